"""
Check a CUDA machine end to end with one command: every path a user takes on a GPU, each check in its own process
with its own time limit, all within --budget_s (330 s: a 15-minute GPU slot holds a run and a rerun); one table at
the end, and the results as JSON.

    python -m tools.gpu_check                      # on a CUDA machine
    python -m tools.gpu_check --json=check.json    # also write the results as JSON, rewritten after every check
    python -m tools.gpu_check --only=nccl,fp16     # some checks alone (names below), e.g. to rerun those that failed
    python -m tools.gpu_check --quick              # the same code on this CPU at tiny shapes (CI): checks that it runs

In the order they run (seconds of the budget; a check may also use what the ones before it left unused):
  zero_gates         20  a model whose gates are all zero gives exactly the logits of the same weights with
                         adapter_layer=0, in bf16: full forward and cached decoding (the paper's zero-init property)
  sdpa_math          15  the prompt branch (paper Eq. 7's gated part) with the default attention kernel against
                         torch's math kernel, bf16, with and without grouped-query attention: output and gradient
  compiled_decoding  90  generation.generate(compile=True) at LLaMA-7B's shapes, batch 1 and 8: CUDA graphs, one
                         compilation and one graph recording per batch size, then a second call timed on the kept
                         cache (no capture in it), beside the memory-bandwidth bound
  generate_cli       35  generate.py as users run it, on a small random base written in Meta's layout: 9 prompts
                         from a file, --max_batch_size=4 --compile: one compilation and one CUDA-graph recording,
                         counted on its stderr (TORCH_LOGS=recompiles,cudagraphs,dynamo); then --max_batch_size=0,
                         the batch generation.batch_that_fits fits to free memory, at --max_seq_len=2048 on the same
                         grouped-query model with all but 1 GiB of the card taken first: no out of memory
  nccl               30  train.py under torchrun (NCCL), DDP and --fsdp in 1 process (and in 2 where there are 2
                         GPUs), against python train.py on the same steps: the adapter.pth files agree within
                         rtol 1e-3, atol 1e-4 (fp32 base; GPU kernels are not bit-exact) and the losses within 1e-4
  fp16               15  train.py --dtype=fp16 (the T4 path: loss scaling): finite losses; which dtype --dtype=auto
                         picks on this card, and its compute capability
  small_card         15  the small-card recipe on a Llama-3-shaped model (4 query heads per kv head, 128,256-entry
                         vocabulary, 4 layers): an int8 base, activation checkpointing, the chunked loss (256); its
                         peak memory reserved at most 1.10x the planner's prediction (tools/plan.py)
  adapter_step       25  LLaMA-7B's shapes, train.py's step at length 512, micro-batch 1, 2, 4, 8 (bench.py's code):
                         tokens/s, MFU, peak memory reserved, the planner's prediction, the attention kernels that ran
  decoding           15  generation.generate at batch 1 and 8, eager, beside the memory-bandwidth bound
  walkthrough        40  python train.py --dtype=bf16: the walkthrough's targets, read from its walkthrough.json (its
                         base is pretrained on the CPU alongside the checks above, or copied from out/walkthrough)
  tests              30  the fast tier, python -m pytest -q test_lladapter.py, with LLADAPTER_TEST_DEVICE=cuda
A check that would get under 5 s is reported as not run. --quick runs every check on the CPU at tiny shapes and skips
only what a CPU cannot do: gloo instead of NCCL (the 2-process runs not at all), compiled decoding in torch.compile's
default mode instead of CUDA graphs, no GPU memory figures, the walkthrough's smoke run, and a few fast-tier tests.
"""
import contextlib
import functools
import json as jsonlib  # `json` is the --json setting below
import logging
import math
import os
import re
import shutil
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
import generation
import lladapter
from lladapter import ModelArgs, Transformer


@dataclass
class Settings:
    budget_s: int = 330  # the whole run, process starts included; each check gets its share (see the list above)
    json: str = ""  # --json=FILE: the results as JSON, rewritten after every check
    only: str = ""  # comma-separated check names to run alone (e.g. --only=nccl,fp16); empty: all
    gpu_peak_tflops: float = 0.0  # the card's dense 16-bit peak, for MFU; 0: looked up from its name (bench.GPU_SPECS)
    gpu_bandwidth_tbs: float = 0.0  # the card's memory bandwidth in TB/s, for decoding's bound; 0: looked up
    quick: bool = False  # tiny shapes on the CPU: checks that every check runs (CI), measures nothing
    step: str = ""  # internal: run this one check in this process and write its rows as JSON to --rows_file
    rows_file: str = ""  # internal: where --step writes its rows
    deadline: float = 0.0  # internal: the time.time() by which the check must be done
    work: str = ""  # internal: the folder the checks share (the small base, its data, the walkthrough's base)


globals().update(vars(Settings()))  # the defaults, for the helpers below; main() sets the command line's
ROOT = Path(__file__).resolve().parent.parent  # where train.py is
SHORTEST_CHECK_S = 5  # a check that would get less is reported as not run
ADAPTER = dict(adapter_layer=2, adapter_len=10)  # the small base's adapter, in train.py and in generate.py
TRAIN_STEPS = 4  # optimizer steps of each train.py run (of 8 examples, 64 tokens each)
# train.py's runs against each other (nccl): the tolerance of the adapter files, and of the per-step losses
ADAPTER_RTOL, ADAPTER_ATOL, LOSS_RTOL = 1e-3, 1e-4, 1e-4
FREE_GIB = 1.0  # generate.py --max_batch_size=0 runs with all but this much of the card's free memory taken
QUICK_TESTS = "zero_gates_give_exactly or cached_decoding_matches"  # the fast-tier tests --quick runs


def row(check, result, ok=None):
    # ok: True or False for a pass/fail check, None for a figure reported as is
    return {"check": check, "result": result, "ok": ok}


def log(text):
    print(text, file=sys.stderr, flush=True)


def size_text(nbytes):
    return bench.size_text(nbytes / 2**30)


def against_bound(tokens_per_s, bound):
    if math.isnan(bound):  # a CPU, or a card bench.GPU_SPECS does not know
        return f"{tokens_per_s:,.1f} tok/s (no bandwidth bound known for this device: --gpu_bandwidth_tbs)"
    return f"{tokens_per_s:,.1f} tok/s, {100 * tokens_per_s / bound:.0f}% of the bandwidth bound {bound:,.0f} tok/s"


class Context:
    """What every check needs: the device, the shapes, the shared folder, and how much time is left. The card's
    name, peak and dtype are read on first use: checks that only start other processes never touch the GPU
    themselves until those have ended (a CUDA context here would hold memory they count on)."""

    def __init__(self, quick, deadline, work):
        self.quick, self.deadline, self.work = quick, deadline, Path(work)
        self.device = torch.device("cpu" if quick else "cuda")
        self.dtype = torch.bfloat16  # the correctness checks' dtype, on the CPU too
        self.args7b = ModelArgs(vocab_size=32000, max_seq_len=512) if not quick else \
            ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=3)
        # the command-line checks' device flag: --quick runs the scripts on the CPU even where there is a GPU
        self.device_flag = ["--device=cpu"] if quick else []

    @functools.cached_property
    def fast_dtype(self):
        # The timed checks': bf16 on a GPU that has it (fp16 on a T4); fp32 on a CPU (--quick), where bf16 is slow
        return cli.dtype_of("auto", self.device)

    @functools.cached_property
    def specs(self):
        name = bench.cpu_name() if self.quick else torch.cuda.get_device_name()
        return bench.gpu_specs(name, gpu_peak_tflops, gpu_bandwidth_tbs)  # (peak TFLOPS, bandwidth TB/s, note)

    def left(self):
        return self.deadline - time.time()


# ----------------------------------------------------------------------------------------------------------
# Processes: each check's, and the commands a check runs (train.py, generate.py, torchrun, pytest)

RUNNING = set()  # this process's children still running: ended with it


class Run:
    """A command in a process group of its own, its output to a file (no pipe that fills while several run at
    once). wait() ends the whole group (torchrun's workers, the tests' train.py runs) when the deadline passes."""

    def __init__(self, cmd, env=None, output=None):
        # --quick: one thread per process, as OpenMP's threads spin for cores a busy CI machine doesn't give them, and
        # those that a script asks for anyway (the walkthrough's 2) sleep while they wait: on 2 busy cores the
        # walkthrough's smoke run took 44 s with spinning threads, 7 s without (the same losses)
        quiet = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"} if quick else {}
        env = {**os.environ, **quiet, **(env or {})}
        self.output = output or tempfile.TemporaryFile("w+", errors="replace")
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self.output, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        RUNNING.add(self)

    def wait(self, deadline):
        """(exit status, or None if it ran out of time, and its output)."""
        try:
            code = self.process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.end()
            code = None
        RUNNING.discard(self)
        self.output.seek(0)
        return code, self.output.read()

    def end(self, grace=5):
        # SIGTERM first: a check's process then ends the commands it started (end_children); then whatever is left
        if grace:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        RUNNING.discard(self)


def end_children(*_):
    # SIGTERM's handler: end every command this process started (each in a process group of its own, so not reached
    # by the signal that ends this one), then this process
    for run in list(RUNNING):
        run.end(grace=0)
    sys.exit(1)


def last_line(output):
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def failure(code, output, limit_text="ran out of time"):
    return limit_text if code is None else f"exited {code}: {last_line(output)}"


# ----------------------------------------------------------------------------------------------------------
# The shared folder: a small random base in Meta's layout with its tokenizer, an adapter for it, train.py's data,
# generate.py's prompts; the walkthrough's base, built in the background

def small_args(vocab_size):
    """The small base of the command-line checks: grouped-query attention, 4 query heads per kv head."""
    shape = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32) if quick else \
        dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=256)
    return ModelArgs(**shape, vocab_size=vocab_size, adapter_layer=0)


def long_run():
    # generate.py --max_batch_size=0: (max_seq_len, prompts, new tokens per prompt)
    return (256, 12, 8) if quick else (2048, 40, 8)


def letters(n, offset=0):
    return " ".join("abcdefghijklmnopqrstuvwxyz"[(offset + i) % 26] for i in range(n))


def prepare_work(work):
    """Write the small base and everything the command-line checks read (a few seconds, on the CPU)."""
    small = work / "small"
    small.mkdir(parents=True)
    tokenizer = plan.write_tokenizer(small / "tokenizer.model")  # each lone letter one token
    args = small_args(tokenizer.n_words)
    torch.manual_seed(0)
    checkpoint.save_meta_checkpoint(Transformer(args), small, dtype=torch.float16)  # fp16, as Meta's files are
    adapted = Transformer(replace(args, **ADAPTER))
    bench.open_gates(adapted)  # open: the prompt branch changes every compiled step's output
    checkpoint.save_adapter(adapted, work / "adapter.pth")
    records = plan.fixed_length_records(tokenizer, 8 * TRAIN_STEPS, 64)  # TRAIN_STEPS batches of 8, 64 tokens each
    (work / "data.json").write_text(jsonlib.dumps(records))
    (work / "prompts.txt").write_text("".join(letters(3 + 2 * i, i) + "\n" for i in range(9)))  # 9 lengths
    max_seq_len, n, new = long_run()
    template = len(lladapter.encode_prompt(tokenizer, ""))
    lines = [letters(max_seq_len - new - template - 8 - i % 5, i) for i in range(n)]  # nearly max_seq_len long
    lengths = [len(lladapter.encode_prompt(tokenizer, line)) for line in lines]
    assert max(lengths) + new <= max_seq_len, f"a long prompt of {max(lengths)} tokens"
    (work / "long_prompts.txt").write_text("".join(line + "\n" for line in lines))
    (work / "long_prompts.json").write_text(jsonlib.dumps({"shortest": min(lengths), "longest": max(lengths)}))


WALKTHROUGH_FILES = ("base/consolidated.00.pth", "base/params.json", "base/tokenizer.model", "alpaca_train.json",
                     "heldout.json")
BUILD = """import sys
from pathlib import Path
from walkthrough import world
try:
    world.build(sys.argv[1], sys.argv[2] == "smoke")
    Path(sys.argv[3]).write_text("ok")
except BaseException as e:
    Path(sys.argv[3]).write_text(f"{type(e).__name__}: {e}")
    raise
"""


def start_walkthrough_base(work):
    """The walkthrough's pretrained base (minutes of CPU) in work/walk, in a process of its own while the GPU checks
    run; copied from out/walkthrough where python train.py made it on this machine. work/walk.built says when."""
    user = ROOT / "out" / "walkthrough"
    if not quick and all((user / f).is_file() for f in WALKTHROUGH_FILES):
        for f in WALKTHROUGH_FILES:
            (work / "walk" / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(user / f, work / "walk" / f)
        (work / "walk.source").write_text("copied from out/walkthrough")
    else:
        (work / "walk.source").write_text("pretrained on the CPU while the checks before it ran")
    return Run([sys.executable, "-c", BUILD, str(work / "walk"), "smoke" if quick else "full",
                str(work / "walk.built")], output=open(work / "walk_build.log", "w+"))


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


class GraphRecordings(logging.Handler):
    """Counts the CUDA graphs torch's cudagraph trees record (their "cudagraphs" log artifact: "Recording
    function=...", "Re-recording function=..." at DEBUG) and the reasons it skips them ("skipping cudagraphs due
    to ...", WARNING, all through cudagraph_utils.log_cudagraph_skip_and_bump_counter), in this process."""
    LOGGERS = ("torch._inductor.cudagraph_trees.__cudagraphs", "torch._inductor.cudagraph_utils.__cudagraphs")

    def __enter__(self):
        import torch._inductor.cudagraph_trees  # noqa: F401  (their loggers, as torch sets them up)
        import torch._inductor.cudagraph_utils  # noqa: F401
        self.recorded, self.rerecorded, self.skipped = 0, 0, []
        self.saved = []
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self.saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *_):
        for logger, level in self.saved:
            logger.removeHandler(self)
            logger.setLevel(level)

    def emit(self, record):
        text = record.getMessage()
        self.recorded += bool(re.search(r"\bRecording function=", text))
        self.rerecorded += "Re-recording function=" in text
        if "skipping cudagraph" in text or record.levelno >= logging.WARNING and "cudagraph_utils" in record.name:
            self.skipped.append(text.splitlines()[0][:160])


def decoding_compiled(ctx):
    """generate(compile=True) at batch 1 and 8: a warm-up call (it compiles, warms up, records the graph), then the
    same call again, timed, on the cache the first one kept: it must compile and record nothing."""
    from torch._dynamo.utils import counters
    args = ctx.args7b if not ctx.quick else replace(ctx.args7b, n_layers=2, adapter_layer=1)  # --quick: compiles faster
    model = bench.random_model(args, ctx.device, ctx.fast_dtype)
    bench.open_gates(model)
    n_new, n_prompt = (16, 8) if ctx.quick else (128, 32)
    rows = []
    with GraphRecordings() as graphs:
        for bsz in (1, 8):
            prompts = torch.randint(3, args.vocab_size, (bsz, n_prompt)).tolist()
            def count():  # graphs compiled, CUDA graphs recorded, re-recordings, so far in this process
                return counters["stats"]["unique_graphs"], graphs.recorded, graphs.rerecorded

            call = functools.partial(generation.generate, model, prompts, n_new, temperature=0, eos_id=-1, compile=True)
            before = count()
            call()
            warm = count()
            seconds = bench.timed(call)
            after = count()
            compiled, recorded, rerecorded = (w - b for w, b in zip(warm, before))
            again = tuple(a - w for a, w in zip(after, warm))  # in the timed call: must be (0, 0, 0)
            bound = bench.decode_bound(model, bsz, args.max_seq_len, ctx.specs[1])  # it reads the whole static cache
            tps = bsz * n_new / seconds
            graph_text = "CUDA graphs: none on a CPU (torch.compile's default mode)" if ctx.quick else \
                f"{recorded} CUDA graph(s) recorded, {rerecorded} re-recorded" + \
                (f", skipped: {graphs.skipped[0]}" if graphs.skipped else "")
            text = (f"{against_bound(tps, bound)} ({n_new} new tokens after {n_prompt}, timed on the kept cache); "
                    f"compiled {compiled}x, {graph_text}; the timed call compiled {again[0]}x, recorded "
                    f"{again[1] + again[2]}x")
            ok = compiled == 1 and again == (0, 0, 0) and \
                (ctx.quick or (recorded == 1 and rerecorded == 0 and not graphs.skipped))
            log(f"decoding, batch {bsz}, compiled: {text}")
            rows.append(row(f"decoding, batch {bsz}, compiled", text, ok))
    return rows


def generate_cli(ctx):
    """generate.py as users run it, on the small base and its adapter: a prompts file with --compile, its compilations
    and graph recordings read off TORCH_LOGS; then the batch fitted to free memory at a long max_seq_len."""
    base = [sys.executable, "generate.py", f"--ckpt_dir={ctx.work / 'small'}", f"--adapter={ctx.work / 'adapter.pth'}",
            "--temperature=0", *ctx.device_flag]
    long_reserve = 15 if not ctx.quick else 8  # seconds kept for the second run
    rows = []
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        # 1. 9 prompts in batches of 4, 4 and 1 (padded to 4 by generate.py): one batch size, so one compilation
        # and one CUDA graph. dynamo's INFO log says "Step 2: done compiler function" once per graph compiled;
        # recompiles: "Recompiling function"; the cudagraphs artifact: "Recording function=" per graph recorded.
        out = Path(tmp) / "compiled.jsonl"
        code, output = Run([*base, f"--prompts_file={ctx.work / 'prompts.txt'}", "--max_batch_size=4", "--compile",
                            "--max_gen_len=16", f"--out={out}"],
                           env={"TORCH_LOGS": "recompiles,cudagraphs,dynamo"}).wait(ctx.deadline - long_reserve)
        compiles = output.count("done compiler function")
        recompiles = output.count("Recompiling function")
        recorded = len(re.findall(r"\bRecording function=", output))
        rerecorded = output.count("Re-recording function=")
        skipped = re.findall(r"skipping cudagraphs? due to [^\n]{0,120}", output)
        answers = len(out.read_text().splitlines()) if out.is_file() else 0
        label = "generate.py --compile, 9 prompts in batches of 4"
        if code != 0:
            rows += [row(f"{label}: one compilation", failure(code, output), False),
                     row(f"{label}: one CUDA graph", "see above", False)]
        else:
            rows.append(row(f"{label}: one compilation", f"{compiles} compilation(s), {recompiles} recompilation(s); "
                            f"{answers} answers", compiles == 1 and recompiles == 0 and answers == 9))
            if ctx.quick:
                rows.append(row(f"{label}: one CUDA graph", "none on a CPU (torch.compile's default mode)"))
            else:
                rows.append(row(f"{label}: one CUDA graph", f"{recorded} recorded, {rerecorded} re-recorded"
                                + (f"; {skipped[0]}" if skipped else ""),
                                recorded == 1 and rerecorded == 0 and not skipped))
        # 2. --max_batch_size=0 at a long max_seq_len, grouped-query attention, on a card with little left free
        max_seq_len, n, new = long_run()
        out = Path(tmp) / "long.jsonl"
        args = [f"--prompts_file={ctx.work / 'long_prompts.txt'}", "--max_batch_size=0", f"--max_seq_len={max_seq_len}",
                f"--max_gen_len={new}", f"--out={out}"]
        code, output = Run([sys.executable, "-c", WITH_LITTLE_FREE, str(FREE_GIB), *base[1:], *args]).wait(
            ctx.deadline - 2)
        answers = len(out.read_text().splitlines()) if out.is_file() else 0
        batches = [int(b) for b in re.findall(r"\[(\d+)/\d+ answered\]", output)]
        fitted = batches[0] if batches else n  # no progress lines: every prompt in one batch
        memory = re.search(r"gpu_check: peak (\d+) reserved, (\d+) free", output)
        memory_text = (f"peak {size_text(int(memory[1]))} reserved with {size_text(int(memory[2]))} left free"
                       if memory else "free memory not bounded on a CPU")
        label = "generate.py --max_batch_size=0, long --max_seq_len, GQA: no out of memory"
        if code != 0:
            oom = "out of memory" in output.lower()
            rows.append(row(label, ("OUT OF MEMORY: " if oom else "") + failure(code, output), False))
        else:
            tokens = jsonlib.loads((ctx.work / "long_prompts.json").read_text())
            rows.append(row(label, f"max_seq_len {max_seq_len}, {n} prompts of {tokens['shortest']}-"
                            f"{tokens['longest']} tokens, {new} new each: "
                            f"fitted batch {fitted}{'' if fitted < min(n, 32) else ' (not limited by memory)'}; "
                            f"{memory_text}; {answers} answers", answers == n))
    return rows


# generate.py (argv[2:]) in a process whose card has little free memory left, as on a card its weights nearly fill:
# a ballast tensor takes all but argv[1] GiB first, so that torch.cuda.mem_get_info, which generate.py reads, sees
# that much. On a CPU (--quick, --device=cpu) generate.py runs as it is.
WITH_LITTLE_FREE = """import atexit, runpy, sys, torch
if torch.cuda.is_available() and "--device=cpu" not in sys.argv:
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(0, int(free - float(sys.argv[1]) * 2**30)), dtype=torch.uint8, device="cuda")
    left = torch.cuda.mem_get_info()[0]
    atexit.register(lambda: print(f"gpu_check: peak {torch.cuda.max_memory_reserved() - ballast.numel()} reserved, "
                                  f"{left} free", file=sys.stderr))
sys.argv = sys.argv[2:]
runpy.run_path("generate.py", run_name="__main__")
"""


def train_args(ctx, out):
    """train.py on the small base: TRAIN_STEPS optimizer steps of 8 examples of 64 tokens, micro-batches of 2, a
    learning rate at which the adapter visibly moves, its file written at the end."""
    return ["train.py", f"--ckpt_dir={ctx.work / 'small'}", f"--data_path={ctx.work / 'data.json'}", f"--out_dir={out}",
            *(f"--{k}={v}" for k, v in ADAPTER.items()), "--max_seq_len=64", "--batch_size=8", "--micro_batch_size=2",
            "--epochs=1", "--warmup_epochs=0.5", "--val_fraction=0", "--log_interval=1", "--base_lr=1.0",
            f"--stop_after={TRAIN_STEPS}", "--save_interval=1000", *ctx.device_flag]


def losses(out):
    return [jsonlib.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def adapter_of(path):
    return {k: v for k, v in checkpoint.torch_load(path).items() if isinstance(v, torch.Tensor)}


def distributed(ctx):
    """train.py under torchrun, DDP and FSDP, against one plain process on the same steps, all running at once."""
    gpus = 0 if ctx.quick else torch.cuda.device_count()  # the driver's count: no CUDA context in this process
    backend = "gloo on the CPU" if ctx.quick else "NCCL"
    launches = [(kind, n) for n in (1, 2) for kind in ("DDP", "FSDP")]
    rows = []
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        out = {name: Path(tmp) / name for name in ["one", *(f"{kind}{n}" for kind, n in launches)]}
        commands = {"one": [sys.executable, *train_args(ctx, out["one"])]}
        for kind, n in launches:
            if n == 1 or gpus >= 2:
                commands[f"{kind}{n}"] = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={n}", *train_args(ctx, out[f"{kind}{n}"]),
                                          *(["--fsdp"] if kind == "FSDP" else [])]
        started = {name: Run([*cmd, "--dtype=fp32"]) for name, cmd in commands.items()}
        done = {name: run.wait(ctx.deadline - 2) for name, run in started.items()}
        if done["one"][0] != 0:
            reference = f"python train.py failed: {failure(*done['one'])}"
        else:
            ref, ref_losses = adapter_of(out["one"] / "adapter.pth"), losses(out["one"])
            moved = max(v.abs().max().item() for k, v in ref.items() if k.endswith(".gate"))
            reference = "" if moved > 0 else "the adapter did not train (its gates are still zero)"
        for kind, n in launches:
            label = f"train.py, torchrun {n} process{'es' if n > 1 else ''}, {kind} = one process"
            name = f"{kind}{n}"
            if name not in done:
                why = "needs 2 GPUs" if ctx.quick else f"{gpus} GPU here, it needs 2"
                rows.append(row(label, f"skipped: {why} (the slow tier runs gloo over 2 processes on a CPU)"))
                continue
            code, output = done[name]
            if code != 0 or reference:
                rows.append(row(label, failure(code, output) if code != 0 else reference, False))
                continue
            got, got_losses = adapter_of(out[name] / "adapter.pth"), losses(out[name])
            diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
            close = got.keys() == ref.keys() and all(
                torch.allclose(got[k], ref[k], rtol=ADAPTER_RTOL, atol=ADAPTER_ATOL) for k in ref)
            loss_diff = max(abs(a - b) / abs(b) for a, b in zip(got_losses, ref_losses))
            same_losses = len(got_losses) == len(ref_losses) == TRAIN_STEPS and loss_diff <= LOSS_RTOL
            rows.append(row(label, f"{backend}, {TRAIN_STEPS} steps, fp32 base: adapter "
                            f"{'identical' if diff == 0 else f'max abs difference {diff:.2g}'} (rtol {ADAPTER_RTOL:g}, "
                            f"atol {ADAPTER_ATOL:g}; gates moved up to {moved:.3g}), losses within {loss_diff:.2g} "
                            f"relative (at most {LOSS_RTOL:g})", close and same_losses))
    return rows


def fp16(ctx):
    """train.py --dtype=fp16: the loss scaled, a step whose gradients overflow skipped; then --dtype=auto's choice."""
    label = "train.py --dtype=fp16 (loss scaling): finite losses"
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        out = Path(tmp) / "fp16"
        code, output = Run([sys.executable, *train_args(ctx, out), "--dtype=fp16"]).wait(ctx.deadline - 5)
        if code != 0:
            rows = [row(label, failure(code, output), False)]
        else:
            records = [jsonlib.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            finite = all(math.isfinite(r["loss"]) for r in records)
            skipped = sum(bool(r.get("skipped")) for r in records)
            rows = [row(label, f"{len(records)} steps, losses {records[0]['loss']:.3f} .. {records[-1]['loss']:.3f}, "
                        f"{skipped} skipped on overflow, loss scale now {records[-1].get('loss_scale', 0):g}",
                        finite and len(records) == TRAIN_STEPS and skipped < len(records))]
    # Only now this process touches the GPU (train.py ran with the card to itself)
    label = "--dtype=auto on this device"
    try:
        auto = cli.dtype_name(ctx.fast_dtype)
        capability = None if ctx.quick else ".".join(map(str, torch.cuda.get_device_capability()))
    except Exception as e:  # the row above stands
        return rows + [row(label, f"error: {type(e).__name__}: {e}"[:200], False)]
    text = f"{auto} on a CPU" if ctx.quick else \
        f"{auto} on this card (compute capability {capability}: bf16 from 8.0, fp16 with loss scaling below)"
    return rows + [row(label, text)]


def small_card(ctx):
    """train.py's step with the small-card recipe (--quantize=int8 --activation_checkpointing --loss_chunk=256) on a
    Llama-3-shaped model, its layers and width cut: grouped-query attention (4 query heads per kv head), Llama 3's
    vocabulary (the output head and the logits carry most of the memory at small sizes)."""
    shape = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=1) if ctx.quick else \
        dict(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4)  # head_dim 64 and 128, as Llama 3's
    micro_batch, length = (1, 64) if ctx.quick else (4, 512)
    args = replace(plan.llama_args("Llama-3.1-8B", length), **shape, rope_theta=500000.0,
                   adapter_layer=shape["n_layers"])
    options = dict(quantize="int8", checkpointing=True, chunk=256)
    dtype = ctx.fast_dtype
    trainer = bench.Trainer(args, "adapter", ctx.device, dtype, **options)
    gates = [layer.attention.gate for layer in trainer.model.layers]
    tokens, labels = bench.random_batch(micro_batch, length, args.vocab_size, ctx.device)
    if ctx.device.type == "cuda":  # from here: the steps alone, not the quantization that built the model
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second with AdamW's state allocated
        trainer.step(tokens, labels)
    moved = max(g.abs().max().item() for g in gates)
    finite = all(p.isfinite().all() for p in trainer.model.parameters() if p.requires_grad)
    scored = bench.scored_per_sequence(length)
    predicted = plan.plan_memory(args, "1 GPU", 1, micro_batch, length, scored, dtype, **options)["total"]
    what = (f"dim {args.dim}, {args.n_layers} layers, {args.n_heads}/{args.n_kv_heads} heads, vocabulary "
            f"{args.vocab_size:,}, {cli.dtype_name(dtype)}, micro-batch {micro_batch} x {length}")
    rows = [row("small-card recipe, Llama-3-shaped: int8 + checkpointing + chunked loss, 2 steps",
                f"{what}: adapter finite, gates moved up to {moved:.3g}", finite and moved > 0)]
    label = "small-card recipe: peak memory vs the planner"
    if ctx.device.type != "cuda":
        rows.append(row(label, f"not measured on a CPU (planner {size_text(predicted)})"))
    else:
        reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        rows.append(row(label, f"{size_text(reserved)} reserved ({size_text(allocated)} allocated), planner "
                        f"{size_text(predicted)}: {reserved / predicted:.2f}x (at most 1.10x)",
                        reserved <= 1.1 * predicted))
    return rows


def adapter_step(ctx):
    micro_batches = [1, 2] if ctx.quick else [1, 2, 4, 8]
    peak, _, note = ctx.specs
    step, _ = bench.adapter_step(ctx.args7b, ctx.device, ctx.fast_dtype, micro_batches, 2 if ctx.quick else 3, peak,
                                 log=log)
    rows = []
    for r in step["micro_batches"]:
        label = f"7B-shaped adapter step, micro-batch {r['micro_batch']}"
        if r.get("out_of_memory"):
            rows.append(row(label, "out of memory", False))
            continue
        memory = f"{r['reserved_gib']:.1f} GiB reserved" if "reserved_gib" in r else "memory not measured on a CPU"
        mfu = "" if math.isnan(r["mfu"]) else f", MFU {100 * r['mfu']:.1f}%"
        rows.append(row(label, f"x {r['length']}: {r['tokens_per_s']:,.0f} tok/s{mfu}, {memory} "
                        f"(planner {bench.size_text(r['predicted_gib'])})"))
    first, measured = step["micro_batches"][0], [r for r in step["micro_batches"] if "tokens_per_s" in r]
    best = max(measured, key=lambda r: r["tokens_per_s"]) if measured else None
    judged = not ctx.quick
    rows.append(row("7B-shaped adapter step fits a 24 GB card (micro-batch 1)",
                    f"{first['reserved_gib']:.1f} GiB reserved + {plan.CONTEXT_GIB} GiB context <= 24 GiB"
                    if "reserved_gib" in first else "not judged on a CPU",
                    first.get("reserved_gib", 99) + plan.CONTEXT_GIB <= 24 if judged else None))
    if ctx.quick:
        mfu = "not judged on a CPU"
    elif best is None:
        mfu = "nothing measured"
    else:
        mfu = (f"{100 * best['mfu']:.1f}% at micro-batch {best['micro_batch']} (peak {peak} TFLOPS"
               f"{'; ' + note if note else ''})")
    rows.append(row("7B-shaped adapter step MFU >= 45% (best micro-batch)", mfu,
                    best is not None and best["mfu"] >= 0.45 if judged else None))
    rows.append(row("attention kernels in the adapter step", "; ".join(f"{k}: {v}" for k, v in step["sdpa"].items())))
    return rows


def decoding_eager(ctx):
    model = bench.random_model(ctx.args7b, ctx.device, ctx.fast_dtype)
    bench.open_gates(model)
    found = bench.decoding(model, ctx.device, [1, 8], [False], 16 if ctx.quick else 64, 8 if ctx.quick else 32,
                           ctx.specs[1], log=log)
    return [row(f"decoding, batch {r['batch']}, eager", against_bound(r["tokens_per_s"], r["bound_tokens_per_s"]))
            for r in found]


def walkthrough(ctx):
    """python train.py --dtype=bf16 on the base pretrained alongside the checks before it: the walkthrough's targets,
    read from the walkthrough.json it writes (--quick: its smoke run, whose targets are not judged)."""
    label = "walkthrough in bf16: its targets"
    built = ctx.work / "walk.built"
    while not built.is_file():  # its base, pretrained in the background (start_walkthrough_base)
        if ctx.left() < 10:
            return [row(label, "ran out of time waiting for its base to be pretrained", False)]
        time.sleep(0.5)
    if built.read_text() != "ok":
        return [row(label, f"pretraining its base failed: {built.read_text()[:200]}", False)]
    out = ctx.work / "walk"
    start = time.time()
    code, output = Run([sys.executable, "train.py", "--dtype=bf16", f"--out_dir={out}",
                        *(["--smoke"] if ctx.quick else []), *ctx.device_flag]).wait(ctx.deadline - 2)
    if code != 0 or not (out / "walkthrough.json").is_file():
        return [row(label, failure(code, output), False)]
    result = jsonlib.loads((out / "walkthrough.json").read_text())
    text = (f"held-out exact match: base alone {100 * result['base_exact_match']:.1f}%, base + adapter "
            f"{100 * result['adapter_exact_match']:.1f}%; trainable {result['trainable']:,} of "
            f"{result['parameters']:,}; {time.time() - start:.0f} s, its base {(ctx.work / 'walk.source').read_text()}")
    if ctx.quick:
        return [row(label, f"smoke run, targets not judged: {text}")]
    return [row(label, text + "; targets " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                                      for k, v in result["targets_met"].items()),
                all(result["targets_met"].values()))]


def tests(ctx):
    """The fast tier once, with the check's device as the test device; counts read from pytest's JUnit XML report."""
    label = "fast tier, test_lladapter.py, on the check's device"
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_lladapter.py",
               f"--junitxml={report}", *(["-k", QUICK_TESTS] if ctx.quick else [])]
        start = time.time()
        code, output = Run(cmd, {"LLADAPTER_TEST_DEVICE": ctx.device.type}).wait(ctx.deadline - 2)
        if not report.is_file():
            return [row(label, "ran out of time" if code is None else f"exited {code} with no report", False)]
        cases = list(ET.parse(report).getroot().iter("testcase"))
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = sum(c.find("skipped") is not None for c in cases)
    text = (f"LLADAPTER_TEST_DEVICE={ctx.device.type}{' (--quick: a few tests)' if ctx.quick else ''}: "
            f"{len(cases) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped in "
            f"{time.time() - start:.0f} s" + (f": {', '.join(failed[:4])}" if failed else ""))
    return [row(label, text, code == 0 and not failed and len(cases) > 0)]


@dataclass
class Check:
    name: str
    label: str  # what the table calls it when it did not run
    budget_s: int  # its share of the default --budget_s
    run: object


# In the order they run: the quick correctness checks, compiled decoding while the budget is fresh, the command
# lines users type, the measurements, then the slowest two.
CHECKS = [
    Check("zero_gates", "zero gates = base model", 20, zero_gates),  # with the first CUDA start-up
    Check("sdpa_math", "prompt branch vs math SDPA", 15, prompt_branch_against_math),
    Check("compiled_decoding", "decoding, compiled", 90, decoding_compiled),
    Check("generate_cli", "generate.py as users run it", 35, generate_cli),
    Check("nccl", "train.py under torchrun", 30, distributed),
    Check("fp16", "train.py --dtype=fp16", 15, fp16),
    Check("small_card", "small-card recipe", 15, small_card),
    Check("adapter_step", "7B-shaped adapter step", 25, adapter_step),
    Check("decoding", "decoding, eager", 15, decoding_eager),
    Check("walkthrough", "walkthrough in bf16", 40, walkthrough),
    Check("tests", "fast tier", 30, tests),
]
BY_NAME = {c.name: c for c in CHECKS}


def run_check(check, limit):
    """Run one check in a fresh process (its own memory, its own CUDA context, its own time limit, and a crash or a
    CUDA error that ends it ends no other check): (its rows, the device it reports, its output). --quick runs it in
    this process, to save the imports."""
    if quick:
        return run_step(check, Context(quick, time.time() + limit, work)), None, ""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "tools.gpu_check", f"--step={check.name}", f"--deadline={time.time() + limit}",
               f"--work={work}", f"--rows_file={rows_path}", f"--gpu_peak_tflops={gpu_peak_tflops}",
               f"--gpu_bandwidth_tbs={gpu_bandwidth_tbs}"]
        code, output = Run(cmd).wait(time.time() + limit + 10)  # its own deadline first, then 10 s to end
        if rows_path.is_file():
            found = jsonlib.loads(rows_path.read_text())
            return found["rows"], found["device"], output
    why = f"ran out of time ({limit:.0f} s)" if code is None else f"crashed: {last_line(output)}"
    return [row(check.label, why, False)], None, output


def run_step(check, ctx):
    try:
        return check.run(ctx)
    except Exception as e:
        traceback.print_exc()
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return [row(check.label, f"error: {type(e).__name__}: {text}", False)]


def device_info():
    """The card this process ran on, for the header (None if it never touched the GPU and can't now)."""
    try:
        props = torch.cuda.get_device_properties(0)
        return {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "compute_capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                "gpus": torch.cuda.device_count()}
    except Exception:
        return None


def header():
    if quick:
        return {"device": f"cpu: {bench.cpu_name()}, {os.cpu_count()} cores (--quick: tiny shapes)",
                "torch": torch.__version__, "cuda": None}
    # No CUDA context here: device_count() asks NVML or the driver, and the first check names the card
    return {"device": None, "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}


def write_json(results):
    if json:  # whole or not at all: a run stopped from outside still leaves what it found
        Path(json + ".tmp").write_text(jsonlib.dumps(results, indent=2))
        os.replace(json + ".tmp", json)


def main(argv):
    cli.exit_on_input_error()
    globals().update(vars(cli.parse(Settings, __doc__, argv)))
    if step:  # one check, in this process
        cli.require(step in BY_NAME, f"--step={step}: no such check")
        signal.signal(signal.SIGTERM, end_children)  # told to stop: the commands this check started stop too
        rows = run_step(BY_NAME[step], Context(quick, deadline, work))
        # the card, where this check used it (one that only ran commands gets the header's)
        info = device_info() if not quick and torch.cuda.is_initialized() else None
        Path(rows_file).write_text(jsonlib.dumps({"rows": rows, "device": info}))
        return 0
    selected = [c for c in CHECKS if not only or c.name in only.split(",")]
    unknown = set(only.split(",")) - set(BY_NAME) if only else set()
    cli.require(not unknown, f"--only: no check named {', '.join(sorted(unknown))}; the checks: {', '.join(BY_NAME)}")
    cli.require(quick or torch.cuda.is_available(), "no CUDA device here: tools/gpu_check.py checks a GPU "
                                                           "machine (--quick runs its code on this CPU at tiny shapes)")
    signal.signal(signal.SIGTERM, end_children)
    if quick:
        torch.set_num_threads(1)  # as the commands it runs
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as shared:
        globals()["work"] = shared
        try:
            return run_all(selected, Path(shared))
        finally:
            for run in list(RUNNING):  # the walkthrough's base, if it was not wanted after all
                run.end()


def run_all(selected, shared):
    start = time.time()
    results = {**header(), "quick": quick, "budget_s": budget_s, "checks": {}}
    where = results["device"] or f"{results['gpus']} CUDA device(s), the card named by the first check"
    print(f"gpu_check: {where} | torch {results['torch']} | CUDA {results['cuda']} | budget {budget_s} s", flush=True)
    if any(c.name in ("generate_cli", "nccl", "fp16") for c in selected):  # the checks that run the scripts
        prepare_work(shared)
    if any(c.name == "walkthrough" for c in selected):
        start_walkthrough_base(shared)
    total = sum(c.budget_s for c in selected)
    shares = [c.budget_s * budget_s / total for c in selected]  # the budgets add up to --budget_s
    for i, check in enumerate(selected):
        # what is left of the budget but the shares of the checks after this one: its own share and what the ones
        # before it left unused
        limit = budget_s - (time.time() - start) - sum(shares[i + 1:])
        record = {"label": check.label, "budget_s": round(shares[i], 1), "limit_s": round(limit, 1)}
        if limit < SHORTEST_CHECK_S:
            rows, device = [row(check.label, f"not run: the {budget_s} s budget is spent", False)], None
            record.update(status="not run", seconds=0)
        else:
            write_json({**results, "running": check.name})  # what was running, should the run be stopped from outside
            t0 = time.time()
            rows, device, output = run_check(check, limit)
            record.update(status="ran", seconds=round(time.time() - t0, 1))
            if any(r["ok"] is False for r in rows) and output:
                print(output[-3000:], file=sys.stderr, flush=True)
        if device and not results["device"]:
            results.update(device)
            print(f"card: {device['device']}, {device['memory_gib']} GiB, compute capability "
                  f"{device['compute_capability']} | cuDNN {device['cudnn']}", flush=True)
        results["checks"][check.name] = {**record, "device": (device or {}).get("device", results["device"]),
                                         "rows": rows}
        for r in rows:
            print(f"  [{record['seconds']:5.0f} s] {r['check']}: {r['result']}"
                  + ("" if r["ok"] is None else f"  {'ok' if r['ok'] else 'FAILED'}"), flush=True)
        write_json(results)
    rows = [r for c in results["checks"].values() for r in c["rows"]]
    width = max(len(r["check"]) for r in rows)
    print(f"\n{results['device'] or 'the card: not named (no check reached it)'} | torch {results['torch']} | "
          f"CUDA {results['cuda']}"
          + (f" | cuDNN {results.get('cudnn')}" if not quick else ""))
    print(f"{'check':{width}}  {'ok':6}  result")
    for r in rows:
        print(f"{r['check']:{width}}  {'' if r['ok'] is None else 'ok' if r['ok'] else 'FAILED':6}  {r['result']}")
    failed = sum(r["ok"] is False for r in rows)
    results.update(failed=failed, seconds=round(time.time() - start, 1))
    print(f"\n{len(rows)} rows, {failed} failed; {time.time() - start:.0f} s of the {budget_s} s budget")
    write_json(results)
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
