"""
Check a CUDA machine end to end with one command: correctness on the GPU first, then the 7B-shaped training step
and decoding, then the end-to-end runs and the test suite; one table at the end.

    python -m tools.gpu_check                      # on a CUDA machine: about 5 minutes on one H100, 6 at most
    python -m tools.gpu_check --json=check.json    # also write the results as JSON, rewritten after every check
    python -m tools.gpu_check --quick              # the same code on this CPU at tiny shapes (CI): checks that it runs

In the order they run, each in its own process with its own time limit, all within --budget_s:
  zero gates       a model whose gates are all zero gives exactly the logits of the same weights with
                   adapter_layer=0, in bf16: full forward and cached decoding
  sdpa vs math     the prompt branch (paper Eq. 7's gated part) with the default attention kernel against
                   torch's math kernel, bf16: output and the prompt's gradient
  adapter step     LLaMA-7B's shapes, train.py's step at length 512, micro-batch 1, 2, 4, 8 (bench.py's code):
                   tokens/s, MFU, peak memory reserved, the planner's prediction, the attention kernels that ran
  decoding         lladapter.generate at batch 1 and 8, eager, beside the memory-bandwidth bound
  walkthrough      python train.py --dtype=bf16: the walkthrough's targets must be met (read from its summary.json)
  tests            the fast tier, python -m pytest -q test_lladapter.py, with LLADAPTER_TEST_DEVICE=cuda
--quick leaves out the last two: on a CPU they would repeat what the test suite itself runs.
  compiled decode  the decoding above with generate(compile=True): CUDA graphs, compiled once per batch size
"""
import contextlib
import json as jsonlib  # `json` is the --json setting below
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tools import bench, plan
import checkpoint
import cli
import lladapter
from lladapter import ModelArgs


@dataclass
class Settings:
    budget_s: int = 330  # the whole check's time; a check that would start after it is reported as not run
    json: str = ""  # --json=FILE: the results as JSON, rewritten after every check
    quick: bool = False  # tiny shapes on the CPU: checks that every check runs (CI), measures nothing
    step: str = ""  # internal: run this one check in this process and write its rows as JSON to --rows_file
    rows_file: str = ""  # internal: where --step writes its rows
    deadline: float = 0.0  # internal: the time.time() by which the check must be done
    work: str = ""  # internal: a folder the checks share (the smoke walkthrough's base model, made once)


globals().update(vars(Settings()))  # the defaults, for the helpers below; main() sets the command line's
ROOT = Path(__file__).resolve().parent.parent  # where train.py is
# Checks that --quick leaves out: on a CPU they would only repeat what the test suite itself runs
GPU_ONLY = ("walkthrough", "tests")


class Context:
    """What every check needs: the device, the dtypes, the shapes, and how much time is left."""

    def __init__(self, quick, deadline, work):
        self.quick, self.deadline, self.work = quick, deadline, Path(work)
        self.device = torch.device("cpu" if quick else "cuda")
        self.dtype = torch.bfloat16  # the correctness checks' dtype, on the CPU too
        # The timed checks': bf16 on a GPU; fp32 on a CPU (--quick), where bf16 matmuls run ~4x slower than fp32
        self.fast_dtype = cli.dtype_of("auto", self.device)
        self.name = bench.cpu_name() if quick else torch.cuda.get_device_name()
        self.args7b = ModelArgs(vocab_size=32000, max_seq_len=512) if not quick else \
            ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=3)
        self.peak, self.bandwidth, self.note = bench.gpu_specs(self.name)

    def left(self):
        return self.deadline - time.time()


def row(check, result, ok=None):
    # ok: True or False for a pass/fail check, None for a figure reported as is
    return {"check": check, "result": result, "ok": ok}


def run_command(cmd, timeout, env=None):
    """(exit status or None if it ran out of time, output) of a command, run in its own process group so that its
    children (torchrun's workers, the tests' train.py runs) end with it."""
    # --quick: one thread per process, as OpenMP's threads spin for cores a busy CI machine doesn't give them
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if quick else {}), **(env or {})}
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(1, timeout))
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output


# ----------------------------------------------------------------------------------------------------------
# The checks. Each takes the Context and returns its rows.

@torch.inference_mode()
def zero_gates(ctx):
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=2) if ctx.quick \
        else ModelArgs(dim=1024, n_layers=4, n_heads=8, vocab_size=32000, max_seq_len=256, adapter_layer=3)
    model = bench.random_model(args, ctx.device, ctx.dtype)  # gates at zero, prompts random
    base = bench.random_model(replace(args, adapter_layer=0), ctx.device, ctx.dtype, seed=1)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)})
    tokens = torch.randint(3, args.vocab_size, (2, args.max_seq_len // 2), device=ctx.device)
    full = [m(tokens) for m in (model, base)]
    cached = []
    for m in (model, base):  # a prefill of half the tokens, then one token at a time
        m.setup_cache(tokens.shape[0], tokens.shape[1])
        prefill = tokens.shape[1] // 2
        out = [m(tokens[:, :prefill], 0)] + [m(tokens[:, p:p + 1], p) for p in range(prefill, tokens.shape[1])]
        m.clear_cache()
        cached.append(torch.cat(out, dim=1))
    what = f"{str(ctx.dtype)[6:]}, dim {args.dim}, {args.n_layers} layers, 2 x {tokens.shape[1]} tokens"
    rows = []
    for label, (a, b) in (("full forward", full), ("cached decoding", cached)):
        same = torch.equal(a, b)
        text = "identical" if same else f"differ by up to {(a - b).abs().max().item():.3g}"
        rows.append(row(f"zero gates = base model, {label}", f"{text} ({what})", same))
    return rows


def prompt_branch_against_math(ctx):
    """The prompt branch, tanh(gate) * softmax(q pk^T / sqrt(d)) pv, through the default kernel and torch's math
    kernel, with 7B's head_dim (128) and with grouped-query attention: output and the prompt's gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    found = {"forward": [], "prompt gradient": []}  # (max abs difference, within tolerance, max |reference|)
    for n_kv_heads in (None, 2):
        args = ModelArgs(dim=256 if ctx.quick else 1024, n_layers=1, n_heads=2 if ctx.quick else 8,
                         n_kv_heads=n_kv_heads and (1 if ctx.quick else 2), vocab_size=512, max_seq_len=512,
                         adapter_layer=1)
        model = bench.random_model(args, ctx.device, ctx.dtype)
        lladapter.mark_only_adapter_trainable(model)
        attn = model.layers[0].attention
        with torch.no_grad():
            attn.gate.uniform_(-1.5, 1.5)
        bsz, seqlen = 2, 128 if ctx.quick else 512
        x = torch.randn(bsz, seqlen, args.dim, device=ctx.device, dtype=ctx.dtype)
        positions = torch.arange(seqlen, device=ctx.device)
        grad_out = torch.randn(bsz, args.n_heads, seqlen, args.dim // args.n_heads, device=ctx.device)
        results = {}
        for backend in ("default", "math"):
            prompt = model.adapter_query.weight.detach().clone().requires_grad_()  # (K, dim), fp32
            with sdpa_kernel(SDPBackend.MATH) if backend == "math" else contextlib.nullcontext():
                q, _, _ = attn.qkv(x, None, model.rope[positions])
                pk, pv = attn.prompt_keys_values(prompt[None], ctx.dtype, bsz)
                out = torch.tanh(attn.gate) * F.scaled_dot_product_attention(
                    q, pk, pv, enable_gqa=attn.n_kv_heads != attn.n_heads)  # (bsz, heads, seqlen, head_dim), fp32
                (out * grad_out).sum().backward()
            results[backend] = out.detach(), prompt.grad
        for part, i, rtol in (("forward", 0, 1.6e-2), ("prompt gradient", 1, 2e-2)):
            got, ref = results["default"][i], results["math"][i]
            diff = (got - ref).abs().max().item()
            # bf16's tolerance (torch.testing's rtol for bf16) on the output; the gradient, summed over many bf16
            # products, against its own largest entry
            ok = torch.allclose(got, ref, rtol=rtol, atol=1e-2) if i == 0 else diff <= rtol * ref.abs().max().item()
            found[part].append((diff, ok, ref.abs().max().item()))
    what = f"{str(ctx.dtype)[6:]}, head_dim {args.dim // args.n_heads}, with and without GQA"
    return [row(f"prompt branch vs math SDPA, {part}", f"max abs difference {max(r[0] for r in runs):.3g} (largest "
                f"|value| {max(r[2] for r in runs):.3g}; {what})", all(r[1] for r in runs))
            for part, runs in found.items()]


def adapter_step(ctx):
    micro_batches = [1, 2] if ctx.quick else [1, 2, 4, 8]
    step, _ = bench.adapter_step(ctx.args7b, ctx.device, ctx.fast_dtype, micro_batches, 2 if ctx.quick else 5, ctx.peak,
                                 log=lambda s: print(s, file=sys.stderr, flush=True))
    rows = []
    for r in step["micro_batches"]:
        label = f"7B-shaped adapter step, micro-batch {r['micro_batch']}"
        if r.get("out_of_memory"):
            rows.append(row(label, "out of memory", False))
            continue
        memory = f"{r['reserved_gib']:.1f} GiB reserved" if "reserved_gib" in r else "memory not measured on a CPU"
        rows.append(row(label, f"x {r['length']}: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, {memory} "
                        f"(planner {bench.size_text(r['predicted_gib'])})"))
    first, measured = step["micro_batches"][0], [r for r in step["micro_batches"] if "tokens_per_s" in r]
    best = max(measured, key=lambda r: r["tokens_per_s"]) if measured else None
    judged = not ctx.quick
    rows.append(row("7B-shaped adapter step fits a 24 GB card (micro-batch 1)",
                    f"{first['reserved_gib']:.1f} GiB reserved + {plan.CONTEXT_GIB} GiB context <= 24 GiB"
                    if "reserved_gib" in first else "not judged on a CPU",
                    first.get("reserved_gib", 99) + plan.CONTEXT_GIB <= 24 if judged else None))
    rows.append(row("7B-shaped adapter step MFU >= 45% (best micro-batch)",
                    f"{100 * best['mfu']:.1f}% at micro-batch {best['micro_batch']} (peak {ctx.peak} TFLOPS"
                    f"{'; ' + ctx.note if ctx.note else ''})" if best else "nothing measured",
                    best is not None and best["mfu"] >= 0.45 if judged else None))
    rows.append(row("attention kernels in the adapter step", "; ".join(f"{k}: {v}" for k, v in step["sdpa"].items())))
    return rows


def decoding(ctx, compiled):
    model = bench.random_model(ctx.args7b, ctx.device, ctx.fast_dtype)
    bench.open_gates(model)
    kind = "compiled" if compiled else "eager"
    if compiled and ctx.quick:
        return [row(f"decoding, batch {b}, {kind}", "not run with --quick (compiling takes ~20 s on a CPU)")
                for b in (1, 8)]
    found = bench.decoding(model, ctx.device, [1, 8], [compiled], 16 if ctx.quick else 128, 8 if ctx.quick else 32,
                           ctx.bandwidth, log=lambda s: print(s, file=sys.stderr, flush=True))
    return [row(f"decoding, batch {r['batch']}, {kind}", f"{r['tokens_per_s']:,.1f} tok/s, "
                f"{100 * r['tokens_per_s'] / r['bound_tokens_per_s']:.0f}% of the bandwidth bound "
                f"{r['bound_tokens_per_s']:,.0f} tok/s") for r in found]


def decoding_eager(ctx):
    return decoding(ctx, compiled=False)


def decoding_compiled(ctx):
    return decoding(ctx, compiled=True)


def walkthrough(ctx):
    """python train.py in bf16 on the GPU: the walkthrough's three targets, read from the summary.json it writes."""
    label = "walkthrough in bf16: its targets"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        code, output = run_command([sys.executable, "train.py", "--dtype=bf16", f"--out_dir={tmp}/walk"], ctx.left() - 5)
        if code != 0:
            why = "ran out of time" if code is None else f"exited {code}: {output.strip().splitlines()[-1:]}"
            return [row(label, why, False)]
        result = jsonlib.loads((Path(tmp) / "walk" / "summary.json").read_text())["walkthrough"]
    text = (f"held-out exact match: base alone {100 * result['base_exact_match']:.1f}%, base + adapter "
            f"{100 * result['adapter_exact_match']:.1f}%; trainable {result['trainable']:,} of {result['parameters']:,}; "
            f"{time.time() - start:.0f} s")
    return [row(label, text, all(result["targets_met"].values()))]


def tests(ctx):
    """The fast tier once, with the GPU as the test device; counts read from pytest's JUnit XML report."""
    label = "fast tier (test_lladapter.py), LLADAPTER_TEST_DEVICE=" + ctx.device.type
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_lladapter.py", f"--junitxml={report}"]
        start = time.time()
        code, output = run_command(cmd, ctx.left() - 5, {"LLADAPTER_TEST_DEVICE": ctx.device.type})
        if not report.is_file():
            return [row(label, "ran out of time" if code is None else f"exited {code} with no report", False)]
        cases = list(ET.parse(report).getroot().iter("testcase"))
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = sum(c.find("skipped") is not None for c in cases)
    text = (f"{len(cases) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped in "
            f"{time.time() - start:.0f} s" + (f": {', '.join(failed[:4])}" if failed else ""))
    return [row(label, text, code == 0 and not failed)]


# name, what the table calls it, seconds allowed, function; in the order they run
CHECKS = [
    ("zero_gates", "zero gates = base model", 60, zero_gates),
    ("sdpa_math", "prompt branch vs math SDPA", 60, prompt_branch_against_math),
    ("adapter_step", "7B-shaped adapter step", 120, adapter_step),
    ("decoding", "decoding, eager", 60, decoding_eager),
    ("walkthrough", "walkthrough in bf16", 150, walkthrough),
    ("tests", "test suite", 240, tests),
    ("compiled_decoding", "decoding, compiled", 180, decoding_compiled),
]


def run_check(name, limit):
    """Run one check in a fresh process (its own memory, its own CUDA context, its own time limit, and a crash or a
    CUDA error that ends it ends no other check); its rows. --quick runs it in this process, to save the imports."""
    if quick:
        return run_step(name, Context(quick, time.time() + limit, work)), ""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "tools.gpu_check", f"--step={name}", f"--deadline={time.time() + limit}",
               f"--work={work}", f"--rows_file={rows_path}"]
        code, output = run_command(cmd, limit + 10)
        if rows_path.is_file():
            return jsonlib.loads(rows_path.read_text()), output
    label = next(c[1] for c in CHECKS if c[0] == name)
    why = f"ran out of time ({limit:.0f} s)" if code is None else f"failed: {output.strip().splitlines()[-1:]}"
    return [row(label, why, False)], output


def run_step(name, ctx):
    try:
        return dict((c[0], c[3]) for c in CHECKS)[name](ctx)
    except Exception as e:
        traceback.print_exc()
        label = next(c[1] for c in CHECKS if c[0] == name)
        return [row(label, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", False)]


def header():
    if quick:
        return {"device": f"cpu: {bench.cpu_name()}, {os.cpu_count()} cores (--quick: tiny shapes)",
                "torch": torch.__version__, "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {"device": f"{props.name}, {props.total_memory / 2**30:.1f} GiB", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count()}


def main(argv):
    cli.exit_on_input_error()
    globals().update(vars(cli.parse(Settings, __doc__, argv)))
    if step:  # one check, in this process
        rows = run_step(step, Context(quick, deadline, work or tempfile.gettempdir()))
        Path(rows_file).write_text(jsonlib.dumps(rows))
        return
    cli.require(quick or torch.cuda.is_available(), "no CUDA device here: tools/gpu_check.py checks a GPU "
                                                           "machine (--quick runs its code on this CPU at tiny shapes)")
    start = time.time()
    if quick:
        torch.set_num_threads(1)  # as run_command's processes
    with tempfile.TemporaryDirectory() as shared:
        globals()["work"] = shared
        return run_all(start)


def run_all(start):
    results = {**header(), "budget_s": budget_s, "checks": {}}
    print(f"gpu_check: {results['device']} | torch {results['torch']} | CUDA {results['cuda']}"
          + (f" | cuDNN {results['cudnn']} | {results['gpus']} GPU(s)" if not quick else ""), flush=True)
    for name, label, limit, _ in CHECKS:
        if quick and name in GPU_ONLY:
            continue
        left = budget_s - (time.time() - start)
        if left < 10:
            rows, status = [row(label, f"not run: the {budget_s} s budget is spent", False)], "not run"
        else:
            if json:  # what was running, should the whole check be stopped from outside
                Path(json).write_text(jsonlib.dumps({**results, "running": name}, indent=2))
            t0 = time.time()
            rows, output = run_check(name, min(limit, left))
            status = f"{time.time() - t0:.0f} s"
            if any(r["ok"] is False for r in rows):
                print(output[-3000:], file=sys.stderr)
        results["checks"][name] = {"seconds": status, "rows": rows}
        for r in rows:
            print(f"  [{status:>6}] {r['check']}: {r['result']}" + ("" if r["ok"] is None else
                                                                    f"  {'ok' if r['ok'] else 'FAILED'}"), flush=True)
        if json:  # as it goes: a run cut short still leaves what it found
            Path(json).write_text(jsonlib.dumps(results, indent=2))
    rows = [r for c in results["checks"].values() for r in c["rows"]]
    width = max(len(r["check"]) for r in rows)
    print(f"\n{'check':{width}}  {'ok':6}  result")
    for r in rows:
        print(f"{r['check']:{width}}  {'' if r['ok'] is None else 'ok' if r['ok'] else 'FAILED':6}  {r['result']}")
    failed = sum(r["ok"] is False for r in rows)
    print(f"\n{len(rows)} rows, {failed} failed; {time.time() - start:.0f} s in all")
    results["failed"] = failed
    if json:
        Path(json).write_text(jsonlib.dumps(results, indent=2))
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)

