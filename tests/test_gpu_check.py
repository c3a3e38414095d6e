"""Slow tier: tools/gpu_check.py, the one command a user runs on a GPU machine, runs its steps on this CPU (--quick),
writes every result into its folder, skips what finished when it runs again after a cut, and refuses a machine
without a GPU in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cli
from tests.fixtures import ROOT
from tools import gpu_check

STEPS = ["walkthrough", "on_device", "fast_tier", "bench"]


def run_tool(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **gpu_check.QUIET})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check"
    return out, run_tool("--quick", f"--out_dir={out}")


def test_quick_runs_every_step_on_the_cpu_and_writes_each_result_into_its_folder(quick_run):
    out, result = quick_run
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["quick"] and run["torch"] == torch.__version__
    for step in STEPS:
        found = json.loads((out / f"{step}.json").read_text())
        assert found["ok"] and found["exit_status"] == 0, found
        assert (out / f"{step}.log").stat().st_size > 0
    tests = {name: [t["test"].split("::")[-1] for t in json.loads((out / f"{name}.json").read_text())["tests"]]
             for name in ("walkthrough", "on_device", "fast_tier")}
    source = (ROOT / "tests" / "test_on_device.py").read_text()
    every = {line[4:line.index("(")] for line in source.splitlines() if line.startswith("def test_")}
    assert tests["walkthrough"] == ["test_the_walkthrough_as_typed_meets_its_targets"]
    assert set(tests["on_device"]) | set(tests["walkthrough"]) == every  # each test of the file, once
    assert {name.split("[")[0] for name in tests["fast_tier"]} == {  # --quick: two of its tests
        "test_zero_gates_give_exactly_the_base_model", "test_cached_decoding_matches_full_forward"}
    for step in ("walkthrough", "on_device", "fast_tier"):  # a file per test, in the step's folder
        assert len(list((out / step).glob("*.json"))) == len(tests[step])
        assert all(t["outcome"] == "passed" for t in json.loads((out / f"{step}.json").read_text())["tests"])
    bench = json.loads((out / "bench_figures.json").read_text())
    assert bench["quick"] and [r["micro_batch"] for r in bench["gpu"]["micro_batches"]] == [1, 2]
    walkthrough = next((out / "work").rglob("walkthrough.json"))  # the files the tests' commands wrote, kept
    assert json.loads(walkthrough.read_text())["heldout"] > 0


def test_a_rerun_after_a_cut_runs_only_what_had_not_finished(quick_run):
    # As if the machine went away while on_device ran its last test: no on_device.json, and that test's file gone
    out, first = quick_run
    assert first.returncode == 0, first.stdout[-4000:]
    (out / "on_device.json").unlink()
    cut = next((out / "on_device").glob("test_zero_gates*.json"))
    cut.unlink()
    kept = {p: p.read_bytes() for p in out.rglob("*.json") if p.name != "run.json"}
    result = run_tool("--quick", f"--out_dir={out}", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for step in ("walkthrough", "fast_tier", "bench"):
        assert f"{step}: finished in an earlier run" in result.stdout
    assert {p: p.read_bytes() for p in kept} == kept, "a finished test or step ran again"
    assert json.loads(cut.read_text())["outcome"] == "passed"  # the one test cut short, run now
    found = json.loads((out / "on_device.json").read_text())
    assert found["ok"] and len(found["tests"]) == len(list((out / "on_device").glob("*.json")))


def test_a_folder_that_holds_another_machines_run_is_refused(quick_run, tmp_path, monkeypatch):
    # In this process (the refusal is an InputError, which the command prints as one line: the test below)
    out, _ = quick_run
    run = json.loads((out / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**run, "device": "NVIDIA H100 80GB HBM3", "quick": False}))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main() installs its own
    with pytest.raises(cli.InputError, match="holds a run on NVIDIA H100 80GB HBM3: give another --out_dir"):
        gpu_check.main(["--quick", f"--out_dir={tmp_path}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_without_a_gpu_it_refuses_in_one_line_unless_quick(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run_tool(f"--out_dir={tmp_path / 'check'}", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: no CUDA device here"), \
        result.stderr
    assert not (tmp_path / "check").exists()
