"""Slow tier: the lab's tools (tools/bench.py, the memory planner tools/plan.py, tools/gpu_check.py) run and measure
what they say."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lladapter
from lladapter import ModelArgs

import quantize
from tools import bench, plan
from tests.fixtures import ROOT

# ---- bench.py ---------------------------------------------------------------------------------------------

def test_bench_runs_every_section_on_tiny_shapes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", f"--json={tmp_path / 'bench.json'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["cpu_adapter"]["trainable"] == 1 * 10 * 64 + 1 * 4  # L=1, K=10, dim 64, 4 heads
    assert results["cpu_full"]["trainable"] > 100 * results["cpu_adapter"]["trainable"]
    assert all(row["cached_tokens_per_s"] > 0 and row["speedup"] > 0 for row in results["cpu_generation"])
    assert results["cpu_decoding"]["eager_ms_per_token"] > 0
    adapters = results["cpu_adapters"]  # several adapters on one base
    assert set(adapters["tokens_per_s"]) == {"4 adapters in one batch of 8", "1 adapter in one batch of 8",
                                             "4 adapters one at a time, batch 2"}
    assert all(v > 0 for v in adapters["tokens_per_s"].values())
    # K x L x 2 x n_kv_heads x head_dim bf16 values per Llama-3.1-8B adapter: 10 x 30 x 2 x 8 x 128 x 2 bytes
    assert adapters["llama3_8b_mib_per_adapter"] == 10 * 30 * 2 * 8 * 128 * 2 / 2**20
    gpu = results["gpu"]  # the GPU code path ran, on the CPU
    assert [row["micro_batch"] for row in gpu["micro_batches"]] == [1, 2]
    assert all(row["length"] == 64 and row["tokens_per_s"] > 0 for row in gpu["micro_batches"])  # full length
    assert gpu["sdpa"] == {"word attention": "flash (CPU)", "prompt branch": "flash (CPU)"}
    assert [(r["batch"], r["compiled"]) for r in gpu["decoding"]] == [(1, False), (8, False)]
    assert "cpu adapter / full step time" in result.stdout
    options = results["cpu_memory_options"]
    assert set(options["peak_above_torch_mib"]) == set(bench.OPTIONS)
    assert results["cpu_int8_decoding"]["tokens_per_s"]["int8"] > 0
    assert options["int8_over_fp32_matrix_bytes"] < 0.26  # 1 byte per weight and 4 per row, against 4 per weight


def test_bench_is_importable_without_running_anything():
    result = subprocess.run([sys.executable, "-c", "import tools.bench, tools.gpu_check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_bench_imports_where_posix_resource_does_not_exist():
    # Windows has neither the resource module nor /proc: the memory figures are NaN, the rest runs
    program = ("import sys; sys.modules['resource'] = None; import builtins; real = builtins.open\n"
               "def no_proc(path, *a, **k):\n"
               "    if str(path).startswith('/proc'): raise FileNotFoundError(path)\n"
               "    return real(path, *a, **k)\n"
               "builtins.open = no_proc\n"
               "import math, tools.bench; assert math.isnan(tools.bench.rss_mib()); print('ok')")
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stdout + result.stderr


def test_the_cards_peak_and_bandwidth_are_looked_up_by_name():
    assert bench.gpu_specs("NVIDIA H100 80GB HBM3")[:2] == (989, 3.35)
    assert bench.gpu_specs("NVIDIA H100 PCIe")[:2] == (756, 2.0)
    assert bench.gpu_specs("NVIDIA H200")[:2] == (989, 4.8)
    assert bench.gpu_specs("NVIDIA A100-SXM4-80GB")[:2] == (312, 2.0)
    assert bench.gpu_specs("NVIDIA A100-SXM4-40GB")[:2] == (312, 1.55)
    assert bench.gpu_specs("NVIDIA L40S")[:2] == (362, 0.864)
    assert bench.gpu_specs("NVIDIA L4")[:2] == (121, 0.3)  # not L40S's
    assert bench.gpu_specs("NVIDIA GeForce RTX 4090")[:2] == (165, 1.0)
    assert bench.gpu_specs("Tesla T4")[:2] == (65, 0.32)
    peak, bandwidth, note = bench.gpu_specs("NVIDIA B200")
    assert math.isnan(peak) and math.isnan(bandwidth) and "--gpu_peak_tflops" in note
    assert bench.gpu_specs("NVIDIA B200", 2250, 8.0) == (2250, 8.0, "")


def test_decode_bound_counts_the_weights_and_the_whole_cache_once_per_step():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64, adapter_layer=1, adapter_len=10)
    model = bench.random_model(args, torch.device("cpu"), torch.bfloat16)
    base = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith("tok_embeddings") and not lladapter.is_adapter_key(n))
    gates = sum(gate.numel() for gate in model.gates())  # read off the model
    # bf16 base weights, fp32 gates; K and V, batch 3, 2 layers x 40 positions + 10 prompts
    read = 2 * base + 4 * gates + 2 * 3 * 64 * 2 * (2 * 40 + 1 * 10)
    assert bench.decode_bound(model, 3, 40, 1.0) == pytest.approx(3 * 1e12 / read)


# ---- the memory planner ------------------------------------------------------------------------------------

def base_parameters(args, **kinds):
    """The frozen base's parameters of a model built on the meta device, by name (kinds: as quantize.int8_linears)."""
    with torch.device("meta"):
        model = lladapter.Transformer(args)
    if kinds.get("quantize"):
        quantize.int8_linears(model)
    return {n: p for n, p in model.named_parameters() if not lladapter.is_adapter_key(n)}


def test_planner_weights_are_the_parameters_in_bf16_on_one_gpu_and_a_shard_plus_gathered_units_under_fsdp():
    args = plan.llama_args("7B")
    with torch.device("meta"):
        model = lladapter.Transformer(args)
    n_base = sum(p.numel() for p in base_parameters(args).values())
    n_adapter = sum(p.numel() for p in lladapter.adapter_tensors(model).values())
    one = plan.plan_memory(args, "1 GPU", 1, 1, 512, 512, torch.bfloat16)
    assert one["weights"] == n_base * 2
    assert one["adapter"] == n_adapter * (4 + 4 + 8)  # fp32 prompts and gates, their gradients, AdamW's 2 moments
    assert plan.plan_memory(args, "DDP", 8, 1, 512, 512, torch.bfloat16)["adapter"] == n_adapter * 20  # + a bucket
    assert one["logits"] == 3 * 4 * 512 * args.vocab_size
    # FSDP over 8: every 7B tensor's rows divide by 8, so the shard is an eighth; the root (embeddings, output head,
    # final norm) stays gathered, and 3 blocks are gathered at once
    fsdp = plan.plan_memory(args, "FSDP", 8, 1, 512, 512, torch.bfloat16)
    root = sum(p.numel() for n, p in base_parameters(args).items() if not n.startswith("layers."))
    block = sum(p.numel() for n, p in base_parameters(args).items() if n.startswith("layers.0."))
    assert fsdp["weights"] == 2 * (n_base // 8 + root + 3 * block)
    assert fsdp["activations"] == one["activations"]  # each process runs its own micro-batch


def test_planner_counts_an_int8_base_by_dtype_and_a_tied_head_once():
    args = plan.llama_args("Llama-3.2-1B")
    int8 = base_parameters(args, quantize="int8")
    bf16 = base_parameters(args)
    matrices = [n for n, p in int8.items() if p.dtype == torch.int8]
    assert "output.weight" in matrices and len(matrices) == 7 * args.n_layers + 1
    expected = sum(int8[n].numel() + 4 * int8[n].shape[0] for n in matrices) + 2 * sum(
        p.numel() for n, p in bf16.items() if n not in matrices)  # int8 + fp32 scale per row; the rest bf16
    terms = plan.plan_memory(args, "1 GPU", 1, 1, 512, 512, torch.bfloat16, quantize="int8", tied=True)
    assert terms["weights"] == expected  # an int8 head is a copy of the tied embeddings, which stay bf16
    largest = 2 * max(int8[n].numel() for n in matrices)  # one matrix cast to bf16 at a time
    assert terms["largest_dequantized"] == largest
    # the head's copy lives beside one fp32 logits tensor, in place of the other two of the logits' peak
    assert terms["dequantized"] == max(0, largest - 2 * 4 * 512 * args.vocab_size)
    tied = plan.plan_memory(args, "1 GPU", 1, 1, 512, 512, torch.bfloat16, tied=True)
    assert tied["weights"] == 2 * sum(p.numel() for n, p in bf16.items() if n != "output.weight")
    chunked = plan.plan_memory(args, "1 GPU", 1, 2, 512, 512, torch.bfloat16, chunk=256)
    assert chunked["logits"] == 3 * 4 * 256 * args.vocab_size + 2 * 512 * args.dim * 2


def real_saved_bytes(args, dtype, micro_batch, length, scored, quantized=False):
    """What autograd keeps in a real adapter training forward on this CPU (the kernels train.py runs here)."""
    model = bench.random_model(args, torch.device("cpu"), dtype)
    if quantized:
        quantize.int8_linears(model, quantize_from_weights=True)
    lladapter.mark_only_adapter_trainable(model)
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights and not (t.dim() and t.shape[-1] == args.vocab_size):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(3, args.vocab_size, (micro_batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, logits_at=slice(length - scored, None))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, -scored:].flatten(), reduction="sum")
    return sum(saved.values()), loss


@pytest.mark.parametrize("dtype, quantized", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_activations_counted_on_the_meta_device_are_what_a_real_cpu_forward_keeps(dtype, quantized, n_kv_heads):
    # 6 layers, the top 5 adapted: the planner measures 2 and 3 adapted layers and extrapolates to 5
    args = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=512, max_seq_len=64,
                     adapter_layer=5, adapter_len=10)
    predicted, n_logits = plan.saved_for_backward(args, 3, 48, 30, dtype, "int8" if quantized else "")
    real, loss = real_saved_bytes(args, dtype, 3, 48, 30, quantized)
    assert predicted == real and n_logits == 3 * 30 * 512
    assert loss.requires_grad


def test_planner_check_at_tiny_shapes_agrees_with_train_py_within_10_percent(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.plan", "--quick", f"--json={tmp_path / 'plan.json'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    found = json.loads((tmp_path / "plan.json").read_text())
    rows = {(r["model"], r["setup"], r["micro_batch"]): r for r in found["plan"]}
    assert len(rows) == len(plan.LLAMA) * 3 * 2  # every size; 1 GPU, DDP, FSDP; micro-batch 1 and 4
    assert rows[("65B", "FSDP 8", 1)]["total"] < rows[("65B", "1 GPU", 1)]["total"] / 3
    assert rows[("Llama-3.1-405B", "FSDP 16", 1)]["total"] < rows[("Llama-3.1-405B", "1 GPU", 1)]["total"] / 7
    assert rows[("7B", "1 GPU", 1)]["fits_gb"] == [24, 40, 48, 80] and rows[("65B", "1 GPU", 1)]["fits_gb"] == []
    cards = {(r["model"], r["mode"]): r["largest_micro_batch"] for r in found["cards"]}
    for model in plan.CARD_TABLE:  # each option lets at least as many sequences train on every card
        for gb in map(str, plan.CARD_TABLE_GB):
            assert cards[(model, "bf16")][gb] <= cards[(model, "int8")][gb] <= cards[(model, "int8+ckpt+chunk")][gb]
    assert cards[("Llama-3.1-8B", "int8+ckpt+chunk")]["12"] >= 4, "the target: Llama-3.1-8B at micro-batch 4 on a 12 GB card"
    generation = {(r["model"], r["base"]): r for r in found["generation"]}
    assert generation[("LLaMA-7B", "int8")]["gib"]["32"] < generation[("LLaMA-7B", "bf16")]["gib"]["32"]
    check = found["plan_check"]
    assert [r["run"] for r in check["rows"]] == ["1 process", "DDP 2", "FSDP 2", "int8", "int8 + ckpt + chunk"]
    assert check["within_10_percent"], check["rows"]
    assert "prediction within 10% of the measurement in every run: yes" in result.stdout
