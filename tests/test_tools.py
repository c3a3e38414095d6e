"""Slow tier: the lab's tools (tools/bench.py, its memory planner, tools/gpu_check.py) run and measure what they say."""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import lladapter
from lladapter import ModelArgs

from tools import bench
from test_lladapter import ROOT

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
    gpu = results["gpu"]  # the GPU code path ran, on the CPU
    assert [row["micro_batch"] for row in gpu["micro_batches"]] == [1, 2]
    assert all(row["length"] == 64 and row["tokens_per_s"] > 0 for row in gpu["micro_batches"])  # full length
    assert gpu["sdpa"] == {"word attention": "flash (CPU)", "prompt branch": "flash (CPU)"}
    assert [(r["batch"], r["compiled"]) for r in gpu["decoding"]] == [(1, False), (8, False)]
    assert "cpu adapter / full step time" in result.stdout


def test_bench_is_importable_without_running_anything():
    result = subprocess.run([sys.executable, "-c", "import tools.bench, tools.gpu_check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


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
    # bf16 base weights, fp32 gates (1 adapted layer, 4 heads); K and V, batch 3, 2 layers x 40 positions + 10 prompts
    read = 2 * base + 4 * 4 + 2 * 3 * 64 * 2 * (2 * 40 + 1 * 10)
    assert bench.decode_bound(model, 3, 40, 1.0) == pytest.approx(3 * 1e12 / read)


# ---- the memory planner ------------------------------------------------------------------------------------

def test_planner_weights_are_the_parameters_in_bf16_on_one_gpu_and_a_shard_plus_gathered_units_under_fsdp():
    args = bench.llama_args("7B")
    one = bench.plan_memory(args, "1 GPU", 1, 1, 512, 512, torch.bfloat16)
    assert one["weights"] == 6_738_415_616 * 2
    assert one["adapter"] == 1_229_760 * (4 + 4 + 8)  # fp32 prompts and gates, their gradients, AdamW's 2 moments
    assert bench.plan_memory(args, "DDP", 8, 1, 512, 512, torch.bfloat16)["adapter"] == 1_229_760 * 20  # + a bucket
    assert one["logits"] == 3 * 4 * 512 * 32000
    # FSDP over 8: every 7B tensor's rows divide by 8, so the shard is an eighth; the root (embeddings, output head,
    # final norm) stays gathered, and 3 blocks of 4 * 4096^2 + 3 * 4096 * 11008 + 2 * 4096 are gathered at once
    fsdp = bench.plan_memory(args, "FSDP", 8, 1, 512, 512, torch.bfloat16)
    root, block = 2 * 32000 * 4096 + 4096, 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    assert fsdp["weights"] == 2 * (6_738_415_616 // 8 + root + 3 * block) == 3_423_200_256
    assert fsdp["activations"] == one["activations"]  # each process runs its own micro-batch


def real_saved_bytes(args, dtype, micro_batch, length, scored):
    """What autograd keeps in a real adapter training forward on this CPU (the kernels train.py runs here)."""
    model = bench.random_model(args, torch.device("cpu"), dtype)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_activations_counted_on_the_meta_device_are_what_a_real_cpu_forward_keeps(dtype, n_kv_heads):
    # 6 layers, the top 5 adapted: the planner measures 2 and 3 adapted layers and extrapolates to 5
    args = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=512, max_seq_len=64,
                     adapter_layer=5, adapter_len=10)
    predicted, n_logits = bench.saved_for_backward(args, 3, 48, 30, dtype)
    real, loss = real_saved_bytes(args, dtype, 3, 48, 30)
    assert predicted == real and n_logits == 3 * 30 * 512
    assert loss.requires_grad


def test_planner_check_at_tiny_shapes_agrees_with_train_py_within_15_percent(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.bench", "--plan", "--quick", f"--json={tmp_path / 'plan.json'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    rows = {(r["model"], r["setup"], r["micro_batch"]): r for r in plan["plan"]}
    assert len(rows) == 5 * 3 * 2  # LLaMA 7B, 13B, 33B, 65B, 70B; 1 GPU, DDP 8, FSDP 8; micro-batch 1 and 4
    assert rows[("65B", "FSDP 8", 1)]["total"] < rows[("65B", "1 GPU", 1)]["total"] / 3
    assert rows[("7B", "1 GPU", 1)]["fits_gb"] == [24, 40, 48, 80] and rows[("65B", "1 GPU", 1)]["fits_gb"] == []
    check = plan["plan_check"]
    assert [r["run"] for r in check["rows"]] == ["1 process", "DDP 2", "FSDP 2"]
    assert check["within_15_percent"], check["rows"]
    assert "prediction within 15% of the measurement in every run: yes" in result.stdout


# ---- gpu_check.py ------------------------------------------------------------------------------------------

GPU_CHECK_ROWS = [
    "zero gates = base model, full forward", "zero gates = base model, cached decoding",
    "prompt branch vs math SDPA, forward", "prompt branch vs math SDPA, prompt gradient",
    "7B-shaped adapter step, micro-batch 1", "7B-shaped adapter step, micro-batch 2",
    "7B-shaped adapter step fits a 24 GB card (micro-batch 1)", "7B-shaped adapter step MFU >= 45% (best micro-batch)",
    "attention kernels in the adapter step", "decoding, batch 1, eager", "decoding, batch 8, eager",
    "decoding, batch 1, compiled", "decoding, batch 8, compiled",
]  # and, on a GPU only, "walkthrough in bf16: its targets" and the fast tier on the GPU


def test_gpu_check_quick_runs_every_check_on_the_cpu_and_prints_every_row(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--quick", f"--json={tmp_path / 'check.json'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("\ncheck "):]
    for label in GPU_CHECK_ROWS:
        assert label in table, label
    assert "torch " + torch.__version__ in result.stdout.splitlines()[0]
    checks = json.loads((tmp_path / "check.json").read_text())["checks"]
    rows = [r for c in checks.values() for r in c["rows"]]
    assert [r["check"] for r in rows] == GPU_CHECK_ROWS
    assert all(r["ok"] is not False for r in rows)


def test_gpu_check_runs_one_check_in_its_own_process_and_hands_back_its_rows(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--quick", "--step=zero_gates",
                             f"--deadline={time.time() + 120}", f"--work={tmp_path}", f"--rows_file={tmp_path / 'rows.json'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["check"] for r in rows] == GPU_CHECK_ROWS[:2] and all(r["ok"] for r in rows)


def test_gpu_check_refuses_to_run_without_a_gpu_unless_quick():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no CUDA device here" in result.stderr and "Traceback" not in result.stderr
