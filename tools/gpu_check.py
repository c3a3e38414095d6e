"""
Check a CUDA machine with one command: the GPU paths as tests on the card, then the timings, each result written
into a folder as soon as it is known. The same command run again (after a cut, say) skips what finished.

    python -m tools.gpu_check --out_dir=out/gpu-check                # on a CUDA machine
    python -m tools.gpu_check --quick --out_dir=out/gpu-check-quick  # the same steps on this CPU at tiny shapes (CI)

The steps, in order (docs/gpu-check.md maps every property checked to the test that holds it):
  walkthrough  tests/test_on_device.py's walkthrough test: python train.py as a user types it, its targets. Started
               first and run beside the next two: it pretrains its base on the CPU for about a minute
  on_device    the rest of tests/test_on_device.py: the GPU paths at real shapes; train.py and generate.py as typed
  fast_tier    test_lladapter.py on the card (LLADAPTER_TEST_DEVICE=cuda; --quick: two of its tests)
  bench        python -m tools.bench --only=gpu: the 7B-shaped adapter step and eager decoding, with the card to
               itself (the walkthrough waited for); compiled decoding's figures come from on_device's test
The folder: run.json (the machine); STEP.log (a step's output, written as it runs); STEP/*.json (one per test,
written as the test ends: its outcome, seconds and the figures it recorded); STEP.json (when the step ends: its exit
status, seconds and tests); work/ (the files the tests' commands wrote); bench_figures.json (all of bench's figures).
A rerun skips every step that has a STEP.json and, in a step cut short, every test that has its file: delete a file
to run that again. pytest writes and reads the per-test files through this module (-p tools.gpu_check: the hooks at
the end).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
from checkpoint import atomic_save
from tools.plan import ROOT, cpu_name

RESULTS_ENV = "LLADAPTER_CHECK_RESULTS"  # the folder a test's outcome goes to (the plugin's hooks below)
WORK_ENV = "LLADAPTER_CHECK_WORK"  # the folder the tests' commands write into (tests/test_on_device.py's work)
QUICK_FAST_TIER = "zero_gates_give_exactly or cached_decoding_matches"  # the fast-tier tests --quick runs
# --quick: one OpenMP thread per process, and no spinning: a waiting OpenMP thread spins for a core that two busy
# cores don't have (the walkthrough's smoke run took 44 s with spinning threads, 7 s without, the same losses)
QUIET = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@dataclass
class Settings:
    out_dir: str = "out/gpu-check"  # every result, a file per test and per step; a rerun skips what is there
    quick: bool = False  # the same steps on this CPU at tiny shapes (CI): checks that they run, measures nothing
    step_limit_s: int = 420  # a step still running after this long is stopped, so that a hang cannot take the window


@dataclass
class Step:
    name: str
    command: list
    beside: bool = False  # runs beside the steps after it, until a step that measures
    measures: bool = False  # waits for the steps running beside first: its timings want the card to itself


def steps(out, quick):
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "tools.gpu_check", "-p", "no:cacheprovider"]
    bench = [sys.executable, "-m", "tools.bench", "--only=gpu", f"--json={out / 'bench_figures.json'}"]
    # bench compiles no decoding step: LLaMA-7B's 32 layers, compiled for batch 1 and 8, take 90-105 s from cold;
    # on_device's compiled-decoding test times its own (a grouped-query model of 2 layers)
    return [Step("walkthrough", [*pytest, "tests/test_on_device.py", "-k", "walkthrough"], beside=True),
            Step("on_device", [*pytest, "tests/test_on_device.py", "-k", "not walkthrough"]),
            Step("fast_tier", [*pytest, "test_lladapter.py", *(["-k", QUICK_FAST_TIER] if quick else [])]),
            Step("bench", [*bench, "--no-compile_decode", *(["--quick"] if quick else [])], measures=True)]


def machine(quick):
    """What run.json says of the machine; no CUDA context is made here (the tests count the card's free memory)."""
    found = {"quick": quick, "torch": torch.__version__, "python": sys.version.split()[0],
             "cpu": f"{cpu_name()}, {os.cpu_count()} cores"}
    if quick:
        return {**found, "device": "cpu (--quick: tiny shapes, nothing measured)"}
    props = torch.cuda.get_device_properties(0)
    return {**found, "device": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def write_json(path, data):
    # whole or not at all: a run cut while it writes leaves the file as it was, or no file
    atomic_save(json.dumps(data, indent=1, default=str).encode(), path)


def results_in(folder):
    # in the order the tests ended, which wrote them
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"), key=lambda p: p.stat().st_mtime)]


def start(step, out, quick):
    env = {**os.environ, **(QUIET if quick else {}), "LLADAPTER_TEST_DEVICE": "cpu" if quick else "cuda",
           RESULTS_ENV: str(out / step.name), WORK_ENV: str(out / "work")}
    (out / step.name).mkdir(exist_ok=True)
    print(f"{step.name}: started{' (beside the next steps)' if step.beside else ''}; its output in "
          f"{out / step.name}.log", flush=True)
    with open(out / f"{step.name}.log", "a") as log:
        # a process group of its own: stopped, it stops with every command its tests started
        process = subprocess.Popen(step.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return step, process, time.time()


def finish(running, out, quick, limit_s):
    """Wait for a step, then write STEP.json: its exit status, seconds and tests (bench: the targets it judged)."""
    step, process, t0 = running
    try:
        code = process.wait(timeout=max(1.0, t0 + limit_s - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    tests = results_in(out / step.name)
    # pytest's exit status 5: no test left to run (all finished in an earlier run)
    ok = code in (0, 5) and not [t for t in tests if t["outcome"] in ("failed", "error")]
    result = {"step": step.name, "command": step.command, "exit_status": code, "stopped_after_s": None if code is not
              None else limit_s, "seconds": round(time.time() - t0, 1), "tests": tests}
    if step.name == "bench" and (out / "bench_figures.json").is_file():
        result["targets"] = json.loads((out / "bench_figures.json").read_text())["targets"]
        ok = ok and (quick or all(t["met"] for t in result["targets"]))  # --quick's CPU figures are not judged
    result["ok"] = ok
    write_json(out / f"{step.name}.json", result)
    report(result, quick)
    return ok


def report(result, quick):
    why = "stopped: it ran past --step_limit_s" if result["exit_status"] is None else \
        f"exit status {result['exit_status']}"
    print(f"{result['step']}: {'ok' if result['ok'] else 'FAILED'} ({why}, {result['seconds']:.0f} s)", flush=True)
    for test in result["tests"]:
        name = test["test"].split("::")[-1]
        print(f"  {test['outcome']:7} {test['seconds']:5.1f} s  {name}", flush=True)
        for key, value in test["figures"].items():
            print(f"  {'':15} {key}: {value}", flush=True)
        if "error" in test:
            print(f"  {'':15} {test['error'].strip().splitlines()[-1][:200]}", flush=True)
    for target in result.get("targets", []):
        verdict = "(CPU)" if quick else "met" if target["met"] else "MISSED"
        print(f"  {verdict:7} {target['measure']}: {target['value']} (target "
              f"{target['target']})", flush=True)


def main(argv):
    cli.exit_on_input_error()
    settings = cli.parse(Settings, __doc__, argv)
    quick, out = settings.quick, Path(settings.out_dir)
    cli.require(quick or torch.cuda.is_available(), "no CUDA device here: tools/gpu_check.py checks a GPU machine "
                                                    "(--quick runs its steps on this CPU at tiny shapes)")
    found = machine(quick)
    if (out / "run.json").is_file():  # a rerun: the same machine and mode, or another folder
        earlier = json.loads((out / "run.json").read_text())
        cli.require((earlier["quick"], earlier["device"]) == (quick, found["device"]),
                    f"--out_dir={out} holds a run on {earlier['device']}: give another --out_dir")
    (out / "work").mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", found)
    print(f"gpu_check: {found['device']} | torch {found['torch']} | results in {out}", flush=True)
    t0, beside, ok = time.time(), [], True
    for step in steps(out, quick):
        if (out / f"{step.name}.json").is_file():
            print(f"{step.name}: finished in an earlier run ({out / step.name}.json)", flush=True)
            ok = ok and json.loads((out / f"{step.name}.json").read_text())["ok"]
            continue
        if step.measures:
            ok = all([finish(running, out, quick, settings.step_limit_s) for running in beside]) and ok
            beside = []
        running = start(step, out, quick)
        if step.beside:
            beside.append(running)
        else:
            ok = finish(running, out, quick, settings.step_limit_s) and ok
    ok = all([finish(running, out, quick, settings.step_limit_s) for running in beside]) and ok
    print(f"gpu_check: {'every step ok' if ok else 'FAILED'} in {time.time() - t0:.0f} s; results in {out}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
# pytest's side (-p tools.gpu_check): each test's outcome into the step's folder as it ends; a test that has one
# there already is not run again

def result_path(folder, nodeid):
    return Path(folder) / (re.sub(r"[^\w.-]+", "_", nodeid.split("::", 1)[-1]) + ".json")


def pytest_collection_modifyitems(config, items):
    folder = os.environ.get(RESULTS_ENV)
    finished = [item for item in items if folder and result_path(folder, item.nodeid).is_file()]
    if finished:
        config.hook.pytest_deselected(items=finished)
        items[:] = [item for item in items if item not in finished]


def pytest_runtest_logreport(report):
    # Each test reports its setup, call and teardown: its outcome is the call's, or a setup's skip or error, or a
    # teardown's error
    folder = os.environ.get(RESULTS_ENV)
    if not folder or report.when != "call" and report.passed:
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    result = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 1),
              "figures": dict(report.user_properties)}
    if report.failed or report.skipped:
        result["error" if report.failed else "reason"] = report.longreprtext[-3000:]
    write_json(result_path(folder, report.nodeid), result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
