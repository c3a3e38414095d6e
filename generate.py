"""
Answer instructions with a base LLaMA plus a trained adapter (or the base alone, to compare).

    python generate.py                   # no arguments: the walkthrough's held-out questions, with and without
                                         # its adapter (run `python train.py` first)
    python generate.py --ckpt_dir=llama/7B --adapter=out/adapter.pth --prompt="Tell me about alpacas."
    python generate.py --ckpt_dir=Llama-2-7b-hf --adapter=out/adapter.pth --interactive    # Hugging Face layout
    python generate.py --ckpt_dir=llama/7B --adapter=out/adapter.pth --prompts_file=alpaca_eval.json \\
        --temperature=0 --out=answers.jsonl
    python generate.py ... --show_gates  # the adapter's tanh(gate) per layer and head, as a heat map

Prompts are wrapped in the training template. --prompts_file holds one instruction per line, or Alpaca-format
records (a JSON list, or JSON Lines in a .jsonl file; with "input", and "image" for image adapters), answered in
batches of --max_batch_size. The adapter file says its own K, L and image width. --help lists every setting.
"""
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import cli
import lladapter
from checkpoint import load_llama
from cli import InputError


@dataclass
class Settings:
    ckpt_dir: str = ""  # base model, Meta's layout or Hugging Face's; empty: the walkthrough's (see train.py)
    tokenizer_path: str = ""  # empty: tokenizer.model or tokenizer.json in ckpt_dir, or tokenizer.model beside it
    adapter: str = ""  # adapter file from train.py; empty: the base model alone
    template: Literal[lladapter.TEMPLATES] = "alpaca"  # the prompt, as in training: alpaca, or llama3 (Llama 3's instruct chat)
    prompt: tuple = ()  # an instruction; repeat --prompt for several
    input: str = ""  # context for the with-input template, for every --prompt
    prompts_file: str = ""  # one instruction per line, or Alpaca-format records (.json list or .jsonl)
    image: str = ""  # a .npy image feature for every prompt (image adapters only)
    interactive: bool = False  # read instructions from standard input, one per line, and answer each
    out: str = ""  # write one JSON line per prompt (instruction, input, output) to this file
    max_gen_len: int = 256  # new tokens at most, per prompt
    max_batch_size: int = 0  # prompts decoded together; 0: 32, or on a GPU as many of 32 as free memory holds
    temperature: float = 0.1  # the paper's; 0 is greedy
    top_p: float = 0.75  # the paper's
    seed: int = 0  # of the sampling, for answers that repeat
    max_seq_len: int = 512  # prompt plus answer, in tokens
    adapter_len: int = 0  # 0: from the adapter file (needed only for an original-layout file whose gates are all zero)
    adapter_layer: int = 0  # 0: from the adapter file (as adapter_len)
    image_dim: int = 0  # 0: from the adapter file
    device: str = ""  # empty: cuda if available, else cpu
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # the base's weights: auto is bf16 on a GPU that has it natively, else fp16; fp32 on a CPU
    quantize: Literal["", "int8"] = ""  # int8: the base's block matrices and output head int8, a scale per row (half of bf16's memory)
    compile: bool = False  # decode with a compiled one-token step (CUDA graphs on a GPU): the same tokens, less overhead
    show_gates: bool = False  # print the adapter's tanh(gate) as a layers x heads heat map


cli.exit_on_input_error()
args = cli.parse(Settings, __doc__)
walkthrough = None
if not args.ckpt_dir:  # the walkthrough's model and adapter, on some of the instructions it never trained on
    from walkthrough import world as walkthrough
    args, heldout = walkthrough.generate_preset(args, functools.partial(cli.parse, Settings, __doc__))
cli.require(args.max_batch_size >= 0, f"--max_batch_size={args.max_batch_size}: must not be negative")
for key in ("max_gen_len", "max_seq_len"):
    cli.require(getattr(args, key) > 0, f"--{key}={getattr(args, key)}: must be positive")
cli.require(args.temperature >= 0 and 0 < args.top_p <= 1, f"--temperature={args.temperature} --top_p={args.top_p}: "
            f"need temperature >= 0 and 0 < top_p <= 1")
cli.require(not args.device.startswith("cuda") or torch.cuda.is_available(), f"--device={args.device}: no CUDA device here")
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
if device.startswith("cuda"):  # this GPU, not GPU 0, for the dtype, the free memory and every kernel
    torch.cuda.set_device(device)
base_dtype = cli.dtype_of(args.dtype, device)


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


# prompts: (instruction, input, image feature or None). A feature named on the command line is a path from here; one
# named in a prompts file, a path from that file's folder.
image = str(Path(args.image).resolve()) if args.image else None
jobs = [(p, args.input, image) for p in args.prompt]
if walkthrough and not jobs and not args.prompts_file and not args.interactive:
    jobs = [(r["instruction"], r["input"], None) for r in heldout]
if args.prompts_file:
    path = Path(args.prompts_file)
    if path.suffix in (".json", ".jsonl"):
        for i, r in enumerate(cli.read_records(path)):
            if not isinstance(r.get("instruction"), str) or not isinstance(r.get("input", ""), str):
                raise InputError(f"{path}: record {i}: expected a string 'instruction' (and optional 'input')")
            feature = r.get("image", image)
            jobs.append((r["instruction"], r.get("input", ""),
                         str(path.parent / feature) if isinstance(feature, str) and "image" in r else feature))
    else:
        jobs += [(line, "", image) for line in cli.read_text(path).splitlines() if line.strip()]
if not jobs and not args.show_gates and not args.interactive:
    raise InputError("nothing to answer: give --prompt=..., --prompts_file=... or --interactive")
out_path = Path(args.out) if args.out else None
cli.require(out_path is None or out_path.parent.is_dir(), f"--out={args.out}: no folder {out_path and out_path.parent}")

given = {"adapter_len": args.adapter_len, "adapter_layer": args.adapter_layer, "image_dim": args.image_dim}
model, tokenizer = load_llama(args.ckpt_dir, args.tokenizer_path or None, args.adapter or None, device=device,
                              dtype=base_dtype, max_seq_len=args.max_seq_len, quantize=args.quantize,
                              **({k: v for k, v in given.items() if v} if args.adapter else {"adapter_layer": 0}))
model_device = model.tok_embeddings.weight.device
# A response ends at any of the model's stop ids (Llama 3 instruct: 128001, 128008, 128009), or at its template's end
stop_ids = tokenizer.stop_ids | {lladapter.response_end_id(tokenizer, args.template)}


# --max_batch_size=0: on a GPU as many as 90% of its free memory holds (lladapter.batch_that_fits says what it counts)
free = torch.cuda.mem_get_info(model_device)[0] if model_device.type == "cuda" else float("inf")
max_batch_size = args.max_batch_size or lladapter.batch_that_fits(model, args.max_seq_len, 0.9 * free)
cli.require(max_batch_size > 0, f"the GPU's free memory holds no sequence of max_seq_len={args.max_seq_len} with its "
                                f"KV cache: lower --max_seq_len, or try --quantize=int8")
if args.show_gates:
    if not args.adapter:
        raise InputError("--show_gates needs an --adapter")
    print(heatmap({i: torch.tanh(layer.attention.gate).flatten().tolist()
                   for i, layer in enumerate(model.layers) if i >= model.first_adapted}))


def encode(jobs):
    """Token lists and image features (or None) of (instruction, input, image) jobs, checked against the model."""
    prompts = [lladapter.encode_prompt(tokenizer, instruction, context, args.template) for instruction, context, _ in jobs]
    for (instruction, _, _), tokens in zip(jobs, prompts):
        if len(tokens) >= args.max_seq_len:
            raise InputError(f"the prompt {instruction[:40]!r}... is {len(tokens)} tokens, over max_seq_len="
                             f"{args.max_seq_len}")
    if all(feature is None for _, _, feature in jobs):
        return prompts, None
    if not model.args.image_dim:
        raise InputError("an image was given, but the adapter is text-only")
    if any(feature is None for _, _, feature in jobs):
        raise InputError("either every prompt has an image or none does")
    images = [cli.load_image_feature(f, ".", model.args.image_dim, f"prompt {i}") for i, (_, _, f) in enumerate(jobs)]
    return prompts, torch.stack(images).to(model_device)


def answer(jobs, stream=False):
    """The responses to `jobs` and their token count, in batches of max_batch_size; with stream, one job's text is
    printed as it grows."""
    shown, streamed, n_tokens = "", [], 0

    def print_growing_text(new_tokens):  # pieces decode differently alone: decode all so far, print what's new
        nonlocal shown
        streamed.append(new_tokens[0].item())
        end = next((i for i, t in enumerate(streamed) if t in stop_ids), len(streamed))
        text = tokenizer.decode(streamed[:end])
        print(text[len(shown):], end="", flush=True)
        shown = text

    prompts, images = encode(jobs)  # every prompt checked before any is answered
    # Batches of similar lengths, so that no batch feeds one long prompt token by token; answers in the jobs' order.
    order = sorted(range(len(jobs)), key=lambda j: len(prompts[j]))
    answers = [None] * len(jobs)
    for i in range(0, len(jobs), max_batch_size):
        batch = order[i:i + max_batch_size]
        # Compiled: a short last batch filled up with copies of its last prompt, whose answers are dropped, so that
        # the compiled step keeps its one batch size (another would compile again, and capture another graph).
        rows = batch + batch[-1:] * (max_batch_size - len(batch)) if args.compile and len(jobs) > max_batch_size else batch
        new = lladapter.generate(model, [prompts[j] for j in rows], args.max_gen_len, args.temperature, args.top_p,
                                 stop_ids, images[rows] if images is not None else None, generator,
                                 on_token=print_growing_text if stream else None, compile=args.compile)
        for j, tokens in zip(batch, new):
            answers[j] = tokenizer.decode(tokens).strip()
        n_tokens += sum(map(len, new))
        if len(jobs) > max_batch_size:
            print(f"[{i + len(batch)}/{len(jobs)} answered]", file=sys.stderr, flush=True)
    if stream:
        print()
    return answers, n_tokens


generator = torch.Generator(model_device).manual_seed(args.seed)
if args.interactive:
    print("Type an instruction and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        print("### Response: ", end="", flush=True)
        answer([(line.strip(), args.input, image)], stream=True)
if not jobs:
    sys.exit(0)

t0 = time.time()
answers, n_new = answer(jobs, stream=len(jobs) == 1 and not out_path)
elapsed = time.time() - t0
if out_path:  # written whole under a temporary name, then renamed
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for (instruction, context, _), text in zip(jobs, answers):
            f.write(json.dumps({"instruction": instruction, "input": context, "output": text}) + "\n")
    os.replace(tmp, out_path)
    print(f"wrote {len(answers)} answers to {out_path}", file=sys.stderr)
elif walkthrough and not args.prompt and not args.prompts_file:  # with and without the adapter, side by side
    with lladapter.gates_closed(model):  # exactly the base model (the paper's zero-init property)
        generator.manual_seed(args.seed)
        base_answers, _ = answer(jobs)
    for record, with_adapter, base in zip(heldout, answers, base_answers):
        print(f"### Instruction: {record['instruction']}" + (f"  ### Input: {record['input']}" if record["input"] else ""))
        print(f"    expected: {record['output']!r}\n    base alone: {base!r}\n    with the adapter: {with_adapter!r}")
    print(f"exact match on these {len(heldout)} held-out instructions: base alone "
          f"{sum(a == r['output'] for a, r in zip(base_answers, heldout))}, with the adapter "
          f"{sum(a == r['output'] for a, r in zip(answers, heldout))}")
elif len(jobs) > 1:
    for (instruction, context, _), text in zip(jobs, answers):
        print(f"### Instruction: {instruction}" + (f"\n### Input: {context}" if context else ""))
        print(f"### Response: {text}\n")
print(f"[{n_new} tokens in {elapsed:.2f}s, {n_new / elapsed:.1f} tok/s, {len(jobs)} prompt(s), "
      f"{'adapter ' + args.adapter if args.adapter else 'base model alone'}]", file=sys.stderr)
