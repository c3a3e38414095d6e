"""
Measure what the paper and the README claim about cost, on random weights: nothing to download.

    python -m tools.bench                      # CPU section, then the GPU section when CUDA is present; a table at the end
    python -m tools.bench --json=bench.json    # also write every figure as JSON
    python -m tools.bench --quick              # tiny shapes, seconds: checks that every section runs, measures nothing
    python -m tools.plan                       # the memory planner (tools/plan.py), and its check against train.py

CPU: one adapter step against one full fine-tuning step (time, peak memory); cached generation against
recomputation; per-token decoding on a tiny model, where it is all overhead, eager against compile=True, and compiled
on a model whose context is 2,048 with generate()'s default static cache against cache_len=64; the memory options
side by side; int8 decoding against fp32.
GPU: LLaMA-7B's shapes, bf16 base and fp32 adapter under autocast, train.py's step at full length (max_seq_len
512, no padding) for micro-batches 1, 2, 4, 8: tokens/s, MFU against the card's dense 16-bit peak, the peak memory
torch reserved (the CUDA context, a few hundred MiB, comes on top) beside the planner's prediction, and which
scaled_dot_product_attention kernel ran; then decoding at batch 1 and 8, eager and compiled, beside the card's
memory-bandwidth bound.

Targets: CPU adapter step <= 0.7x the full step's time and <= 0.6x its memory; cached generation >= 5x
recomputation at 256 new tokens; compiled decoding with the default cache <= 1.25x the time with cache_len=64;
GPU: >= 45% MFU on the 7B-shaped adapter step, the paper's 5 Alpaca epochs projected under an hour on one H100, 7B
adapter training at max_seq_len 512 (micro-batch 1) within a 24 GB card.
"""
import functools
import json as jsonlib  # `json` is the --json setting below
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import checkpoint
import cli
import generation
import lladapter
import quantize as quantization
from lladapter import ModelArgs, Transformer
from tools.plan import CONTEXT_GIB, FIXED_MALLOC, ROOT, cpu_name, llama_args, plan_memory


@dataclass
class Settings:
    # CPU section: a mid-size LLaMA (the shape); the adapter on the top 7 of 8 layers, as 30 of 32 at 7B
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = 32000
    seq_len: int = 256
    batch: int = 4
    adapter_layer: int = 7
    adapter_len: int = 10
    steps: int = 5  # timed steps per mode, alternating adapter / full, after one warm-up step each
    new_tokens: int = 256  # generation: new tokens per prompt
    prompt_len: int = 32
    decode_tokens: int = 128  # CPU decoding overhead: new tokens per timed call on the tiny model
    options_dim: int = 1024  # the memory options' model: the CPU section's, this wide (the issue's mid size)
    compile_decode: bool = True  # also decode with generate(compile=True); compiling first takes ~20 s on a CPU
    # GPU section: LLaMA-7B's shapes, the paper's adapter (K=10, L=30), every sequence max_seq_len long
    dtype: str = "auto"  # the frozen base: auto is bf16 on a GPU that has it, fp16 on one that doesn't (fp32 on a CPU)
    gpu_steps: int = 10  # timed steps per micro-batch size, after one warm-up step
    gpu_micro_batches: str = "1,2,4,8"  # micro-batch sizes to run at max_seq_len 512
    gpu_peak_tflops: float = 0.0  # the card's dense 16-bit peak; 0: looked up from its name (GPU_SPECS)
    gpu_bandwidth_tbs: float = 0.0  # the card's memory bandwidth in TB/s; 0: looked up from its name
    json: str = ""  # --json=FILE writes the results as JSON
    only: str = ""  # comma-separated sections (training, generation, decoding, adapters, memory_options, int8_decoding, int8_quality, gpu); empty: all
    quick: bool = False  # tiny shapes: a smoke test of this script
    memory_probe: str = ""  # internal: "adapter" or "full", run in a fresh process to measure its peak memory


globals().update(vars(Settings()))  # the defaults, for the helpers below; main() sets the command line's
QUICK = dict(dim=64, options_dim=128, n_layers=2, n_heads=4, vocab_size=512, seq_len=32, batch=2, adapter_layer=1, steps=2,
             new_tokens=16, prompt_len=8, decode_tokens=16, compile_decode=False, gpu_steps=2, gpu_micro_batches="1,2")


# ----------------------------------------------------------------------------------------------------------
# Shared pieces: random models, train.py's step, timing, memory

def random_model(args, device, dtype, seed=0):
    # Build on the meta device, give the base `dtype` and the adapter fp32 (as load_llama does), then fill in.
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = lladapter.set_precision(Transformer(args), dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.adapter_layer:
        model.reset_adapter()
    model.rope = lladapter.precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, device)
    return model


def open_gates(model, value=0.1):
    # An adapter in use: its branch runs at every step and changes the output.
    with torch.no_grad():
        for gate in model.gates():
            gate.fill_(value)


class Trainer:
    """A model with train.py's optimizer and precision: the base in `dtype` under one autocast, the trainable
    tensors fp32, AdamW (fused on a GPU), and fp16's loss scaling."""

    def __init__(self, args, mode, device, dtype, quantize="", checkpointing=False, chunk=0):
        self.model = random_model(args, device, dtype)
        if quantize:  # train.py --quantize=int8 (there quantized while loading)
            quantization.int8_linears(self.model, quantize_from_weights=True)
        self.model.activation_checkpointing, self.chunk = checkpointing, chunk
        if mode == "adapter":
            lladapter.mark_only_adapter_trainable(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in trainable)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02,
                                           fused=device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(self, tokens, labels):
        # train.py's step for one micro-batch that is the whole batch: the response loss as a mean over its scored
        # tokens, a backward, an AdamW update
        with self.autocast:
            loss = lladapter.response_loss(self.model, tokens, labels, chunk=self.chunk) / \
                (labels != lladapter.IGNORE_INDEX).sum()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def mid_args(adapter=True):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size, max_seq_len=2 * seq_len + 64,
                     adapter_len=adapter_len, adapter_layer=adapter_layer if adapter else 0)


def random_batch(bsz, length, vocab, device):
    # `length` tokens per sequence (+1, as train.py feeds tokens[:, :-1]); the first third is an unscored prompt.
    # The labels stay on the CPU, as train.py's (lladapter.pad_batch)
    labels = torch.randint(3, vocab, (bsz, length + 1))
    tokens = labels.to(device, copy=True)
    labels[:, :length // 3] = lladapter.IGNORE_INDEX
    return tokens, labels


def scored_per_sequence(length):
    # What random_batch scores: targets are labels[:, 1:], of which the first length // 3 - 1 are the prompt's
    return length - length // 3 + 1


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def alternating_medians(calls, repeats):
    """Each of `calls` (name: function) run repeats + 1 times, in turn, so that a drift of the machine's speed
    falls on all alike; the first call of each warms up (and compiles). On one thread: at these sizes a second
    OpenMP thread on a busy machine measures the contention, not the work. The median seconds of each."""
    times = {name: [] for name in calls}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(repeats + 1):
            for name, call in calls.items():
                t = timed(call)
                if i > 0:
                    times[name].append(t)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def rss_mib(field="VmHWM"):
    # The process's peak (VmHWM) or current (VmRSS) resident memory. VmHWM starts afresh at exec; getrusage's
    # ru_maxrss would also count the parent's memory at fork time.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # KiB
    except (OSError, StopIteration):
        pass
    try:
        import resource  # POSIX only: on Windows the memory figures are NaN, the timings as ever
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10




# ----------------------------------------------------------------------------------------------------------
# CPU: adapter against full fine-tuning, the KV cache against recomputation, decoding overhead

def probe_memory(mode):
    """Run in a fresh process (--memory_probe): 3 training steps of one mode ("adapter", "full", or "option:NAME",
    an adapter with the memory option NAME of OPTIONS at options_dim); its peak memory as JSON."""
    baseline = rss_mib()
    if mode.startswith("option:"):
        trainer = Trainer(options_args(), "adapter", torch.device("cpu"), torch.float32, **OPTIONS[mode[7:]])
    else:
        trainer = Trainer(mid_args(), mode, torch.device("cpu"), torch.float32)
    loaded = rss_mib("VmRSS")
    tokens, labels = random_batch(batch, seq_len, vocab_size, "cpu")
    for _ in range(3):  # from the second step on, the optimizer state is allocated
        trainer.step(tokens, labels)
    print(jsonlib.dumps({"peak_mib": rss_mib(), "baseline_mib": baseline, "loaded_mib": loaded}))


def cpu_training(argv, results):
    cpu = torch.device("cpu")
    trainers = {mode: Trainer(mid_args(), mode, cpu, torch.float32) for mode in ("adapter", "full")}
    tokens, labels = random_batch(batch, seq_len, vocab_size, cpu)
    times = {"adapter": [], "full": []}
    for i in range(steps + 1):
        for mode, trainer in trainers.items():
            t = timed(lambda: trainer.step(tokens, labels))
            if i > 0:  # the first step of each warms up (allocations, optimizer state)
                times[mode].append(t)
    for mode in ("adapter", "full"):
        median = statistics.median(times[mode])
        probe = subprocess.run([sys.executable, "-m", "tools.bench", f"--memory_probe={mode}", *argv], cwd=ROOT,
                               capture_output=True, text=True, check=True, env={**os.environ, **FIXED_MALLOC})
        memory = jsonlib.loads(probe.stdout)
        # Peak memory above the interpreter and torch (weights included), and above the loaded model (what the
        # training step itself adds: activations, logits, gradients, optimizer state).
        above_import = memory["peak_mib"] - memory["baseline_mib"]
        above_model = memory["peak_mib"] - memory["loaded_mib"]
        results[f"cpu_{mode}"] = {"trainable": trainers[mode].n_trainable, "step_s": median,
                                  "tokens_per_s": batch * seq_len / median, "peak_mib": memory["peak_mib"],
                                  "above_import_mib": above_import, "above_model_mib": above_model}
        print(f"cpu {mode:7} step: {median * 1000:8.1f} ms median of {steps}, {batch * seq_len / median:8.0f} tok/s, "
              f"peak memory {above_import:.0f} MiB above torch's own, {above_model:.0f} MiB above the loaded model",
              flush=True)
    a, f = results["cpu_adapter"], results["cpu_full"]
    results["cpu_time_ratio"] = a["step_s"] / f["step_s"]
    for key in ("above_import_mib", "above_model_mib"):
        results[f"cpu_memory_ratio_{key[:-4]}"] = a[key] / f[key] if f[key] > 0 else float("nan")


@torch.inference_mode()
def recompute_generate(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def cache_against_recompute(model, bsz):
    prompt = torch.randint(3, model.args.vocab_size, (bsz, prompt_len))
    cached = timed(lambda: generation.generate(model, prompt.tolist(), new_tokens, temperature=0, eos_id=-1))
    recompute = timed(lambda: recompute_generate(model, prompt, new_tokens))
    row = {"batch": bsz, "cached_tokens_per_s": bsz * new_tokens / cached,
           "recompute_tokens_per_s": bsz * new_tokens / recompute, "speedup": recompute / cached}
    print(f"cpu generation, batch {bsz}: {row['cached_tokens_per_s']:8.1f} tok/s with the cache, "
          f"{row['recompute_tokens_per_s']:8.1f} recomputing, {row['speedup']:.1f}x", flush=True)
    return row


def decode_overhead(n_tokens, use_compile, repeats=3):
    """Per-token decoding time on a tiny model (dim 64, 4 layers: the arithmetic is nothing, the time is Python,
    dispatch and kernel launches), eager and compile=True alternating in one process, after a warm-up of each.
    On one thread: ops this small gain nothing from more, and on a busy machine OpenMP's waiting threads would
    measure the contention (both modes read ~60 ms per token on 2 threads here), not the overhead."""
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=n_tokens + 16, adapter_layer=3)
    model = random_model(args, torch.device("cpu"), torch.float32)
    open_gates(model)
    prompt = [list(range(3, 11))]  # 8 tokens: the prefill is one small forward
    modes = [False, True] if use_compile else [False]
    seconds = alternating_medians({m: functools.partial(generation.generate, model, prompt, n_tokens, temperature=0,
                                                        eos_id=-1, compile=m) for m in modes}, repeats)
    row = {"eager_ms_per_token": 1000 * seconds[False] / n_tokens}
    text = f"cpu decoding, tiny model, batch 1: {row['eager_ms_per_token']:.2f} ms per token eager"
    if use_compile:
        row["compiled_ms_per_token"] = 1000 * seconds[True] / n_tokens
        row["compiled_over_eager"] = row["compiled_ms_per_token"] / row["eager_ms_per_token"]
        text += f", {row['compiled_ms_per_token']:.2f} compiled ({row['compiled_over_eager']:.2f}x)"
    print(text + f"; median of {repeats} calls of {n_tokens} tokens each, one thread", flush=True)
    return row


def compiled_cache(n_prompt=8, n_new=32, context=2048, repeats=9):
    """Compiled decoding on a model whose context is 2,048 (the shape of llama2.c's stories260K: dim 64, 5 layers, 8
    query heads over 4 kv heads), n_new tokens after an n_prompt-token prompt, batch 1, one thread: generate()'s
    default static cache against the same call with cache_len=64, and with the model's context as the cache (what
    the default was: every compiled step reads all of its static cache). Interleaved after a warm-up of each (which
    compiles: the default and 64 share one graph), the median of `repeats` calls."""
    args = ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=context, adapter_layer=3)
    model = random_model(args, torch.device("cpu"), torch.float32)
    open_gates(model)
    prompt = [list(range(3, 3 + n_prompt))]
    caches = {"default": None, "cache_len=64": 64, f"cache_len={context}": context}
    seconds = alternating_medians({name: functools.partial(generation.generate, model, prompt, n_new, temperature=0,
                                                           eos_id=-1, compile=True, cache_len=cache_len)
                                   for name, cache_len in caches.items()}, repeats)
    model.clear_cache()
    ms = {name: 1000 * t / n_new for name, t in seconds.items()}
    row = {"ms_per_token": ms, "default_over_64": ms["default"] / ms["cache_len=64"],
           "context_over_64": ms[f"cache_len={context}"] / ms["cache_len=64"]}
    print(f"cpu compiled decoding, context {context}, {n_new} new tokens after {n_prompt}, batch 1, one thread: "
          + ", ".join(f"{name} {v:.3f}" for name, v in ms.items()) + f" ms per token (median of {repeats}); default "
          f"/ cache_len=64 {row['default_over_64']:.2f}x, the context as cache / 64 {row['context_over_64']:.2f}x",
          flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# CPU: several adapters on one base (generation.AdapterBank), side by side with one adapter and with one at a time

def adapter_serving(repeats=3, n_new=64):
    """Tokens/s of 8 rows over 4 different adapters in one batch (a bank), of the same 8 rows over one adapter (a
    bank of one), and of the 4 adapters one after another at batch 2, each loaded into the model the ordinary way:
    the three alternating in one process, after a warm-up of each; the median. Then the bank's memory per adapter at
    Llama-3.1-8B's shapes (the paper's K = 10 in the top 30 layers, bf16), read off a bank built on the meta device."""
    cpu = torch.device("cpu")
    model = random_model(mid_args(), cpu, torch.float32)
    base = random_model(mid_args(adapter=False), cpu, torch.float32)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)})
    states = []
    for seed in range(4):  # four adapters: their own prompts and open gates
        generator = torch.Generator().manual_seed(seed)
        states.append({k: torch.randn(v.shape, generator=generator) * (1.0 if v.dim() == 2 else 0.3)
                       for k, v in lladapter.adapter_state_dict(model).items()})
    adapters = [checkpoint.Adapter(f"a{i}", model.args.adapter_len, model.args.adapter_layer, 0, state)
                for i, state in enumerate(states)]
    four = generation.AdapterBank(base, {a.path: a for a in adapters})
    one = generation.AdapterBank(base, {"a0": adapters[0]})
    prompts = torch.randint(3, vocab_size, (8, prompt_len)).tolist()

    def one_at_a_time():  # each adapter in the model itself, its 2 rows decoded apart
        for i, state in enumerate(states):
            with torch.no_grad():
                for k, v in lladapter.adapter_tensors(model).items():
                    v.copy_(state[k])
            generation.generate(model, prompts[2 * i:2 * i + 2], n_new, temperature=0, eos_id=-1)
    runs = {"4 adapters in one batch of 8": lambda: generation.generate(base, prompts, n_new, temperature=0, eos_id=-1,
                                                                          bank=four, rows=[1, 2, 3, 4] * 2),
            "1 adapter in one batch of 8": lambda: generation.generate(base, prompts, n_new, temperature=0, eos_id=-1,
                                                                         bank=one, rows=[1] * 8),
            "4 adapters one at a time, batch 2": one_at_a_time}
    times = {name: [] for name in runs}
    for i in range(repeats + 1):
        for name, run in runs.items():
            t = timed(run)
            if i > 0:
                times[name].append(t)
    tokens_per_s = {name: 8 * n_new / statistics.median(t) for name, t in times.items()}
    with torch.device("meta"):
        big = Transformer(replace(llama_args("Llama-3.1-8B"), adapter_layer=0))
    paper = {f"layers.{i}.attention.gate": torch.zeros(1, 32, 1, 1) for i in range(2, 32)}
    paper["adapter_query.weight"] = torch.zeros(30 * 10, 4096)
    big_bank = generation.AdapterBank(lladapter.set_precision(big, torch.bfloat16), {"a": checkpoint.Adapter("a", 10, 30, 0, paper)})
    row = {"tokens_per_s": tokens_per_s, "mixed_over_one": tokens_per_s["4 adapters in one batch of 8"] /
           tokens_per_s["1 adapter in one batch of 8"], "mixed_over_one_at_a_time": tokens_per_s[
           "4 adapters in one batch of 8"] / tokens_per_s["4 adapters one at a time, batch 2"],
           "llama3_8b_mib_per_adapter": big_bank.nbytes / len(big_bank.names) / 2**20}
    row["llama3_8b_gib_per_1000_adapters"] = 1000 * row["llama3_8b_mib_per_adapter"] / 1024
    print("cpu several adapters: " + "; ".join(f"{name}: {v:.1f} tok/s" for name, v in tokens_per_s.items()) +
          f" (median of {repeats}, {n_new} new tokens after {prompt_len}); mixed / one adapter "
          f"{row['mixed_over_one']:.2f}x, mixed / one at a time {row['mixed_over_one_at_a_time']:.2f}x; a bank holds "
          f"{row['llama3_8b_mib_per_adapter']:.2f} MiB per Llama-3.1-8B adapter, "
          f"{row['llama3_8b_gib_per_1000_adapters']:.2f} GiB per 1,000", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# CPU: the memory options (an int8 base, activation checkpointing, the chunked loss), side by side at options_dim

OPTIONS = {"none": {}, "int8": dict(quantize="int8"), "checkpointing": dict(checkpointing=True),
           "chunked loss": dict(chunk=256), "all three": dict(quantize="int8", checkpointing=True, chunk=256)}


def options_args():
    return replace(mid_args(), dim=options_dim, n_heads=options_dim // 64)


def base_bytes(model):
    # the frozen base's tensors as stored: every parameter but the adapter's
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not lladapter.is_adapter_key(n))


def memory_options(argv):
    cpu, args, row = torch.device("cpu"), options_args(), {}
    fp32 = random_model(args, cpu, torch.float32)
    int8 = quantization.int8_linears(random_model(args, cpu, torch.float32), quantize_from_weights=True)
    matrices = [n for n, m in int8.named_modules() if isinstance(m, quantization.Int8Linear)]
    row["int8_over_fp32_base_bytes"] = base_bytes(int8) / base_bytes(fp32)
    row["int8_over_fp32_matrix_bytes"] = sum(base_bytes(int8.get_submodule(n)) for n in matrices) / sum(
        base_bytes(fp32.get_submodule(n)) for n in matrices)
    del fp32, int8
    # the adapter step with and without activation checkpointing, alternating, on the fp32 base
    trainers = {c: Trainer(args, "adapter", cpu, torch.float32, checkpointing=c) for c in (False, True)}
    tokens, labels = random_batch(batch, seq_len, args.vocab_size, cpu)
    times = {False: [], True: []}
    for i in range(steps + 1):
        for c, trainer in trainers.items():
            t = timed(lambda: trainer.step(tokens, labels))
            if i:
                times[c].append(t)
    row["checkpointing_over_plain_step_time"] = statistics.median(times[True]) / statistics.median(times[False])
    del trainers
    peaks = {}
    for name in OPTIONS:  # each in a fresh process: its peak resident memory, above python and torch
        probe = subprocess.run([sys.executable, "-m", "tools.bench", f"--memory_probe=option:{name}", *argv], capture_output=True,
                               text=True, check=True, cwd=ROOT, env={**os.environ, **FIXED_MALLOC})
        memory = jsonlib.loads(probe.stdout)
        peaks[name] = memory["peak_mib"] - memory["baseline_mib"]
    row["peak_above_torch_mib"] = peaks
    print(f"cpu memory options, dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, micro-batch {batch} x "
          f"{seq_len}: int8 base {row['int8_over_fp32_base_bytes']:.2f}x fp32's bytes (its matrices "
          f"{row['int8_over_fp32_matrix_bytes']:.2f}x; embeddings and norms stay fp32); "
          f"adapter step with checkpointing {row['checkpointing_over_plain_step_time']:.2f}x the time without", flush=True)
    print("cpu peak memory above torch, adapter training: " + ", ".join(
        f"{name} {mib:.0f} MiB ({mib / peaks['none']:.2f}x)" for name, mib in peaks.items()), flush=True)
    return row


def int8_decoding(n_new, repeats=5):
    """Decoding at batch 1 on the memory options' model, an int8 base against fp32: alternating calls after a warm-up
    of each, the median of `repeats`. On one thread, as decode_overhead: on a busy machine a second OpenMP thread
    measures the contention (at batch 1 every matmul is small), not the decoding."""
    cpu, args = torch.device("cpu"), options_args()
    models = {"fp32": random_model(args, cpu, torch.float32),
              "int8": quantization.int8_linears(random_model(args, cpu, torch.float32), quantize_from_weights=True)}
    prompt = torch.randint(3, args.vocab_size, (1, prompt_len)).tolist()
    for model in models.values():
        open_gates(model)
    seconds = alternating_medians({name: functools.partial(generation.generate, model, prompt, n_new, temperature=0,
                                                           eos_id=-1) for name, model in models.items()}, repeats)
    row = {"tokens_per_s": {name: n_new / t for name, t in seconds.items()}}
    row["int8_over_fp32"] = row["tokens_per_s"]["int8"] / row["tokens_per_s"]["fp32"]
    print(f"cpu decoding, batch 1, dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, one thread: "
          f"{row['tokens_per_s']['int8']:.1f} tok/s int8, {row['tokens_per_s']['fp32']:.1f} fp32 "
          f"({row['int8_over_fp32']:.2f}x; {n_new} new tokens after {prompt_len}, median of {repeats})", flush=True)
    return row


def int8_quality():
    """The walkthrough's pretrained base (python train.py makes it) loaded in full precision and as int8: the
    logits' relative error on its own 900 pretraining documents, and how often the two agree on the top token."""
    from walkthrough import world
    base_dir = world.paths(ROOT / world.SETTINGS["out_dir"])["ckpt_dir"]
    if not (ROOT / base_dir).is_dir():
        print(f"cpu int8 quality: no {base_dir} (run python train.py first); skipped")
        return None
    load = functools.partial(checkpoint.load_llama, ROOT / base_dir, device="cpu", adapter_layer=0, max_seq_len=128)
    (full, tokenizer), (int8, _) = load(), load(quantize="int8")
    docs = world.corpus_docs(world.make_world(random.Random(world.SEED), world.PRETRAIN["n_creatures"]))
    errors, agree, positions = [], 0, 0
    with torch.no_grad():
        for doc in docs:
            tokens = torch.tensor([tokenizer.encode(doc, bos=True, eos=True)])
            a, b = full(tokens), int8(tokens)  # (1, seqlen, vocab)
            errors.append(((a - b).norm() / a.norm()).item())
            agree, positions = agree + (a.argmax(-1) == b.argmax(-1)).sum().item(), positions + tokens.numel()
    row = {"documents": len(docs), "relative_error_mean": statistics.mean(errors), "relative_error_max": max(errors),
           "top1_agreement": agree / positions}
    print(f"cpu int8 quality, the walkthrough's base on its {len(docs)} documents: logits' relative error mean "
          f"{row['relative_error_mean']:.4f} (max {row['relative_error_max']:.4f}), top-1 agreement "
          f"{100 * row['top1_agreement']:.1f}% of {positions} positions", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# GPU: the 7B-shaped adapter step and decoding, against the card's peak compute and memory bandwidth

# Dense (no sparsity) 16-bit tensor peak in TFLOPS (bf16; fp16 for V100 and T4, which have no bf16) and memory
# bandwidth in TB/s, from the vendors' data sheets. Matched against torch.cuda.get_device_name() as whole words,
# in this order: the first whose every word is in the name wins.
GPU_SPECS = [
    (("H100", "PCIe"), 756, 2.0),
    (("H100",), 989, 3.35),  # SXM: "NVIDIA H100 80GB HBM3"
    (("H200",), 989, 4.8),
    (("A100", "80GB"), 312, 2.0),
    (("A100",), 312, 1.55),
    (("L40S",), 362, 0.864),
    (("L4",), 121, 0.3),
    (("A10G",), 125, 0.6),
    (("4090",), 165, 1.0),
    (("V100",), 125, 0.9),
    (("T4",), 65, 0.32),
]


def gpu_specs(name, peak_tflops=0.0, bandwidth_tbs=0.0):
    """(peak TFLOPS, bandwidth TB/s, note) for a card's name; a nonzero argument overrides the table."""
    found = next(((p, b) for words, p, b in GPU_SPECS if all(re.search(rf"\b{w}\b", name) for w in words)), None)
    note = "" if found else f"{name!r} is not in bench.py's GPU_SPECS: give --gpu_peak_tflops and --gpu_bandwidth_tbs"
    found = found or (float("nan"), float("nan"))
    return peak_tflops or found[0], bandwidth_tbs or found[1], note if not (peak_tflops and bandwidth_tbs) else ""


def adapter_step_flops(args, length, scored):
    """FLOPs of one adapter training step on one sequence of `length` tokens, `scored` of them scored.

    Counted as the work needed, not as the kernels run: 2 per multiply-add; causal word attention over (length + 1) / 2
    keys on average per query; no recomputation. Forward: every layer, the output head at the scored positions.
    Backward: input gradients only (the base is frozen), through the output head and the adapted layers; in the
    lowest adapted layer only the prompt branch, wo and the feed-forward get one (its input needs no gradient).
    Left out: the prompts' own projections by wk and wv, 0.2% at 7B.
    """
    with torch.device("meta"):
        block = lladapter.TransformerBlock(args, adapted=True)
    c, kv = args.dim, (args.n_kv_heads or args.n_heads) * (args.dim // args.n_heads)
    linear = 2 * sum(p.numel() for p in block.parameters() if p.dim() == 2)  # the matrices, per token
    qkv = 2 * (c * c + 2 * c * kv)  # wq, wk, wv per token
    attention = 4 * c * (length + 1) / 2  # q k^T and (probabilities) v per token, causal
    prompt = 4 * c * args.adapter_len  # the prompt branch per token
    head = 2 * c * args.vocab_size  # per scored token
    forward = length * (args.n_layers * (linear + attention) + args.adapter_layer * prompt) + scored * head
    backward = length * ((args.adapter_layer - 1) * (linear + 2 * attention + 2 * prompt)
                         + (linear - qkv + 2 * prompt)) + scored * head
    return forward + backward


def sdpa_kernels(trainer, tokens, labels):
    """Which scaled_dot_product_attention implementation ran, read off the profiler's operator names for one
    training step: {"word attention": ..., "prompt branch": ...}. The prompt branch is the call whose keys are
    adapter_len long."""
    from torch.profiler import ProfilerActivity, profile
    names = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
             "_scaled_dot_product_flash_attention": "flash",
             "_scaled_dot_product_efficient_attention": "memory-efficient",
             "_scaled_dot_product_cudnn_attention": "cuDNN", "_scaled_dot_product_attention_math": "math",
             "_scaled_dot_product_fused_attention_overrideable": "fused"}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tokens.is_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        trainer.step(tokens, labels)
    found = {}
    for event in prof.key_averages(group_by_input_shape=True):
        op = event.key.removeprefix("aten::")
        if op in names and event.input_shapes and len(event.input_shapes[1]) == 4:
            key_len = event.input_shapes[1][2]  # key: (bsz, heads, keys, head_dim)
            part = "prompt branch" if key_len == trainer.model.args.adapter_len else "word attention"
            found.setdefault(part, set()).add(names[op])
    return {part: ", ".join(sorted(kinds)) for part, kinds in sorted(found.items(), reverse=True)}


ALPACA_EXAMPLES = 52002  # Stanford Alpaca's records
ALPACA_MEAN_TOKENS = 180  # assumed mean length of an example in LLaMA tokens (template ~40 + response): not measured


def size_text(gib):
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def adapter_step(args, device, dtype, micro_batches, n_steps, peak_tflops, log=print):
    """train.py's adapter step on `args`' shapes at full length (max_seq_len tokens, no padding) for each micro-batch
    size: tokens/s, MFU, peak memory, the planner's prediction; then which SDPA kernels ran."""
    trainer = Trainer(args, "adapter", device, dtype)
    length = args.max_seq_len
    flops = adapter_step_flops(args, length, scored_per_sequence(length)) / length  # per token
    rows = []
    for mb in micro_batches:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tokens, labels = random_batch(mb, length, args.vocab_size, device)
        try:
            times = [timed(lambda: trainer.step(tokens, labels)) for _ in range(n_steps + 1)][1:]  # after a warm-up
        except torch.cuda.OutOfMemoryError:
            rows.append({"micro_batch": mb, "out_of_memory": True})
            log(f"gpu adapter step, micro-batch {mb} x {length}: out of memory")
            break
        tps = mb * length / statistics.median(times)
        predicted = plan_memory(args, "1 GPU", 1, mb, length, scored_per_sequence(length), dtype)["total"] / 2**30
        row = {"micro_batch": mb, "length": length, "tokens_per_s": tps, "mfu": tps * flops / (peak_tflops * 1e12),
               "predicted_gib": predicted}
        if device.type == "cuda":
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            row["allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        hours = 5 * ALPACA_EXAMPLES * ALPACA_MEAN_TOKENS / tps / 3600
        row.update(projected_hours_1gpu=hours, projected_hours_8gpu=hours / 8)
        rows.append(row)
        memory = (f"peak {row['reserved_gib']:.1f} GiB reserved ({row['allocated_gib']:.1f} allocated)"
                  if "reserved_gib" in row else "peak memory: not measured on a CPU")
        log(f"gpu adapter step, micro-batch {mb} x {length}: {tps:8.0f} tok/s, MFU {100 * row['mfu']:.1f}%, {memory}, "
            f"planner {size_text(predicted)}; 5 Alpaca epochs projected at {hours:.2f} h on one, {hours / 8:.2f} on 8")
    tokens, labels = random_batch(1, length, args.vocab_size, device)
    kernels = sdpa_kernels(trainer, tokens, labels)
    log("gpu scaled_dot_product_attention kernels: " + "; ".join(f"{k}: {v}" for k, v in kernels.items()))
    return {"params": sum(p.numel() for p in trainer.model.parameters()), "trainable": trainer.n_trainable,
            "flops_per_token": flops, "micro_batches": rows, "sdpa": kernels}, trainer.model


def decode_bound(model, bsz, cache_len, bandwidth_tbs):
    """Tokens/s if each step only read memory at full bandwidth: every weight but the embedding table (of which it
    reads bsz rows), the prompts' keys and values, and the whole KV cache as this code reads it (all cache_len
    positions, masked, in every step)."""
    a = model.args
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if not name.startswith(("tok_embeddings", "adapter_")))
    itemsize = model.tok_embeddings.weight.element_size()
    kv_dim = (a.n_kv_heads or a.n_heads) * (a.dim // a.n_heads)
    kv = 2 * bsz * kv_dim * itemsize * (a.n_layers * cache_len + a.adapter_layer * a.adapter_len)
    return bsz * bandwidth_tbs * 1e12 / (weights + kv)


def decoding(model, device, batches, compile_modes, n_new, n_prompt, bandwidth_tbs, log=print):
    """generation.generate's tokens/s at each batch size, eager and compiled, beside the bandwidth bound."""
    rows = []
    for use_compile in compile_modes:
        for bsz in batches:
            prompts = torch.randint(3, model.args.vocab_size, (bsz, n_prompt)).tolist()
            # compiled, the warm-up is the timed call itself: one of another length could choose another static
            # cache, and the timed call would compile and record its graph again
            generation.generate(model, prompts, n_new if use_compile else 4, temperature=0, eos_id=-1,
                                compile=use_compile)
            t = timed(lambda: generation.generate(model, prompts, n_new, temperature=0, eos_id=-1, compile=use_compile))
            # the cache generate() allocates, all of which a compiled step reads
            cache_len = generation.static_cache_len(n_prompt + n_new, model.args.max_seq_len) if use_compile \
                else n_prompt + n_new
            bound = decode_bound(model, bsz, cache_len, bandwidth_tbs)
            row = {"batch": bsz, "compiled": use_compile, "tokens_per_s": bsz * n_new / t, "bound_tokens_per_s": bound}
            rows.append(row)
            kind = "compiled" if use_compile else "eager"
            log(f"gpu decoding, batch {bsz}, {kind}: {row['tokens_per_s']:8.1f} tok/s, "
                f"{100 * row['tokens_per_s'] / bound:.0f}% of the bandwidth bound {bound:.0f} tok/s "
                f"({n_new} new tokens after {n_prompt})")
    return rows


def gpu_section(results):
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    name = torch.cuda.get_device_name() if on_gpu else "cpu (quick: the GPU code path on tiny shapes)"
    peak, bandwidth, note = gpu_specs(name, gpu_peak_tflops, gpu_bandwidth_tbs)
    base_dtype = cli.dtype_of(dtype, device)
    args = ModelArgs(vocab_size=32000, max_seq_len=512) if not quick else \
        ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=3)
    print(f"gpu: {name}; dense 16-bit peak {peak} TFLOPS, {bandwidth} TB/s; base in {base_dtype}, adapter fp32"
          + (f"; {note}" if note else ""), flush=True)
    micro_batches = [int(m) for m in gpu_micro_batches.split(",")]
    log = functools.partial(print, flush=True)
    step, model = adapter_step(args, device, base_dtype, micro_batches, gpu_steps, peak, log)
    results["gpu"] = {"device": name, "dtype": str(base_dtype), "peak_tflops": peak, "bandwidth_tbs": bandwidth, **step}
    open_gates(model)
    modes = [False, True] if compile_decode else [False]
    results["gpu"]["decoding"] = decoding(model, device, [1, 8], modes, new_tokens, prompt_len, bandwidth, log)


# ----------------------------------------------------------------------------------------------------------
# The table of targets, and the command line

def table(results):
    rows = []
    if "cpu_time_ratio" in results:
        rows += [("cpu adapter / full step time", f"{results['cpu_time_ratio']:.2f}x", "<= 0.70x",
                  results["cpu_time_ratio"] <= 0.7),
                 ("cpu adapter / full peak memory (above torch)", f"{results['cpu_memory_ratio_above_import']:.2f}x",
                  "<= 0.60x", results["cpu_memory_ratio_above_import"] <= 0.6),
                 ("cpu adapter / full peak memory (above the model)", f"{results['cpu_memory_ratio_above_model']:.2f}x",
                  "", True)]
    for row in results.get("cpu_generation", []):
        rows.append((f"cpu generation speedup from the cache, batch {row['batch']}", f"{row['speedup']:.1f}x",
                     ">= 5x", row["speedup"] >= 5))
    if "cpu_memory_options" in results:
        options = results["cpu_memory_options"]
        peaks = options["peak_above_torch_mib"]
        rows += [("cpu int8 / fp32 base's matrices, bytes", f"{options['int8_over_fp32_matrix_bytes']:.2f}x", "<= 0.30x",
                  options["int8_over_fp32_matrix_bytes"] <= 0.3),
                 ("cpu int8 / fp32 whole base, bytes (embeddings fp32)", f"{options['int8_over_fp32_base_bytes']:.2f}x",
                  "", True),
                 ("cpu adapter step, checkpointing / plain time", f"{options['checkpointing_over_plain_step_time']:.2f}x",
                  "", True)]
        rows += [(f"cpu peak memory, {name} / none", f"{peaks[name] / peaks['none']:.2f}x", "", True)
                 for name in peaks if name != "none"]
    if "cpu_int8_decoding" in results:
        ratio = results["cpu_int8_decoding"]["int8_over_fp32"]
        rows.append(("cpu decoding batch 1, int8 / fp32 tokens/s", f"{ratio:.2f}x", "", True))
    if "cpu_adapters" in results:
        adapters = results["cpu_adapters"]
        rows += [("cpu 8 rows over 4 adapters / over 1 adapter, tok/s", f"{adapters['mixed_over_one']:.2f}x", ">= 0.90x",
                  adapters["mixed_over_one"] >= 0.9),
                 ("cpu 8 rows over 4 adapters / 4 apart at batch 2, tok/s",
                  f"{adapters['mixed_over_one_at_a_time']:.2f}x", ">= 2.00x", adapters["mixed_over_one_at_a_time"] >= 2),
                 ("bank: GiB per 1,000 Llama-3.1-8B adapters (bf16)",
                  f"{adapters['llama3_8b_gib_per_1000_adapters']:.2f}", "", True)]
    if "compiled_over_eager" in results.get("cpu_decoding", {}):
        rows.append(("cpu decoding per token, tiny model: compiled / eager",
                     f"{results['cpu_decoding']['compiled_over_eager']:.2f}x", "", True))
    if "cpu_compiled_cache" in results:
        cache = results["cpu_compiled_cache"]
        rows += [("cpu compiled decoding, context 2,048: default / cache_len=64", f"{cache['default_over_64']:.2f}x",
                  "<= 1.25x", cache["default_over_64"] <= 1.25),
                 ("cpu compiled decoding: the context as cache / cache_len=64", f"{cache['context_over_64']:.2f}x",
                  "", True)]
    measured = [r for r in results.get("gpu", {}).get("micro_batches", []) if "tokens_per_s" in r]
    if measured:
        best = max(measured, key=lambda r: r["tokens_per_s"])
        rows += [(f"gpu MFU, 7B adapter step (micro-batch {best['micro_batch']} x {best['length']})",
                  f"{100 * best['mfu']:.1f}%", ">= 45%", best["mfu"] >= 0.45),
                 ("gpu 5 Alpaca epochs, one GPU (projected)", f"{best['projected_hours_1gpu']:.2f} h", "< 1 h",
                  best["projected_hours_1gpu"] < 1)]
        if "reserved_gib" in measured[0]:
            rows.append((f"gpu peak reserved, micro-batch {measured[0]['micro_batch']} x {measured[0]['length']}",
                         f"{measured[0]['reserved_gib']:.1f} GiB", f"<= {24 - CONTEXT_GIB:g} GiB",
                         measured[0]["reserved_gib"] <= 24 - CONTEXT_GIB))
    return rows


def print_table(rows):
    print(f"\n{'measure':56} {'value':>10}  {'target':>11}  met")
    for label, value, target, met in rows:
        print(f"{label:56} {value:>10}  {target:>11}  {('yes' if met else 'NO') if target else ''}")


def main(argv):
    cli.exit_on_input_error()
    given = cli.parse(Settings, __doc__, argv)
    globals().update(vars(cli.parse(Settings, __doc__, argv, defaults=QUICK) if given.quick else given))
    if memory_probe:  # a fresh process: one mode only, so its peak resident memory is its own
        probe_memory(memory_probe)
        return
    results = {"torch": torch.__version__, "cpu": f"{cpu_name()}, {os.cpu_count()} cores", "quick": quick}
    print(f"torch {torch.__version__} | {results['cpu']} | {torch.get_num_threads()} threads"
          + (" | QUICK: tiny shapes, not a measurement" if quick else ""), flush=True)
    wanted = set(only.split(",")) if only else {"training", "generation", "decoding", "adapters", "memory_options",
                                                "int8_decoding", "int8_quality", "gpu"}
    if "training" in wanted:
        cpu_training(argv, results)
    if "generation" in wanted:
        model = random_model(mid_args(), torch.device("cpu"), torch.float32)
        open_gates(model)
        results["cpu_generation"] = [cache_against_recompute(model, bsz) for bsz in (1, 8)]
        del model
    if "decoding" in wanted:
        results["cpu_decoding"] = decode_overhead(decode_tokens, compile_decode)
        if compile_decode:
            results["cpu_compiled_cache"] = compiled_cache()
    if "adapters" in wanted:
        results["cpu_adapters"] = adapter_serving(*((1, 8) if quick else (3, 64)))
    if "memory_options" in wanted:
        results["cpu_memory_options"] = memory_options(argv)
    if "int8_decoding" in wanted:
        results["cpu_int8_decoding"] = int8_decoding(new_tokens // 8)
    if "int8_quality" in wanted and not quick:
        results["cpu_int8_quality"] = int8_quality()
    if (torch.cuda.is_available() or quick) and "gpu" in wanted:
        gpu_section(results)
    rows = table(results)
    print_table(rows)
    if "gpu" not in results:
        print("gpu: no CUDA device here; the GPU section did not run")
    results["targets"] = [{"measure": r[0], "value": r[1], "target": r[2], "met": bool(r[3])} for r in rows if r[2]]
    if json:
        Path(json).write_text(jsonlib.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
