"""Slow tier: train.py and generate.py as a user runs them, in processes: one process, DDP and FSDP under torchrun,
resume after a stop, the recipe's schedule, precision, bad inputs and settings."""
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

import checkpoint
import cli
import lladapter
from cli import InputError

from tests.fixtures import ROOT, DEVICE, tiny_model, adapter_file_tensors, tokens, write_meta_checkpoint
from tests.test_files import flipped, record_spans
from tests.conftest import train, log_of, run_generate, image_task, first_answer_accuracy, generate_answers, bad_inputs, script_error, SHARDED_FORWARD

@dataclass
class ToySettings:
    lr: float = 1e-3  # the learning rate
    steps: int = 10  # how many
    name: str = "x"  # a name
    resume: bool = False  # go on
    prompt: tuple = ()  # one per --prompt
    mode: Literal["a", "b"] = "a"  # one of two
    max_len: int = 4  # a name with an underscore
    dry_run: bool = True  # a flag with one


def test_settings_are_parsed_by_the_type_of_their_default_and_a_wrong_one_is_one_line():
    got = cli.parse(ToySettings, "", ["--lr=2e-4", "--steps", "3", "--resume", "--prompt=a", "--prompt=b=c", "--mode=b"])
    assert got == ToySettings(lr=2e-4, steps=3, name="x", resume=True, prompt=("a", "b=c"), mode="b", max_len=4,
                              dry_run=True)
    assert cli.parse(ToySettings, "", ["--resume", "--no-resume"]).resume is False
    assert cli.parse(ToySettings, "", [], defaults={"steps": 7}).steps == 7  # a preset's value, under the command line's
    assert cli.parse(ToySettings, "", ["--steps=2"], defaults={"steps": 7}).steps == 2
    # hyphens where the names have underscores, the commonest typo of a class: read as meant
    assert cli.parse(ToySettings, "", ["--max-len=9", "--no-dry-run"]) == ToySettings(max_len=9, dry_run=False)
    with pytest.raises(InputError, match=r"unrecognized arguments: --max-lenn=9 \(did you mean --max_len\?\)"):
        cli.parse(ToySettings, "", ["--max-lenn=9"])
    for bad, message in [(["--stepz=3"], "unrecognized arguments: --stepz=3"), (["--ste=3"], "unrecognized arguments"),
                         (["--steps=1.5"], "argument --steps: invalid int value: '1.5'"),
                         (["--mode=c"], "argument --mode: invalid choice: 'c'"), (["steps=3"], "unrecognized arguments"),
                         (["--steps"], "argument --steps: expected one argument")]:
        with pytest.raises(InputError, match=message):
            cli.parse(ToySettings, "", bad)


@pytest.mark.parametrize("script, flag, comment, default", [
    ("train.py", "--base_lr", "the learning rate is base_lr * batch_size / 256", "0.009"),
    ("generate.py", "--max_batch_size", "prompts decoded together", "0")])
def test_help_lists_each_setting_with_its_default_and_comment(monkeypatch, capsys, script, flag, comment, default):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its own
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal
    assert stop.value.code == 0
    entry = text[text.index(f" {flag} ") + 1:]
    entry = entry[:entry.index(" --", 1)]  # up to the next setting
    assert comment in entry and f"(default: {default})" in entry, entry


def test_ddp_and_fsdp_on_two_processes_end_with_the_adapter_of_one_process(parallel_runs):
    d, _ = parallel_runs
    one = adapter_file_tensors(d / "one" / "adapter.pth")
    assert any(key.endswith("gate") and v.any() for key, v in one.items())  # the run moved the gates
    for name in ("ddp", "fsdp"):
        other = adapter_file_tensors(d / name / "adapter.pth")
        assert other.keys() == one.keys()
        for key in one:
            torch.testing.assert_close(other[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        for a, b in zip(log_of(d / "one"), log_of(d / name)):
            assert a["lr"] == b["lr"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-4), name


def test_fsdp_holds_half_of_the_frozen_base_in_each_of_two_processes(parallel_runs):
    _, output = parallel_runs
    held = re.search(r"fsdp: process 0 holds ([\d,]+) of the base's ([\d,]+) elements", output["fsdp"])
    local, total = (int(g.replace(",", "")) for g in held.groups())
    assert total == sum(p.numel() for n, p in tiny_model().named_parameters() if not lladapter.is_adapter_key(n))
    assert 0.45 < local / total < 0.55, "sharded, not replicated"
    assert "fsdp:" not in output["ddp"]


def test_a_resumed_fsdp_run_ends_where_an_uninterrupted_one_does(parallel_runs):
    d, output = parallel_runs
    assert "resumed from" in output["fsdp_resumed"] and "at step 3" in output["fsdp_resumed"]
    straight, resumed = adapter_file_tensors(d / "fsdp" / "adapter.pth"), adapter_file_tensors(d / "fsdp_resumed" / "adapter.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in log_of(d / "fsdp_resumed")] == [r["loss"] for r in log_of(d / "fsdp")]


def test_fsdp_loads_two_meta_shards_and_its_adapter_to_the_logits_of_one_process(task, parallel_runs, tmp_path):
    # The base in 2 model-parallel files, loaded under FSDP on 2 processes (each reading only its rows), with the
    # adapter an FSDP run wrote, computes the logits that one process gets from load_llama and generate.py's path.
    import sys
    d, _ = parallel_runs
    base, _ = checkpoint.load_llama(task / "ckpt", device="cpu", adapter_layer=0)
    write_meta_checkpoint(base, tmp_path / "mp2", n_shards=2)
    (tmp_path / "mp2" / "tokenizer.model").write_bytes((task / "ckpt" / "tokenizer.model").read_bytes())
    torch.save(tokens(seqlen=10).cpu(), tmp_path / "tokens.pth")
    script = SHARDED_FORWARD.format(root=str(ROOT), ckpt=str(tmp_path / "mp2"), adapter=str(d / "fsdp" / "adapter.pth"),
                                    tokens=str(tmp_path / "tokens.pth"), out=str(tmp_path / "logits.pth"))
    (tmp_path / "sharded_forward.py").write_text(script)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(tmp_path / "sharded_forward.py")], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, _ = checkpoint.load_llama(task / "ckpt", adapter_path=d / "fsdp" / "adapter.pth", device="cpu")  # K, L: file
    with torch.no_grad():
        expected = one(tokens(seqlen=10).cpu())
    torch.testing.assert_close(torch.load(tmp_path / "logits.pth"), expected, rtol=1e-5, atol=1e-5)


def test_compiled_training_gives_the_losses_of_eager_training(task, tmp_path):
    # --compile compiles each block in place: the same steps, the same losses (up to the fused kernels' rounding),
    # and an adapter file with the usual names
    train(task, tmp_path / "eager", "--base_lr=1.0", "--stop_after=3")
    train(task, tmp_path / "compiled", "--base_lr=1.0", "--stop_after=3", "--compile")
    eager, compiled = log_of(tmp_path / "eager"), log_of(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert adapter_file_tensors(tmp_path / "compiled" / "adapter.pth").keys() == \
        adapter_file_tensors(tmp_path / "eager" / "adapter.pth").keys()


def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(task, tmp_path):
    train(task, tmp_path / "straight", "--base_lr=1.0", "--save_interval=5")
    train(task, tmp_path / "stopped", "--base_lr=1.0", "--save_interval=5", "--stop_after=7")
    _, output = train(task, tmp_path / "stopped", "--base_lr=1.0", "--save_interval=5", "--resume")
    assert "resumed from" in output and "at step 7" in output
    straight = adapter_file_tensors(tmp_path / "straight" / "adapter.pth")
    resumed = adapter_file_tensors(tmp_path / "stopped" / "adapter.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["step"] for r in log_of(tmp_path / "stopped")] == [r["step"] for r in log_of(tmp_path / "straight")]
    code, output = train(task, tmp_path / "stopped", "--base_lr=2.0", "--resume", check=False)
    assert code != 0 and "other settings: base_lr=1.0 (now 2.0)" in output


def test_first_step_loss_is_the_base_models_next_token_loss_on_the_responses(task, tmp_path):
    # With val_fraction=0 and one global batch of all 120 records, step 1's loss (computed before the first
    # update, so with zero gates: the base model) is the mean over every response token and EOS.
    train(task, tmp_path, "--val_fraction=0", "--batch_size=120", "--micro_batch_size=8", "--stop_after=1")
    model, tok = checkpoint.load_llama(task / "ckpt", device=DEVICE, adapter_layer=0)
    total, count = 0.0, 0
    for r in json.loads((task / "data.json").read_text()):
        prompt = tok.encode(lladapter.format_prompt(r["instruction"], r["input"]), bos=True, eos=False)
        full = tok.encode(lladapter.format_prompt(r["instruction"], r["input"]) + r["output"], bos=True, eos=True)
        with torch.no_grad():
            logits = model(torch.tensor([full], device=DEVICE))[0]
        # the response tokens full[len(prompt):] are predicted at the positions just before them
        total += F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(full[len(prompt):]), reduction="sum").item()
        count += len(full) - len(prompt)
    assert math.isclose(log_of(tmp_path)[0]["loss"], total / count, rel_tol=1e-5)


def test_a_few_hundred_steps_lower_the_loss_and_open_the_gates(task, tmp_path):
    # The base is random, so the adapter can learn the answers' form but not the colours: ~4.9 -> ~2.4 nats.
    train(task, tmp_path, "--epochs=20", "--warmup_epochs=2", "--base_lr=10.0", "--micro_batch_size=8")
    log = log_of(tmp_path)
    assert len(log) == 20 * 14  # 114 training examples // 8
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert log[0]["gate"] <= log[0]["lr"] < 0.1 < log[-1]["gate"]  # from 0, one Adam step moves a gate <= lr
    assert log[-1]["val_loss"] < 0.6 * first


def test_learning_rate_follows_warmup_and_cosine_in_optimizer_steps(task, tmp_path):
    records = json.loads((task / "data.json").read_text())  # the same data as JSON Lines
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train(task, tmp_path, f"--data_path={tmp_path / 'data.jsonl'}", "--micro_batch_size=2", "--batch_size=8",
          "--epochs=3", "--warmup_epochs=1", "--base_lr=0.256")
    log = log_of(tmp_path)
    steps_per_epoch = 114 // 8  # 120 records, 6 held out; accumulation (4 micro-batches) doesn't change the count
    total, warmup, peak = 3 * steps_per_epoch, steps_per_epoch, 0.256 * 8 / 256
    assert [r["step"] for r in log] == list(range(1, total + 1))
    for r in log:
        s = r["step"] - 1
        expected = peak * (s + 1) / warmup if s < warmup else \
            peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert math.isclose(r["lr"], expected, rel_tol=1e-9), (s, r["lr"], expected)
    assert max(r["lr"] for r in log) == peak


def test_full_mode_trains_every_weight_and_saves_a_loadable_checkpoint(task, tmp_path):
    _, output = train(task, tmp_path, "--mode=full", "--adapter_layer=0", "--stop_after=3", "--base_lr=0.5")
    assert "(100.000%)" in output
    tuned, _ = checkpoint.load_llama(tmp_path, adapter_layer=0)
    base, _ = checkpoint.load_llama(task / "ckpt", adapter_layer=0)
    assert all(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))


def test_fp16_loss_scaling_skips_overflowing_steps_and_training_goes_on(task, tmp_path):
    # A starting scale far too large: the first steps' fp16 gradients overflow, each is skipped with the scale
    # halved, until the scale fits; then the adapter trains. (The scaler's logic, on a CPU.)
    _, output = train(task, tmp_path, "--dtype=fp16", "--loss_scale=2.5e7", "--stop_after=8", "--base_lr=1.0")
    log = log_of(tmp_path)
    skipped = [r.get("skipped", False) for r in log]
    assert skipped[0] and not skipped[-1] and "step skipped" in output
    first_kept = skipped.index(False)
    assert not any(skipped[first_kept:])
    assert [r["loss_scale"] for r in log[:first_kept + 1]] == [2.5e7 / 2 ** (i + 1) for i in range(first_kept)] + \
        [2.5e7 / 2 ** first_kept]
    assert log[first_kept - 1]["gate"] == 0 < log[-1]["gate"]  # nothing moved while skipping, then the gates open
    assert all(torch.isfinite(v).all() for v in adapter_file_tensors(tmp_path / "adapter.pth").values())


def test_a_diverging_run_stops_with_a_message_and_keeps_the_last_good_checkpoint(task, tmp_path):
    code, output = train(task, tmp_path, "--base_lr=1e30", "--save_interval=1", check=False)
    assert code != 0 and "stopping. The last good checkpoint is in" in output
    assert "error: the loss is nan" in output or "error: the weights are no longer finite" in output
    saved = adapter_file_tensors(tmp_path / "adapter.pth")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_input_exits_nonzero_with_one_clear_message_and_writes_nothing(task, tmp_path):
    for name, args, message in bad_inputs(task, tmp_path):
        out = tmp_path / ("out_" + name.replace(" ", "_"))
        code, output = train(task, out, *args, check=False)
        assert code != 0, name
        assert message in output, (name, output)
        assert "Traceback" not in output, (name, output)
        assert not out.exists(), name


def test_generate_greedy_output_is_the_step_by_step_argmax_of_the_full_forward(task, open_adapter):
    code, stdout, _ = run_generate(task, "--prompt=Which colour is the owl?", "--temperature=0", "--max_gen_len=12",
                                   adapter=open_adapter)
    assert code == 0
    model, tok = checkpoint.load_llama(task / "ckpt", adapter_path=open_adapter, device=DEVICE)
    seq = tok.encode(lladapter.format_prompt("Which colour is the owl?"), bos=True, eos=False)
    new = []
    with torch.no_grad():
        while len(new) < 12 and tok.eos_id not in new:
            new.append(model(torch.tensor([seq + new], device=DEVICE))[0, -1].argmax().item())
    expected = tok.decode(new[:-1] if new[-1] == tok.eos_id else new)
    assert stdout == expected + "\n"
    code, base_out, _ = run_generate(task, "--prompt=Which colour is the owl?", "--temperature=0", "--max_gen_len=12")
    assert code == 0 and base_out != stdout  # without --adapter: the base model alone


def test_generate_batched_matches_one_prompt_at_a_time(task, open_adapter):
    prompts = ["Which colour is the owl?", "Which colour is the yak, and the emu and the cat?", "red"]
    code, batched, _ = run_generate(task, *[f"--prompt={p}" for p in prompts], "--temperature=0", "--max_gen_len=10",
                                    adapter=open_adapter)
    responses = [line[len("### Response: "):] for line in batched.splitlines() if line.startswith("### Response: ")]
    alone = [run_generate(task, f"--prompt={p}", "--temperature=0", "--max_gen_len=10", adapter=open_adapter)[1]
             for p in prompts]
    assert code == 0 and responses == [a.strip() for a in alone]


def test_generate_is_reproducible_per_seed(task, open_adapter):
    args = ["--prompt=Which colour is the fox?", "--temperature=1.0", "--top_p=0.95", "--max_gen_len=16"]
    runs = [run_generate(task, *args, f"--seed={s}", adapter=open_adapter)[1] for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_gate_heatmap_shows_the_gates_it_is_given_one_character_per_head_beside_the_comparison(task, tmp_path):
    model = tiny_model(max_seq_len=512)
    # tanh(gate) per head; shaded by magnitude in quarters of the largest (0.9): 0, (0, 1/4], (1/4, 1/2], ...
    shade = {0.0: " ", 0.2: "░", -0.45: "▒", 0.9: "█", 0.45: "▒", 0.666: "▓", 0.684: "█"}
    values = {2: [0.0, 0.2, -0.45, 0.9], 3: [0.9, 0.45, 0.666, 0.684]}  # as many as the model has gates per layer
    with torch.no_grad():
        for i, row in values.items():
            gate = model.layers[i].attention.gate
            gate.copy_(torch.atanh(torch.tensor(row[:gate.numel()])).view_as(gate))
    checkpoint.save_adapter(model, tmp_path / "known.pth")
    code, stdout, _ = run_generate(task, "--show_gates", "--compare", "--prompt=Which colour is the owl?",
                                   "--max_gen_len=4", adapter=tmp_path / "known.pth")
    rows = {line.split("│")[0].strip(): line.split("│")[1] for line in stdout.splitlines() if "│" in line}
    assert code == 0 and "(the largest is 0.900)" in stdout and "▓ up to 0.675, █ up to 0.900" in stdout, stdout
    for i, row in values.items():  # 4 heads: 4 characters
        assert rows[f"layer   {i}"] == "".join(shade[v] for v in row[:model.layers[i].attention.gate.numel()])
    assert [line.split(":")[0].strip() for line in stdout.splitlines() if line.startswith("    ")] == ["base", "known"]


def test_generate_bad_input_is_one_clear_message(task, tmp_path):
    torch.save(lladapter.adapter_state_dict(tiny_model(adapter_len=5)), tmp_path / "other.pth")  # K=5, no config
    checkpoint.save_adapter(tiny_model(dim=32), tmp_path / "small.pth")
    cases = [(["--prompt=hi"], {"adapter": tmp_path / "nope.pth"}, "nope.pth: no such file"),
             (["--prompt=hi", "--adapter_len=3"], {"adapter": tmp_path / "other.pth"},
              "other.pth: the file says adapter_len=5, the settings say adapter_len=3"),
             (["--prompt=hi"], {"adapter": tmp_path / "small.pth"}, "small.pth: an adapter for another base: it was "
              "trained on dim=32, n_layers=4, n_heads=4, this base has dim=64, n_layers=4, n_heads=4"),
             (["--prompt=" + "red " * 400, "--max_seq_len=512"], {}, "over max_seq_len=512: raise --max_seq_len"),
             (["--prompts_file=" + str(tmp_path / "none.txt")], {}, "none.txt: no such file"),
             (["--prompt=hi", "--image=" + str(tmp_path / "f.npy")], {}, "the adapter is text-only")]
    for args, kwargs, message in cases:
        code, stdout, stderr = run_generate(task, *args, **kwargs)
        assert code != 0 and message in stderr and "Traceback" not in stderr, (args, stderr)


def test_an_answer_only_the_image_holds_is_learned_with_images_and_not_without(task, tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(image_task(tmp_path, 256, seed=1)))
    (tmp_path / "text_only.json").write_text(json.dumps(image_task(tmp_path, 256, seed=1, images=False)))
    held_out = image_task(tmp_path, 60, seed=2)
    args = ["--batch_size=16", "--micro_batch_size=16", "--epochs=10", "--warmup_epochs=1", "--base_lr=4.0"]
    train(task, tmp_path / "image", f"--data_path={tmp_path / 'train.json'}", "--image_dim=16", *args)
    train(task, tmp_path / "text", f"--data_path={tmp_path / 'text_only.json'}", *args)
    with_image = first_answer_accuracy(task, tmp_path / "image", held_out, image_dim=16)
    text_only = first_answer_accuracy(task, tmp_path / "text", held_out, image_dim=0)
    print(f"image task, held-out first-answer accuracy: {with_image:.1%} with image features, {text_only:.1%} "
          f"text-only (chance 25%)")
    assert with_image >= 0.9 and text_only <= 0.5, (with_image, text_only)


def test_image_input_errors_name_the_record(task, tmp_path):
    good = {"instruction": "Which colour is the picture?", "output": "red"}
    cases = [([{**good, "image": "missing.npy"}], ["--image_dim=16"], "record 0 (counting from 0): image feature 'missing.npy'"),
             ([good, {**good, "image": [0.5] * 8}], ["--image_dim=16"], "record 0 (counting from 0) has no 'image'"),
             ([{**good, "image": [0.5] * 8}] * 2, ["--image_dim=16"], "has shape [8], expected [16]"),
             ([{**good, "image": [0.5] * 16}], [], "record 0 (counting from 0) has an image, but this adapter is text-only")]
    for i, (records, args, message) in enumerate(cases):
        (tmp_path / f"d{i}.json").write_text(json.dumps(records))
        code, output = train(task, tmp_path / f"out{i}", f"--data_path={tmp_path / f'd{i}.json'}", *args, check=False)
        assert code != 0 and message in output and "Traceback" not in output, (message, output)


WITHOUT_PROC_OR_RESOURCE = """
import builtins, os, runpy, sys
sys.path.insert(0, os.getcwd())  # the reference's folder, where train.py runs
sys.modules["resource"] = None  # as on Windows: `import resource` raises ImportError
real_open = builtins.open
def guarded_open(file, *args, **kwargs):  # as on macOS and Windows: no /proc
    if str(file).startswith("/proc"):
        raise OSError(f"{file}: no /proc here")
    return real_open(file, *args, **kwargs)
builtins.open = guarded_open
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_training_runs_and_reports_without_proc_or_the_resource_module(task, tmp_path):
    (tmp_path / "run_train.py").write_text(WITHOUT_PROC_OR_RESOURCE)
    code, output = train(task, tmp_path / "out", "--stop_after=2", script=str(tmp_path / "run_train.py"))
    assert "peak memory: not measured here" in output, output[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["peak_memory_mib"] is None and summary["steps"] == 2 and len(summary["step_seconds"]) == 2


def test_a_command_line_image_is_a_path_from_here_and_a_records_image_a_path_from_its_file(task, tmp_path):
    import numpy as np
    (tmp_path / "images.json").write_text(json.dumps(image_task(tmp_path, 40, seed=0)))
    train(task, tmp_path / "run", f"--data_path={tmp_path / 'images.json'}", "--image_dim=16", "--stop_after=1")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    np.save(tmp_path / "here.npy", np.ones(16, np.float32))  # beside the working folder, not the prompts file
    np.save(prompts / "there.npy", np.ones(16, np.float32))  # beside the prompts file
    (prompts / "questions.txt").write_text("Which colour is the picture?\n")
    (prompts / "records.json").write_text(json.dumps([{"instruction": "Which colour is the picture?",
                                                        "image": "there.npy"}]))
    for args in (["--prompts_file=prompts/questions.txt", "--image=here.npy"], ["--prompts_file=prompts/records.json"]):
        result = subprocess.run([sys.executable, str(ROOT / "generate.py"), f"--ckpt_dir={task / 'ckpt'}",
                                 f"--adapter={tmp_path / 'run' / 'adapter.pth'}", "--device=cpu", "--max_gen_len=2",
                                 *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (args, result.stderr[-2000:])


def test_adapter_trained_with_other_K_and_L_generates_without_being_told_them(task, tmp_path):
    train(task, tmp_path, "--adapter_layer=3", "--adapter_len=2", "--stop_after=3", "--base_lr=1.0")
    adapter = tmp_path / "adapter.pth"
    untold = generate_answers(task, adapter)
    assert untold == generate_answers(task, adapter, "--adapter_layer=3", "--adapter_len=2")
    assert untold.count("### Response: ") == 2
    model, _ = checkpoint.load_llama(task / "ckpt", adapter_path=adapter, device=DEVICE)
    assert (model.args.adapter_layer, model.args.adapter_len) == (3, 2)
    x = tokens()
    with torch.no_grad(), lladapter.gates_closed(model):
        base = model(x)
    with torch.no_grad():  # the adapter was loaded and matters: its gates opened in training
        assert not torch.allclose(model(x), base)


# ---- generate.py: a prompts file in batches ---------------------------------------------------------------

def test_prompts_file_over_max_batch_size_gives_the_one_at_a_time_answers_one_json_line_each(task, open_adapter,
                                                                                            tmp_path):
    records = [{"instruction": "Which colour is the owl?", "input": ""},
               {"instruction": "Which colour is the yak, and the emu and the cat?", "input": "a short note"},
               {"instruction": "pink pink pink"},
               {"instruction": "Which colour is the bee?", "input": "the fox is pink and the dog is blue"},
               {"instruction": "The cat is blue.", "input": "green"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    answers, progress = {}, {}
    for batch in (2, 1):  # 5 prompts in batches of 2, 2 and 1 (prompts of other lengths padded together); one by one
        out = tmp_path / f"answers{batch}.jsonl"
        code, _, stderr = run_generate(task, f"--prompts_file={tmp_path / 'prompts.jsonl'}",
                                       f"--max_batch_size={batch}", "--temperature=0", "--max_gen_len=8", f"--out={out}",
                                       adapter=open_adapter)
        assert code == 0, stderr
        progress[batch] = [line for line in stderr.splitlines() if line.endswith("answered]")]
        lines = out.read_text(encoding="utf-8").splitlines()
        answers[batch] = [json.loads(line) for line in lines]
        assert [(a["instruction"], a["input"]) for a in answers[batch]] == \
            [(r["instruction"], r.get("input", "")) for r in records]
        assert all(set(a) == {"instruction", "input", "output", "generator"} for a in answers[batch])
        assert {a["generator"] for a in answers[batch]} == {"open_adapter"}  # the adapter file's name
    assert progress[2] == ["[2/5 answered]", "[4/5 answered]", "[5/5 answered]"]
    assert progress[1] == [f"[{n}/5 answered]" for n in range(1, 6)]
    assert [a["output"] for a in answers[2]] == [a["output"] for a in answers[1]]
    assert len({a["output"] for a in answers[1]}) > 1  # (the random base answers most prompts alike, not these)


def test_zero_or_negative_settings_and_non_utf8_inputs_are_refused_before_anything_is_written(task, tmp_path,
                                                                                            monkeypatch):
    out, answers = tmp_path / "out", tmp_path / "answers.jsonl"
    (tmp_path / "latin1.json").write_bytes('[{"instruction": "Café?", "output": "Oui."}]'.encode("latin-1"))
    (tmp_path / "latin1.txt").write_bytes("Which colour is the café?\n".encode("latin-1"))
    trains = [f"--ckpt_dir={task / 'ckpt'}", f"--data_path={task / 'data.json'}", f"--out_dir={out}"]
    for setting in ["--batch_size=0", "--micro_batch_size=-1", "--epochs=0", "--save_interval=0", "--adapter_len=0"]:
        assert setting in script_error(monkeypatch, "train.py", *trains, setting)
    assert "latin1.json: not UTF-8 text" in script_error(monkeypatch, "train.py", *trains,
                                                          f"--data_path={tmp_path / 'latin1.json'}")
    generates = [f"--ckpt_dir={task / 'ckpt'}", f"--out={answers}"]
    assert "--max_batch_size=-1: must not be negative" in script_error(monkeypatch, "generate.py", *generates,
                                                                       "--prompt=hi", "--max_batch_size=-1")
    assert "latin1.txt: not UTF-8 text" in script_error(monkeypatch, "generate.py", *generates,
                                                        f"--prompts_file={tmp_path / 'latin1.txt'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.json", "latin1.txt"]


def test_scripts_given_damaged_files_exit_1_with_one_line_and_write_nothing(task, tmp_path):
    ckpt = tmp_path / "ckpt"  # the task's base, its checkpoint cut in half
    shutil.copytree(task / "ckpt", ckpt)
    data = (ckpt / "consolidated.00.pth").read_bytes()
    (ckpt / "consolidated.00.pth").write_bytes(data[:len(data) // 2])
    adapter = tmp_path / "adapter.pth"  # an adapter for the task's base, one byte of its prompts flipped
    checkpoint.save_adapter(tiny_model(open_gates=True, max_seq_len=512), adapter)
    data = adapter.read_bytes()
    start, end = max(record_spans(data).values(), key=lambda span: span[1] - span[0])  # adapter_query's [6, 64]
    adapter.write_bytes(next(flipped(data, [(start + end) // 2]))[1])
    out, answers = tmp_path / "out", tmp_path / "answers.jsonl"
    runs = {"cut checkpoint": (train(task, out, f"--ckpt_dir={ckpt}", check=False), "consolidated.00.pth: corrupted"),
            "flipped adapter": (run_generate(task, "--prompt=hi", f"--out={answers}", adapter=adapter), "adapter.pth: "
                                "corrupted (Bad CRC-32")}
    for name, (result, message) in runs.items():
        code, output = result[0], "".join(result[1:])
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert code == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in output, (name, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pth", "ckpt"]


# ---- what a class trips on: --help, Ctrl-C ------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_help_prints_each_example_line_as_the_docstring_writes_it(script):
    # A backslash ending a line of a docstring joins it to the next one ("--quantize=int8         --activation_...")
    raw = (ROOT / script).read_text(encoding="utf-8").split('"""')[1]  # as written in the file
    shown = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120).stdout.splitlines()
    for line in raw.strip("\n").splitlines():
        assert not line.strip() or line.replace("\\\\", "\\") in shown, f"{script} --help mangles: {line}"


def wait_for(stream, text, timeout=300):
    """Read `stream` line by line until a line holds `text`; the lines read."""
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never printed {text!r}:\n{''.join(lines)}")


def sigint_as_at_a_terminal():
    # A suite started in the background by a shell script (CI's `.ci/run &`) hands its children SIGINT ignored, and
    # Python then never raises KeyboardInterrupt: the child gets Ctrl-C as a terminal's foreground process would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, as a terminal's Ctrl-C does on Linux and macOS")
def test_ctrl_c_in_training_prints_one_line_with_what_is_kept_and_the_command_that_continues(task, tmp_path):
    cmd = [sys.executable, "train.py", f"--ckpt_dir={task / 'ckpt'}", f"--data_path={task / 'data.json'}",
           f"--out_dir={tmp_path}", "--adapter_layer=2", "--adapter_len=3", "--batch_size=8", "--micro_batch_size=2",
           "--epochs=40", "--log_interval=1", "--save_interval=2", "--dtype=fp32", "--device=cpu"]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=sigint_as_at_a_terminal) as run:
        wait_for(run.stdout, "step 3/")
        run.send_signal(signal.SIGINT)
        stderr = run.communicate(timeout=120)[1]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert run.returncode != 0 and len(lines) == 1 and "Traceback" not in stderr, stderr
    kept = int(re.search(r"train_state.pth keeps step (\d+)", lines[0])[1])
    assert kept >= 2 and lines[0].startswith("stopped: ") and lines[0].endswith(" --resume"), lines[0]
    command = lines[0].split("continue with: ")[1].split()
    assert command[:2] == ["python", "train.py"] and "--resume" == command[-1]
    result = subprocess.run([sys.executable, *command[1:], "--stop_after=" + str(kept + 1)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and f"resumed from {tmp_path / 'train_state.pth'} at step {kept}" in result.stdout, \
        result.stdout + result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, as a terminal's Ctrl-C does on Linux and macOS")
def test_ctrl_c_at_the_interactive_prompt_prints_one_line(task, open_adapter):
    cmd = [sys.executable, "generate.py", f"--ckpt_dir={task / 'ckpt'}", f"--adapter={open_adapter}", "--device=cpu",
           "--dtype=fp32", "--interactive"]
    with subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          preexec_fn=sigint_as_at_a_terminal) as run:
        wait_for(run.stderr, "Type an instruction")
        run.send_signal(signal.SIGINT)
        stderr = run.communicate(timeout=120)[1]
    assert run.returncode != 0 and "Traceback" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["stopped: nothing was written"], stderr
