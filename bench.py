"""
Measure what the paper claims about cost: adapter training against full fine-tuning, cached generation against
recomputation, and (with CUDA) a LLaMA-7B-shaped adapter step. Random weights: nothing to download.

    python bench.py                      # CPU section, then the GPU section when CUDA is present; a table at the end
    python bench.py --json=bench.json    # also write every figure as JSON
    python bench.py --quick              # tiny shapes, seconds: checks that the benchmark runs, measures nothing

Targets (issue 7): CPU adapter step <= 0.7x the full step's time and <= 0.6x its memory; cached generation >= 5x
recomputation at 256 new tokens; GPU: >= 45% MFU on the 7B-shaped adapter step, the paper's 5 Alpaca epochs
projected under an hour on one H100, 7B adapter training at max_seq_len 512 within 24 GB.
"""
import json as jsonlib  # `json` is the --json setting below
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import cli
import lladapter
from lladapter import ModelArgs, Transformer

# CPU section: a mid-size LLaMA (the shape); the adapter on the top 7 of 8 layers, as 30 of 32 at 7B
dim = 512
n_layers = 8
n_heads = 8
vocab_size = 32000
seq_len = 256
batch = 4
adapter_layer = 7
adapter_len = 10
steps = 5  # timed steps per mode, alternating adapter / full, after one warm-up step each
new_tokens = 256  # generation: new tokens per prompt
prompt_len = 32
# GPU section: LLaMA-7B's shapes in bf16, the paper's adapter (K=10, L=30), Alpaca-like lengths
gpu_steps = 10
gpu_micro_batches = "1,2,4,8"  # micro-batch sizes to try at max_seq_len 512 (peak memory reported for each)
gpu_peak_tflops = 989.0  # bf16 dense peak of the GPU: H100 SXM 989 (A100 312, H200 989)
json = ""  # --json=FILE writes the results as JSON
quick = False  # tiny shapes: a smoke test of this script
memory_probe = ""  # internal: "adapter" or "full", run in a fresh process to measure its peak memory
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
cli.exit_on_input_error()
settings.update(cli.parse_overrides(settings, sys.argv[1:], __doc__, __file__))
if settings["quick"]:
    settings.update(dim=64, n_layers=2, n_heads=4, vocab_size=512, seq_len=32, batch=2, adapter_layer=1, steps=2,
                    new_tokens=16, prompt_len=8, gpu_steps=2, gpu_micro_batches="1,2")
globals().update(settings)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def random_model(args, device, dtype, seed=0):
    # Build on the meta device, give the base `dtype` and the adapter fp32 (as load_llama does), then fill in.
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype)
    for name, p in model.named_parameters():
        if lladapter.is_adapter_key(name):
            p.data = p.data.float()
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.adapter_layer:
        model.reset_adapter()
    model.rope = lladapter.precompute_rope(args.dim // args.n_heads, args.max_seq_len,
                                                               args.rope_theta, device)
    return model


def training_step(model, optimizer, tokens, labels):
    # train.py's step: the response loss under bf16 autocast on a GPU, a backward, an AdamW update
    device_type = tokens.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
        loss = lladapter.response_loss(model, tokens, labels) / (labels != lladapter.IGNORE_INDEX).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_trainer(args, mode, device, dtype):
    model = random_model(args, device, dtype)
    if mode == "adapter":
        lladapter.mark_only_adapter_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02,
                                  fused=device.type == "cuda")
    return model, optimizer, sum(p.numel() for p in trainable)


def mid_args(adapter=True):
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size, max_seq_len=2 * seq_len + 64,
                     adapter_len=adapter_len, adapter_layer=adapter_layer if adapter else 0)


def random_batch(bsz, length, vocab, device):
    # `length` tokens per sequence (+1, as train.py feeds tokens[:, :-1]); the first third is an unscored prompt
    tokens = torch.randint(3, vocab, (bsz, length + 1), device=device)
    labels = tokens.clone()
    labels[:, :length // 3] = lladapter.IGNORE_INDEX
    return tokens, labels


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def rss_mib(field="VmHWM"):
    # The process's peak (VmHWM) or current (VmRSS) resident memory. VmHWM starts afresh at exec; getrusage's
    # ru_maxrss would also count the parent's memory at fork time.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if memory_probe:  # a fresh process: one mode only, so its peak resident memory is its own
    baseline = rss_mib()
    model, optimizer, _ = make_trainer(mid_args(), memory_probe, torch.device("cpu"), torch.float32)
    loaded = rss_mib("VmRSS")
    tokens, labels = random_batch(batch, seq_len, vocab_size, "cpu")
    for _ in range(3):  # from the second step on, the optimizer state is allocated
        training_step(model, optimizer, tokens, labels)
    print(jsonlib.dumps({"peak_mib": rss_mib(), "baseline_mib": baseline, "loaded_mib": loaded}))
    sys.exit(0)

results = {"torch": torch.__version__, "cpu": f"{cpu_name()}, {os.cpu_count()} cores", "quick": quick}
print(f"torch {torch.__version__} | {results['cpu']} | {torch.get_num_threads()} threads"
      + (" | QUICK: tiny shapes, not a measurement" if quick else ""), flush=True)

# ---- CPU: one adapter step against one full fine-tuning step, alternating --------------------------------
cpu = torch.device("cpu")
trainers = {mode: make_trainer(mid_args(), mode, cpu, torch.float32) for mode in ("adapter", "full")}
tokens, labels = random_batch(batch, seq_len, vocab_size, cpu)
times = {"adapter": [], "full": []}
for i in range(steps + 1):
    for mode, (model, optimizer, _) in trainers.items():
        t = timed(lambda: training_step(model, optimizer, tokens, labels))
        if i > 0:  # the first step of each warms up (allocations, optimizer state)
            times[mode].append(t)
for mode in ("adapter", "full"):
    median = statistics.median(times[mode])
    # glibc raises its mmap threshold as large blocks are freed, then keeps freed tensors resident, so by default
    # the peak depends on allocation history (0.58x-0.60x over runs here); with the threshold fixed, freed
    # tensors go back to the system and the peak follows the live tensors, the same to the MiB on every run.
    probe = subprocess.run([sys.executable, __file__, f"--memory_probe={mode}", *sys.argv[1:]], capture_output=True,
                           text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    memory = jsonlib.loads(probe.stdout)
    # Peak memory above the interpreter and torch (weights included), and above the loaded model (what the
    # training step itself adds: activations, logits, gradients, optimizer state).
    above_import, above_model = memory["peak_mib"] - memory["baseline_mib"], memory["peak_mib"] - memory["loaded_mib"]
    results[f"cpu_{mode}"] = {"trainable": trainers[mode][2], "step_s": median, "tokens_per_s": batch * seq_len / median,
                              "peak_mib": memory["peak_mib"], "above_import_mib": above_import, "above_model_mib": above_model}
    print(f"cpu {mode:7} step: {median * 1000:8.1f} ms median of {steps}, {batch * seq_len / median:8.0f} tok/s, "
          f"peak memory {above_import:.0f} MiB above torch's own, {above_model:.0f} MiB above the loaded model",
          flush=True)
del trainers
a, f = results["cpu_adapter"], results["cpu_full"]
results["cpu_time_ratio"] = a["step_s"] / f["step_s"]
for key in ("above_import_mib", "above_model_mib"):
    results[f"cpu_memory_ratio_{key[:-4]}"] = a[key] / f[key] if f[key] > 0 else float("nan")


# ---- generation: KV cache against recomputing the whole sequence at every step ---------------------------
@torch.inference_mode()
def recompute_generate(model, prompt, n):
    tokens = prompt
    for _ in range(n):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def generation_speed(model, device, bsz, label):
    prompt = torch.randint(3, model.args.vocab_size, (bsz, prompt_len), device=device)
    cached = timed(lambda: lladapter.generate(model, prompt.tolist(), new_tokens, temperature=0, eos_id=-1))
    row = {"batch": bsz, "cached_tokens_per_s": bsz * new_tokens / cached}
    if device.type == "cpu" or bsz == 1:
        recompute = timed(lambda: recompute_generate(model, prompt, new_tokens))
        row.update(recompute_tokens_per_s=bsz * new_tokens / recompute, speedup=recompute / cached)
    print(f"{label} generation, batch {bsz}: {row['cached_tokens_per_s']:8.1f} tok/s with the cache" +
          (f", {row['recompute_tokens_per_s']:8.1f} recomputing, {row['speedup']:.1f}x" if "speedup" in row else ""),
          flush=True)
    return row


model = random_model(mid_args(), cpu, torch.float32)
with torch.no_grad():
    for layer in model.layers[model.first_adapted:]:
        layer.attention.gate.fill_(0.1)  # an adapter in use: its branch runs at every step
results["cpu_generation"] = [generation_speed(model, cpu, bsz, "cpu") for bsz in (1, 8)]
del model

# ---- GPU: LLaMA-7B's shapes, bf16 base, fp32 adapter, Alpaca-like lengths --------------------------------
if torch.cuda.is_available() or quick:
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if gpu.type == "cuda" else "cpu (quick: the GPU code path on tiny shapes)"
    args = ModelArgs(vocab_size=32000, max_seq_len=512) if not quick else \
        ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=3)
    dtype = torch.bfloat16 if gpu.type == "cuda" else torch.float32
    model, optimizer, n_trainable = make_trainer(args, "adapter", gpu, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    # Alpaca-like lengths: log-normal, clipped to [60, max_seq_len]; mean near 180 at max_seq_len 512.
    rng = torch.Generator().manual_seed(0)
    lengths = (torch.randn(4096, generator=rng) * 0.45 + 5.1).exp().clamp(60, args.max_seq_len).long()
    if quick:
        lengths = lengths * args.max_seq_len // 512
    # FLOPs per token of an adapter step: forward 2 * (matmul params) + attention 4 * n_layers * seqlen * dim;
    # backward, for activations only (no weight gradients), through the adapted layers and the output head.
    layer_params = sum(p.numel() for p in model.layers[0].parameters())
    mean_len = lengths.float().mean().item()
    forward = 2 * (args.n_layers * layer_params + args.dim * args.vocab_size) + 4 * args.n_layers * mean_len * args.dim
    backward = 2 * (args.adapter_layer * layer_params + args.dim * args.vocab_size) + 8 * args.adapter_layer * mean_len * args.dim
    flops_per_token = forward + backward
    results["gpu"] = {"device": name, "params": n_params, "trainable": n_trainable, "mean_length": mean_len,
                      "flops_per_token": flops_per_token, "peak_tflops": gpu_peak_tflops, "micro_batches": []}
    print(f"gpu: {name}; {n_params / 1e9:.2f}B parameters, {n_trainable:,} trainable; lengths mean {mean_len:.0f}; "
          f"{flops_per_token / 1e9:.2f} GFLOP per token", flush=True)
    for mb in map(int, gpu_micro_batches.split(",")):
        if gpu.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            n_tokens, elapsed = 0, 0.0
            for step in range(gpu_steps + 1):
                batch_lengths = lengths[step * mb:(step + 1) * mb]
                width = int(batch_lengths.max())  # padded to the longest in the batch, as train.py does
                tokens, labels = random_batch(mb, width, args.vocab_size, gpu)
                t = timed(lambda: training_step(model, optimizer, tokens, labels))
                if step > 0:
                    n_tokens, elapsed = n_tokens + int(batch_lengths.sum()), elapsed + t
        except torch.cuda.OutOfMemoryError:
            print(f"gpu micro-batch {mb}: out of memory", flush=True)
            break
        tps = n_tokens / elapsed
        mfu = tps * flops_per_token / (gpu_peak_tflops * 1e12)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if gpu.type == "cuda" else float("nan")
        epoch_tokens = 52002 * mean_len  # the paper's run: Alpaca's 52,002 examples, 5 epochs
        hours = 5 * epoch_tokens / tps / 3600
        row = {"micro_batch": mb, "tokens_per_s": tps, "mfu": mfu, "peak_gib": peak_gib,
               "projected_hours_1gpu": hours, "projected_hours_8gpu": hours / 8}
        results["gpu"]["micro_batches"].append(row)
        print(f"gpu adapter step, micro-batch {mb}: {tps:8.0f} tok/s, MFU {100 * mfu:.1f}%, peak {peak_gib:.1f} GiB; "
              f"5 Alpaca epochs projected at {hours:.2f} h on one, {hours / 8:.2f} h on 8 (ideal scaling)", flush=True)
    del optimizer
    with torch.no_grad():
        for layer in model.layers[model.first_adapted:]:
            layer.attention.gate.fill_(0.1)
    results["gpu"]["generation"] = [generation_speed(model, gpu, bsz, "gpu") for bsz in (1, 8)]

# ---- the table ---------------------------------------------------------------------------------------------
rows = [("cpu adapter / full step time", f"{results['cpu_time_ratio']:.2f}x", "<= 0.70x", results["cpu_time_ratio"] <= 0.7),
        ("cpu adapter / full peak memory (above torch)", f"{results['cpu_memory_ratio_above_import']:.2f}x", "<= 0.60x",
         results["cpu_memory_ratio_above_import"] <= 0.6),
        ("cpu adapter / full peak memory (above the model)", f"{results['cpu_memory_ratio_above_model']:.2f}x", "", True)]
for row in results["cpu_generation"]:
    rows.append((f"cpu generation speedup from the cache, batch {row['batch']}", f"{row['speedup']:.1f}x", ">= 5x",
                 row["speedup"] >= 5))
if "gpu" in results and results["gpu"]["micro_batches"]:
    best = max(results["gpu"]["micro_batches"], key=lambda r: r["tokens_per_s"])
    small = results["gpu"]["micro_batches"][0]
    rows += [(f"gpu MFU, 7B adapter step (micro-batch {best['micro_batch']})", f"{100 * best['mfu']:.1f}%", ">= 45%", best["mfu"] >= 0.45),
             ("gpu 5 Alpaca epochs, one GPU (projected)", f"{best['projected_hours_1gpu']:.2f} h", "< 1 h", best["projected_hours_1gpu"] < 1),
             (f"gpu peak memory, micro-batch {small['micro_batch']}", f"{small['peak_gib']:.1f} GiB", "<= 24 GiB", small["peak_gib"] <= 24)]
print(f"\n{'measure':54} {'value':>10}  {'target':>9}  met")
for label, value, target, met in rows:
    print(f"{label:54} {value:>10}  {target:>9}  {('yes' if met else 'NO') if target else ''}")
if "gpu" not in results:
    print("gpu: no CUDA device here; the GPU section did not run")
results["targets"] = [{"measure": r[0], "value": r[1], "target": r[2], "met": bool(r[3])} for r in rows if r[2]]
if json:
    with open(json, "w") as f:
        f.write(jsonlib.dumps(results, indent=2))
