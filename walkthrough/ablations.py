"""
The paper's ablations in miniature, on the walkthrough's world and base model (walkthrough/world.py).

    python -m walkthrough.ablations            # every variant, a short and a full budget: 11-15 min on 2 cores, before the probes
    python -m walkthrough.ablations --quick    # CI: the smoke walkthrough's base and world, every variant for 2 epochs: 1 min
    python -m walkthrough.ablations --seeds=5  # the gate variants at the full budget over train.py --seed 0..4

Each run is the walkthrough's own adapter training (train.py with the walkthrough's SETTINGS, on its base and its
instructions) with exactly one thing changed:
- how the prompts enter attention, the paper's zero-initialized attention against the alternatives (VARIANTS
  below, applied by train.py --variant): zero_init (the paper), random_init, no_gate and prefix;
- how many of the base's top layers get prompts, L = 1, 2, 3, 4 (train.py --adapter_layer; the paper's
  insertion-layer ablation);
- how many prompts each adapted layer gets, K = 2, 5, 10, 20 (train.py --adapter_len).
The walkthrough itself is K=20, L=4: that run is zero_init's, trained once and shown in every group.

Each configuration trains twice, for a short and for the full budget (see SHORT_BUDGET), one train.py process at a
time on the walkthrough's own CPU threads (walkthrough/world.py THREADS), so that its zero_init run is exactly
`python train.py`'s (--jobs=2: two at a time on one thread each, and other last digits). Each model is probed at
the end of each budget, the gate variants' full runs also on the way (PROBE_STEPS):
- accuracy: the walkthrough's held-out instructions (greedy, exact match);
- retention, what zero-init is there to protect (Sec. 3.2): the base's own pretraining questions ([BOS] "Q: ...\nA:",
  every creature and attribute) answered greedily with the adapter attached, exact match and right value named;
  and KL(base || adapted) in nats per predicted token over the base's pretraining documents ([BOS] doc [EOS]).
Every zero-init run must be exactly the base at step 0 (KL 0, the base's answers): the command fails otherwise.
Prints the tables and two text charts, and writes out_dir/ablations.md, ablations.json and ablations.svg (training
loss per gate variant; how far zero-init's gates open, per layer; the base's Q/A over training per gate variant).
--seeds=N writes out_dir/seeds.md and seeds.json instead: each seed's numbers, each variant's mean and range, and in
how many seeds zero-init does better. The seed (train.py --seed) changes the prompts' initial values, the split and
the data order; random_init's gates stay the one fixed draw that defines that variant, so the seeds vary training
alone, as they do for zero_init, whose gates are always 0. Every run keeps its adapter.pth, log.jsonl, train.log
and result.json in out_dir/<configuration>/<budget> (seed k > 0: out_dir/seeds/seed<k>/<variant>); a run whose
result.json records the same job is reused, not trained again (so --seeds=N reuses the table's seed-0 runs, and a
stopped command continues): delete out_dir to measure afresh.
"""
import functools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from xml.sax.saxutils import escape

import torch
import torch.nn.functional as F

import checkpoint
import cli
import generation
import lladapter


# ----------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    out_dir: str = ""  # empty: <walkthrough_dir>/ablations; each run in a folder of its own inside
    walkthrough_dir: str = ""  # the walkthrough run's folder: its base and data, beside it, are shared; empty: its own
    quick: bool = False  # CI: the smoke walkthrough's barely pretrained base and world, 2 epochs; the numbers mean nothing
    short_epochs: int = 5  # the short budget (see SHORT_BUDGET); 0: the full budget only
    short_warmup_epochs: float = 2.0  # its linear warmup, as the paper's
    jobs: int = 1  # train.py processes at a time, sharing the walkthrough's CPU threads (world.THREADS) between them
    seeds: int = 1  # above 1: instead of the table, the gate variants at the full budget over train.py --seed 0 .. seeds-1


# SHORT_BUDGET. Zero-init's advantage is about the start of training, so every configuration also trains for a
# short budget, chosen here once, before any run: the paper trains 5 epochs (2 of warmup) on its 52K instructions;
# the walkthrough needs 40 epochs at its scale; the short budget is the paper's own 5 epochs (warmup 2), 1/8 of the
# walkthrough's steps. Both budgets warm up over the same 2 epochs, so their first 2 epochs are the same steps.
QUICK_SETTINGS = dict(short_epochs=0)  # CI: the smoke walkthrough's 2 epochs only (a process costs seconds)
# The gate variants' full runs are also probed on the way (train.py --stop_after, then --resume), so that their
# curves, not only their end points, are compared. The walkthrough runs 480 steps; the smoke run 10.
PROBE_STEPS, QUICK_PROBE_STEPS = [100, 150, 300], [4, 8]
LAYERS = (1, 2, 3, 4)  # L: adapted top layers of the walkthrough base's 4
LENGTHS = (2, 5, 10, 20)  # K: prompts per adapted layer
ROOT = Path(__file__).resolve().parent.parent  # where train.py is

# ----------------------------------------------------------------------------------------------------------
# The variants: each a small change to a model just built by checkpoint.load_llama. train.py --variant applies it
# before marking the adapter trainable; the evaluation here applies it before loading the trained adapter.


def zero_init(model):
    # The paper (Sec. 3.2, Eq. 7): nothing to change, the gates start at 0 in Transformer.reset_adapter.
    pass


def random_init(model):
    # The paper's random-init ablation (ScienceQA: 40.77% against zero-init's 84.04%): the same gated branch, its
    # gates drawn at random instead of 0. N(0, 1) per head, the prompts' own init: |tanh| of it averages 0.56, so
    # from step 0 the still random prompts enter most heads at about the weight a trained gate ends up with. From
    # a generator of its own with a fixed seed: the same gates in every run, and torch's global draws untouched.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates():
            gate.copy_(torch.randn(gate.shape, generator=generator))


def remove_gate(attention):
    # The gate Parameter goes: it no longer trains, counts or is saved. In its place a plain tensor whose tanh is
    # exactly 1, which the unchanged Eq. 7 code (and train.py's log of the gates) still reads.
    n_heads = attention.gate.shape[1]
    del attention.gate
    attention.gate = torch.full((1, n_heads, 1, 1), float("inf"), device=attention.wq.weight.device)


def no_gate(model):
    # Zero-init attention without its gate: the prompts, softmaxed apart from the words as in Eq. 7, are added at
    # full weight from step 0: out + tanh(inf) * prompt_out = out + prompt_out. Trainable: the prompts alone.
    for layer in model.layers[model.first_adapted:]:
        remove_gate(layer.attention)


def prefix_attention(attention, x, start_pos, rope, mask=None, prompt=None):
    # Plain prefix tuning, what the paper's zero-init attention departs from: the K prompt keys and values join
    # the words' and ONE softmax runs over [prompt; words], so the prompts take attention from the words from step
    # 0 on, with no gate. Every position sees all K prompts, and the words causally.
    bsz, seqlen, _ = x.shape
    q, k, v = attention.qkv(x, start_pos, rope)  # q: (bsz, n_heads, seqlen, head_dim); k, v: the words (or cache)
    if prompt is not None:  # training: rebuilt every forward, so the prompts keep receiving gradients
        pk, pv = attention.prompt_keys_values(prompt, x.dtype, bsz)
    else:  # generation: projected once per call, as in Attention.forward
        pk, pv = attention.prompt_kv[:2]
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (bsz, n_kv_heads, K + words, head_dim)
    if mask is None:  # causal over the words (the keys are the queries' own), or one query that sees every word
        mask = torch.ones(seqlen, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - seqlen)
    mask = torch.cat([mask.new_ones(seqlen, pk.shape[2]), mask], dim=1)  # (seqlen, K + words): prompts all seen
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                         enable_gqa=attention.n_kv_heads != attention.n_heads)
    return attention.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))  # (bsz, seqlen, dim)


def prefix(model):
    for layer in model.layers[model.first_adapted:]:
        remove_gate(layer.attention)  # no gate; the plain tensor left is only read by train.py's log
        layer.attention.forward = functools.partial(prefix_attention, layer.attention)


VARIANTS = {"zero_init": zero_init, "random_init": random_init, "no_gate": no_gate, "prefix": prefix}

# ----------------------------------------------------------------------------------------------------------
# Retention: what zero-init is there to protect, the base's own behaviour, measured with the adapter attached


def base_questions(docs):
    """The corpus's own questions, as the base read them: (prompt "Q: ...\\nA:", its answer "in the lake.")."""
    return [(question + "\nA:", answer.strip()) for question, answer in
            (doc.split("\nA:") for doc in docs if doc.startswith("Q: "))]


@torch.no_grad()
def base_qa(model, tokenizer, questions, batch_size=100):
    """Greedy answers to the base's own questions ([BOS] "Q: ...\\nA:"): (exact-match share, share that name the
    right value, the answers)."""
    prompts = [tokenizer.encode(question, bos=True, eos=False) for question, _ in questions]
    max_gen_len = max(len(tokenizer.encode(" " + answer, bos=False, eos=True)) for _, answer in questions) + 4
    answers = []
    for i in range(0, len(prompts), batch_size):
        outs = generation.generate(model, prompts[i:i + batch_size], max_gen_len, temperature=0,
                                  eos_id=tokenizer.eos_id)
        answers += [tokenizer.decode(out).strip() for out in outs]
    exact = sum(answer == expected for answer, (_, expected) in zip(answers, questions))
    named = sum(expected.rstrip(".").split()[-1] in answer.replace(".", " ").split()  # "in the lake." -> lake
                for answer, (_, expected) in zip(answers, questions))
    return exact / len(questions), named / len(questions), answers


@torch.no_grad()
def kl_from_base(model, base, tokenizer, docs, batch_size=128):
    """KL(base || model) in nats per predicted token over the documents, each [BOS] doc [EOS] as in pretraining:
    how far the adapted model's next-token distributions have moved from the base's on the base's own text."""
    encoded = sorted((tokenizer.encode(doc, bos=True, eos=True) for doc in docs), key=len)  # batches pad little
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        batch = encoded[i:i + batch_size]
        n = max(len(d) for d in batch)
        tokens = torch.tensor([d + [tokenizer.eos_id] * (n - len(d)) for d in batch])  # (bsz, n); right-padded:
        # attention is causal, so the padding changes no real position
        predicted = torch.tensor([[j < len(d) - 1 for j in range(n - 1)] for d in batch])  # (bsz, n - 1)
        log_p = F.log_softmax(base(tokens[:, :-1]).float(), -1)[predicted]  # (predicted tokens, vocab_size)
        log_q = F.log_softmax(model(tokens[:, :-1]).float(), -1)[predicted]
        total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()  # sum of p (log p - log q)
        count += int(predicted.sum())
    return total / count


def probe(model, base, tokenizer, docs, heldout_path):
    """Accuracy and retention of one model: held-out instructions, the base's own questions, KL from the base."""
    from walkthrough import world as wt
    exact, named = wt.evaluate(model, tokenizer, heldout_path)
    qa_exact, qa_named, answers = base_qa(model, tokenizer, base_questions(docs))
    return {"exact_match": exact, "names_value": named, "qa_exact_match": qa_exact, "qa_names_value": qa_named,
            "kl": kl_from_base(model, base, tokenizer, docs), "qa_answers": answers}


# ----------------------------------------------------------------------------------------------------------
# One run, in a worker process: train with train.py, stopping to probe at the probe steps, then at the end


def run_one(job):
    """train.py for one configuration and budget: probed at step 0 (the model train.py starts from), at each of
    job["probe_steps"] (train.py --stop_after, then --resume: the same steps as one run) and at the end. Returns
    the numbers of its table row and its curves, or an error."""
    run_dir, found, s = Path(job["run_dir"]), job["found"], job["train_settings"]
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "result.json"  # a run already measured for this very job is reused (seed 0 by --seeds=N)
    if done.is_file() and json.loads(done.read_text())["job"] == json.loads(json.dumps({**job, "docs": None})):
        r = json.loads(done.read_text())["result"]
        return {**r, "at_steps": {int(step): p for step, p in r["at_steps"].items()}}
    command = [sys.executable, "train.py", f"--ckpt_dir={found['ckpt_dir']}", f"--data_path={found['data_path']}",
               f"--out_dir={run_dir}", *(f"--{k}={v}" for k, v in s.items())]
    start = time.time()
    torch.set_num_threads(job["threads"])
    base, tokenizer = checkpoint.load_llama(found["ckpt_dir"], device="cpu", max_seq_len=s["max_seq_len"],
                                            adapter_layer=0)

    def train(*extra):  # train.py, appending to train.log; its log.jsonl and summary.json are what we read
        with open(run_dir / "train.log", "a") as log:
            log.write(" ".join(command + list(extra)) + "\n")
            log.flush()
            code = subprocess.run(command + list(extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(job["threads"]),
                                       "MKL_NUM_THREADS": str(job["threads"])}).returncode
        if code != 0:
            tail = (run_dir / "train.log").read_text().splitlines()[-5:]
            return f"train.py exited with status {code}; {run_dir / 'train.log'} ends:\n  " + "\n  ".join(tail)
        return json.loads((run_dir / "summary.json").read_text())

    (run_dir / "train.log").unlink(missing_ok=True)
    done.unlink(missing_ok=True)
    if s.get("mode") == "full":  # the base alone: one step logs its loss at step 0; its probes are the base's own
        summary = train()
        if isinstance(summary, str):
            return {**job, "error": summary}
        at_0 = probe(base, base, tokenizer, job["docs"], found["heldout_path"])
        end = dict(at_0)
        at_steps, model = {}, base
    else:
        # The model train.py starts from (its seed, load_llama's draws, the variant), then each saved adapter
        torch.manual_seed(s.get("seed", 0))
        model, _ = checkpoint.load_llama(found["ckpt_dir"], device="cpu", max_seq_len=s["max_seq_len"],
                                         adapter_len=s["adapter_len"], adapter_layer=s["adapter_layer"])
        if s.get("variant"):
            VARIANTS[s["variant"].split(":")[1]](model)
        at_0 = probe(model, base, tokenizer, job["docs"], found["heldout_path"])
        at_steps = {}
        for i, stop in enumerate(job["probe_steps"] + [0]):  # 0: to the end
            summary = train(f"--stop_after={stop}", *["--resume"] * (i > 0))
            if isinstance(summary, str):
                return {**job, "error": summary}
            checkpoint.load_adapter(model, run_dir / "adapter.pth")
            if summary["steps"] == summary["total_steps"]:
                break
            at_steps[summary["steps"]] = probe(model, base, tokenizer, job["docs"], found["heldout_path"])
            del at_steps[summary["steps"]]["qa_answers"]
        end = probe(model, base, tokenizer, job["docs"], found["heldout_path"])
    del end["qa_answers"]
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = round(1 / records[0]["epoch"])
    after_epoch = [r["loss"] for r in records if r["step"] == steps_per_epoch + 1]  # after one epoch of updates
    lladapter.mark_only_adapter_trainable(model)
    result = {**job, "docs": None, "n_docs": len(job["docs"]),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "loss_at_0": records[0]["loss"], "loss_after_epoch_1": after_epoch[0] if after_epoch else None,
            "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
            **end, "at_0": at_0, "at_steps": at_steps, "total_steps": summary["total_steps"],
            "seconds": time.time() - start, "steps_per_epoch": steps_per_epoch, "loss": [r["loss"] for r in records],
            "gates": [r["gates"] for r in records]}
    done.write_text(json.dumps({"job": {**job, "docs": None}, "result": result}))
    return result


# ----------------------------------------------------------------------------------------------------------
# Reporting: the table, text charts and the SVG figure

COLORS = {"zero_init": "#1f77b4", "random_init": "#d62728", "no_gate": "#ff7f0e", "prefix": "#2ca02c"}
LAYER_COLORS = ["#9ecae1", "#4292c6", "#2171b5", "#08306b"]  # lower to higher layers, light to dark


def fmt(value, kind):
    if value is None:
        return ""
    if kind == "kl":  # nats per token; exactly 0 printed as such
        return "0" if value == 0 else f"{value:.4f}"
    return {"loss": f"{value:.4f}", "percent": f"{100 * value:.1f}%", "count": f"{value:,}"}[kind]


def table(rows, budgets):
    """Markdown: one line per configuration, the short and full budget side by side."""
    head = (["group", "variant", "trainable", "loss at step 0", "loss after epoch 1", "base Q/A at step 0",
             "KL at step 0"] + [f"{what}, {label}" for label in budgets.values()
                                for what in ("val loss", "exact match", "base Q/A (named)", "KL")])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in rows:
        full = row["full"]
        cells = [row["group"], row["label"], fmt(full["trainable"], "count"), fmt(full["loss_at_0"], "loss"),
                 fmt(full["loss_after_epoch_1"], "loss"), fmt(full["at_0"]["qa_exact_match"], "percent"),
                 fmt(full["at_0"]["kl"], "kl")]
        for budget in budgets:
            r = row[budget]
            cells += [fmt(r.get("val_loss"), "loss"), fmt(r["exact_match"], "percent"),
                      f"{fmt(r['qa_exact_match'], 'percent')} ({fmt(r['qa_names_value'], 'percent')})",
                      fmt(r["kl"], "kl")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PROBED = ("exact_match", "names_value", "qa_exact_match", "qa_names_value", "kl")  # what probe() measures
KEPT = ("trainable", "loss_at_0", "loss_after_epoch_1", "val_loss", *PROBED, "seconds")  # a run's numbers in JSON


def kept(r):
    """A run's (or a probe's) numbers for the JSON files, its step-0 probe beside them."""
    return {**{k: r[k] for k in KEPT if k in r}, **({"at_0": kept(r["at_0"])} if "at_0" in r else {})}


def curve(r):
    """A full run's probes in step order: [(step, probe)], from step 0 to its end."""
    return [(0, r["at_0"])] + sorted((int(k), v) for k, v in r["at_steps"].items()) + [(r["total_steps"], r)]


def curve_table(runs, what, kind):
    """Markdown: one line per run {name: result}, one column per probed step."""
    steps = [step for step, _ in curve(next(iter(runs.values())))]
    lines = ["| variant | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---:|" * len(steps)]
    return lines + [f"| {name} | " + " | ".join(fmt(p[what], kind) for _, p in curve(r)) + " |"
                    for name, r in runs.items()]


def text_chart(series, x_max, lo, hi, log=False, width=64, height=12):
    """series: {marker: (xs, ys)}. Each column is the mean of the points that fall in it; '#' marks a cell that
    two series share. A log scale for losses, whose differences late in training are small in absolute terms."""
    scale = math.log10 if log else (lambda y: y)
    grid = [[" "] * width for _ in range(height)]
    for marker, (xs, ys) in series.items():
        for c in range(width):
            bucket = [scale(y) for x, y in zip(xs, ys) if c <= x / x_max * width < c + 1]
            if not bucket:
                continue
            r = round((scale(hi) - sum(bucket) / len(bucket)) / (scale(hi) - scale(lo)) * (height - 1))
            r = min(max(r, 0), height - 1)
            grid[r][c] = marker if grid[r][c] in (" ", marker) else "#"
    label = {0: hi, height // 2: (10 ** ((scale(hi) + scale(lo)) / 2) if log else (hi + lo) / 2), height - 1: lo}
    lines = [f"{label[r]:7.3f} |" if r in label else "        |" for r in range(height)]
    lines = [axis + "".join(cells) for axis, cells in zip(lines, grid)]
    lines.append("        +" + "-" * width)
    lines.append("         0" + f"{x_max} steps".rjust(width - 1))
    return lines


def nice_ticks(lo, hi, log=False):
    # Round values between lo and hi to label an axis: 1, 2, 5 times a power of ten (and 1.5, 3, 7 on a log axis
    # that spans less than a decade), or lo and hi themselves when none fall between.
    if log:
        mantissas = (1, 2, 5) if hi / lo > 10 else (1, 1.5, 2, 3, 5, 7)
        powers = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        ticks = [m * 10.0 ** p for p in powers for m in mantissas if lo <= m * 10.0 ** p <= hi]
    else:
        step = min(m * 10.0 ** p for p in range(-3, 6) for m in (1, 2, 5) if m * 10.0 ** p >= (hi - lo) / 5)
        ticks = [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return ticks if len(ticks) >= 2 else [float(f"{lo:.3g}"), float(f"{hi:.3g}")]


def svg_figure(losses, gates, retention, first_layer, x_max, short_steps, lo, hi, title):
    """One self-contained SVG: left, the training loss of each gate variant (log scale); middle, zero-init's mean
    |tanh(gate)| per adapted layer; right, each gate variant's exact match on the base's own questions, at the
    probed steps. Curves are polylines of class "loss-curve" (one per gate variant), "gate-curve" (one per layer)
    and "retention-curve" (one per gate variant)."""
    width, height, top, panel_w, panel_h = 1450, 400, 60, 380, 260
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']

    def panel(left, y_of, y_ticks, heading, y_label):
        # Axes, ticks and labels; returns the function from (step, value) to the panel's pixels.
        def xy(x, y):
            return left + x / x_max * panel_w, top + (1 - y_of(y)) * panel_h
        parts.append(f'<text x="{left + panel_w / 2}" y="{top - 12}" text-anchor="middle">{escape(heading)}</text>')
        parts.append(f'<rect x="{left}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#444"/>')
        for y in y_ticks:
            _, py = xy(0, y)
            parts.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + panel_w}" y2="{py:.1f}" stroke="#ddd"/>')
            parts.append(f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">{y:g}</text>')
        for x in nice_ticks(0, x_max):
            px, _ = xy(x, y_ticks[0])
            parts.append(f'<text x="{px:.1f}" y="{top + panel_h + 16}" text-anchor="middle">{x:g}</text>')
        parts.append(f'<text x="{left + panel_w / 2}" y="{top + panel_h + 34}" text-anchor="middle">'
                     f'optimizer step</text>')
        parts.append(f'<text transform="translate({left - 44},{top + panel_h / 2}) rotate(-90)" '
                     f'text-anchor="middle">{escape(y_label)}</text>')
        return xy

    def polyline(xy, points, color, css, ident):
        coords = " ".join("{:.1f},{:.1f}".format(*xy(x, y)) for x, y in points)
        parts.append(f'<polyline class="{css}" id="{ident}" points="{coords}" fill="none" stroke="{color}" '
                     f'stroke-width="1.3"/>')

    def legend(left, entries):  # one row under the panel: a colored line, then its name
        x, y = left, top + panel_h + 52
        for text, color in entries:
            parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 18}" y2="{y}" stroke="{color}" stroke-width="3"/>')
            parts.append(f'<text x="{x + 22}" y="{y + 4}">{escape(text)}</text>')
            x += 36 + 7 * len(text)

    log_lo, log_hi = math.log10(lo), math.log10(hi)
    xy = panel(70, lambda y: (math.log10(y) - log_lo) / (log_hi - log_lo), nice_ticks(lo, hi, log=True),
               "training loss (log scale)",
               "loss on the step's batch, before its update")
    if short_steps:  # where the short budget's run ends
        short_x, _ = xy(short_steps, lo)
        parts.append(f'<line x1="{short_x:.1f}" y1="{top}" x2="{short_x:.1f}" y2="{top + panel_h}" stroke="#888" '
                     f'stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{short_x + 4:.1f}" y="{top + 14}" fill="#666">short budget ends</text>')
    for name, ys in losses.items():  # record k's loss is computed after k - 1 updates
        polyline(xy, [(k, y) for k, y in enumerate(ys)], COLORS[name], "loss-curve", f"loss-{name}")
    legend(70, [(name, COLORS[name]) for name in losses])

    xy = panel(560, lambda y: y, [0, 0.25, 0.5, 0.75, 1], "zero_init: how far the gates open",
               "mean |tanh(gate)| over the heads")
    for l, per_step in enumerate(zip(*gates)):  # record k's gates are after k updates; all 0 before the first
        polyline(xy, [(0, 0.0)] + [(k + 1, g) for k, g in enumerate(per_step)], LAYER_COLORS[-len(per_step):][l],
                 "gate-curve", f"gate-layer-{first_layer + l}")
    legend(560, [(f"layer {first_layer + l}", LAYER_COLORS[-len(gates[0]):][l]) for l in range(len(gates[0]))])

    xy = panel(1050, lambda y: y, [0, 0.25, 0.5, 0.75, 1], "retention: the base's own Q/A, adapter attached",
               "exact match on the base's questions")
    for name, points in retention.items():  # (step, exact match) at step 0, each probed step and the end
        polyline(xy, points, COLORS[name], "retention-curve", f"retention-{name}")
        for point in points:
            parts.append('<circle cx="{:.1f}" cy="{:.1f}" r="2.5" fill="{}"/>'.format(*xy(*point), COLORS[name]))
    legend(1050, [(name, COLORS[name]) for name in retention])
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------

def main():
    from walkthrough import world as wt
    cli.exit_on_input_error()
    s = vars(cli.parse(Settings, __doc__))
    if s["quick"]:
        s = vars(cli.parse(Settings, __doc__, defaults=QUICK_SETTINGS))
    cli.require(s["jobs"] > 0 and s["seeds"] > 0 and s["short_epochs"] >= 0,
                "--jobs and --seeds must be positive, --short_epochs not negative")
    t_start = time.time()
    walk_settings = {**wt.SETTINGS, **(wt.SMOKE_SETTINGS if s["quick"] else {})}  # what train.py would run
    walk = Path(s["walkthrough_dir"] or walk_settings["out_dir"]).resolve()
    out = Path(s["out_dir"] or walk / "ablations").resolve()
    walk_settings = {k: v for k, v in walk_settings.items() if k != "out_dir"}
    # The world and base that every walkthrough run beside `walk` shares, built once (then reused): build()
    # pretrains on the walkthrough's THREADS, as train.py does
    found = {k: str(Path(v).resolve()) for k, v in wt.build(walk, s["quick"]).items()}
    t_ready = time.time()
    # The base's own pretraining documents, for the retention probes: its world drawn again as build() drew it,
    # checked against the held-out instructions build() wrote from it.
    _, docs, _, heldout = wt.draw(wt.pretraining(s["quick"]))
    cli.require(json.loads(Path(found["heldout_path"]).read_text()) == heldout, f"{found['heldout_path']} is not "
                f"about the world that walkthrough/world.py draws{' with --quick' * s['quick']}: delete "
                f"{found['base_dir']} to build it again")

    # The configurations: (name, group, label, what differs from the walkthrough's settings). The walkthrough's
    # own K and L are zero_init's run (change None: trained once) shown in each group.
    K, L = walk_settings["adapter_len"], walk_settings["adapter_layer"]
    configs = [(name, "gate", name + " (the paper)" * (name == "zero_init"), {"variant": f"walkthrough.ablations:{name}"}) for name in VARIANTS]
    configs += [(f"L{n}", "layers", f"L={n}", {"adapter_layer": n}) if n != L else
                ("zero_init", "layers", f"L={n} (zero_init)", None) for n in LAYERS]
    configs += [(f"K{n}", "prompts", f"K={n}", {"adapter_len": n}) if n != K else
                ("zero_init", "prompts", f"K={n} (zero_init)", None) for n in LENGTHS]
    budgets = {"full": dict(epochs=walk_settings["epochs"], warmup_epochs=walk_settings["warmup_epochs"])}
    if s["short_epochs"]:
        budgets = {"short": dict(epochs=s["short_epochs"], warmup_epochs=s["short_warmup_epochs"]), **budgets}
    seed_list = [0]  # train.py's own default seed
    if s["seeds"] > 1:  # the seed study: the gate variants at the full budget
        configs, budgets = [c for c in configs if c[1] == "gate"], {"full": budgets["full"]}
        seed_list = range(s["seeds"])
    probe_steps = QUICK_PROBE_STEPS if s["quick"] else PROBE_STEPS
    threads = max(1, wt.THREADS // s["jobs"])  # one job at a time: python train.py's threads, so its very numbers
    jobs = [dict(name=name, budget=budget, seed=seed, found=found, docs=docs, threads=threads,
                 run_dir=str(out / name / budget if seed == 0 else out / "seeds" / f"seed{seed}" / name),
                 probe_steps=probe_steps if group == "gate" and budget == "full" else [],
                 train_settings={**walk_settings, **budgets[budget], **change, "device": "cpu", "seed": seed})
            for seed in seed_list for budget in budgets for name, group, _, change in configs if change is not None]
    # The base alone: train.py in full mode (every weight, no adapter) for one step logs the base model's loss at
    # step 0 on the very batch the adapter runs start with; its exact match is the walkthrough's gates_closed one.
    jobs.append(dict(name="base", budget="full", seed=0, run_dir=str(out / "base"), found=found, docs=docs, threads=threads,
                     probe_steps=[], train_settings={**walk_settings, "mode": "full", "adapter_layer": 0,
                                                     "stop_after": 1, "device": "cpu"}))
    jobs.sort(key=lambda j: -j["train_settings"]["epochs"] * (j["train_settings"]["adapter_layer"] + 2))  # long first

    print(f"ablations: {len(jobs)} train.py runs, {s['jobs']} at a time on {threads} thread(s) each, in {out}")
    results = {}
    with ProcessPoolExecutor(s["jobs"], mp_context=get_context("spawn")) as pool:
        for done, future in enumerate(as_completed([pool.submit(run_one, job) for job in jobs]), 1):
            r = future.result()
            if "error" in r:
                pool.shutdown(cancel_futures=True)
                sys.exit(f"error: {r['name']} ({r['budget']}): {r['error']}")
            results[r["name"], r["budget"], r["seed"]] = r
            seed = f" seed {r['seed']}" * (s["seeds"] > 1)
            print(f"  [{done:2}/{len(jobs)}] {r['name']:>11} {r['budget']:>5}{seed}: loss at step 0 "
                  f"{r['loss_at_0']:.4f}, val loss {fmt(r['val_loss'], 'loss') or '-':>6}, exact match "
                  f"{fmt(r['exact_match'], 'percent'):>6}, base Q/A {fmt(r['qa_exact_match'], 'percent'):>6}, "
                  f"KL {fmt(r['kl'], 'kl')}  ({r['seconds']:.0f} s)", flush=True)
    check_step_0(results)
    if s["seeds"] > 1:
        seed_report(results, configs, seed_list, probe_steps, s, out)
    else:
        results = {(name, budget): r for (name, budget, _), r in results.items()}
        results.update({("base", b): results["base", "full"] for b in budgets})  # the base alone has no budget
        report(results, configs, budgets, s, walk_settings, found, out)
    wall = (f"wall time: {time.time() - t_start:.0f} s ({t_ready - t_start:.0f} s to build or find the base, "
            f"{time.time() - t_ready:.0f} s of runs)")
    try:
        import resource  # POSIX only: elsewhere the children's CPU time goes untold
        cpu = sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime"))
        wall += f"; the train.py processes used {cpu:.0f} s of CPU time (the probes, in the workers, not counted)"
    except ImportError:
        pass
    print(wall)


def check_step_0(results):
    """The paper's zero-init property, asserted on the walkthrough itself: every zero-init run (the L and K ones
    too) starts as exactly the base, KL 0 and the base's own answers, whatever its random prompts."""
    base = results["base", "full", 0]["at_0"]
    for (name, budget, seed), r in results.items():
        if name != "base" and r["train_settings"].get("variant", ":zero_init").endswith(":zero_init"):
            changed = sum(a != b for a, b in zip(r["at_0"]["qa_answers"], base["qa_answers"]))
            if r["at_0"]["kl"] != 0.0 or changed:
                sys.exit(f"error: {name} ({budget}, seed {seed}) at step 0: KL from the base {r['at_0']['kl']!r}, "
                         f"{changed} of the base's answers changed; with its gates at 0 it must be exactly the base (Eq. 7)")


def report(results, configs, budgets, s, walk_settings, found, out):
    """The table with its notes, the text charts and the SVG figure; printed, and written to out_dir."""
    base, zero = results["base", "full"], results["zero_init", "full"]
    rows = [dict(group="base", label="base model alone", **{b: results["base", b] for b in budgets})]
    rows += [dict(group=group, label=label, **{b: results[name, b] for b in budgets})
             for name, group, label, _ in configs]
    labels = {b: f"{budget['epochs']} epochs" for b, budget in budgets.items()}
    # Claims checked on the numbers themselves
    notes = [
        f"Loss at step 0: record 1 of each run's log.jsonl, computed before any update. zero_init's ("
        f"{zero['loss_at_0']!r}) {'equals' if zero['loss_at_0'] == base['loss_at_0'] else 'DIFFERS FROM'} the base "
        f"model's ({base['loss_at_0']!r}) exactly: with its gates at 0 the adapted model is the base.",
        "Loss after epoch 1: the training loss after one epoch of updates (on the first batch of epoch 2), in the "
        "full run."]
    if "short" in budgets:
        def shared(name):  # how many leading losses the short and the full run have in common
            short, full = results[name, "short"]["loss"], results[name, "full"]["loss"]
            return next((i for i, (a, b) in enumerate(zip(short, full)) if a != b), min(len(short), len(full)))
        n_shared = min(shared(name) for name, *_ in configs)
        notes[-1] += (f" The two budgets warm up alike, and every short run's first {n_shared} losses equal its full "
                      f"run's" + (": the short runs share these two columns." if n_shared > zero["steps_per_epoch"]
                                  else "."))
    notes.append(f"Exact match: greedy answers to the {len(json.loads(Path(found['heldout_path']).read_text()))} "
                 f"held-out instructions, about creatures the adapter never saw. The base alone's is the "
                 f"walkthrough's gates_closed figure.")
    notes.append(f"Retention, what zero-init is there to protect: base Q/A is the greedy exact match on the base's "
                 f"own {len(base['at_0']['qa_answers'])} "
                 f"pretraining questions ([BOS] \"Q: ...\\nA:\", every creature and attribute) with the adapter "
                 f"attached, the share that name the right value in brackets; KL is KL(base || adapted) in nats per "
                 f"predicted token over the base's {base['n_docs']} pretraining documents ([BOS] document [EOS]). "
                 f"At step 0 every "
                 f"zero_init run is checked to be exactly the base: KL 0, the base's own answers.")
    gate_runs = {name: results[name, "full"] for name in VARIANTS}
    curves = [f"The gate variants' full runs, probed on the way ({what}):\n\n" +
              "\n".join(curve_table(gate_runs, key, kind))
              for what, key, kind in [("held-out exact match", "exact_match", "percent"),
                                      ("base Q/A exact match", "qa_exact_match", "percent"), ("KL", "kl", "kl")]]
    markdown = table(rows, labels)
    print("\n" + "\n".join(markdown) + "\n\n" + "\n".join(notes) + "\n\n" + "\n\n".join(curves))

    # Curves over the full budget: the gate variants' training loss, and how far zero_init's gates open
    losses = {name: results[name, "full"]["loss"] for name in VARIANTS}
    gates = zero["gates"]  # per record, the mean |tanh(gate)| of each adapted layer
    lo, hi = min(min(ys) for ys in losses.values()), max(max(ys) for ys in losses.values())
    n_layers = json.loads((Path(found["ckpt_dir"]) / "params.json").read_text())["n_layers"]
    x_max, first_layer = len(gates), n_layers - zero["train_settings"]["adapter_layer"]
    print("\ntraining loss over the full budget (log scale; z zero_init, r random_init, n no_gate, p prefix):")
    print("\n".join(text_chart({name[0]: (range(len(ys)), ys) for name, ys in losses.items()}, x_max, lo, hi,
                               log=True)))
    print("\nzero_init: mean |tanh(gate)| per layer over training (digit = layer):")
    print("\n".join(text_chart({str(first_layer + l)[-1]: (range(1, x_max + 1), g) for l, g in enumerate(zip(*gates))},
                               x_max, 0.0, 1.0)))
    short_steps = len(results["zero_init", "short"]["loss"]) if "short" in budgets else None
    title = "LLaMA-Adapter ablations in miniature: " + (
        "--quick, on the smoke base (numbers meaningless)" if s["quick"] else
        f"the walkthrough, {walk_settings['epochs']} epochs")
    out.mkdir(parents=True, exist_ok=True)
    retention = {name: [(step, p["qa_exact_match"]) for step, p in curve(r)] for name, r in gate_runs.items()}
    (out / "ablations.svg").write_text(svg_figure(losses, gates, retention, first_layer, x_max, short_steps, lo, hi,
                                                  title))
    (out / "ablations.md").write_text("\n".join(markdown) + "\n\n" + "\n\n".join(notes + curves) + "\n")
    (out / "ablations.json").write_text(json.dumps({
        "settings": s, "walkthrough_settings": walk_settings, "budgets": budgets,
        "rows": [{"group": r["group"], "variant": r["label"], **{b: kept(r[b]) for b in budgets}} for r in rows],
        "curves": {"loss": losses, "zero_init_gates": gates,
                   "probes": {name: [{"step": step, **kept(p)} for step, p in curve(r)]
                              for name, r in gate_runs.items()}}},
        indent=1))
    print(f"\nwrote {out / 'ablations.md'}, {out / 'ablations.json'} and {out / 'ablations.svg'}")


def seed_report(results, configs, seed_list, probe_steps, s, out):
    """The gate variants over seeds: each seed's numbers; then, per measure, each variant's mean and range and in
    how many seeds zero_init does better than each other variant. Printed, and written to out_dir/seeds.md and
    seeds.json."""
    names = [name for name, *_ in configs]
    runs = {(name, seed): results[name, "full", seed] for name in names for seed in seed_list}
    steps = [step for step in probe_steps if step in runs["zero_init", 0]["at_steps"]]
    # (label, format, +1 if higher is better or -1, the number of a run)
    measures = [(f"held-out exact match, step {step}", "percent", 1,
                 lambda r, step=step: r["at_steps"][step]["exact_match"]) for step in steps]
    measures += [(f"held-out exact match, step {runs['zero_init', 0]['total_steps']} (end)", "percent", 1,
                  lambda r: r["exact_match"]),
                 ("base Q/A exact match (end)", "percent", 1, lambda r: r["qa_exact_match"]),
                 ("base Q/A, right value named (end)", "percent", 1, lambda r: r["qa_names_value"]),
                 ("KL from the base, nats/token (end)", "kl", -1, lambda r: r["kl"])]
    per_seed = ["| variant | seed | " + " | ".join(label for label, *_ in measures) + " |",
                "|---|---:|" + "---:|" * len(measures)]
    per_seed += [f"| {name} | {seed} | " + " | ".join(fmt(get(runs[name, seed]), kind) for _, kind, _, get in measures)
                 + " |" for name in names for seed in seed_list]
    summary = ["| measure | " + " | ".join(f"{name}: mean (range)" for name in names) + " | " +
               " | ".join(f"zero_init better than {name}" for name in names[1:]) + " |",
               "|---|" + "---:|" * (2 * len(names) - 1)]
    numbers = {}
    for label, kind, sign, get in measures:
        values = {name: [get(runs[name, seed]) for seed in seed_list] for name in names}
        ahead = {name: sum(sign * (a - b) > 0 for a, b in zip(values["zero_init"], values[name])) for name in names[1:]}
        numbers[label] = {"per_seed": values, "zero_init_better_in": ahead}
        summary.append(f"| {label} | " + " | ".join(
            f"{fmt(sum(v) / len(v), kind)} ({fmt(min(v), kind)}-{fmt(max(v), kind)})" for v in values.values()) +
            " | " + " | ".join(f"{n} of {len(seed_list)}" for n in ahead.values()) + " |")
    heading = (f"The gate variants over {len(seed_list)} seeds (train.py --seed 0 to {len(seed_list) - 1}: the "
               f"prompts' initial values, the split and the data order; random_init's gates stay its fixed draw), "
               f"each at the full budget: python -m walkthrough.ablations --seeds={len(seed_list)}" +
               " --quick (numbers meaningless)" * s["quick"])
    text = heading + "\n\n" + "\n".join(summary) + "\n\nEach seed:\n\n" + "\n".join(per_seed)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text(text + "\n")
    (out / "seeds.json").write_text(json.dumps({
        "settings": s, "seeds": list(seed_list), "measures": numbers,
        "runs": {name: [{"seed": seed, **kept(runs[name, seed]),
                         "at_steps": {step: kept(p) for step, p in runs[name, seed]["at_steps"].items()}}
                        for seed in seed_list] for name in names}}, indent=1))
    print(f"\nwrote {out / 'seeds.md'} and {out / 'seeds.json'}")

if __name__ == "__main__":
    main()
