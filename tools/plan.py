"""
The memory planner: peak GPU memory per process for adapter training and for generation, counted from the
model's shapes and this code (nothing to download), then checked against train.py's measured peaks on this CPU.

    python -m tools.plan                 # the tables, then the check against train.py (minutes: it runs train.py several times)
    python -m tools.plan --quick         # the tables, and the check at tiny shapes (CI, ~1 min)
    python -m tools.plan --check=false   # the tables alone, in seconds
    python -m tools.plan --json=plan.json

It counts the base's weights by dtype (bf16, or int8 with a scale per row and the one dequantized matrix a matmul
holds at a time), the adapter with its gradients and AdamW's moments, the activations autograd keeps (read off a
forward on the meta device; with activation checkpointing each adapted block's input plus one block's recompute),
the fp32 logits (all scored positions, or one chunk of the chunked loss), and for generation the KV cache. Every
figure is an estimate until a GPU measures it; the check compares the same counting with train.py on this CPU.
"""
import functools
import json as jsonlib  # `json` is the --json setting below
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoint
import cli
import generation
import lladapter
import quantize as quantization
from lladapter import ModelArgs, Transformer
from tokenizer import SentencePieceTokenizer


@dataclass
class Settings:
    check: bool = True  # after the tables: train.py on this CPU against the planner (1 process, DDP 2, FSDP 2, int8, int8 + all)
    json: str = ""  # --json=FILE writes the tables and the check as JSON
    quick: bool = False  # the check at tiny shapes


globals().update(vars(Settings()))  # the defaults, for the helpers below; main() sets the command line's
ROOT = Path(__file__).resolve().parent.parent  # where train.py is
# glibc raises its mmap threshold as large blocks are freed, then keeps freed tensors resident, so by default a
# CPU peak depends on allocation history; with the threshold fixed, freed tensors go back to the system and the
# peak follows the live tensors (the same to the MiB on every run).
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


LOSS_CHUNK = 256  # the chunked loss's scored positions per chunk in these tables: train.py --loss_chunk=256


# ----------------------------------------------------------------------------------------------------------
# The memory planner: peak GPU memory per process for adapter training, from the model's shapes and this code

# Sizes as Meta's params.json give them. LLaMA-1 and -2: vocabulary 32,000, the paper's share of adapted layers (30 of
# 32 at 7B). Llama 3.x: vocabulary 128,256, all but the bottom two layers adapted; 3.2 1B and 3B tie the output head
# to the embeddings; 405B is sharded over 16 processes (2 nodes of 8).
LLAMA3 = dict(n_kv_heads=8, vocab_size=128256)
LLAMA = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32),
    "13B": dict(dim=5120, n_layers=40, n_heads=40),
    "33B": dict(dim=6656, n_layers=60, n_heads=52),
    "65B": dict(dim=8192, n_layers=80, n_heads=64),
    "70B (LLaMA-2)": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "Llama-3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256, tied=True, **LLAMA3),
    "Llama-3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256, tied=True, **LLAMA3),
    "Llama-3.1-8B": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024, **LLAMA3),
    "Llama-3.1-70B": dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096, **LLAMA3),
    "Llama-3.1-405B": dict(dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2, multiple_of=4096, world=16,
                           **LLAMA3),
}


def llama_args(size, max_seq_len=512):
    # The paper's adapter: K = 10, and 30 of 32 layers at 7B; the same share at LLaMA's other sizes, n_layers - 2
    # at Llama 3's.
    shape = {k: v for k, v in LLAMA[size].items() if k not in ("tied", "world")}
    llama3 = size.startswith("Llama-3")
    return ModelArgs(**{"vocab_size": 32000, **shape}, max_seq_len=max_seq_len, adapter_len=10,
                     adapter_layer=shape["n_layers"] - 2 if llama3 else round(shape["n_layers"] * 30 / 32))


class FusedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on the meta device, where torch would pick the math kernel, which
    also keeps each head's attention matrix. The fused kernels that train (flash, memory-efficient and cuDNN on a
    GPU, flash on a CPU) keep their inputs, their output, and one fp32 log-sum-exp per query and head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)  # (bsz, heads, seqlen)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


class MetaFusedAttention(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return FusedAttention.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def fields_of(args):
    return tuple(vars(args).items())  # ModelArgs, hashable, for functools.lru_cache


@functools.lru_cache(maxsize=None)
def meta_forward_saved(fields, micro_batch, length, scored, dtype, quantize="", checkpointing=False):
    # One forward of the whole model on the meta device, counting what autograd saves (see saved_for_backward)
    args = ModelArgs(**dict(fields))
    with torch.device("meta"):
        model = lladapter.set_precision(Transformer(args), dtype)  # as load_llama; the rotary table fp32 below
    if quantize:
        quantization.int8_linears(model)
    model.activation_checkpointing = checkpointing  # then autograd saves nothing inside the adapted blocks
    model.rope = model.rope.float()
    lladapter.mark_only_adapter_trainable(model)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = (storage.nbytes(), t.dim() > 0 and t.shape[-1] == args.vocab_size)
        return t

    tokens = torch.zeros(micro_batch, length, dtype=torch.long, device="meta")
    targets = torch.zeros(micro_batch * scored, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MetaFusedAttention():
        logits = model(tokens, logits_at=slice(length - scored, None))  # (micro_batch, scored, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
    assert loss.requires_grad  # the graph reaches the adapter
    return sum(n for n, is_logits in saved.values() if not is_logits), micro_batch * scored * args.vocab_size


def saved_for_backward(args, micro_batch, length, scored, dtype, quantize="", checkpointing=False):
    """Bytes of activations an adapter training step keeps for backward, read off this code rather than modelled:
    a forward on the meta device (shapes, no data), adding up the distinct storages autograd saves, weights
    excluded. Returns (bytes outside the output head's logits, logits elements). `scored` positions per sequence go
    through the output head (as a slice: train.py gathers them, which keeps the same but for scored x dim elements).
    Frozen layers below the adapted ones keep nothing, the lowest adapted one keeps less (its input needs no
    gradient), and every other keeps the same: so a model of 2 and one of 3 adapted layers, extrapolated to L, give
    the model's figure exactly, in a second at any size.
    With activation checkpointing, autograd keeps what lies outside the adapted blocks, checkpointing keeps each
    adapted block's input (bsz, seqlen, dim), and the backward pass recomputes one block at a time, which then keeps
    what a block keeps without checkpointing."""
    if args.adapter_layer <= 3 and not checkpointing:
        return meta_forward_saved(fields_of(args), micro_batch, length, scored, dtype, quantize)
    two, three = (meta_forward_saved(fields_of(replace(args, n_layers=n, adapter_layer=n)), micro_batch, length, scored,
                                     dtype, quantize) for n in (2, 3))
    if not checkpointing:
        return two[0] + (args.adapter_layer - 2) * (three[0] - two[0]), two[1]
    outside = meta_forward_saved(fields_of(replace(args, n_layers=2, adapter_layer=2)), micro_batch, length, scored,
                                 dtype, quantize, checkpointing=True)[0]
    inputs = args.adapter_layer * micro_batch * length * args.dim * dtype.itemsize
    return outside + inputs + (three[0] - two[0]), two[1]


@functools.lru_cache(maxsize=None)
def parameters_of(fields, dtype, quantize=""):
    """{name: (shape, bytes per element)} of every parameter as load_llama builds them: the base in dtype (with
    quantize="int8" its matrices int8 and their scales fp32), the adapter fp32."""
    with torch.device("meta"):
        model = Transformer(ModelArgs(**dict(fields))).to(dtype)
    if quantize:
        quantization.int8_linears(model)
    return {name: (p.shape, 4 if lladapter.is_adapter_key(name) else p.element_size())
            for name, p in model.named_parameters()}


def plan_memory(args, parallel, world, micro_batch, length, scored, dtype, gathered_blocks=3, quantize="",
                checkpointing=False, chunk=0, tied=False):
    """Predicted peak memory of one process in adapter training, in bytes, by term.

    parallel: "1 GPU", "DDP" or "FSDP" (train.py --fsdp: fully_shard on each TransformerBlock and on the root; the
    adapter is left out of the shards, whole and fp32 in every process). The base is in `dtype`; the activations
    are those of one micro-batch of `micro_batch` sequences of `length` tokens, `scored` of each scored.
    gathered_blocks: under FSDP, whole blocks held at once besides the shards: the one running, the next one
    gathered ahead, and the all-gather buffer of one more being copied out.
    quantize, checkpointing, chunk: train.py's --quantize, --activation_checkpointing and --loss_chunk. tied: the
    output head is the embedding matrix (Llama 3.2 1B, 3B), counted once; an int8 head is a quantized copy of it.
    The two peaks, end of forward (logits) and a block's backward (gathered blocks), are added: a slight overestimate.
    """
    if quantize and parallel == "FSDP":
        raise ValueError("train.py refuses --quantize with --fsdp")
    params = parameters_of(fields_of(args), dtype, quantize)
    base = {name: shape for name, (shape, _) in params.items() if not lladapter.is_adapter_key(name)
            and not (tied and not quantize and name == "output.weight")}
    itemsize = {name: params[name][1] for name in base}
    n_adapter = sum(math.prod(shape) for name, (shape, _) in params.items() if lladapter.is_adapter_key(name))
    terms = {}
    if parallel == "FSDP":
        # fully_shard splits every tensor along dim 0: ceil(rows / world) rows each. The root's tensors (the
        # embeddings, the final norm, the output head) are gathered at the start of forward and stay so until the
        # end of backward; a block's are gathered while it runs, in forward and again in backward.
        shard = sum(math.ceil(shape[0] / world) * math.prod(shape[1:]) for shape in base.values())
        root = sum(math.prod(shape) for name, shape in base.items() if not name.startswith("layers."))
        block = sum(math.prod(shape) for name, shape in base.items() if name.startswith("layers.0."))
        terms["weights"] = dtype.itemsize * (shard + root + gathered_blocks * block)
    else:
        terms["weights"] = sum(itemsize[name] * math.prod(shape) for name, shape in base.items())  # all of it
    # fp32 prompts and gates, their gradients, AdamW's two moments; DDP also keeps a bucket of gradients
    terms["adapter"] = n_adapter * (4 + 4 + 8 + (4 if parallel == "DDP" else 0))
    activations, n_logits = saved_for_backward(args, micro_batch, length, scored, dtype, quantize, checkpointing)
    terms["activations"] = activations
    # fp32 log-probabilities kept for backward, then at the start of backward their gradient and the logits'
    # gradient beside them: three (scored positions, vocab_size) fp32 tensors at once (forward holds two at most).
    # Chunked: those of one chunk, recomputed in backward, and the final norm's output at every scored position.
    n_scored = micro_batch * scored
    logits_bytes = 4 * (n_logits if not chunk else min(chunk, n_scored) * args.vocab_size)  # one such tensor
    terms["logits"] = 3 * logits_bytes + (n_scored * args.dim * dtype.itemsize if chunk else 0)
    # int8: each matmul casts its int8 matrix to the activation dtype while it runs, the largest at most at once.
    # The output head's copy exists in its backward, beside the logits' gradient alone (the other two are freed):
    # it raises the peak above the logits' only by what it exceeds two of them by.
    largest = max(math.prod(s) for n, s in base.items() if itemsize[n] == 1) * dtype.itemsize if quantize else 0
    terms["dequantized"] = max(0, largest - 2 * logits_bytes)
    terms["total"] = sum(terms.values())
    terms["largest_dequantized"] = largest  # not a term of the total: generation's transient (generation_memory)
    return terms


CARDS_GB = (12, 16, 24, 40, 48, 80)  # common cards' memory; "24 GB" cards report 22.5 (L4, A10G) to 24 GiB (RTX 4090)
CONTEXT_GIB = 1.5  # kept free on the card: the CUDA context (~0.5 GiB), cuBLAS and NCCL workspaces, allocator slack


def fits(total_bytes):
    return [gb for gb in CARDS_GB if total_bytes / 2**30 + CONTEXT_GIB <= gb]


def plan_table(micro_batches=(1, 4), length=512, world=8, log=print):
    rows = []
    log(f"memory planner: peak GPU memory per process, GiB, adapter training at max_seq_len {length} (every position "
        f"scored), bf16 base, fp32 adapter with AdamW; K=10, L = 30/32 of the layers (Llama 3: all but 2); fits: a "
        f"card of N GB with {CONTEXT_GIB} GiB kept for the CUDA context and workspaces")
    log(f"{'model':14} {'L':>3}  {'setup':7} {'mb':>3} {'weights':>8} {'adapter':>8} {'activ.':>8} {'logits':>7} "
        f"{'total':>7}  fits (GB)")
    for size in LLAMA:
        args, w = llama_args(size, length), LLAMA[size].get("world", world)
        for parallel in ("1 GPU", "DDP", "FSDP"):
            for mb in micro_batches:
                terms = plan_memory(args, parallel, w, mb, length, length, torch.bfloat16, tied=LLAMA[size].get("tied", False))
                setup = parallel if parallel == "1 GPU" else f"{parallel} {w}"
                row = {"model": size, "adapter_layer": args.adapter_layer, "setup": setup, "micro_batch": mb,
                       **{k: v / 2**30 for k, v in terms.items()}, "fits_gb": fits(terms["total"])}
                rows.append(row)
                log(f"{size:14} {args.adapter_layer:3}  {setup:7} {mb:3} {row['weights']:8.2f} {row['adapter']:8.3f} "
                    f"{row['activations']:8.2f} {row['logits']:7.2f} {row['total']:7.2f}  "
                    f"{' '.join(map(str, row['fits_gb'])) or 'none'}")
    totals = {mb: plan_memory(llama_args("7B", length), "1 GPU", 1, mb, length, length, torch.bfloat16)["total"]
              for mb in (1, 2, 4, 8)}  # the README's micro-batch advice for 7B
    log("7B on one GPU or DDP, by micro-batch: " + ", ".join(
        f"{mb}: {t / 2**30:.2f} GiB (fits {' '.join(map(str, fits(t))) or 'none'})" for mb, t in totals.items()))
    return rows



# ----------------------------------------------------------------------------------------------------------
# The planner's check: train.py on this CPU, 1 process, DDP over 2, FSDP over 2, an int8 base, and int8 with
# activation checkpointing and the chunked loss

def write_tokenizer(path):
    """A small BPE SentencePiece model (LLaMA's ids: unk 0, BOS 1, EOS 2) in which each lone letter is one piece."""
    from walkthrough.world import train_tokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = [lladapter.PROMPT_WITH_INPUT, lladapter.PROMPT_NO_INPUT] * 20 + [" ".join(letters)] * 200
    train_tokenizer(text, path.with_suffix(""), 200)
    return SentencePieceTokenizer(path)


def fixed_length_records(tokenizer, n, length, seed=0):
    """n Alpaca records of exactly `length` tokens each ([BOS] + prompt + response + [EOS]), about a third prompt."""
    rng = random.Random(seed)

    def words(k):  # k lone letters: k tokens
        return " ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(k))

    template = len(tokenizer.encode(lladapter.format_prompt(""), bos=True, eos=False))
    records = []
    for _ in range(n):
        instruction = words(max(1, length // 3 - template))
        prompt = lladapter.format_prompt(instruction)
        k = length - len(tokenizer.encode(prompt, bos=True, eos=True))  # one token per lone letter
        output = " " + words(k)
        got = len(tokenizer.encode(prompt + output, bos=True, eos=True))
        if got != length:
            raise RuntimeError(f"a record of {got} tokens, not {length}: the tokenizer split a letter")
        records.append({"instruction": instruction, "input": "", "output": output})
    return records


def write_checkpoint(args, ckpt_dir, n_shards):
    """A random base in Meta's layout (fp16, as Meta's files are), split into model-parallel shards as Meta's are."""
    torch.manual_seed(0)
    checkpoint.save_meta_checkpoint(Transformer(ModelArgs(**{**vars(args), "adapter_layer": 0})), ckpt_dir,
                                    n_shards=n_shards, dtype=torch.float16)


def train_figures(out):
    """The figures a train.py run wrote to out/summary.json: peak memory at the end and after loading (MiB above
    python and torch), and the seconds of each optimizer step."""
    summary = jsonlib.loads((out / "summary.json").read_text())
    start = summary["peak_memory_mib"] - summary["above_start_mib"]
    return {"peak_above_mib": summary["above_start_mib"], "load_above_mib": summary["load_peak_mib"] - start,
            "step_seconds": summary["step_seconds"]}


def run_train(tmp, args, world, fsdp, ckpt, mb, length, n_steps, out, options=()):
    """train.py as a user runs it (torchrun with gloo for 2 processes), 1 thread per process; the figures of the
    summary.json it writes."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    # Started from a small process of its own: on Linux a new process's peak resident size (what train.py reports,
    # getrusage's ru_maxrss) starts at the size of the process that started it, and this one holds the planner's models.
    small_parent = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
    cmd = [*small_parent, sys.executable, *launcher, "train.py", f"--ckpt_dir={ckpt}",
           f"--tokenizer_path={tmp / 'tokenizer.model'}",
           f"--data_path={tmp / 'data.json'}", f"--out_dir={tmp / out}", f"--adapter_layer={args.adapter_layer}",
           f"--adapter_len={args.adapter_len}", f"--max_seq_len={length + 1}", f"--batch_size={2 * mb}",
           f"--micro_batch_size={mb}", "--epochs=1", "--val_fraction=0", "--log_interval=1", f"--stop_after={n_steps}",
           *(["--fsdp"] if fsdp else []), *options]
    env = {**os.environ, **FIXED_MALLOC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    measured = train_figures(tmp / out)
    measured["step_s"] = statistics.mean(measured["step_seconds"][1:])  # after the first step
    return measured


def check_plan(small, log=print):
    """The planner against the real train.py on this CPU (fp32, the base's dtype here): peak memory above python
    and torch, as train.py reports it, in 1 process, DDP over 2 and FSDP over 2 (gloo), and in 1 process on an int8
    base, without and with activation checkpointing and the chunked loss.

    The planner counts tensors. A process also holds what torch loads on first use (its Python modules for
    meta-device building, kernels' code), the tokenizer and the data: that floor is measured by the same run on a
    negligible model (dim 64, 1 layer, vocabulary 512), less the planner's figure for that model, and added."""
    if small:  # tiny layers, LLaMA's vocabulary: the output head and the logits carry the memory
        args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=32000, adapter_layer=2, adapter_len=10)
        mb, length, n_steps, chunk = 2, 128, 3, 64
    else:  # the CPU section's mid-size model
        args = ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, adapter_layer=7, adapter_len=10)
        mb, length, n_steps, chunk = 4, 256, 5, LOSS_CHUNK
    args.max_seq_len = length + 1
    negligible = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=512, adapter_layer=1, adapter_len=10,
                           max_seq_len=length + 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = write_tokenizer(tmp / "tokenizer.model")
        records = fixed_length_records(tokenizer, 2 * mb * (n_steps + 1), length + 1)
        (tmp / "data.json").write_text(jsonlib.dumps(records))
        scored = sum(label != lladapter.IGNORE_INDEX for label in lladapter.encode_example(
            tokenizer, records[0]["instruction"], "", records[0]["output"], length + 1)[1])
        write_checkpoint(negligible, tmp / "negligible", 1)
        write_checkpoint(args, tmp / "ckpt1", 1)
        write_checkpoint(args, tmp / "ckpt2", 2)  # FSDP loads 2 model-parallel shards, as 13B's are
        floor_run = run_train(tmp, negligible, 1, False, tmp / "negligible", mb, length, n_steps, "floor")
        floor = floor_run["peak_above_mib"] - plan_memory(negligible, "1 GPU", 1, mb, length, scored,
                                                          torch.float32)["total"] / 2**20
        log(f"planner check: train.py on this CPU ({cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}); "
            f"dim {args.dim}, {args.n_layers} layers, vocab {args.vocab_size}, adapter on the top {args.adapter_layer} "
            f"(K=10), fp32; micro-batch {mb} x {length} tokens ({scored} scored each), {n_steps} steps")
        log(f"MiB above python and torch; floor (torch's lazily loaded modules and code, tokenizer, data) "
            f"{floor:.0f} MiB, measured on a negligible model")
        log(f"{'run':18} {'planner':>8} {'+ floor':>8} {'measured':>9} {'error':>7}   {'load peak':>9}  {'s/step':>6}")
        rows = []
        everything = dict(quantize="int8", checkpointing=True, chunk=chunk)
        runs = [("1 process", 1, False, {}), ("DDP 2", 2, False, {}), ("FSDP 2", 2, True, {}),
                ("int8", 1, False, dict(quantize="int8")), ("int8 + ckpt + chunk", 1, False, everything)]
        for label, world, fsdp, options in runs:
            flags = [f"--quantize={options['quantize']}"] if options else []
            flags += ["--activation_checkpointing", f"--loss_chunk={chunk}"] if options.get("checkpointing") else []
            measured = run_train(tmp, args, world, fsdp, tmp / ("ckpt2" if fsdp else "ckpt1"), mb, length, n_steps,
                                 label.replace(" ", "_"), flags)
            parallel = "FSDP" if fsdp else "DDP" if world > 1 else "1 GPU"
            terms = {k: v / 2**20 for k, v in plan_memory(args, parallel, world, mb, length, scored,
                                                          torch.float32, **options).items()}
            predicted = terms["total"] + floor
            row = {"run": label, "planner_mib": terms["total"], "predicted_mib": predicted,
                   "measured_mib": measured["peak_above_mib"], "error": predicted / measured["peak_above_mib"] - 1,
                   "load_peak_mib": measured["load_above_mib"], "step_s": measured["step_s"], "terms_mib": terms}
            rows.append(row)
            log(f"{label:18} {terms['total']:8.0f} {predicted:8.0f} {row['measured_mib']:9.0f} "
                f"{100 * row['error']:+6.1f}%   {row['load_peak_mib']:9.0f}  {row['step_s']:6.2f}")
    by = {r["run"]: r for r in rows}
    summary = {"floor_mib": floor, "rows": rows, "within_10_percent": all(abs(r["error"]) <= 0.10 for r in rows),
               "fsdp_over_ddp_step_time": by["FSDP 2"]["step_s"] / by["DDP 2"]["step_s"],
               "fsdp_over_one_load_peak": by["FSDP 2"]["load_peak_mib"] / by["1 process"]["load_peak_mib"]}
    log(f"prediction within 10% of the measurement in every run: {'yes' if summary['within_10_percent'] else 'NO'}; "
        f"step time FSDP 2 / DDP 2: {summary['fsdp_over_ddp_step_time']:.2f}x (one run after the other, on a shared "
        f"machine); loading peak FSDP 2 / 1 process: {summary['fsdp_over_one_load_peak']:.2f}x")
    return summary




# ----------------------------------------------------------------------------------------------------------
# By card: the largest micro-batch that fits, in each memory mode; generation's KV cache

MODES = {"bf16": {}, "int8": dict(quantize="int8"),
         "int8+ckpt+chunk": dict(quantize="int8", checkpointing=True, chunk=LOSS_CHUNK)}
CARD_TABLE = {"LLaMA-7B": "7B", "Llama-3.1-8B": "Llama-3.1-8B", "Llama-3.2-1B": "Llama-3.2-1B",
              "Llama-3.2-3B": "Llama-3.2-3B", "LLaMA-13B": "13B"}
CARD_TABLE_GB = (12, 16, 24, 40, 80)


def training_total(size, mode, micro_batch, length=512):
    args = llama_args(size, length)
    return plan_memory(args, "1 GPU", 1, micro_batch, length, length, torch.bfloat16, tied=LLAMA[size].get("tied", False),
                       **MODES[mode])["total"]


def largest_micro_batch(size, mode, card_gb, length=512):
    """The largest micro-batch of `length`-token sequences whose predicted peak fits the card (0: not even one).
    The peak is affine in the micro-batch (every activation scales with it; at 512 scored positions per sequence
    the chunked loss's one chunk is already full), so two micro-batch sizes give it."""
    one, two = training_total(size, mode, 1, length), training_total(size, mode, 2, length)
    free = (card_gb - CONTEXT_GIB) * 2**30
    return max(0, int((free - (2 * one - two)) // (two - one)))


def card_table(length=512, log=print):
    log(f"\nthe largest micro-batch of {length}-token sequences per card, one GPU (estimates; 0: not even one; "
        f"{CONTEXT_GIB} GiB kept free); int8+ckpt+chunk: --quantize=int8 --activation_checkpointing "
        f"--loss_chunk={LOSS_CHUNK}")
    log(f"{'model':14} {'mode':16} " + " ".join(f"{gb:>5} GB" for gb in CARD_TABLE_GB) + "   GiB at mb 1 / 4")
    rows = []
    for label, size in CARD_TABLE.items():
        for mode in MODES:
            row = {"model": label, "mode": mode, "largest_micro_batch": {gb: largest_micro_batch(size, mode, gb, length)
                                                                          for gb in CARD_TABLE_GB},
                   "gib_at_1": training_total(size, mode, 1, length) / 2**30,
                   "gib_at_4": training_total(size, mode, 4, length) / 2**30}
            rows.append(row)
            log(f"{label:14} {mode:16} " + " ".join(f"{row['largest_micro_batch'][gb]:>8}" for gb in CARD_TABLE_GB)
                + f"   {row['gib_at_1']:5.1f} / {row['gib_at_4']:5.1f}")
    return rows


def generation_memory(size, batch, cache_len, quantize=""):
    """Predicted peak of generate.py: the base (bf16, or int8 with the one dequantized matrix a matmul holds), and
    `batch` sequences as generation.bytes_per_sequence counts them for generate.py's batch size (each its KV cache and
    its prefill's largest transients). fused=True: the cards this plans for run bf16 (compute capability 8.0 on),
    where flash attention takes the prefill (causal, no mask, grouped-query heads too) and keeps no (heads, length,
    length) fp32 scores; left to ask (fused=None), it would count a meta-device model as a CPU's, with math's scores."""
    args = llama_args(size, cache_len)
    terms = plan_memory(args, "1 GPU", 1, 1, 1, 1, torch.bfloat16, quantize=quantize,
                        tied=LLAMA[size].get("tied", False))
    with torch.device("meta"):
        model = Transformer(replace(args, adapter_layer=0)).to(torch.bfloat16)
    sequences = batch * generation.bytes_per_sequence(model, cache_len, fused=True)
    return {"weights": terms["weights"], "sequences": sequences, "dequantized": terms["largest_dequantized"],
            "total": terms["weights"] + sequences + terms["largest_dequantized"]}


def generation_table(cache_len=512, batches=(1, 8, 32), log=print):
    log(f"\ngeneration (generate.py), max_seq_len {cache_len}: GiB by batch (estimates); the largest batch per card")
    log(f"{'model':14} {'base':5} " + " ".join(f"{'b' + str(b):>6}" for b in batches) + "   "
        + " ".join(f"{gb:>4} GB" for gb in CARD_TABLE_GB))
    rows = []
    for label in ("LLaMA-7B", "Llama-3.1-8B"):
        for quantize in ("", "int8"):
            size = CARD_TABLE[label]
            totals = {b: generation_memory(size, b, cache_len, quantize)["total"] / 2**30 for b in batches}
            per_seq = generation_memory(size, 2, cache_len, quantize)["total"] - generation_memory(size, 1, cache_len,
                                                                                                  quantize)["total"]
            fixed = generation_memory(size, 1, cache_len, quantize)["total"] - per_seq
            largest = {gb: max(0, int(((gb - CONTEXT_GIB) * 2**30 - fixed) // per_seq)) for gb in CARD_TABLE_GB}
            rows.append({"model": label, "base": quantize or "bf16", "gib": totals, "largest_batch": largest})
            log(f"{label:14} {quantize or 'bf16':5} " + " ".join(f"{totals[b]:6.1f}" for b in batches) + "   "
                + " ".join(f"{largest[gb]:>7}" for gb in CARD_TABLE_GB))
    return rows


def main(argv):
    cli.exit_on_input_error()
    globals().update(vars(cli.parse(Settings, __doc__, argv)))
    print(f"torch {torch.__version__} | {cpu_name()}, {os.cpu_count()} cores", flush=True)
    results = {"plan": plan_table(), "cards": card_table(), "generation": generation_table()}
    if check:
        print()
        results["plan_check"] = check_plan(small=quick)
    if json:
        Path(json).write_text(jsonlib.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
