"""
The exercise loop: after an edit to lladapter.py (the README's Exercises), train the edited model as the walkthrough
trains its adapter, on the walkthrough's own base, and show its result and training curves beside the unedited
adapter's.

    python train.py                         # once, with lladapter.py unedited: the run to compare with
    python -m walkthrough.exercise          # after each edit: 95 s of CPU time (172 s on 2 cores loaded 3x over)
    python -m walkthrough.exercise --smoke  # the smoke walkthrough's, against python train.py --smoke's (seconds;
                                            # the numbers mean nothing)

The edited run is `python train.py --out_dir=out/exercise`, in a process of its own: the walkthrough's settings to the
last one, on the base that `python train.py` made (found beside out_dir, as every walkthrough run finds it), so that
an unedited lladapter.py gives the unedited run's log.jsonl step for step. The unedited run is the one in the folder
the walkthrough's default run uses, beside out_dir (out/walkthrough): its log.jsonl and walkthrough.json. Printed:
held-out exact match, the base alone, trainable parameters, losses and gates, side by side; how many steps the two
runs share exactly; two text charts, the training loss and the mean |tanh(gate)|. A run that stops (a loss that is
not finite, an exception) ends the output with one line that says so, and the command exits with status 1.
This module imports nothing of the reference at its start (an edit can break lladapter.py's import; train.py, in
its own process, then tells how): the charts come from walkthrough/ablations.py once the edited run has steps to show.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent.parent  # where train.py is


@dataclass
class Settings:
    out_dir: str = "out/exercise"  # the edited model's run: train.py's out_dir (the unedited run is beside it)
    smoke: bool = False  # the smoke walkthrough's settings and base, against python train.py --smoke's run


SMOKE_SETTINGS = dict(out_dir="out/exercise-smoke")
# The default runs' folders, world.SETTINGS' out_dir and SMOKE_SETTINGS' (not imported: world.py imports lladapter.py)
DEFAULT_RUN = {False: "walkthrough", True: "walkthrough-smoke"}


def read_log(path) -> list:
    """log.jsonl's records, one per optimizer step (train.py's): step, loss, lr, gate (mean |tanh(gate)|), ...; only
    whole lines, those a newline ends (train.py may be writing the next)."""
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def train(command, out, total_steps):
    """Run the edited model's training, its output into out/train.log, a line of progress every 10 s from its
    log.jsonl; returns (exit status, the output's last line). Its OpenMP threads sleep while they wait, unless the
    user's environment says otherwise: on a laptop busy with anything else a spinning thread takes a core it doesn't
    have (the unedited walkthrough here, at a load of 6 on 2 cores: 648 s spinning, 172 s not, the same log)."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    with open(out / "train.log", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        start, shown = time.time(), time.time()
        try:
            while process.poll() is None:
                time.sleep(0.5)
                records = read_log(out / "log.jsonl")
                if records and time.time() - shown >= 10:
                    last, shown = records[-1], time.time()
                    print(f"  step {last['step']}/{total_steps}  loss {last['loss']:.4f}  mean |tanh(gate)| "
                          f"{last['gate']:.3f}  ({shown - start:.0f} s)", flush=True)
        except KeyboardInterrupt:  # the training goes with this command
            process.kill()
            raise
    lines = [line for line in (out / "train.log").read_text(errors="replace").splitlines() if line.strip()]
    return process.returncode, lines[-1] if lines else ""


def main():
    cli.exit_on_input_error()
    s = cli.parse(Settings, __doc__)
    if s.smoke:
        s = cli.parse(Settings, __doc__, defaults=SMOKE_SETTINGS)
    out = Path(s.out_dir)
    unedited = out.parent / DEFAULT_RUN[s.smoke]
    make = "python train.py" + " --smoke" * s.smoke
    cli.require(out != unedited, f"--out_dir={s.out_dir}: that is the unedited run's folder: name another")
    cli.require((unedited / "walkthrough.json").is_file() and (unedited / "log.jsonl").is_file(),
                f"no unedited run to compare with in {unedited}: run `{make}` with lladapter.py unedited first (put "
                f"your edit aside and back with `git stash` and `git stash pop`), then this again")
    reference = cli.read_json(unedited / "walkthrough.json")
    cli.require(not reference.get("changes"), f"{unedited} holds a variant's run ({reference.get('changes')}), not "
                                              f"the default one: run `{make}` there with lladapter.py unedited")
    base = unedited.parent / reference.get("base", "")
    cli.require("base" in reference and base.is_dir(), f"no walkthrough base beside {unedited} (its walkthrough.json "
                                                       f"names none, or the folder is gone): run `{make}` again")
    before = read_log(unedited / "log.jsonl")

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("log.jsonl", "walkthrough.json"):  # an earlier exercise's, never shown as this one's
        (out / stale).unlink(missing_ok=True)
    settings = [f"--out_dir={out}", *["--smoke"] * s.smoke]
    print(f"exercise: training your lladapter.py as the walkthrough does (python train.py {' '.join(settings)}) on "
          f"the base in {base}: {len(before)} steps, its output in {out / 'train.log'}", flush=True)
    start = time.time()
    try:
        code, last_line = train([sys.executable, str(ROOT / "train.py"), *settings], out, len(before))
    except KeyboardInterrupt:
        sys.exit(f"\nexercise: stopped; {out} holds a part of the run")
    seconds = time.time() - start
    after = read_log(out / "log.jsonl")
    result = cli.read_json(out / "walkthrough.json") if code == 0 and (out / "walkthrough.json").is_file() else None
    compare(before, after, reference, result, unedited, out, seconds)
    if result is None:
        where = f"at step {len(after) + 1} of {len(before)}" if len(after) < len(before) else \
            "after its last step, in the held-out evaluation"
        sys.exit(f"exercise: BROKEN: your edit stopped training {where} ({last_line.strip()}); the whole output is in "
                 f"{out / 'train.log'}")


def compare(before, after, reference, result, unedited, out, seconds):
    """The two runs side by side: their results, where their logs part, and the curves."""
    def row(label, key, kind, runs=(reference, result)):
        cells = [format(r[key], kind) if r is not None and key in r else "-" for r in runs]
        return f"  {label:<34}{cells[0]:>14}{cells[1]:>14}"

    last = [records[-1] if records else None for records in (before, after)]
    val = [next((r for r in reversed(records) if "val_loss" in r), None) for records in (before, after)]
    print(f"\n  {'':<34}{'unedited':>14}{'yours':>14}    ({unedited} and {out}, {seconds:.0f} s)")
    print(row("held-out exact match", "adapter_exact_match", ".1%"))
    print(row("  names the right value", "adapter_names_value", ".0%"))
    print(row("base alone (gates closed)", "base_exact_match", ".1%"))
    print(row("trainable parameters", "trainable", ","))
    print(row("loss at step 1 (before any update)", "loss", ".4f", (before[0], after[0] if after else None)))
    print(row("loss at the last step", "loss", ".4f", last))
    print(row("validation loss, last", "val_loss", ".4f", val))
    print(row("mean |tanh(gate)|, last step", "gate", ".3f", last))
    same = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    if after == before:
        print("  your run's log.jsonl is the unedited run's, step for step: the edit changes nothing this run sees")
    elif after:
        print(f"  the two runs log the same numbers for their first {same} step(s) of {len(before)}" +
              (": the models differ before the first update" if same == 0 else ""))
    if not after:
        return
    from walkthrough.ablations import text_chart  # imports the reference, which has just trained: it loads
    losses = [r["loss"] for r in before + after]
    print("\ntraining loss (log scale; u unedited, y yours, # both):")
    print("\n".join(text_chart({"u": (range(len(before)), [r["loss"] for r in before]),
                                "y": (range(len(after)), [r["loss"] for r in after])},
                               len(before), min(losses), max(losses), log=True)))
    print("\nmean |tanh(gate)| over the adapted layers, after each step (u unedited, y yours, # both):")
    print("\n".join(text_chart({"u": (range(1, len(before) + 1), [r["gate"] for r in before]),
                                "y": (range(1, len(after) + 1), [r["gate"] for r in after])},
                               len(before), 0.0, 1.0)))


if __name__ == "__main__":
    main()
