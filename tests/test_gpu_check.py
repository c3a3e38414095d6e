"""Slow tier: tools/gpu_check.py, the one command a user runs on a GPU machine, runs every check's code on this CPU
(--quick), hands rows back from a check's own process, refuses a machine without a GPU in one line, and fits its
checks into its budget."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures import ROOT
from tools import gpu_check

# What --quick prints, in order: every row of every check ("ok" or a figure; none FAILED)
QUICK_ROWS = [
    "zero gates = base model, full forward", "zero gates = base model, cached decoding",
    "prompt branch vs math SDPA, forward", "prompt branch vs math SDPA, prompt gradient",
    "decoding, batch 1, compiled", "decoding, batch 8, compiled",
    "generate.py --compile, 9 prompts in batches of 4: one compilation",
    "generate.py --compile, 9 prompts in batches of 4: one CUDA graph",
    "generate.py --max_batch_size=0, long --max_seq_len, GQA: no out of memory",
    "train.py, torchrun 1 process, DDP = one process", "train.py, torchrun 1 process, FSDP = one process",
    "train.py, torchrun 2 processes, DDP = one process", "train.py, torchrun 2 processes, FSDP = one process",
    "train.py --dtype=fp16 (loss scaling): finite losses", "--dtype=auto on this device",
    "small-card recipe, Llama-3-shaped: int8 + checkpointing + chunked loss, 2 steps",
    "small-card recipe: peak memory vs the planner",
    "7B-shaped adapter step, micro-batch 1", "7B-shaped adapter step, micro-batch 2",
    "7B-shaped adapter step fits a 24 GB card (micro-batch 1)", "7B-shaped adapter step MFU >= 45% (best micro-batch)",
    "attention kernels in the adapter step", "decoding, batch 1, eager", "decoding, batch 8, eager",
    "walkthrough in bf16: its targets", "fast tier, test_lladapter.py, on the check's device",
]
# Rows that must pass (not only be reported) on a CPU too
QUICK_JUDGED = [
    "zero gates = base model, full forward", "zero gates = base model, cached decoding",
    "decoding, batch 1, compiled", "decoding, batch 8, compiled",
    "generate.py --compile, 9 prompts in batches of 4: one compilation",
    "generate.py --max_batch_size=0, long --max_seq_len, GQA: no out of memory",
    "train.py, torchrun 1 process, DDP = one process", "train.py, torchrun 1 process, FSDP = one process",
    "train.py --dtype=fp16 (loss scaling): finite losses",
    "small-card recipe, Llama-3-shaped: int8 + checkpointing + chunked loss, 2 steps",
    "fast tier, test_lladapter.py, on the check's device",
]
ORDER = ["zero_gates", "sdpa_math", "compiled_decoding", "generate_cli", "nccl", "fp16", "small_card", "adapter_step",
         "decoding", "walkthrough", "tests"]


def run_tool(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quick_runs_every_check_on_the_cpu_prints_every_row_and_fails_none(tmp_path):
    result = run_tool("--quick", f"--json={tmp_path / 'check.json'}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "torch " + torch.__version__ in result.stdout.splitlines()[0]
    table = result.stdout[result.stdout.index("\ncheck "):]
    for label in QUICK_ROWS:
        assert label in table, label
    assert "FAILED" not in table and "not run" not in table
    found = json.loads((tmp_path / "check.json").read_text())
    assert list(found["checks"]) == ORDER
    assert all(c["status"] == "ran" for c in found["checks"].values())
    rows = [r for c in found["checks"].values() for r in c["rows"]]
    assert [r["check"] for r in rows] == QUICK_ROWS
    assert all(r["ok"] is not False for r in rows) and found["failed"] == 0
    judged = {r["check"]: r["ok"] for r in rows if r["check"] in QUICK_JUDGED}
    assert judged == {label: True for label in QUICK_JUDGED}
    assert found["torch"] == torch.__version__ and "--quick" in found["device"]


def test_one_check_runs_in_its_own_process_and_hands_back_its_rows(tmp_path):
    result = run_tool("--quick", "--step=zero_gates", f"--deadline={time.time() + 120}", f"--work={tmp_path}",
                      f"--rows_file={tmp_path / 'rows.json'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((tmp_path / "rows.json").read_text())
    assert [r["check"] for r in found["rows"]] == QUICK_ROWS[:2] and all(r["ok"] for r in found["rows"])


def test_without_a_gpu_it_refuses_in_one_line_unless_quick():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_tool(timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device here"), result.stderr


def test_the_checks_budgets_add_up_to_no_more_than_the_whole_budget_and_the_slowest_come_last():
    assert [c.name for c in gpu_check.CHECKS] == ORDER  # compiled decoding right after the correctness checks
    assert all(c.budget_s >= gpu_check.SHORTEST_CHECK_S for c in gpu_check.CHECKS)
    assert sum(c.budget_s for c in gpu_check.CHECKS) <= gpu_check.Settings.budget_s


def test_a_check_that_would_start_after_the_budget_is_spent_is_reported_as_not_run(tmp_path):
    # Both checks' shares of a 3 s budget are under the shortest a check may get: neither starts, both are
    # reported, and the run fails
    result = run_tool("--quick", "--only=zero_gates,sdpa_math", "--budget_s=3", f"--json={tmp_path / 'check.json'}",
                      timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    found = json.loads((tmp_path / "check.json").read_text())
    assert list(found["checks"]) == ["zero_gates", "sdpa_math"] and found["failed"] == 2
    for check in found["checks"].values():
        assert check["status"] == "not run" and check["rows"][0]["ok"] is False
        assert "not run: the 3 s budget is spent" in check["rows"][0]["result"]
