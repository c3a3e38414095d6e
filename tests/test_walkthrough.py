"""Slow tier: the walkthrough as a class uses it (walkthrough/world.py, walkthrough/exercise.py). One base for every run
of one world and pretraining, made once even when two runs start together; the settings that base can't take refused
before any work; a variant's result beside the default run's, and a next: line that names what it made; the exercise
loop, with an unedited, an edited and a broken lladapter.py. On the smoke walkthrough (a barely pretrained base), run
as a user runs it: from a folder of one's own, its out/ beside nothing of the checkout's."""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli import InputError
from lladapter import encode_prompt
from tests.fixtures import ROOT
from tokenizer import read_tokenizer
from walkthrough import world


# OpenMP threads that sleep while they wait: a spinning one takes a core that two busy cores don't have (as
# tests/test_on_device.py found; the numbers are the same)
QUIET = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def run(cwd, *command, root=ROOT):
    """A script of the checkout at `root` (train.py, generate.py, or -m walkthrough.exercise), run in `cwd` as a user
    would run it: its out/ is cwd's."""
    script = [str(root / command[0])] if command[0].endswith(".py") else list(command[:2])
    rest = command[1:] if command[0].endswith(".py") else command[2:]
    return subprocess.run([sys.executable, *script, *rest], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root), **QUIET}, timeout=600)


def digest(folder):
    """{file: sha256} of every file under folder."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    """A folder where `python train.py --smoke` has run: out/walkthrough-smoke, and the base it built beside it."""
    cwd = tmp_path_factory.mktemp("classroom")
    result = run(cwd, "train.py", "--smoke")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pretraining step 20/20" in result.stdout and "saved the base model" in result.stdout
    return cwd


def bases(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("walkthrough-base-"))


def test_a_variant_reuses_the_base_and_reports_beside_the_default_run(classroom):
    out = classroom / "out"
    base = out / bases(out)[0]
    before = digest(base)
    result = run(classroom, "train.py", "--smoke", "--adapter_layer=2")  # no --out_dir: a folder of its own
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "pretraining step" not in result.stdout  # nothing built again: the same base, its very bytes
    assert len(bases(out)) == 1 and digest(base) == before
    assert sum(line.startswith(f"walkthrough: reusing the base model and its data in {Path('out') / base.name}")
               for line in lines) == 1
    # beside the default run's figures, not judged against the default recipe's targets
    default = json.loads((out / "walkthrough-smoke" / "walkthrough.json").read_text())
    assert "target <" not in result.stdout and "target >" not in result.stdout and "MISSED" not in result.stdout
    assert any(line.startswith("  a variant (--adapter_layer=2): beside the default run's result") for line in lines)
    assert f"the default run: {100 * default['adapter_exact_match']:.1f}%" in result.stdout
    assert f"the default run: {default['trainable']:,}" in result.stdout
    variant = json.loads((out / "walkthrough-smoke-L2" / "walkthrough.json").read_text())
    assert variant["changes"] == {"adapter_layer": 2} and variant["trainable"] * 2 == default["trainable"]
    assert variant["base"] == default["base"] == base.name
    # next: names the adapter just made, and the side-by-side with the default run's; generate.py answers the
    # held-out sample with both on the base they were trained on (the smoke run's, which its walkthrough.json names)
    adapter, default_adapter = Path("out/walkthrough-smoke-L2/adapter.pth"), Path("out/walkthrough-smoke/adapter.pth")
    nexts = lines[lines.index(next(line for line in lines if line.startswith("next:"))):]
    assert nexts[0].startswith(f"next: python generate.py --adapter={adapter}  (")
    assert nexts[1].strip().startswith(f"python generate.py --adapter={default_adapter} --adapter={adapter} --compare")
    command = shlex.split(nexts[1].split("(")[0])
    result = run(classroom, *command[1:], "--max_gen_len=4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact match on these 8 instructions: base " in result.stdout
    assert "walkthrough-smoke-L2" in result.stdout.splitlines()[-1] and "walkthrough-smoke " in result.stdout
    assert result.stdout.count("    expected: ") == 8
    # --show_gates draws each adapter's gates, and keeps the comparison under them: one character per head
    result = run(classroom, *command[1:], "--max_gen_len=4", "--show_gates")
    rows = [line.split("│")[1] for line in result.stdout.splitlines() if line.startswith("layer ")]
    assert result.returncode == 0 and len(rows) == 4 + 2 and all(len(row) == 4 for row in rows), result.stdout
    assert result.stdout.count("    expected: ") == 8


def test_settings_the_base_cannot_take_are_refused_before_any_work(classroom, tmp_path):
    start = time.time()
    result = run(tmp_path, "train.py", "--smoke", "--adapter_layer=5")
    assert result.returncode == 1 and time.time() - start < 60
    assert result.stderr.splitlines() == ["error: --adapter_layer=5: the walkthrough's base has 4 layers: adapt 1 to 4 "
                                          "of them, or -1 for all but two"]
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing written
    # a variant may not take the default run's folder, which the variants are compared with
    result = run(classroom, "train.py", "--smoke", "--adapter_len=5", "--out_dir=out/walkthrough-smoke")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "leave --out_dir out (this variant then writes to out/walkthrough-smoke-K5)" in result.stderr
    # the rest, checked in this process: what would only fail after pretraining
    settings = dict(smoke=True, adapter_layer=4, image_dim=0, template="alpaca", max_seq_len=128, val_fraction=0.05,
                    batch_size=32)
    world.check(SimpleNamespace(**settings))
    for change, message in [(dict(image_dim=8), "--image_dim=8: the walkthrough's instructions have no images"),
                            (dict(template="llama3"), "--template=llama3 needs a Llama 3 tokenizer"),
                            (dict(max_seq_len=40), "--max_seq_len=40: the walkthrough's prompts take up to "),
                            (dict(batch_size=400), "--batch_size=400: the walkthrough has 171 training instructions")]:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            world.check(SimpleNamespace(**{**settings, **change}))


def test_the_prompt_lengths_checked_before_any_work_are_the_bases_tokenizer_s(classroom):
    base = classroom / "out" / bases(classroom / "out")[0]
    tokenizer = read_tokenizer(base / "base" / "tokenizer.model")  # as train.py reads it
    records = json.loads((base / "alpaca_train.json").read_text()) + json.loads((base / "heldout.json").read_text())
    longest = max(len(encode_prompt(tokenizer, r["instruction"], r["input"])) for r in records)
    settings = dict(smoke=True, adapter_layer=4, image_dim=0, template="alpaca", val_fraction=0.05, batch_size=32)
    world.check(SimpleNamespace(**settings, max_seq_len=longest + 1))
    with pytest.raises(InputError, match=f"prompts take up to {longest} tokens"):
        world.check(SimpleNamespace(**settings, max_seq_len=longest))
    # and the tokenizer's bytes hold no path: the same file in whichever folder it is made
    assert b"walkthrough-base" not in (base / "base" / "tokenizer.model").read_bytes()


BUILD = """import sys, time
from pathlib import Path
from walkthrough import world
world.SMOKE_PRETRAIN["steps"] = 2  # the race, not the pretraining, is under test
Path(sys.argv[2]).touch()  # ready
while not Path(sys.argv[3]).exists():  # go
    time.sleep(0.01)
world.build(sys.argv[1], True)
"""


def test_two_runs_started_together_build_one_base(tmp_path):
    go, ready = tmp_path / "go", [tmp_path / "ready0", tmp_path / "ready1"]
    runs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path / name), str(flag), str(go)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **QUIET})
            for name, flag in zip(("walkthrough-smoke", "walkthrough-smoke-L2"), ready)]
    while not all(flag.exists() for flag in ready):  # both imported and waiting: they start together
        assert all(r.poll() is None for r in runs), [r.communicate()[0] for r in runs]
        time.sleep(0.01)
    go.touch()
    outputs = [r.communicate(timeout=300)[0] for r in runs]
    assert all(r.returncode == 0 for r in runs), outputs
    assert len(bases(tmp_path)) == 1 and not list(tmp_path.glob("*.building-*")), sorted(tmp_path.iterdir())
    assert sum("saved the base model and its data" in o for o in outputs) == 1, outputs
    # the other built its own and lost the rename, or (late by a whole build) found the winner's folder
    assert sum("another run saved the same base model" in o or "reusing the base model" in o for o in outputs) == 1


def fake_make(folder, smoke):  # what build() renames into place, without the pretraining
    for name in world.BASE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)


def test_a_build_that_loses_the_race_or_stops_leaves_only_the_finished_base(tmp_path, monkeypatch, capsys):
    found = world.paths(tmp_path / "walkthrough", smoke=True)
    winner = Path(found["base_dir"])

    def another_run_finishes_first(folder, smoke):
        fake_make(folder, smoke)
        shutil.copytree(folder, winner)

    monkeypatch.setattr(world, "make", another_run_finishes_first)
    assert world.build(tmp_path / "walkthrough", True) == found
    assert "another run saved the same base model" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [winner.name]  # this run's own copy is gone

    def interrupted(folder, smoke):
        fake_make(folder, smoke)
        raise KeyboardInterrupt

    monkeypatch.setattr(world, "make", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world.build(tmp_path / "other" / "walkthrough", True)
    assert list((tmp_path / "other").iterdir()) == []  # no base, no half of one


def edited_copy(folder, old, new):
    """The reference and the lab copied into folder, lladapter.py edited there as an exercise is: old -> new."""
    for file in [*ROOT.glob("*.py"), *ROOT.glob("walkthrough/*.py")]:
        (folder / file.parent.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, folder / file.relative_to(ROOT))
    source = (folder / "lladapter.py").read_text(encoding="utf-8")
    assert source.count(old) == 1, f"`{old}` should occur once in lladapter.py"
    (folder / "lladapter.py").write_text(source.replace(old, new), encoding="utf-8")
    return folder


def chart_cells(output, title):
    """The plotted characters of the text chart under the line that starts with title."""
    lines = output.split("\n" + title, 1)[1].splitlines()[1:]
    return "".join(line.split("|", 1)[1] for line in lines[:next(i for i, l in enumerate(lines) if "+---" in l)])


def test_the_exercise_unedited_repeats_the_unedited_run_step_for_step(classroom):
    result = run(classroom, "-m", "walkthrough.exercise", "--smoke", "--out_dir=out/exercise-unedited")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "your run's log.jsonl is the unedited run's, step for step" in result.stdout
    default = json.loads((classroom / "out" / "walkthrough-smoke" / "walkthrough.json").read_text())
    assert f"{default['trainable']:,}" in result.stdout.split("trainable parameters", 1)[1].splitlines()[0]
    for title in ("training loss (log scale", "mean |tanh(gate)|"):  # one curve over the other: '#' both
        assert set(chart_cells(result.stdout, title)) == {" ", "#"}, title


@pytest.mark.parametrize("new, broken", [
    ("gate.normal_()", None),  # random-init gates: the README's exercise, another model from step 1
    ("gate.fill_(float('nan'))", "(error: the loss is nan at step 1"),
    ("gate.zero_(); raise RuntimeError('an edit that crashes')", "(RuntimeError: an edit that crashes)")],
    ids=["random-init gates", "nan", "crash"])
def test_the_exercise_shows_an_edit_beside_the_unedited_run_and_a_broken_one_in_one_line(classroom, tmp_path, new,
                                                                                          broken):
    code = edited_copy(tmp_path, "gate.zero_()", new)
    result = run(classroom, "-m", "walkthrough.exercise", "--smoke", f"--out_dir=out/exercise-{tmp_path.name}",
                 root=code)
    if broken is None:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "the two runs log the same numbers for their first 0 step(s) of 10: the models differ before the " \
               "first update" in result.stdout
        for title in ("training loss (log scale", "mean |tanh(gate)|"):  # both curves
            assert {"u", "y"} <= set(chart_cells(result.stdout, title)), title
    else:
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("exercise: BROKEN: your edit stopped training at step 1 of 10 " + broken), last
        assert "Traceback" not in result.stdout + result.stderr  # train.py's whole output is in train.log
        log = (classroom / "out" / f"exercise-{tmp_path.name}" / "train.log").read_text()
        assert log.strip().splitlines()[-1] in last


def test_the_exercise_looks_for_the_default_runs_where_train_py_writes_them():
    from walkthrough import exercise  # which names them itself: an edit may break lladapter.py, which world imports
    assert exercise.DEFAULT_RUN == {False: Path(world.SETTINGS["out_dir"]).name,
                                    True: Path(world.SMOKE_SETTINGS["out_dir"]).name}
