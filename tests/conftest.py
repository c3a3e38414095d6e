"""The slow tier's shared pieces: a tiny task and tokenizer written once per session, and helpers that run train.py
and generate.py as a user would, in processes of their own."""
import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the reference's folder

import checkpoint  # noqa: E402
import cli
import generation
import lladapter
from cli import InputError

from tests.fixtures import ROOT, DEVICE, VOCAB, tiny_model, write_meta_checkpoint
from tests.fixtures import bpe_tokenizer, spm_tokenizer  # noqa: F401  (fixtures every slow test may use)
from walkthrough.world import train_tokenizer

# ---- train.py ---------------------------------------------------------------------------------------------

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "elk", "emu", "yak"]
COLOURS = ["red", "blue", "green", "pink"]


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """A tiny base model in Meta's layout, its tokenizer, and an Alpaca-format data file."""
    d = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    records = [{"instruction": f"Which colour is the {a}?", "input": rng.choice(["", "a short note"]),
                "output": f"The {a} is {COLOURS[ANIMALS.index(a) % 4]}."} for a in rng.choices(ANIMALS, k=120)]
    (d / "data.json").write_text(json.dumps(records))
    text = [lladapter.format_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    ckpt = d / "ckpt"
    ckpt.mkdir()
    train_tokenizer(text, ckpt / "tokenizer", VOCAB, user_defined_symbols=COLOURS)  # a colour is one piece
    write_meta_checkpoint(tiny_model(max_seq_len=512), ckpt, vocab_size=-1)
    return d


def train(task, out, *args, nproc=1, check=True, script="train.py", env=None):
    """Run train.py (or a script that runs it) as a user would; returns (returncode, stdout + stderr)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, script, f"--ckpt_dir={task / 'ckpt'}", f"--data_path={task / 'data.json'}",
           f"--out_dir={out}", "--adapter_layer=2", "--adapter_len=3", "--batch_size=8", "--micro_batch_size=2",
           "--epochs=2", "--warmup_epochs=0.5", "--val_fraction=0.05", "--log_interval=5", "--dtype=fp32",
           f"--device={DEVICE if nproc == 1 else 'cpu'}", *args]  # several processes: gloo on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # deterministic kernels, no oversubscription
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed:\n{result.stdout}\n{result.stderr}")
    return result.returncode, result.stdout + result.stderr


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def parallel_runs(task, tmp_path_factory):
    """The same 8 optimizer steps from the same seed and data: one process, DDP on 2, FSDP on 2, and an FSDP run
    stopped after 3 steps and resumed. Returns the folder and each run's output."""
    d = tmp_path_factory.mktemp("parallel")
    args = ["--stop_after=8", "--base_lr=1.0", "--save_interval=3"]
    output = {name: train(task, d / name, *args, *extra, nproc=nproc)[1]
              for name, extra, nproc in [("one", [], 1), ("ddp", [], 2), ("fsdp", ["--fsdp"], 2)]}
    train(task, d / "fsdp_resumed", *args, "--fsdp", "--stop_after=3", nproc=2)
    output["fsdp_resumed"] = train(task, d / "fsdp_resumed", *args, "--fsdp", "--resume", nproc=2)[1]
    return d, output


SHARDED_FORWARD = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import checkpoint
dist.init_process_group("gloo")
model, _ = checkpoint.load_llama({ckpt!r}, adapter_path={adapter!r}, device="cpu", shard=checkpoint.fully_shard_base)
with torch.no_grad():
    logits = model(torch.load({tokens!r}))
if dist.get_rank() == 0:
    torch.save(logits, {out!r})
dist.destroy_process_group()
os._exit(0)  # past Python's teardown, as train.py's finish() does (gloo's threads may still hold tensors)
"""


def bad_inputs(task, d):
    good = json.loads((task / "data.json").read_text())
    cases = {
        "missing data": (["--data_path=" + str(d / "nope.json")], "nope.json: no such file"),
        "malformed": ('[{"instruction": "a", ', "malformed.json: not valid JSON"),
        "bad line.jsonl": ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c" "output": "d"}\n',
                           "bad_line.jsonl: line 3: not valid JSON"),
        "no output": ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 1 (counting from 0) has no 'output'"),
        "no instruction": ([{"output": "b"}], "record 0 (counting from 0) has no 'instruction'"),
        "not a string": (good[:3] + [{"instruction": "a", "input": 7, "output": "b"}], "record 3 (counting from 0): 'input' is a int"),
        "empty": ([], "expected a non-empty list"),
        "missing checkpoint": (["--ckpt_dir=" + str(d / "nockpt")], "nockpt: no such checkpoint directory"),
        "unknown setting": (["--learning_rate=3"], "error: unrecognized arguments: --learning_rate=3"),
        "wrong type": (["--epochs=five"], "error: argument --epochs: invalid int value: 'five'"),
        "uneven batch": (["--batch_size=7"], "batch_size=7 must be a multiple of micro_batch_size=2 x 1 processes"),
        "a typo": (["--adapter-lenn=5"], "unrecognized arguments: --adapter-lenn=5 (did you mean --adapter_len?)"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, list) and all(isinstance(c, str) and c.startswith("--") for c in content) and content:
            yield name, content, message
        else:
            path = d / (name.replace(" ", "_") + ("" if name.endswith(".jsonl") else ".json"))
            path.write_text(content if isinstance(content, str) else json.dumps(content))
            yield name, [f"--data_path={path}"], message


# ---- generate.py ------------------------------------------------------------------------------------------

def run_generate(task, *args, adapter=None):
    cmd = [sys.executable, "generate.py", f"--ckpt_dir={task / 'ckpt'}", f"--device={DEVICE}", "--dtype=fp32",
           *([f"--adapter={adapter}"] if adapter else []), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="session")
def open_adapter(task):
    """An adapter for the task's base model with every gate open."""
    path = task / "open_adapter.pth"
    checkpoint.atomic_save(lladapter.adapter_state_dict(tiny_model(open_gates=True, max_seq_len=512)), path)
    return path


def image_task(d, n, seed, images=True):
    """Records asking for the colour of a picture that only its feature vector shows: 4 noisy class centres."""
    import numpy as np
    centres = np.random.default_rng(0).normal(size=(4, 16)) * 2
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        c = int(rng.integers(4))
        feature = (centres[c] + 0.5 * rng.normal(size=16)).astype(np.float32)
        record = {"instruction": "Which colour is the picture?", "input": "", "output": COLOURS[c]}
        if images and i % 4 == 0:  # some as .npy files beside the data, the rest inline
            np.save(d / f"feature{seed}_{i}.npy", feature)
            record["image"] = f"feature{seed}_{i}.npy"
        elif images:
            record["image"] = feature.tolist()
        records.append(record)
    return records


def first_answer_accuracy(task, out, records, image_dim):
    """Greedy first answer token against the expected colour (the one token that carries the answer)."""
    model, tok = checkpoint.load_llama(task / "ckpt", adapter_path=out / "adapter.pth", device=DEVICE, adapter_layer=2,
                                      adapter_len=3, image_dim=image_dim)
    prompt = tok.encode(lladapter.format_prompt(records[0]["instruction"]), bos=True, eos=False)
    image = torch.stack([cli.load_image_feature(r["image"], out.parent, 16, "test") for r in records])
    answers = generation.generate(model, [prompt] * len(records), 1, 0, eos_id=tok.eos_id,
                                 image=image.to(DEVICE) if image_dim else None)
    return sum(tok.decode(a) == r["output"] for a, r in zip(answers, records)) / len(records)


# ---- adapter files: K and L from the file -----------------------------------------------------------------

def generate_answers(task, adapter, *args):
    """generate.py's stdout for two prompts, greedy, given only the base and the adapter file (and `args`)."""
    code, stdout, stderr = run_generate(task, "--temperature=0", "--max_gen_len=8", "--prompt=Which colour is the owl?",
                                        "--prompt=Which colour is the emu?", *args, adapter=adapter)
    assert code == 0, stderr
    return stdout


def script_error(monkeypatch, script, *args):
    """The InputError that `script` stops with, run in this process: no second torch import to wait for. (That the
    scripts turn it into one line and exit status 1 is checked with real processes below.)"""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its own: ours comes back after
    with pytest.raises(InputError) as error:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)
