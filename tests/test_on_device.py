"""The GPU paths, on the device LLADAPTER_TEST_DEVICE names (tests/fixtures.DEVICE): at tiny shapes on a CPU (the slow
tier, and tools/gpu_check.py --quick), at real shapes on CUDA (tools/gpu_check.py on a GPU machine, which keeps each
test's outcome and the figures it records with record_property). train.py, generate.py and the walkthrough run as a
user types them, without --device: on a GPU machine they must find the card themselves.

They run in this file's order: first the test that fills the card's memory, while the walkthrough (which
tools/gpu_check.py runs beside these) still pretrains its base on the CPU, then the compiled ones."""
import functools
import json
import math
import os
import runpy
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import checkpoint
import cli
import generation
import lladapter
from lladapter import ModelArgs, Transformer
from tests.conftest import log_of
from tests.fixtures import DEVICE, ROOT, SDPACalls, adapter_file_tensors
from tools import bench, gpu_check, plan

ON_GPU = torch.device(DEVICE).type == "cuda"
DTYPE = torch.bfloat16  # the correctness checks': a GPU's base dtype, on a CPU too
QUIET = {} if ON_GPU else gpu_check.QUIET  # on a CPU, the commands' OpenMP threads: one each, none spinning
ADAPTER = dict(adapter_layer=2, adapter_len=10)  # the small base's adapter, in train.py and in generate.py
TRAIN_STEPS = 4  # optimizer steps of each train.py run (of 8 examples, 64 tokens each)
# train.py's runs against each other: the tolerance of the adapter files (fp32 base; GPU kernels are not bit-exact,
# e.g. atomics in attention's backward), and of the per-step losses
ADAPTER_RTOL, ADAPTER_ATOL, LOSS_RTOL = 1e-3, 1e-4, 1e-4
FREE_GIB = 1.5  # generate.py --max_batch_size=0 starts with this much of the card free (its CUDA context takes ~0.5)


def as_typed(*args, timeout=900):
    """python ARGS in the reference's folder, as a user types it: no --device."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **QUIET})


def failed(result):
    return f"exit status {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


@pytest.fixture
def work(request, tmp_path):
    """A test's folder for the files its commands write: under tools/gpu_check.py's folder when it runs the test (kept
    for a look afterwards; the walkthrough's rerun after a cut finds its base there), else pytest's temporary one."""
    root = os.environ.get(gpu_check.WORK_ENV)
    if not root:
        return tmp_path
    folder = Path(root) / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def letters(n, offset=0):
    return " ".join("abcdefghijklmnopqrstuvwxyz"[(offset + i) % 26] for i in range(n))  # n tokens: one a letter


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random base in Meta's layout (fp16 files, as Meta's are; grouped-query attention, 4 query heads per kv
    head) with a tokenizer in which each lone letter is one token, an adapter for it with open gates, train.py's data
    (8 x TRAIN_STEPS records of 64 tokens) and generate.py's prompts. Made on the CPU in a few seconds."""
    d = tmp_path_factory.mktemp("small")
    base = d / "base"
    base.mkdir()
    tokenizer = plan.write_tokenizer(base / "tokenizer.model")
    shape = dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=256) if ON_GPU else \
        dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, multiple_of=32)
    args = ModelArgs(**shape, vocab_size=tokenizer.n_words, adapter_layer=0)
    torch.manual_seed(0)
    checkpoint.save_meta_checkpoint(Transformer(args), base, dtype=torch.float16)
    adapted = Transformer(replace(args, **ADAPTER))
    bench.open_gates(adapted)  # open: the prompt branch changes every decoding step's output
    checkpoint.save_adapter(adapted, d / "adapter.pth")
    (d / "data.json").write_text(json.dumps(plan.fixed_length_records(tokenizer, 8 * TRAIN_STEPS, 64)))
    (d / "prompts.txt").write_text("".join(letters(3 + 2 * i, i) + "\n" for i in range(9)))  # 9 lengths
    # Prompts nearly max_seq_len long, for the batch fitted to free memory
    max_seq_len, n, new = (2048, 40, 8) if ON_GPU else (256, 12, 8)
    template = len(lladapter.encode_prompt(tokenizer, ""))
    lines = [letters(max_seq_len - new - template - 8 - i % 5, i) for i in range(n)]
    assert max(len(lladapter.encode_prompt(tokenizer, line)) for line in lines) + new <= max_seq_len
    (d / "long_prompts.txt").write_text("".join(line + "\n" for line in lines))
    return {"dir": d, "base": base, "adapter": d / "adapter.pth", "long": (max_seq_len, n, new)}


# ---- generate.py ---------------------------------------------------------------------------------------------

def test_generate_py_fits_its_batch_to_a_nearly_full_card_without_running_out_of_memory(small, work, record_property):
    # --max_batch_size=0 (the default) asks generation.batch_that_fits how many sequences of a long --max_seq_len
    # 90% of the free memory holds; on a card that something else nearly fills, a count that misses a tensor runs
    # out of memory. A ballast tensor here leaves FREE_GIB of the card free (torch.cuda.mem_get_info, which
    # generate.py reads, counts every process's memory). On a CPU it runs as it is.
    max_seq_len, n, new = small["long"]
    ballast = None
    if ON_GPU:
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        ballast = torch.empty(max(0, int(free - FREE_GIB * 2**30)), dtype=torch.uint8, device=DEVICE)
        record_property("free_gib_left", round(torch.cuda.mem_get_info()[0] / 2**30, 2))
    out = work / "long.jsonl"
    try:
        result = as_typed("generate.py", f"--ckpt_dir={small['base']}", f"--adapter={small['adapter']}",
                          f"--prompts_file={small['dir'] / 'long_prompts.txt'}", "--max_batch_size=0",
                          f"--max_seq_len={max_seq_len}", f"--max_gen_len={new}", "--temperature=0", f"--out={out}")
    finally:
        del ballast
        if ON_GPU:
            torch.cuda.empty_cache()
    assert result.returncode == 0, ("OUT OF MEMORY: " if "out of memory" in result.stderr.lower() else "") + \
        failed(result)
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    record_property("prompts", f"{n} of about {max_seq_len - new} tokens, {new} new each")
    assert len(answers) == n


class Recordings:
    """What torch compiled and recorded in this process while it is entered: the graphs dynamo compiled (its counter),
    the CUDA graphs cudagraph trees recorded (a recording, or a re-recording, calls dynamo's callbacks with
    CUDAGRAPH_RECORDING), and the times it skipped CUDA graphs (inductor's counter)."""

    def __enter__(self):
        from torch._dynamo.callback import CallbackTrigger, callback_handler
        self.recorded, self.handler = 0, callback_handler
        self.graphs, self.skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]

        def on_start(args):
            self.recorded += args.callback_trigger == CallbackTrigger.CUDAGRAPH_RECORDING

        self.callback = callback_handler.register_start_callback(on_start)
        return self

    def __exit__(self, *_):
        self.handler.remove_start_callback(self.callback)
        self.compiled = counters["stats"]["unique_graphs"] - self.graphs
        self.skipped = counters["inductor"]["cudagraph_skips"] - self.skips

    def text(self):
        return f"{self.compiled} compiled, {self.recorded} CUDA graph(s) recorded, {self.skipped} skipped"


def test_generate_py_compile_with_a_short_last_batch_compiles_once_and_records_one_graph(small, work, monkeypatch,
                                                                                      record_property):
    # 9 prompts in batches of 4, 4 and 1, the last filled up to 4 by generate.py: one batch size, so one compilation
    # and one CUDA graph. Run in this process (runpy, the command line as typed), where torch's counters are read.
    out = work / "compiled.jsonl"
    monkeypatch.setattr(sys, "argv", ["generate.py", f"--ckpt_dir={small['base']}", f"--adapter={small['adapter']}",
                                      f"--prompts_file={small['dir'] / 'prompts.txt'}", "--max_batch_size=4",
                                      "--compile", "--max_gen_len=16", "--temperature=0", f"--out={out}"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # generate.py installs its own
    monkeypatch.chdir(ROOT)
    with Recordings() as seen:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    record_property("generate.py --compile", seen.text())
    assert len(out.read_text().splitlines()) == 9
    assert seen.compiled == 1, seen.text()
    assert not ON_GPU or (seen.recorded, seen.skipped) == (1, 0), seen.text()


# ---- compiled decoding --------------------------------------------------------------------------------------

def a_fused_kernel_takes(q, k, v, mask):
    """Whether flash, memory-efficient or cuDNN attention would take this masked call on this card. torch turns a
    bool mask into an additive one in q's dtype before it chooses (convert_boolean_attn_mask), so the same here."""
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    params = torch.backends.cuda.SDPAParams(q, k, v, bias, 0.0, False, q.shape[1] != k.shape[1])
    return any(can(params) for can in (torch.backends.cuda.can_use_flash_attention,
                                       torch.backends.cuda.can_use_efficient_attention,
                                       torch.backends.cuda.can_use_cudnn_attention))


def test_compiled_decoding_of_a_grouped_query_model_compiles_and_records_once_per_batch_size(record_property):
    # Llama 3.1 8B's attention (32 query heads over 8 kv heads, head_dim 128) in 2 layers, on a GPU: a grouped-query
    # model, whose compiled step must not pass a mask with grouped heads (torch's math kernel would take it, copying
    # K and V per query head in fp32). At batch 1 and 8: one compilation and one CUDA-graph recording each, none
    # skipped; then the same call again, timed, on the cache the first one kept: nothing compiled or recorded.
    args = replace(plan.llama_args("Llama-3.1-8B", 2048), n_layers=2, adapter_layer=2) if ON_GPU else \
        ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, max_seq_len=2048, adapter_layer=2)
    device = torch.device(DEVICE)
    model = bench.random_model(args, device, cli.dtype_of("auto", device))
    bench.open_gates(model)
    n_prompt, n_new = (32, 128) if ON_GPU else (8, 16)
    bandwidth = bench.gpu_specs(torch.cuda.get_device_name())[1] if ON_GPU else math.nan
    for bsz in (1, 8):
        prompts = torch.randint(3, args.vocab_size, (bsz, n_prompt)).tolist()
        call = functools.partial(generation.generate, model, prompts, n_new, temperature=0, eos_id=-1, compile=True)
        with Recordings() as first:
            call()
        with Recordings() as again:
            seconds = bench.timed(call)
        cache_len = model.cache_len  # the static cache the call chose
        tokens_per_s = bsz * n_new / seconds
        bound = bench.decode_bound(model, bsz, cache_len, bandwidth)
        record_property(f"batch {bsz}", f"{first.text()}; the timed call {again.text()}; {tokens_per_s:,.1f} tok/s "
                        f"({n_new} new after {n_prompt}, a cache of {cache_len})"
                        + ("" if math.isnan(bound) else f", the bandwidth bound {bound:,.0f} tok/s"))
        assert first.compiled == 1 and (again.compiled, again.recorded, again.skipped) == (0, 0, 0), first.text()
        assert not ON_GPU or (first.recorded, first.skipped) == (1, 0), first.text()
    # The compiled step's attention, run eagerly (a tensor position, the whole cache under a mask: the same code)
    step = torch.randint(3, args.vocab_size, (8, 1), device=device)
    with SDPACalls() as sdpa, torch.no_grad():
        model(step, torch.tensor([n_prompt], device=device))
    model.clear_cache()
    masked = [(q, k, v, mask) for q, k, v, mask in sdpa.calls if mask is not None]
    assert masked and all(q.shape[1] == k.shape[1] for q, k, _, _ in masked), "a mask passed with grouped heads"
    if ON_GPU:
        assert all(a_fused_kernel_takes(*call) for call in masked), "a masked call left to the math kernel: " + \
            ", ".join(f"q {tuple(q.shape)} k {tuple(k.shape)} mask {tuple(m.shape)}" for q, k, _, m in masked)


# ---- train.py -----------------------------------------------------------------------------------------------

def train_args(small, out):
    """train.py on the small base: TRAIN_STEPS optimizer steps of 8 examples of 64 tokens, micro-batches of 2, a
    learning rate at which the adapter visibly moves, its file written at the end."""
    return ["train.py", f"--ckpt_dir={small['base']}", f"--data_path={small['dir'] / 'data.json'}", f"--out_dir={out}",
            *(f"--{k}={v}" for k, v in ADAPTER.items()), "--max_seq_len=64", "--batch_size=8",
            "--micro_batch_size=2", "--epochs=1", "--warmup_epochs=0.5", "--val_fraction=0", "--log_interval=1",
            "--base_lr=1.0", f"--stop_after={TRAIN_STEPS}", "--save_interval=1000"]


def test_train_py_under_torchrun_trains_the_adapter_that_one_process_trains(small, work, record_property):
    # torchrun with DDP and with --fsdp, in 1 process (and in 2 where there are 2 GPUs; on a CPU the slow tier runs
    # gloo over 2 processes), against python train.py on the same steps, all at once; NCCL on a GPU, gloo on a CPU.
    gpus = torch.cuda.device_count() if ON_GPU else 0
    runs = {"one": [], "DDP1": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]}
    runs["FSDP1"] = runs["DDP1"]
    if gpus >= 2:
        runs.update(DDP2=["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
        runs["FSDP2"] = runs["DDP2"]
    started = {name: subprocess.Popen([sys.executable, *launcher, *train_args(small, work / name), "--dtype=fp32",
                                       *(["--fsdp"] if name.startswith("FSDP") else [])],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, **QUIET})
               for name, launcher in runs.items()}
    outputs = {name: process.communicate(timeout=900)[0] for name, process in started.items()}
    for name, process in started.items():
        assert process.returncode == 0, f"{name}: {outputs[name][-3000:]}"
    ref, ref_losses = adapter_file_tensors(work / "one" / "adapter.pth"), [r["loss"] for r in log_of(work / "one")]
    moved = max(v.abs().max().item() for k, v in ref.items() if k.endswith(".gate"))
    assert moved > 0, "the adapter did not train (its gates are still zero)"
    for name in runs:
        if name == "one":
            continue
        got, losses = adapter_file_tensors(work / name / "adapter.pth"), [r["loss"] for r in log_of(work / name)]
        assert got.keys() == ref.keys()
        diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        record_property(name, f"adapter max abs difference {diff:.2g}, losses within {loss_diff:.2g} relative")
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=ADAPTER_RTOL, atol=ADAPTER_ATOL, msg=f"{name}: {k}")
        assert len(losses) == len(ref_losses) == TRAIN_STEPS and loss_diff <= LOSS_RTOL, (name, losses, ref_losses)
    record_property("gates moved up to", round(moved, 4))


def test_train_py_in_fp16_scales_its_loss_and_keeps_it_finite(small, work, record_property):
    # --dtype=fp16, the path of cards without bf16 (T4, V100): a step whose gradients overflow is skipped and the
    # scale halved, so the losses stay finite and not every step is skipped.
    result = as_typed(*train_args(small, work / "fp16"), "--dtype=fp16")
    assert result.returncode == 0, failed(result)
    records = log_of(work / "fp16")
    skipped = sum(bool(r.get("skipped")) for r in records)
    record_property("fp16", f"losses {records[0]['loss']:.3f} .. {records[-1]['loss']:.3f}, {skipped} of "
                    f"{len(records)} steps skipped on overflow, loss scale now {records[-1].get('loss_scale', 0):g}")
    record_property("--dtype=auto", cli.dtype_name(cli.dtype_of("auto", DEVICE)) + (
        f" at compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}" if ON_GPU else " on a CPU"))
    assert len(records) == TRAIN_STEPS and all(math.isfinite(r["loss"]) for r in records) and skipped < len(records)
    assert json.loads((work / "fp16" / "summary.json").read_text())["device"].startswith(DEVICE)  # found the card


def test_the_small_card_recipe_trains_within_the_planners_memory(record_property):
    # --quantize=int8 --activation_checkpointing --loss_chunk=256 on a Llama-3-shaped model, its layers and width cut:
    # grouped-query attention (4 query heads per kv head), Llama 3's vocabulary (the output head and the logits
    # carry most of the memory at small sizes). A step that trains, and on a GPU its peak memory reserved at most
    # 1.10x what tools/plan.py predicts, since the planner is what a user sizes a micro-batch by.
    shape = dict(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4) if ON_GPU else \
        dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=1)  # head_dim 128 and 64, as Llama 3's
    micro_batch, length = (4, 512) if ON_GPU else (1, 64)
    args = replace(plan.llama_args("Llama-3.1-8B", length), **shape, rope_theta=500000.0,
                   adapter_layer=shape["n_layers"])
    options = dict(quantize="int8", checkpointing=True, chunk=256)
    device = torch.device(DEVICE)
    dtype = cli.dtype_of("auto", device)
    trainer = bench.Trainer(args, "adapter", device, dtype, **options)
    gates = [layer.attention.gate for layer in trainer.model.layers]
    tokens, labels = bench.random_batch(micro_batch, length, args.vocab_size, device)
    if ON_GPU:  # from here: the steps alone, not the quantization that built the model
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the second with AdamW's state allocated
        trainer.step(tokens, labels)
    assert all(p.isfinite().all() for p in trainer.model.parameters() if p.requires_grad)
    assert max(g.abs().max().item() for g in gates) > 0, "the gates did not move"
    predicted = plan.plan_memory(args, "1 GPU", 1, micro_batch, length, bench.scored_per_sequence(length), dtype,
                                 **options)["total"]
    if ON_GPU:
        reserved = torch.cuda.max_memory_reserved()
        record_property("peak reserved / planner", f"{reserved / 2**30:.2f} / {predicted / 2**30:.2f} GiB: "
                        f"{reserved / predicted:.2f}x")
        assert reserved <= 1.1 * predicted


# ---- the model on the device --------------------------------------------------------------------------------

@torch.inference_mode()
def test_zero_gates_give_exactly_the_base_model_in_bf16_full_and_cached():
    # The paper's zero-init property in the base's dtype on the device's kernels: a model whose gates are all zero
    # gives exactly the logits of the same weights with adapter_layer=0, in a full forward and in cached decoding
    # (a prefill of half the tokens, then one token at a time).
    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, vocab_size=32000, max_seq_len=256, adapter_layer=3) if ON_GPU \
        else ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=2)
    device = torch.device(DEVICE)
    model = bench.random_model(args, device, DTYPE)  # gates at zero, prompts random
    base = bench.random_model(replace(args, adapter_layer=0), device, DTYPE, seed=1)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)})
    tokens = torch.randint(3, args.vocab_size, (2, args.max_seq_len // 2), device=device)
    assert torch.equal(model(tokens), base(tokens)), "full forward"
    cached = []
    for m in (model, base):
        m.setup_cache(tokens.shape[0], tokens.shape[1])
        prefill = tokens.shape[1] // 2
        out = [m(tokens[:, :prefill], 0)] + [m(tokens[:, p:p + 1], p) for p in range(prefill, tokens.shape[1])]
        m.clear_cache()
        cached.append(torch.cat(out, dim=1))
    assert torch.equal(*cached), "cached decoding"


def test_the_prompt_branch_gives_the_math_kernels_output_and_gradient_in_bf16_with_and_without_gqa(record_property):
    # The prompt branch of paper Eq. 7, tanh(gate) * softmax(q pk^T / sqrt(d)) pv, through the default kernel (a
    # fused one where the device has it) and through torch's math kernel, at head_dim 128 (LLaMA-7B's) on a GPU:
    # the output and the prompt's gradient.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = torch.device(DEVICE)
    for n_kv_heads in (None, 2):
        args = ModelArgs(dim=1024 if ON_GPU else 256, n_layers=1, n_heads=8 if ON_GPU else 2,
                         n_kv_heads=n_kv_heads and (2 if ON_GPU else 1), vocab_size=512, max_seq_len=512,
                         adapter_layer=1)
        model = bench.random_model(args, device, DTYPE)
        lladapter.mark_only_adapter_trainable(model)
        attn = model.layers[0].attention
        with torch.no_grad():
            attn.gate.uniform_(-1.5, 1.5)
        bsz, seqlen = 2, 512 if ON_GPU else 128
        x = torch.randn(bsz, seqlen, args.dim, device=device, dtype=DTYPE)
        positions = torch.arange(seqlen, device=device)
        grad_out = torch.randn(bsz, args.n_heads, seqlen, attn.head_dim, device=device)
        results = {}
        for backend in ("default", "math"):
            prompt = model.adapter_query.weight.detach().clone().requires_grad_()  # (K, dim), fp32
            with sdpa_kernel(SDPBackend.MATH) if backend == "math" else nullcontext():
                q, _, _ = attn.qkv(x, None, model.rope[positions])
                pk, pv = attn.prompt_keys_values(prompt[None], DTYPE, bsz)
                out = torch.tanh(attn.gate) * F.scaled_dot_product_attention(
                    q, pk, pv, enable_gqa=attn.n_kv_heads != attn.n_heads)  # (bsz, heads, seqlen, head_dim), fp32
                (out * grad_out).sum().backward()
            results[backend] = out.detach(), prompt.grad
        (out, grad), (out_math, grad_math) = results["default"], results["math"]
        what = "GQA" if n_kv_heads else "MHA"
        record_property(f"{what}: max abs difference", f"output {(out - out_math).abs().max().item():.3g}, prompt "
                        f"gradient {(grad - grad_math).abs().max().item():.3g} (largest {grad_math.abs().max():.3g})")
        torch.testing.assert_close(out, out_math, rtol=1.6e-2, atol=1e-2)  # bf16's rtol (torch.testing's)
        # the gradient sums many bf16 products: within 2% of its own largest entry
        assert (grad - grad_math).abs().max() <= 2e-2 * grad_math.abs().max(), what


# ---- the walkthrough ----------------------------------------------------------------------------------------

def test_the_walkthrough_as_typed_meets_its_targets(work, record_property):
    # python train.py, the built-in walkthrough, end to end on the device (data, the base pretrained on the CPU,
    # the adapter trained, the held-out evaluation); on a CPU its one-minute smoke run, whose targets are not
    # judged. Its result is the walkthrough.json and summary.json it writes.
    out = work / "walkthrough"
    result = as_typed("train.py", f"--out_dir={out}", *([] if ON_GPU else ["--smoke"]))
    assert result.returncode == 0, failed(result)
    found = json.loads((out / "walkthrough.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    record_property("held-out exact match", f"base alone {100 * found['base_exact_match']:.1f}%, base + adapter "
                    f"{100 * found['adapter_exact_match']:.1f}%; trainable {found['trainable']:,} of "
                    f"{found['parameters']:,}; on {summary['device']}")
    assert summary["device"].startswith(DEVICE), summary["device"]  # found the card (cuda:0) by itself
    if ON_GPU:
        assert all(found["targets_met"].values()), found["targets_met"]
