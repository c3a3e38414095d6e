"""
Fine-tune LLaMA-Adapter on Alpaca-format instructions, with the paper's recipe (arXiv 2303.16199, Sec. 4.1).

    python train.py                      # no arguments: the built-in walkthrough, a few minutes on a laptop CPU
    python train.py --ckpt_dir=llama/7B --data_path=alpaca_data.json              # one GPU, or the CPU
    torchrun --nproc_per_node 8 train.py --ckpt_dir=llama/7B --data_path=alpaca_data.json
    torchrun --nproc_per_node 8 train.py --ckpt_dir=llama/65B --data_path=alpaca_data.json --fsdp   # sharded base
    python train.py --ckpt_dir=llama/7B --data_path=alpaca_data.json --resume      # continue a stopped run
    python train.py --ckpt_dir=Llama-3.1-8B --data_path=alpaca_data.json --quantize=int8 \\
        --activation_checkpointing --loss_chunk=256                               # a 12-16 GB card

Every setting below can be overridden as --key=value or --key value; --help lists them. The effective batch
(batch_size) holds at any number of processes: each process runs micro-batches and accumulates gradients until the
global batch is done. ckpt_dir may hold Meta's layout or Hugging Face's (config.json + safetensors), LLaMA-1, 2 or
Llama 3.x. Writes into out_dir: adapter.pth (the adapter alone, fp32, ~4.7 MiB at 7B; --mode=full: the whole model in
Meta's layout instead, params.json and consolidated.00.pth), train_state.pth (what --resume needs), log.jsonl (one
line per optimizer step) and summary.json (the run's figures); the walkthrough also walkthrough.json (its result).
"""
import functools
import importlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import cli
import lladapter
from cli import InputError

# ----------------------------------------------------------------------------------------------------------
# settings: each is --name=value on the command line; --help lists them


@dataclass
class Settings:
    ckpt_dir: str = ""  # the base: Meta's layout (params.json, consolidated.*.pth) or Hugging Face's; empty: the walkthrough
    tokenizer_path: str = ""  # empty: tokenizer.model or tokenizer.json in ckpt_dir, or tokenizer.model beside it
    data_path: str = "alpaca_data.json"  # a JSON list (or .jsonl, one per line) of {"instruction", "input", "output"}
    out_dir: str = "out"  # adapter.pth, train_state.pth and log.jsonl go here
    mode: Literal["adapter", "full"] = "adapter"  # adapter: prompts and gates train; full: every weight (the baseline)
    template: Literal[lladapter.TEMPLATES] = "alpaca"  # the paper's prompt, or llama3: Llama 3 instruct's chat format
    adapter_len: int = 10  # K, prompt vectors per adapted layer
    adapter_layer: int = -1  # L, adapted top layers; -1: all but the bottom two (the paper's 30 of 32 at 7B)
    image_dim: int = 0  # width of the image features that records name under "image"; 0: text only
    max_seq_len: int = 512  # longer examples are truncated; those whose prompt alone doesn't fit are skipped
    val_fraction: float = 0.01  # held out from training for the validation loss
    batch_size: int = 32  # effective batch: examples per optimizer step, over all processes
    micro_batch_size: int = 4  # examples per forward pass in each process
    epochs: int = 5  # passes over the training examples
    warmup_epochs: float = 2.0  # linear warmup, then half a cosine down to 0, set at every optimizer step
    base_lr: float = 9e-3  # the learning rate is base_lr * batch_size / 256 (1.125e-3 at 32)
    weight_decay: float = 0.02  # AdamW, on the prompts and gates
    beta1: float = 0.9  # AdamW's first beta, the paper's
    beta2: float = 0.95  # AdamW's second beta, the paper's
    seed: int = 0  # the adapter's initial values, the validation split and the data order
    log_interval: int = 10  # optimizer steps between printed lines (log.jsonl gets every step)
    eval_interval: int = 200  # optimizer steps between validation losses (and one at the end)
    save_interval: int = 200  # optimizer steps between checkpoints (and one at the end)
    stop_after: int = 0  # stop after this many optimizer steps in all, to --resume later; 0: run to the end
    resume: bool = False  # continue from out_dir/train_state.pth
    device: str = ""  # empty: cuda if available, else cpu
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # the frozen base; auto: bf16 from compute 8.0, fp16 below, CPU fp32
    loss_scale: float = 65536.0  # fp16 only: the starting loss scale, halved at each overflow (that step skipped)
    fsdp: bool = False  # under torchrun: shard the frozen base over the processes (FSDP2) instead of a copy in each
    compile: bool = False  # torch.compile each transformer block (the same losses; pays off on a GPU)
    quantize: Literal["", "int8"] = ""  # int8: the frozen base's matrices int8, a scale per row (quantize.py)
    activation_checkpointing: bool = False  # keep only each adapted block's input; recompute the rest in backward
    loss_chunk: int = 0  # scored positions per pass through the output head and loss (256: a 128K vocabulary); 0: all
    smoke: bool = False  # the walkthrough only: its one-minute version
    variant: str = ""  # for experiments (walkthrough/ablations.py): "module:function", applied to the built model


# Settings that must not change between a run and its --resume.
RUN_IDENTITY = ["ckpt_dir", "data_path", "mode", "variant", "adapter_len", "adapter_layer", "image_dim", "max_seq_len",
                "val_fraction", "batch_size", "epochs", "warmup_epochs", "base_lr", "weight_decay", "beta1", "beta2", "seed",
                "template"]
# ----------------------------------------------------------------------------------------------------------

saved_step = None  # the last optimizer step whose state is on disk (train_state.pth), for what Ctrl-C says


def stopped():
    # What Ctrl-C (cli.exit_on_input_error) prints: what this run keeps, and the command that continues it.
    launch = f"torchrun --nproc_per_node {os.environ['WORLD_SIZE']}" if "RANK" in os.environ else "python"
    command = " ".join([launch, "train.py", *(a for a in sys.argv[1:] if a not in ("--resume", "--no-resume"))])
    if saved_step is None:
        return f"nothing of this run is written yet; start it again with: {command}"
    return (f"{Path(args.out_dir) / 'train_state.pth'} keeps step {saved_step} (saved every {args.save_interval} "
            f"steps); continue with: {command} --resume")


cli.exit_on_input_error(stopped)
args = cli.parse(Settings, __doc__)
walkthrough = None
if not args.ckpt_dir:  # no base: the built-in walkthrough (walkthrough/world.py), its settings under the command line's
    from walkthrough import world as walkthrough
    args = walkthrough.preset(args, functools.partial(cli.parse, Settings, __doc__))
# Settings a user can get wrong, refused before anything is built or written
for key in ("batch_size", "micro_batch_size", "epochs", "max_seq_len", "log_interval", "eval_interval", "save_interval",
            "loss_scale"):
    cli.require(getattr(args, key) > 0, f"--{key}={getattr(args, key)}: must be positive")
for key in ("stop_after", "adapter_len", "image_dim", "warmup_epochs", "weight_decay", "loss_chunk"):
    cli.require(getattr(args, key) >= 0, f"--{key}={getattr(args, key)}: must not be negative")
cli.require(args.adapter_layer >= -1, f"--adapter_layer={args.adapter_layer}: a number of layers, or -1 for all but two")
cli.require(args.mode == "full" or args.adapter_len > 0 and args.adapter_layer != 0, f"--adapter_len={args.adapter_len} "
            f"--adapter_layer={args.adapter_layer}: an adapter needs at least one prompt in one layer (or --mode=full)")
cli.require(0 <= args.val_fraction < 1 and args.base_lr > 0 and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1,
            "--val_fraction, --beta1 and --beta2 must lie in [0, 1), --base_lr must be positive")
cli.require(not (args.quantize and args.mode == "full"), "--quantize=int8: an int8 base is frozen, for --mode=adapter")
cli.require(not args.fsdp or "RANK" in os.environ and args.mode == "adapter" and not args.compile,
            "--fsdp: runs under torchrun (one process per GPU), in adapter mode, without --compile")
cli.require(not args.fsdp or tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 7),
            f"--fsdp needs torch >= 2.7 (fully_shard's ignored_params, which keeps the adapter whole); "
            f"this is {torch.__version__}")
if args.variant:  # e.g. walkthrough.ablations:no_gate (python -m walkthrough.ablations runs them)
    module_name, _, function_name = args.variant.partition(":")
    try:
        apply_variant = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise InputError(f"--variant={args.variant}: expected module:function ({e})") from None
out = Path(args.out_dir)
cli.require(not args.resume or (out / "train_state.pth").is_file(),
            f"--resume: nothing to resume, {out / 'train_state.pth'} does not exist")

# Several processes when launched by torchrun (it sets RANK), one otherwise; NCCL on GPUs, gloo on CPUs. Each
# process holds the whole base and DDP averages the adapter's gradients, or (--fsdp) each holds a shard of it.
distributed = "RANK" in os.environ
ddp = distributed and not args.fsdp
device = cli.device_of(args.device)
if distributed and device.type == "cuda":  # this process's GPU (a scheduler may show each process fewer than all)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
device_type = device.type
if device_type == "cuda":  # before anything touches the GPU: the dtype, the memory figures and NCCL read this one
    torch.cuda.set_device(device)
if distributed:  # the device given, so that NCCL never guesses it
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", device_id=device if device_type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()
else:
    rank, world = 0, 1
master = rank == 0  # only it prints and writes files
# One precision story: the frozen base in compute_dtype, every computation on it under one autocast, the adapter
# fp32. Full fine-tuning keeps fp32 master weights. fp16 (GPUs without bf16) scales the loss so that small
# gradients don't underflow; a step whose gradients overflow is skipped and the scale halved.
compute_dtype = cli.dtype_of(args.dtype, device)
autocast = torch.autocast(device_type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
scaler = torch.amp.GradScaler(device_type, init_scale=args.loss_scale, enabled=compute_dtype == torch.float16)


def say(*text):
    if master:
        print(*text, flush=True)


# Each process runs `accumulation` micro-batches per optimizer step, the global batch split evenly
batch_size, micro_batch_size = args.batch_size, args.micro_batch_size
if micro_batch_size * world > batch_size:  # e.g. the walkthrough's one micro-batch of 32, under torchrun
    micro_batch_size = max(1, batch_size // world)
    say(f"micro_batch_size lowered to {micro_batch_size}: {world} processes share each batch of {batch_size}")
accumulation = batch_size // (world * micro_batch_size)
cli.require(accumulation * world * micro_batch_size == batch_size, f"batch_size={batch_size} must be a multiple of "
            f"micro_batch_size={micro_batch_size} x {world} processes")


def peak_memory_mib():
    # The most this process needed: on a GPU, the caching allocator's peak reservation (nvidia-smi also counts the
    # CUDA context, a few hundred MiB); on a CPU, the peak resident set where the platform tells it (not on Windows).
    if device_type == "cuda":
        return torch.cuda.max_memory_reserved() / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def mib(value):
    return f"{value:,.0f} MiB" if math.isfinite(value) else "not measured here"


def finish(code=0):
    # An orderly end for every process: all leave their last collective together, the process group goes, and
    # the process exits with `code`. Several processes leave with os._exit, past Python's own teardown: gloo's
    # worker threads can still be letting go of the last collectives' tensors then, which needs the interpreter
    # (torch 2.13) and aborts a process in mid-teardown ("terminate called without an active exception") after
    # a run that succeeded. Every file is written by then, and the output is flushed here.
    if distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


resident_at_start = peak_memory_mib() if device_type == "cpu" else 0.0
if walkthrough:  # its data, tokenizer and pretrained base, built once by process 0
    walkthrough.prepare(args)

# ----------------------------------------------------------------------------------------------------------
# data: Alpaca records -> (tokens, labels) with only the response and EOS scored


def load_records(path):
    records = cli.read_records(path)
    for i, r in enumerate(records):
        missing = [key for key in ("instruction", "output") if key not in r]
        if missing:
            raise InputError(f"{cli.record_at(path, i)} has no {missing[0]!r}")
        for key in ("instruction", "input", "output"):
            if not isinstance(r.get(key, ""), str):
                raise InputError(f"{cli.record_at(path, i)}: {key!r} is a {type(r[key]).__name__}, not a string")
        if "image" in r and not args.image_dim:
            raise InputError(f"{cli.record_at(path, i)} has an image, but this adapter is text-only (set --image_dim)")
        if args.image_dim and "image" not in r:
            raise InputError(f"{cli.record_at(path, i)} has no 'image', and --image_dim={args.image_dim} needs one per record")
    return records


records = load_records(args.data_path)
say(f"loading {args.ckpt_dir} and tokenizing {len(records)} records ...")
t_load = time.time()
torch.manual_seed(args.seed)  # the adapter's initial values: the same on every run and in every process
model, tokenizer = checkpoint.load_llama(
    args.ckpt_dir, args.tokenizer_path or None, device=device,
    dtype=torch.float32 if args.mode == "full" else compute_dtype,
    shard=checkpoint.fully_shard_base if args.fsdp else None,  # --fsdp: each process reads and keeps only its shard
    quantize=args.quantize,  # int8: quantized as it is read, never whole in full precision
    max_seq_len=args.max_seq_len, adapter_len=args.adapter_len, adapter_layer=args.adapter_layer,
    image_dim=args.image_dim)
model.activation_checkpointing = args.activation_checkpointing
if args.variant:  # an experiment's small, visible change to the built model
    apply_variant(model)
examples, features, n_truncated = [], [], 0
for i, r in enumerate(records):
    encoded = lladapter.encode_example(tokenizer, r["instruction"], r.get("input", ""), r["output"], args.max_seq_len,
                                       args.template)
    if encoded is None:
        continue
    examples.append(encoded[:2])
    n_truncated += encoded[2]
    if args.image_dim:
        features.append(cli.load_image_feature(r["image"], Path(args.data_path).parent, args.image_dim,
                                               cli.record_at(args.data_path, i)))
if not examples:
    raise InputError(f"{args.data_path}: no record fits in max_seq_len={args.max_seq_len}")
features = torch.stack(features) if args.image_dim else None
n_scored = [sum(label != lladapter.IGNORE_INDEX for label in labels) for _, labels in examples]
say(f"data: {len(records)} records in {args.data_path}; {len(records) - len(examples)} skipped (prompt alone longer "
    f"than max_seq_len={args.max_seq_len}), {n_truncated} truncated; loaded in {time.time() - t_load:.0f}s, peak "
    f"memory so far {mib(peak_memory_mib())}")
load_peak_mib = peak_memory_mib()

# A fixed held-out split, the same in every process and on every resume.
perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
n_val = min(len(examples) - 1, math.ceil(args.val_fraction * len(examples)))
val_idx, train_idx = perm[:n_val], perm[n_val:]
steps_per_epoch = len(train_idx) // batch_size
if steps_per_epoch == 0:
    raise InputError(f"{args.data_path}: {len(train_idx)} training records, fewer than batch_size={batch_size}")
total_steps = args.epochs * steps_per_epoch
warmup_steps = round(args.warmup_epochs * steps_per_epoch)
peak_lr = args.base_lr * batch_size / 256
say(f"{len(train_idx)} train / {len(val_idx)} val examples; {steps_per_epoch} steps per epoch, {total_steps} in all; "
    f"{world} process(es) x {accumulation} micro-batches of {micro_batch_size}; peak lr {peak_lr:.3g}")


@functools.lru_cache(maxsize=1)
def epoch_order(epoch):  # a fresh permutation per epoch, from the seed: the data position is the step alone
    return torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(args.seed + 1 + epoch)).tolist()


def global_batch(step):
    # The examples of optimizer step `step`, over all processes.
    epoch, i = divmod(step, steps_per_epoch)
    return [train_idx[j] for j in epoch_order(epoch)[i * batch_size:(i + 1) * batch_size]]


def micro_batches(batch):
    # This process's share, sorted by length so each micro-batch pads little (the loss doesn't depend on grouping).
    share = sorted(batch[rank::world], key=lambda j: len(examples[j][0]))
    return [share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]


def lr_at(step):
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def loss_sum(model, idx):
    # Summed cross-entropy over the response tokens and EOS of examples `idx` (a micro-batch).
    tokens, labels = lladapter.pad_batch([examples[j] for j in idx], device)
    with autocast:
        image = lladapter.to_device(features[idx], device) if args.image_dim else None
        return lladapter.response_loss(model, tokens, labels, image, chunk=args.loss_chunk)


@torch.no_grad()
def validation_loss():
    share = val_idx[rank::world]
    batches = [share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]
    loss = sum(loss_sum(raw_model, idx) for idx in batches)
    if args.fsdp:  # each forward gathers the shards from every process: all must run as many as the busiest, so the
        # ones with fewer examples run repeats that aren't counted
        for _ in range(math.ceil(math.ceil(len(val_idx) / world) / micro_batch_size) - len(batches)):
            loss_sum(raw_model, val_idx[:1])
    total = torch.tensor([float(loss), sum(n_scored[j] for j in share)], device=device)  # summed loss, tokens
    if distributed:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------
# model: the frozen base plus the adapter (or every weight, in full mode), optimizer, checkpoints

raw_model = model  # saved from, never from the DDP or compiled wrapper (no "module." prefixes in files)
if args.mode == "adapter":
    lladapter.mark_only_adapter_trainable(model)  # before DDP wraps it: DDP syncs only what trains
trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
if args.fsdp:  # FSDP leaves the adapter whole in every process: all start from process 0's values (GPUs of two
    # kinds can draw different ones from the same seed). DDP does the same for what trains when it wraps the model.
    for p in trainable.values():
        dist.broadcast(p.data, src=0)
n_trainable, n_total = sum(p.numel() for p in trainable.values()), sum(p.numel() for p in model.parameters())
say(f"model: {n_total:,} parameters, {n_trainable:,} trainable ({100 * n_trainable / n_total:.3f}%), "
    f"base in {model.tok_embeddings.weight.dtype}{', its matrices int8' if args.quantize else ''}, on {device}"
    + (f", {world} processes" if distributed else ""))
if args.fsdp:  # what this process holds of the frozen base: its shard of each tensor
    local = sum(p.to_local().numel() for p in model.parameters() if hasattr(p, "to_local"))
    say(f"fsdp: process 0 holds {local:,} of the base's {n_total - n_trainable:,} elements "
        f"({100 * local / (n_total - n_trainable):.1f}%)")
optimizer = torch.optim.AdamW(trainable.values(), lr=peak_lr, betas=(args.beta1, args.beta2),
                              weight_decay=args.weight_decay, fused=device_type == "cuda")
gates = raw_model.gates()

settings = {**vars(args), "base_dtype": cli.dtype_name(compute_dtype)}  # the dtype --dtype=auto chose on this machine
start_step = 0
if args.resume:
    state = checkpoint.torch_load(out / "train_state.pth", verify=True)
    changed = [k for k in RUN_IDENTITY if state["settings"].get(k, settings[k]) != settings[k]]  # older: no template
    if changed:
        raise InputError(f"{out / 'train_state.pth'} was written with other settings: " +
                         ", ".join(f"{k}={state['settings'][k]!r} (now {settings[k]!r})" for k in changed))
    saved = state["settings"].get("base_dtype", settings["base_dtype"])
    if saved != settings["base_dtype"]:  # the loss scaler's state, and the numbers, belong to the dtype
        raise InputError(f"{out / 'train_state.pth'} was trained with the base in {saved}, here --dtype={args.dtype} "
                         f"is {settings['base_dtype']}: resume with --dtype={saved}, or start again in another --out_dir")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state.get("scaler", {}))
    start_step = saved_step = state["step"]
    say(f"resumed from {out / 'train_state.pth'} at step {start_step}")
if master and (out / "log.jsonl").exists():  # a new run starts a new log; a resumed one keeps its steps so far
    kept = [line for line in (out / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= start_step]
    checkpoint.atomic_save("".join(line + "\n" for line in kept).encode(), out / "log.jsonl")


def save_checkpoint(step):
    # The deliverable first, then the resume state; each written whole under a temporary name, then renamed.
    global saved_step
    if args.mode == "adapter":
        checkpoint.save_adapter(raw_model, out / "adapter.pth")
    else:  # the whole fine-tuned model in Meta's layout, loadable with --ckpt_dir=out_dir
        checkpoint.save_meta_checkpoint(raw_model, out, tokenizer)
    checkpoint.atomic_save({"step": step, "settings": settings, "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(),
                            "trainable": {n: p.detach().cpu() for n, p in trainable.items()}}, out / "train_state.pth")
    saved_step = step


if args.compile:  # in place, block by block: parameter names, DDP and the saved files stay as they are. Dynamic
    # shapes from the start: micro-batches and validation of every length then share a few graphs, where a graph
    # per length would soon pass dynamo's recompile limit (8) and run the blocks eagerly, silently.
    for layer in raw_model.layers:
        layer.compile(dynamic=True)
if ddp:  # DDP syncs what trains and nothing else: the frozen base was read from the same file by every process, and
    # the rotary table is computed from the settings (the default would broadcast both, the table at every step)
    DDP._set_params_and_buffers_to_ignore_for_model(model, [n for n, p in model.named_parameters()
                                                            if not p.requires_grad])
    model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None,
                broadcast_buffers=False)

# ----------------------------------------------------------------------------------------------------------
# the loop: one optimizer step per global batch


def accumulate_gradients(batch):
    """The gradients of the global batch's mean token loss, this process's micro-batches one after another (and the
    processes' summed); returns that loss."""
    targets = sum(n_scored[j] for j in batch)  # scored tokens in the whole global batch
    step_loss = torch.zeros((), device=device)
    parts = micro_batches(batch)
    for i, idx in enumerate(parts):
        with model.no_sync() if ddp and i < len(parts) - 1 else nullcontext():  # DDP averages on the last one
            # Each micro-batch adds its share of the global batch's mean token loss. DDP divides the processes'
            # summed gradients by `world`, hence the factor; under FSDP the adapter's are summed below.
            loss = loss_sum(model, idx) / targets
            scaler.scale(loss * (world if ddp else 1)).backward()
        step_loss += loss.detach()
    if args.fsdp:
        for p in trainable.values():
            dist.all_reduce(p.grad)
    if distributed:
        dist.all_reduce(step_loss)
    return step_loss.item()


def write_log(record, tokens_seen, elapsed):
    """The step's line in log.jsonl, and every log_interval steps (or with a validation loss) a printed one."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    done = record["step"]
    if done % args.log_interval == 0 or done == last_step or "val_loss" in record:
        val = f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
        eta = elapsed / (done - start_step) * (last_step - done)
        print(f"step {done}/{total_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | lr "
              f"{record['lr']:.3e} | {tokens_seen / elapsed:,.0f} tok/s | {elapsed:.0f}s elapsed, eta {eta:.0f}s | "
              f"mean |tanh(gate)| {record['gate']:.4f}{val}", flush=True)


last_step = min(total_steps, args.stop_after or total_steps)
t_start, tokens_seen, step_seconds = time.time(), 0, []
for step in range(start_step, last_step):
    t_step = time.time()
    batch = global_batch(step)
    lr = lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = accumulate_gradients(batch)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # unscales the gradients; with fp16, skips the update if any overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    done = step + 1
    saving = done % args.save_interval == 0 or done == last_step
    # A non-finite loss, or a step that broke the weights about to be saved, ends the run; nothing bad is written.
    if not math.isfinite(step_loss):
        broken = f"the loss is {step_loss}"
    elif saving and not all(p.isfinite().all() for p in trainable.values()):
        broken = "the weights are no longer finite"
    else:
        broken = ""
    if broken:
        say(f"error: {broken} at step {done}: stopping. The last good checkpoint is in {out} "
            f"(written every {args.save_interval} steps); try a lower --base_lr")
        finish(1)  # every process saw the same loss and stops here

    tokens_seen += sum(len(examples[j][0]) for j in batch)
    step_seconds.append(time.time() - t_step)
    per_layer = torch.stack([torch.tanh(g).abs().mean() for g in gates]).tolist() if gates else []  # per layer
    record = {"step": done, "epoch": done / steps_per_epoch, "loss": step_loss, "lr": lr,
              "gate": sum(per_layer) / len(per_layer) if per_layer else 0.0, "gates": per_layer}
    if scaler.is_enabled():
        record["loss_scale"] = scaler.get_scale()
        if record["loss_scale"] < scale:
            record["skipped"] = True
            say(f"step {done}: fp16 gradients overflowed, step skipped; loss scale now {record['loss_scale']:g}")
    if (done % args.eval_interval == 0 or done == total_steps) and val_idx:
        record["val_loss"] = validation_loss()  # every process evaluates its share
    if master:
        write_log(record, tokens_seen, time.time() - t_start)
        if saving:
            save_checkpoint(done)

peak = torch.tensor(peak_memory_mib(), device=device)
if distributed:
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
peak = peak.item()
say(f"peak memory: {mib(peak)} " + ("reserved by torch on the GPU" if device_type == "cuda" else
    f"resident ({mib(peak - resident_at_start)} above python and torch)" if math.isfinite(peak) else "") +
    (f", the most of {world} processes" if distributed else ""))
if last_step < total_steps:
    say(f"stopped after step {last_step} of {total_steps} (--stop_after); continue with --resume")
elif args.mode == "adapter" and master:
    say(f"adapter: {out / 'adapter.pth'} ({os.path.getsize(out / 'adapter.pth') / 2**20:.2f} MiB)")
if master:  # what tools read (tools/plan.py, walkthrough/ablations.py): this run's figures, never its printed lines
    summary = {"steps": last_step, "total_steps": total_steps, "world": world, "device": str(device),
               "peak_memory_mib": peak if math.isfinite(peak) else None,
               "above_start_mib": peak - resident_at_start if device_type == "cpu" and math.isfinite(peak) else None,
               "load_peak_mib": load_peak_mib if math.isfinite(load_peak_mib) else None,
               "step_seconds": step_seconds, "tokens_per_s": tokens_seen / max(sum(step_seconds), 1e-9)}
    checkpoint.atomic_save(json.dumps(summary, indent=1).encode(), out / "summary.json")
if walkthrough and last_step == total_steps and args.mode == "adapter":  # held-out questions, with and without it
    walkthrough.report(raw_model, tokenizer, args)
finish()
