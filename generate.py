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
name of the adapter that answers it ("base": the base), and "output" to compare the answers with. Several adapters
share the one base and every batch (generation.AdapterBank); an adapter file says its own K, L and image width.
"""
import functools
import json
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import checkpoint
import cli
import generation
import lladapter


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


# One instruction to answer: its input, its image feature (a .npy file or the vector itself), the name of the adapter
# that answers it ("base": the base model alone), and the answer a record expects (--compare counts matches)
Job = namedtuple("Job", "instruction input image adapter expected", defaults=("", None, "base", None))

cli.exit_on_input_error()  # Ctrl-C: "nothing was written" (--out is written whole, at the end)
args = cli.parse(Settings, __doc__)
device = cli.device_of(args.device)
if device.type == "cuda":  # this GPU, not GPU 0, for the dtype, the free memory and every kernel
    torch.cuda.set_device(device)
if not args.ckpt_dir:  # the walkthrough's base, adapter and held-out questions (walkthrough/world.py)
    from walkthrough import world as walkthrough
    args = walkthrough.generate_preset(args, functools.partial(cli.parse, Settings, __doc__))
for key in ("max_batch_size", "max_seq_len"):
    cli.require(getattr(args, key) >= 0, f"--{key}={getattr(args, key)}: must not be negative")
cli.require(args.max_gen_len > 0, f"--max_gen_len={args.max_gen_len}: must be positive")
cli.require(args.temperature >= 0 and 0 < args.top_p <= 1, f"--temperature={args.temperature} --top_p={args.top_p}: "
            f"need temperature >= 0 and 0 < top_p <= 1")

# Adapter files by name: NAME=PATH, or the file's stem (its folder's name for train.py's adapter.pth, or a PEFT folder's)
adapter_paths = {}
for spec in args.adapter:
    name, _, path = spec.rpartition("=")
    path = Path(path)
    name = name or (path.parent.name if path.name == "adapter.pth" else path.stem if path.suffix else path.name)
    cli.require(name not in adapter_paths and name != "base", f"--adapter={spec}: the name {name!r} is taken; give NAME=PATH")
    adapter_paths[name] = path

# The jobs. A prompt that names no adapter gets the one given, or the base when none is; with several, each record
# names its own, or --compare asks each. An image on the command line is a path from here; in a file, from its folder.
image = str(Path(args.image).resolve()) if args.image else None
default = next(iter(adapter_paths)) if len(adapter_paths) == 1 else None if adapter_paths else "base"
jobs = [Job(p, args.input, image, default) for p in args.prompt]
if args.prompts_file:
    path = Path(args.prompts_file)
    if path.suffix in (".json", ".jsonl"):
        for i, r in enumerate(cli.read_records(path)):
            cli.require(isinstance(r.get("instruction"), str) and all(isinstance(r.get(k, ""), str) for k in
                        ("input", "adapter", "output")), f"{cli.record_at(path, i)}: expected strings: "
                                                         f"'instruction' (and 'input', 'adapter', 'output')")
            name = r.get("adapter", default)
            cli.require(name in ("base", *adapter_paths, None), f"{cli.record_at(path, i)}: no --adapter named "
                                                                f"{name!r} (given: {', '.join(adapter_paths) or 'none'})")
            feature = str(path.parent / r["image"]) if isinstance(r.get("image"), str) else r.get("image", image)
            jobs.append(Job(r["instruction"], r.get("input", ""), feature, name, r.get("output")))
    else:
        jobs += [Job(line, "", image, default) for line in cli.read_text(path).splitlines() if line.strip()]
cli.require(jobs or args.show_gates or args.interactive, "nothing to answer: give --prompt=..., --prompts_file=... or "
                                                           "--interactive")
cli.require(args.compare or (all(job.adapter for job in jobs) and (default or not args.interactive)),
            "several adapters: give --compare, or name each record's adapter (\"adapter\": NAME in --prompts_file)")
cli.require(not args.show_gates or adapter_paths, "--show_gates: give the --adapter whose gates to show")
out_path = Path(args.out) if args.out else None
cli.require(out_path is None or out_path.parent.is_dir(), f"--out={args.out}: no folder {out_path and out_path.parent}")

# The base, with one adapter loaded into it the ordinary way; or several (or one beside the base) in an AdapterBank
use_bank = args.compare or len(adapter_paths) > 1 or any(job.adapter != default for job in jobs)
settings = {k: getattr(args, k) for k in checkpoint.ADAPTER_FIELDS if getattr(args, k)}  # to agree with the files
single = None if use_bank else adapter_paths.get(default)  # the one adapter file loaded into the model
model, tokenizer = checkpoint.load_llama(args.ckpt_dir, args.tokenizer_path or None, single, device=device,
                                         dtype=cli.dtype_of(args.dtype, device), quantize=args.quantize,
                                         **(settings if single else {"adapter_layer": 0}),
                                         **({"max_seq_len": args.max_seq_len} if args.max_seq_len else {}))
bank = None
if use_bank and adapter_paths:
    adapters = {name: checkpoint.read_adapter(path, vars(model.args), settings) for name, path in adapter_paths.items()}
    cli.require(not any(a.image_dim for a in adapters.values()), "an image adapter answers alone (its prompts depend "
                "on each row's image): give it as the only --adapter, without --compare")
    bank = generation.AdapterBank(model, adapters)
    gates_shown = {name: a.tensors for name, a in adapters.items()} if args.show_gates else {}
    print(f"[{len(adapters)} adapter{'s' * (len(adapters) > 1)} beside the base model, in one batch: the prompts' "
          f"keys and values {len(adapters) * bank.nbytes_per_row / 2**20:.2f} MiB, {bank.nbytes_per_row / 2**20:.3f} "
          f"MiB each]", file=sys.stderr)
    del adapters  # what decoding needs is in the bank: the files' tensors go (but for --show_gates's)
else:
    gates_shown = {default: lladapter.adapter_state_dict(model)} if single else {}
# A response ends at any of the model's stop ids (Llama 3 instruct: 128001, 128008, 128009), or at its template's end
stop_ids = tokenizer.stop_ids | {lladapter.response_end_id(tokenizer, args.template)}


def heatmap(name, tensors):
    """An adapter's |tanh(gate)|: a row of shaded characters per adapted layer, one per head; darker is wider open."""
    gates = {int(k.split(".")[1]): torch.tanh(v).abs().flatten().tolist() for k, v in tensors.items() if "gate" in k}
    shades, top = " ░▒▓█", max(max(row) for row in gates.values()) or 1.0
    lines = [f"{name}: |tanh(gate)|, one column per head, one row per adapted layer (the largest is {top:.3f}):"]
    for layer, row in gates.items():
        cells = "".join(shades[min(4, int(np.ceil(4 * v / top)))] for v in row)
        lines.append(f"layer {layer:>3} │{cells}│ mean {np.mean(row):.3f}")
    lines.append("scale: ' ' 0, " + ", ".join(f"{s} up to {top * (i + 1) / 4:.3f}" for i, s in enumerate(shades[1:])))
    return "\n".join(lines)


if args.show_gates:
    print("\n\n".join(heatmap(name, tensors) for name, tensors in gates_shown.items()) + ("\n" if jobs else ""))


def encode(jobs):
    """Token lists and image features (or None) of the jobs, checked against the model."""
    prompts = [lladapter.encode_prompt(tokenizer, job.instruction, job.input, args.template) for job in jobs]
    for job, tokens in zip(jobs, prompts):
        cli.require(len(tokens) < model.args.max_seq_len, f"the prompt {job.instruction[:40]!r}... is {len(tokens)} "
                    f"tokens, over max_seq_len={model.args.max_seq_len}: raise --max_seq_len (up to the model's context)")
    if all(job.image is None for job in jobs):
        return prompts, None
    cli.require(model.args.image_dim, "an image was given, but the adapter is text-only")
    cli.require(all(job.image is not None for job in jobs), "either every prompt has an image or none does")
    images = [cli.load_image_feature(job.image, ".", model.args.image_dim, f"prompt {i}") for i, job in enumerate(jobs)]
    return prompts, torch.stack(images).to(device)


def compared(jobs):  # --compare: every job asked of the base and of each adapter
    return [job._replace(adapter=name) for job in jobs for name in ("base", *adapter_paths)] if args.compare else jobs


jobs = compared(jobs)
encoded = encode(jobs)  # every prompt checked before any is answered
# The cache: as long as the longest prompt and its answer need (one length for every batch: a compiled step compiles
# once), within max_seq_len; --interactive and compiled: 4,096 tokens at most, for a line and its answer.
# --max_batch_size=0: on a GPU as many as 90% of its free memory holds (batch_that_fits).
cache_len = min(model.args.max_seq_len, max(map(len, encoded[0])) + args.max_gen_len if jobs else 4096)
free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" and jobs else float("inf")
max_batch_size = args.max_batch_size or generation.batch_that_fits(model, cache_len or 1, 0.9 * free)
cli.require(max_batch_size > 0, f"the GPU's free memory holds no sequence of {cache_len} tokens with its KV cache: "
                                f"lower --max_gen_len or --max_seq_len, or try --quantize=int8")
generator = torch.Generator(device).manual_seed(args.seed)


def answer(jobs, encoded, stream=False):
    """The responses to `jobs` (encoded: their prompts and images) and the number of new tokens, in batches of
    max_batch_size; with stream, one job's text is printed as it grows."""
    shown, streamed, n_tokens = "", [], 0

    def print_growing_text(new_tokens):  # pieces decode differently alone: decode all so far, print what's new
        nonlocal shown
        streamed.append(new_tokens[0].item())
        text = tokenizer.decode(streamed[:next((i for i, t in enumerate(streamed) if t in stop_ids), len(streamed))])
        print(text[len(shown):], end="", flush=True)
        shown = text

    prompts, images = encoded
    # Batches of similar lengths, so that no batch feeds one long prompt token by token; answers in the jobs' order.
    order = sorted(range(len(jobs)), key=lambda j: len(prompts[j]))
    answers = [None] * len(jobs)
    for i in range(0, len(jobs), max_batch_size):
        batch = order[i:i + max_batch_size]  # job indices
        # Compiled: a short last batch filled up with copies of its last prompt, whose answers are dropped, so that
        # the compiled step keeps its one batch size (another would compile again, and capture another graph).
        filled = batch + batch[-1:] * (max_batch_size - len(batch)) if args.compile and len(jobs) > max_batch_size \
            else batch
        new = generation.generate(model, [prompts[j] for j in filled], args.max_gen_len, args.temperature, args.top_p,
                                  stop_ids, images[filled] if images is not None else None, generator,
                                  on_token=print_growing_text if stream else None, compile=args.compile, bank=bank,
                                  rows=bank and [bank.names.index(jobs[j].adapter) for j in filled],
                                  cache_len=cache_len)
        for j, tokens in zip(batch, new):
            answers[j] = tokenizer.decode(tokens).strip()
        n_tokens += sum(map(len, new[:len(batch)]))  # the filler rows' tokens are not answers
        if len(jobs) > max_batch_size:
            print(f"[{i + len(batch)}/{len(jobs)} answered]", file=sys.stderr, flush=True)
    if stream:
        print()
    return answers, n_tokens


if args.interactive:
    print("Type an instruction and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        asked = compared([Job(line.strip(), args.input, image, default)])
        asked_encoded = encode(asked)
        if args.compile and len(asked_encoded[0][0]) + args.max_gen_len > cache_len:
            print(f"(that line and its answer would pass the compiled cache's {cache_len} tokens)", file=sys.stderr)
            continue
        print("### Response: ", end="", flush=True)
        texts = answer(asked, asked_encoded, stream=len(asked) == 1)[0]
        if len(asked) > 1:  # --compare: the base's and each adapter's, once they are all there
            print("\n" + "\n".join(f"    {job.adapter}: {text!r}" for job, text in zip(asked, texts)))
if not jobs:
    sys.exit(0)

t0 = time.time()
answers, n_new = answer(jobs, encoded, stream=len(jobs) == 1 and not out_path)
elapsed = time.time() - t0
if out_path:  # AlpacaEval's records, the answering adapter their generator; written whole, then renamed
    records = [{"instruction": job.instruction, "input": job.input, "output": text, "generator": job.adapter}
               for job, text in zip(jobs, answers)]
    checkpoint.atomic_save((json.dumps(records, indent=1) if out_path.suffix == ".json" else
                            "".join(json.dumps(r) + "\n" for r in records)).encode(), out_path)
    print(f"wrote {len(answers)} answers to {out_path}", file=sys.stderr)
elif args.compare:  # each prompt's answers side by side, and how many match the expected output where records say
    names = ["base", *adapter_paths]
    for k, job in list(enumerate(jobs))[::len(names)]:
        print(f"### Instruction: {job.instruction}" + (f"  ### Input: {job.input}" if job.input else ""))
        print(*([f"    expected: {job.expected!r}"] if job.expected is not None else []),
              *(f"    {name}: {text!r}" for name, text in zip(names, answers[k:k + len(names)])), sep="\n")
    if any(job.expected is not None for job in jobs):
        matches = [sum(text == job.expected for job, text in zip(jobs[n::len(names)], answers[n::len(names)]))
                   for n in range(len(names))]
        print(f"exact match on these {len(jobs) // len(names)} instructions: " +
              ", ".join(f"{name} {m}" for name, m in zip(names, matches)))
elif len(jobs) > 1:
    for job, text in zip(jobs, answers):
        print(f"### Instruction: {job.instruction}" + (f"\n### Input: {job.input}" if job.input else "") +
              (f"\n### Adapter: {job.adapter}" if use_bank else ""))
        print(f"### Response: {text}\n")
print(f"[{n_new} tokens in {elapsed:.2f}s, {n_new / elapsed:.1f} tok/s, {len(jobs)} answer(s), "
      f"{', '.join(f'adapter {p}' for p in adapter_paths.values()) or 'base model alone'}]", file=sys.stderr)
