"""
Answer instructions with a base LLaMA and its adapters: one, several side by side, or none (the base alone).

    python generate.py                   # no arguments: the walkthrough's held-out questions, answered by the base
                                         # and by its adapter side by side (run `python train.py` first)
    python generate.py --ckpt_dir=llama/7B --adapter=out/alpaca/adapter.pth --prompt="Tell me about alpacas."
    python generate.py --ckpt_dir=Llama-2-7b-hf --adapter=out/alpaca/adapter.pth --interactive   # Hugging Face's layout
    python generate.py --ckpt_dir=llama/7B --adapter=out/alpaca/adapter.pth --prompts_file=alpaca_eval.json \\
        --temperature=0 --out=answers.json                                  # the list AlpacaEval reads
    python generate.py --ckpt_dir=llama/7B --adapter=a.pth --adapter=b=other.pth --compare --prompt="Hi"  # side by side
    python generate.py --ckpt_dir=Llama-2-7b-hf --adapter=peft_adapter/ --prompt="Hi"  # a PEFT adaption_prompt folder
    python generate.py ... --show_gates  # the adapter's tanh(gate) per layer and head, as a heat map

Prompts are wrapped in the training template. --prompts_file holds one instruction per line, or Alpaca-format records
(a JSON list, or JSON Lines in a .jsonl file), each with "input" if any, "image" for an image adapter, "adapter": the
name of the adapter that answers it ("base" or none: the base), and "output" to compare the answers with. They are
answered in batches of --max_batch_size. Several adapters share the one base in memory and every batch: each row
attends to its own adapter's prompts (lladapter.AdapterBank). An adapter file says its own K, L and image width.
"""
import functools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import checkpoint
import cli
import lladapter
from cli import InputError


@dataclass
class Settings:
    ckpt_dir: str = ""  # base model, Meta's layout or Hugging Face's; empty: the walkthrough's (see train.py)
    tokenizer_path: str = ""  # empty: tokenizer.model or tokenizer.json in ckpt_dir, or tokenizer.model beside it
    adapter: tuple = ()  # a train.py adapter file, or a PEFT adaption_prompt folder; NAME=PATH names it; repeatable
    compare: bool = False  # answer every prompt with the base and with each adapter, side by side, in one batch
    template: Literal[lladapter.TEMPLATES] = "alpaca"  # the prompt, as in training: alpaca, or llama3 (its chat format)
    prompt: tuple = ()  # an instruction; repeat --prompt for several
    input: str = ""  # context for the with-input template, for every --prompt
    prompts_file: str = ""  # one instruction per line, or Alpaca-format records (.json list or .jsonl)
    image: str = ""  # a .npy image feature for every prompt (image adapters only)
    interactive: bool = False  # read instructions from standard input, one per line, and answer each
    out: str = ""  # the answers: a .json file gets the list AlpacaEval reads, any other one JSON line per answer
    max_gen_len: int = 256  # new tokens at most, per prompt
    max_batch_size: int = 0  # prompts decoded together; 0: 32, or on a GPU as many of 32 as free memory holds
    temperature: float = 0.1  # the paper's; 0 is greedy
    top_p: float = 0.75  # the paper's
    seed: int = 0  # of the sampling, for answers that repeat
    max_seq_len: int = 0  # prompt plus answer, in tokens; 0: the model's own context (its config.json or params.json)
    adapter_len: int = 0  # 0: from the adapter file (needed only for an original-layout file whose gates are all zero)
    adapter_layer: int = 0  # 0: from the adapter file (as adapter_len)
    image_dim: int = 0  # 0: from the adapter file
    device: str = ""  # empty: cuda if available, else cpu
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # the base; auto: bf16 from compute 8.0, fp16 below, CPU fp32
    quantize: Literal["", "int8"] = ""  # int8: the base's matrices int8, a scale per row (half of bf16's memory)
    compile: bool = False  # decode with a compiled one-token step (CUDA graphs on a GPU): the same tokens, faster
    show_gates: bool = False  # print the adapter's tanh(gate) as a layers x heads heat map


cli.exit_on_input_error()
args = cli.parse(Settings, __doc__)
if not args.ckpt_dir:  # the walkthrough's base, adapter and held-out questions (walkthrough/world.py)
    from walkthrough import world as walkthrough
    args = walkthrough.generate_preset(args, functools.partial(cli.parse, Settings, __doc__))
for key in ("max_batch_size", "max_seq_len"):
    cli.require(getattr(args, key) >= 0, f"--{key}={getattr(args, key)}: must not be negative")
cli.require(args.max_gen_len > 0, f"--max_gen_len={args.max_gen_len}: must be positive")
cli.require(args.temperature >= 0 and 0 < args.top_p <= 1, f"--temperature={args.temperature} --top_p={args.top_p}: "
            f"need temperature >= 0 and 0 < top_p <= 1")
cli.require(not args.device.startswith("cuda") or torch.cuda.is_available(), f"--device={args.device}: no CUDA device here")
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if device.startswith("cuda"):  # this GPU, not GPU 0, for the dtype, the free memory and every kernel
    torch.cuda.set_device(device)

# Adapters by name: NAME=PATH, or the file's stem (its folder's name for train.py's adapter.pth, or a PEFT folder's)
adapters = {}
for spec in args.adapter:
    name, _, path = spec.rpartition("=")
    path = Path(path)
    name = name or (path.parent.name if path.name == "adapter.pth" else path.stem if path.suffix else path.name)
    cli.require(name not in adapters and name != "base", f"--adapter={spec}: the name {name!r} is taken; give NAME=PATH")
    adapters[name] = path

# Jobs: (instruction, input, image feature or None, the name of the adapter that answers it, "base" for the base,
# the expected output or None). A feature named on the command line is a path from here; in a file, from its folder.
image = str(Path(args.image).resolve()) if args.image else None
only = next(iter(adapters)) if len(adapters) == 1 else None if adapters else "base"  # answers a job naming none
jobs = [(p, args.input, image, only, None) for p in args.prompt]
if args.prompts_file:
    path = Path(args.prompts_file)
    if path.suffix in (".json", ".jsonl"):
        for i, r in enumerate(cli.read_records(path)):
            cli.require(isinstance(r.get("instruction"), str) and all(isinstance(r.get(k, ""), str) for k in
                        ("input", "adapter", "output")), f"{path}: record {i}: expected strings: 'instruction' (and "
                                                         f"'input', 'adapter', 'output')")
            name = r.get("adapter", only)
            cli.require(name in ("base", *adapters, None), f"{path}: record {i}: no --adapter named {name!r} (given: "
                                                           f"{', '.join(adapters) or 'none'})")
            feature = str(path.parent / r["image"]) if isinstance(r.get("image"), str) else r.get("image", image)
            jobs.append((r["instruction"], r.get("input", ""), feature, name, r.get("output")))
    else:
        jobs += [(line, "", image, only, None) for line in cli.read_text(path).splitlines() if line.strip()]
cli.require(jobs or args.show_gates or args.interactive, "nothing to answer: give --prompt=..., --prompts_file=... or "
                                                           "--interactive")
cli.require(args.compare or all(job[3] for job in jobs) and (only or not args.interactive),
            "several adapters: give --compare, or name each record's adapter (\"adapter\": NAME in --prompts_file)")
out_path = Path(args.out) if args.out else None
cli.require(out_path is None or out_path.parent.is_dir(), f"--out={args.out}: no folder {out_path and out_path.parent}")

# The base, and one adapter loaded into it the ordinary way; or several, or one beside the base, in an AdapterBank
banked = args.compare or len(adapters) > 1 or any(job[3] != only for job in jobs)
given = {k: v for k, v in dict(adapter_len=args.adapter_len, adapter_layer=args.adapter_layer,
                                image_dim=args.image_dim).items() if v}
alone = adapters.get(only) if not banked else None  # the one adapter file, loaded the ordinary way
loaded = given if alone else {"adapter_layer": 0}
if args.max_seq_len:  # else the model's own context
    loaded["max_seq_len"] = args.max_seq_len
model, tokenizer = checkpoint.load_llama(args.ckpt_dir, args.tokenizer_path or None, alone, device=device,
                                         dtype=cli.dtype_of(args.dtype, device), quantize=args.quantize, **loaded)
model_device = model.tok_embeddings.weight.device
bank = None
if banked:
    states = {}
    for name, path in adapters.items():
        state = checkpoint.read_adapter(path, vars(model.args))  # read once: what it is, then its tensors
        found = checkpoint.adapter_args(path, vars(model.args), given, state)
        cli.require(not found["image_dim"], f"{path}: an image adapter answers alone (its prompts depend on each "
                                            f"row's image): give it as the only --adapter, without --compare")
        states[name] = checkpoint.adapter_state(path, replace(model.args, **found), state=state)
    bank = lladapter.AdapterBank(model, states)
    print(f"[{len(adapters)} adapter(s) on one base: their prompts' keys and values {bank.nbytes / 2**20:.2f} MiB, "
          f"{bank.nbytes / len(bank.names) / 2**20:.3f} MiB per adapter]", file=sys.stderr)
# A response ends at any of the model's stop ids (Llama 3 instruct: 128001, 128008, 128009), or at its template's end
stop_ids = tokenizer.stop_ids | {lladapter.response_end_id(tokenizer, args.template)}


def heatmap(gates):
    """Rows of shaded characters, one per adapted layer, two per head; darker is a wider-open gate."""
    shades = " ░▒▓█"
    top = max(max(abs(v) for v in row) for row in gates.values()) or 1.0
    lines = [f"|tanh(gate)| per head (columns) and layer (rows); ' ' = 0, █ up to {top:.3f}, the largest:"]
    for layer, row in gates.items():
        cells = "".join(shades[min(4, int(np.ceil(4 * abs(v) / top)))] * 2 for v in row)
        lines.append(f"layer {layer:>3} │{cells}│ mean {np.mean(np.abs(row)):.3f}")
    lines.append("scale: " + "  ".join(f"{s}≤{top * (i + 1) / 4:.3f}" for i, s in enumerate(shades[1:])))
    return "\n".join(lines)


if args.show_gates:
    cli.require(alone, "--show_gates needs one --adapter, without --compare")
    print(heatmap({i: torch.tanh(layer.attention.gate).flatten().tolist()
                   for i, layer in enumerate(model.layers) if i >= model.first_adapted}))


def encode(jobs):
    """Token lists and image features (or None) of the jobs, checked against the model."""
    prompts = [lladapter.encode_prompt(tokenizer, job[0], job[1], args.template) for job in jobs]
    for job, tokens in zip(jobs, prompts):
        if len(tokens) >= model.args.max_seq_len:
            raise InputError(f"the prompt {job[0][:40]!r}... is {len(tokens)} tokens, over max_seq_len="
                             f"{model.args.max_seq_len}: raise --max_seq_len (up to the model's context)")
    if all(job[2] is None for job in jobs):
        return prompts, None
    cli.require(model.args.image_dim, "an image was given, but the adapter is text-only")
    cli.require(all(job[2] is not None for job in jobs), "either every prompt has an image or none does")
    images = [cli.load_image_feature(job[2], ".", model.args.image_dim, f"prompt {i}") for i, job in enumerate(jobs)]
    return prompts, torch.stack(images).to(model_device)


def answer(jobs, encoded, stream=False):
    """The responses to `jobs` (encoded: their prompts and images) and their token count, in batches of
    max_batch_size; with stream, one job's text is printed as it grows."""
    shown, streamed, n_tokens = "", [], 0

    def print_growing_text(new_tokens):  # pieces decode differently alone: decode all so far, print what's new
        nonlocal shown
        streamed.append(new_tokens[0].item())
        end = next((i for i, t in enumerate(streamed) if t in stop_ids), len(streamed))
        text = tokenizer.decode(streamed[:end])
        print(text[len(shown):], end="", flush=True)
        shown = text

    prompts, images = encoded
    # Batches of similar lengths, so that no batch feeds one long prompt token by token; answers in the jobs' order.
    order = sorted(range(len(jobs)), key=lambda j: len(prompts[j]))
    answers = [None] * len(jobs)
    for i in range(0, len(jobs), max_batch_size):
        batch = order[i:i + max_batch_size]
        # Compiled: a short last batch filled up with copies of its last prompt, whose answers are dropped, so that
        # the compiled step keeps its one batch size (another would compile again, and capture another graph).
        filled = args.compile and len(jobs) > max_batch_size
        rows = batch + batch[-1:] * (max_batch_size - len(batch)) if filled else batch
        new = lladapter.generate(model, [prompts[j] for j in rows], args.max_gen_len, args.temperature, args.top_p,
                                 stop_ids, images[rows] if images is not None else None, generator,
                                 on_token=print_growing_text if stream else None, compile=args.compile, bank=bank,
                                 rows=bank and [bank.names.index(jobs[j][3]) for j in rows],
                                 cache_len=cache_len)
        for j, tokens in zip(batch, new):
            answers[j] = tokenizer.decode(tokens).strip()
        n_tokens += sum(map(len, new))
        if len(jobs) > max_batch_size:
            print(f"[{i + len(batch)}/{len(jobs)} answered]", file=sys.stderr, flush=True)
    if stream:
        print()
    return answers, n_tokens


def compared(jobs):  # --compare: every job asked of the base and of each adapter
    return [(*job[:3], name, job[4]) for job in jobs for name in ("base", *adapters)] if args.compare else jobs


jobs = compared(jobs)
encoded = encode(jobs)  # every prompt checked before any is answered
# The cache: as long as the longest prompt and its answer need (one length for every batch: a compiled step compiles
# once), within max_seq_len. --max_batch_size=0: on a GPU as many as 90% of its free memory holds (batch_that_fits).
# (--interactive: the cache each line needs; compiled, a static one of up to 4,096 tokens, for a line and its answer.)
cache_len = min(model.args.max_seq_len, max(map(len, encoded[0])) + args.max_gen_len if jobs else 4096)
free = torch.cuda.mem_get_info(model_device)[0] if model_device.type == "cuda" and jobs else float("inf")
max_batch_size = args.max_batch_size or lladapter.batch_that_fits(model, cache_len or 1, 0.9 * free)
cli.require(max_batch_size > 0, f"the GPU's free memory holds no sequence of {cache_len} tokens with its KV cache: "
                                f"lower --max_gen_len or --max_seq_len, or try --quantize=int8")
generator = torch.Generator(model_device).manual_seed(args.seed)
if args.interactive:
    print("Type an instruction and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        asked = compared([(line.strip(), args.input, image, only, None)])
        asked_encoded = encode(asked)
        if args.compile and len(asked_encoded[0][0]) + args.max_gen_len > cache_len:
            print(f"(that line and its answer would pass the compiled cache's {cache_len} tokens)", file=sys.stderr)
            continue
        print("### Response: ", end="", flush=True)
        texts = answer(asked, asked_encoded, stream=len(asked) == 1)[0]
        if len(asked) > 1:  # --compare: the base's and each adapter's, once they are all there
            print("\n" + "\n".join(f"    {job[3]}: {text!r}" for job, text in zip(asked, texts)))
if not jobs:
    sys.exit(0)

t0 = time.time()
answers, n_new = answer(jobs, encoded, stream=len(jobs) == 1 and not out_path)
elapsed = time.time() - t0
if out_path:  # AlpacaEval's records, the answering adapter their generator; written whole, then renamed
    records = [{"instruction": job[0], "input": job[1], "output": text, "generator": job[3]}
               for job, text in zip(jobs, answers)]
    checkpoint.atomic_save((json.dumps(records, indent=1) if out_path.suffix == ".json" else
                            "".join(json.dumps(r) + "\n" for r in records)).encode(), out_path)
    print(f"wrote {len(answers)} answers to {out_path}", file=sys.stderr)
elif args.compare:  # each prompt's answers side by side, and how many match the expected output where records say
    names = ["base", *adapters]
    for k in range(0, len(jobs), len(names)):
        job = jobs[k]
        print(f"### Instruction: {job[0]}" + (f"  ### Input: {job[1]}" if job[1] else ""))
        print(*([f"    expected: {job[4]!r}"] if job[4] is not None else []),
              *(f"    {name}: {text!r}" for name, text in zip(names, answers[k:k + len(names)])), sep="\n")
    if any(job[4] is not None for job in jobs):
        matches = [sum(a == job[4] for job, a in zip(jobs[n::len(names)], answers[n::len(names)])) for n in
                   range(len(names))]
        print(f"exact match on these {len(jobs) // len(names)} instructions: " +
              ", ".join(f"{name} {m}" for name, m in zip(names, matches)))
elif len(jobs) > 1:
    for job, text in zip(jobs, answers):
        print(f"### Instruction: {job[0]}" + (f"\n### Input: {job[1]}" if job[1] else "") +
              (f"\n### Adapter: {job[3]}" if banked else ""))
        print(f"### Response: {text}\n")
print(f"[{n_new} tokens in {elapsed:.2f}s, {n_new / elapsed:.1f} tok/s, {len(jobs)} answer(s), "
      f"{', '.join(f'adapter {p}' for p in adapters.values()) or 'base model alone'}]", file=sys.stderr)
