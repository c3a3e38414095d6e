"""
Answer instructions with a base LLaMA plus a trained adapter (or the base alone, to compare).

    python generate.py                   # no arguments: the walkthrough's held-out questions, with and without
                                         # its adapter (run `python train.py` first)
    python generate.py --ckpt_dir=llama/7B --adapter=out/adapter.pth --prompt="Tell me about alpacas."
    python generate.py --ckpt_dir=llama/7B --adapter=out/adapter.pth --prompts_file=questions.txt --temperature=0
    python generate.py ... --show_gates  # the adapter's tanh(gate) per layer and head, as a heat map

Prompts are wrapped in the training template. --prompts_file holds one instruction per line, or an Alpaca JSON
list (with "input", and "image" for image adapters). Override any setting below as --key=value.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lladapter
from lladapter import InputError

ckpt_dir = ""  # base model in Meta's layout; empty: the walkthrough's (see train.py)
tokenizer_path = ""  # empty: tokenizer.model in ckpt_dir or beside it
adapter = ""  # adapter file from train.py; empty: the base model alone
prompt = []  # an instruction; repeat --prompt for several
input = ""  # context for the with-input template, for every --prompt
prompts_file = ""  # one instruction per line, or an Alpaca-format JSON list
image = ""  # a .npy image feature for every prompt (image adapters only)
max_gen_len = 256  # new tokens at most, per prompt
temperature = 0.1  # the paper's; 0 is greedy
top_p = 0.75  # the paper's
seed = 0
max_seq_len = 512
adapter_len = 10  # must match the adapter's training
adapter_layer = 30
image_dim = 0
device = ""  # empty: cuda if available, else cpu
show_gates = False  # print the adapter's tanh(gate) as a layers x heads heat map
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}

lladapter.exit_on_input_error()
overrides = lladapter.parse_overrides(settings, sys.argv[1:])
walkthrough = not overrides.get("ckpt_dir", ckpt_dir)
if walkthrough:  # the walkthrough's model and adapter, on some of the instructions it never trained on
    from data import walkthrough as wt
    found = wt.paths(wt.SETTINGS["out_dir"])
    if not Path(found["adapter_path"]).is_file():
        raise InputError(f"no walkthrough adapter at {found['adapter_path']}: run `python train.py` first")
    heldout = wt.heldout_examples(found["heldout_path"], 8)
    settings.update({k: wt.SETTINGS[k] for k in ("adapter_len", "adapter_layer", "max_seq_len")},
                    ckpt_dir=found["ckpt_dir"], adapter=found["adapter_path"], temperature=0.0)
settings.update(overrides)
globals().update(settings)


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


# prompts: (instruction, input, image feature or None)
jobs = [(p, input, image or None) for p in prompt]
if walkthrough and not jobs and not prompts_file:
    jobs = [(r["instruction"], r["input"], None) for r in heldout]
if prompts_file:
    path = Path(prompts_file)
    if not path.is_file():
        raise InputError(f"{path}: no such prompts file")
    if path.suffix == ".json":
        try:
            jobs += [(r["instruction"], r.get("input", ""), r.get("image")) for r in json.loads(path.read_text())]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{path}: expected an Alpaca-format JSON list of records with 'instruction' ({e})") from None
    else:
        jobs += [(line, "", image or None) for line in path.read_text().splitlines() if line.strip()]
if not jobs and not show_gates:
    raise InputError("nothing to answer: give --prompt=... or --prompts_file=...")

model, tokenizer = lladapter.load_llama(ckpt_dir, tokenizer_path or None, adapter or None, device=device or None,
                                        max_seq_len=max_seq_len, adapter_len=adapter_len,
                                        adapter_layer=adapter_layer if adapter else 0, image_dim=image_dim)
if show_gates:
    if not adapter:
        raise InputError("--show_gates needs an --adapter")
    print(heatmap({i: torch.tanh(layer.attention.gate).flatten().tolist()
                   for i, layer in enumerate(model.layers) if i >= model.first_adapted}))
if not jobs:
    sys.exit(0)

prompts = [tokenizer.encode(lladapter.format_prompt(instruction, context), bos=True, eos=False)
           for instruction, context, _ in jobs]
for (instruction, _, _), tokens in zip(jobs, prompts):
    if len(tokens) >= max_seq_len:
        raise InputError(f"the prompt {instruction[:40]!r}... is {len(tokens)} tokens, over max_seq_len={max_seq_len}")
images = None
if any(feature is not None for _, _, feature in jobs):
    if not image_dim:
        raise InputError("an image was given, but the adapter is text-only (set --image_dim for an image adapter)")
    if any(feature is None for _, _, feature in jobs):
        raise InputError("either every prompt has an image or none does")
    base_dir = Path(prompts_file).parent if prompts_file else Path(".")
    images = torch.stack([lladapter.load_image_feature(f, base_dir, image_dim, f"prompt {i}")
                          for i, (_, _, f) in enumerate(jobs)]).to(model.tok_embeddings.weight.device)


def stream(new_tokens):  # one prompt: print the text as it grows (pieces decode differently alone)
    global shown
    streamed.append(new_tokens[0].item())
    text = tokenizer.decode(streamed[:streamed.index(tokenizer.eos_id)] if tokenizer.eos_id in streamed else streamed)
    print(text[len(shown):], end="", flush=True)
    shown = text


def answer():
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    new = lladapter.generate(model, prompts, max_gen_len, temperature, top_p, tokenizer.eos_id, images, generator,
                             on_token=stream if len(jobs) == 1 else None)
    return [tokenizer.decode(tokens).strip() for tokens in new], sum(map(len, new))


streamed, shown = [], ""
t0 = time.time()
answers, n_new = answer()
elapsed = time.time() - t0
if len(jobs) == 1:
    print()
elif walkthrough and not prompt and not prompts_file:  # with and without the adapter, side by side
    with lladapter.gates_closed(model):  # exactly the base model (the paper's zero-init property)
        base_answers, _ = answer()
    for record, with_adapter, base in zip(heldout, answers, base_answers):
        print(f"### Instruction: {record['instruction']}" + (f"  ### Input: {record['input']}" if record["input"] else ""))
        print(f"    expected: {record['output']!r}\n    base alone: {base!r}\n    with the adapter: {with_adapter!r}")
    print(f"exact match on these {len(heldout)} held-out instructions: base alone "
          f"{sum(a == r['output'] for a, r in zip(base_answers, heldout))}, with the adapter "
          f"{sum(a == r['output'] for a, r in zip(answers, heldout))}")
else:
    for (instruction, context, _), text in zip(jobs, answers):
        print(f"### Instruction: {instruction}" + (f"\n### Input: {context}" if context else ""))
        print(f"### Response: {text}\n")
print(f"[{n_new} tokens in {elapsed:.2f}s, {n_new / elapsed:.1f} tok/s, {len(jobs)} prompt(s), "
      f"{'adapter ' + adapter if adapter else 'base model alone'}]", file=sys.stderr)
