"""Slow tier: zero-initialized attention beyond LLaMA (walkthrough/beyond.py): the encoders' own gated attention is
the fast tier's literal Eq. 7, zero gates give exactly the frozen encoders, the prompts learn only once a gate
moves, and the study's smoke run works end to end and twice to the same numbers."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures import ROOT
from test_lladapter import eq7_reference  # the paper's Eq. 7, written literally (causal and rotary turned off here)
from walkthrough.beyond_models import GATE_VARIANTS, Encoder, adapt, gates_of

K, L = 3, 2


def encoder(kind, seed=0):
    torch.manual_seed(seed)
    return Encoder(kind, dim=32, n_layers=3, n_heads=4, positions=1 + 36 if kind == "image" else 16, vocab_size=50,
                   pad_id=0)


def inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return torch.randint(0, 256, (2, 3, 24, 24), generator=g, dtype=torch.uint8)
    ids = torch.randint(1, 50, (2, 12), generator=g)
    ids[1, 8:] = 0  # padding: the mask path too
    return ids


def adapted(kind, method, seed=0):
    model = encoder(kind)
    trainable = adapt(model, method, K, L, torch.Generator().manual_seed(seed))
    return model, trainable


@pytest.mark.parametrize("kind", ["image", "text"])
def test_zero_gates_give_exactly_the_frozen_encoder(kind):
    x = inputs(kind)
    with torch.no_grad():
        frozen = encoder(kind)(x)
        model, _ = adapted(kind, "zero_init")
        assert torch.equal(model(x), frozen), "zero-init: with its gates at 0 the encoder is exactly the frozen one"
        for layer in model.layers[-L:]:
            layer.attention.gate.fill_(0.5)
        assert not torch.allclose(model(x), frozen, atol=1e-4), "an open gate lets the prompts in"
        for method in ("ungated", "random_gate", "gate_one"):  # the others change the encoder from the start
            assert not torch.allclose(adapted(kind, method)[0](x), frozen, atol=1e-4), method
        assert torch.equal(adapted(kind, "linear_gate")[0](x), frozen)  # also 0 at 0


@pytest.mark.parametrize("kind", ["image", "text"])
def test_prompts_get_no_gradient_until_a_gate_moves(kind):
    model, trainable = adapted(kind, "zero_init")
    head = torch.nn.Linear(32, 5)
    optimizer = torch.optim.SGD(trainable + list(head.parameters()), lr=0.5)
    x, y = inputs(kind), torch.tensor([1, 3])

    def step():
        optimizer.zero_grad()
        F.cross_entropy(head(model(x)[:, 0]), y).backward()
        return model.prompts.grad.clone(), [layer.attention.gate.grad for layer in model.layers[-L:]]

    prompt_grad, gate_grads = step()
    assert torch.count_nonzero(prompt_grad) == 0, "at step 0 the prompts' gradient is times tanh(0) = 0"
    assert all(torch.count_nonzero(g) == g.numel() for g in gate_grads), "every gate gets a gradient at step 0"
    optimizer.step()
    prompt_grad, _ = step()
    assert torch.count_nonzero(prompt_grad) > 0.9 * prompt_grad.numel(), "once the gates moved, the prompts learn"
    # the frozen layers below the prompts build no graph, and only the prompts and gates of the top L layers train
    assert all(not p.requires_grad for layer in model.layers[:-L] for p in layer.parameters())
    assert {id(p) for p in trainable} == {id(model.prompts)} | {id(layer.attention.gate) for layer in model.layers[-L:]}


@pytest.mark.parametrize("kind", ["image", "text"])
def test_gated_attention_is_the_papers_eq7_and_not_one_softmax(kind):
    model, _ = adapted(kind, "zero_init")
    attention = model.layers[-1].attention
    with torch.no_grad():
        attention.gate.uniform_(-1.5, 1.5)  # as after some training
        x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
        prompt = model.prompts[-1]  # the last layer's K prompts
        ours = attention(x, prompt)
        torch.testing.assert_close(ours, eq7_reference(attention, x, prompt, causal=False, rotary=False),
                                   rtol=1e-5, atol=1e-5)
        attention.one_softmax = True  # ungated prompts: one softmax over [prompts; tokens], a different equation
        assert not torch.allclose(attention(x, prompt), eq7_reference(attention, x, prompt, causal=False,
                                                                       rotary=False), atol=1e-3)


def test_gate_variants_start_and_train_as_named():
    for method in GATE_VARIANTS:
        model, trainable = adapted("image", method)
        gates = torch.tensor(gates_of(model))  # scale(gate) per adapted layer and head
        expected = {"zero_init": "zero", "linear_gate": "zero", "gate_one": "one", "random_gate": "random"}[method]
        if expected == "zero":
            assert torch.count_nonzero(gates) == 0, method
        elif expected == "one":
            assert torch.equal(gates, torch.ones_like(gates)) and len(trainable) == 1, "fixed at 1, not trained"
        else:
            assert gates.abs().min() > 0 and torch.equal(gates, torch.tensor(gates_of(adapted("image", method, 7)[0])))
    assert gates_of(adapted("image", "ungated")[0]) is None


def quick(out, *args):
    result = subprocess.run([sys.executable, "-m", "walkthrough.beyond", "--quick", f"--out_dir={out}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def numbers(out):
    """Every run's scores, learning rate and gates, without its times."""
    runs = {}
    for path in sorted((out / "runs").rglob("*.json")):
        r = json.loads(path.read_text())
        runs[str(path.relative_to(out))] = {k: r[k] for k in ("val", "test", "gates", "loss_last", "trainable")}
    return runs


def test_quick_study_runs_every_miniature_and_twice_gives_the_same_numbers(tmp_path):
    stdout = quick(tmp_path / "a")
    assert "NUMBERS MEAN NOTHING" in stdout and "numbers mean nothing" in stdout
    markdown = (tmp_path / "a" / "beyond.md").read_text()
    for heading in ("## Vision", "## Language", "## Vision and language"):
        assert heading in markdown, heading
    for row in ("| full fine-tuning |", "| ungated prompts |", "| zero-init gated prompts (the paper) |",
                "| random-init gate |", "| gate fixed at 1 |", "| gate without tanh (0 at 0) |", "paper: mean",
                "paper: CoNLL03 F1", "| zero-shot", "HM"):
        assert row in markdown, row
    svg = ET.parse(tmp_path / "a" / "beyond-llama.svg").getroot()  # well-formed
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert len([e for e in svg.iter() if e.get("class") == "gate-cell"]) > 0
    first = numbers(tmp_path / "a")
    assert any("zero_shot" in k for k in first) and any("random_probe" in k for k in first)
    # a second command finds every run finished and reuses it; a fresh folder retrains to the same numbers
    quick(tmp_path / "a", "--only=text")
    assert numbers(tmp_path / "a") == first
    quick(tmp_path / "b")
    assert numbers(tmp_path / "b") == first, "the same command twice gives the same numbers"


def test_beyond_help_and_a_wrong_setting_is_one_line():
    result = subprocess.run([sys.executable, "-m", "walkthrough.beyond", "--help"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--only" in result.stdout and "--quick" in result.stdout
    result = subprocess.run([sys.executable, "-m", "walkthrough.beyond", "--only=audio"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1
