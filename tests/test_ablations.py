"""Slow tier: the walkthrough's world and the ablations in miniature (walkthrough/): each variant changes exactly what it
claims, and the command runs end to end."""
import json
import math
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import generation
import lladapter
import tokenizer as tokenizers

from walkthrough import world
from walkthrough.ablations import VARIANTS, base_qa, base_questions, kl_from_base
from tests.fixtures import ROOT, DEVICE, tiny_model, base_copy, tokens, cached_logits
from test_lladapter import eq7_reference  # the paper's Eq. 7, written literally, that the variants are held to

# ---- the paper's ablations in miniature (walkthrough/ablations.py) -----------------------------------------

def variant_model(name, **overrides):
    model = tiny_model(**overrides)  # random prompts, zero gates, as load_llama gives train.py
    VARIANTS[name](model)
    return model


def last_layer_input(model, seqlen=9):
    x = torch.randn(2, seqlen, model.args.dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    return x, model.adapter_query.weight[-model.args.adapter_len:]  # the last layer's K prompts


def test_zero_init_is_exactly_the_base_model_at_step_0_and_the_other_variants_are_not():
    x = tokens()
    with torch.no_grad():
        base = base_copy(tiny_model())(x)
        assert torch.equal(variant_model("zero_init")(x), base)
        for name in ("random_init", "no_gate", "prefix"):
            assert not torch.allclose(variant_model(name)(x), base, atol=1e-3), name


def test_only_zero_init_gives_the_prompts_no_gradient_at_step_0():
    # The paper's point: with closed gates the random prompts can't disturb the start; every other variant lets
    # them in (and so learns from them) at once.
    x = tokens()
    for name in VARIANTS:
        model = variant_model(name)
        lladapter.mark_only_adapter_trainable(model)
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        assert (model.adapter_query.weight.grad.abs().sum() == 0) == (name == "zero_init"), name


def test_random_init_draws_the_same_gates_every_time_from_its_own_generator():
    first, second = variant_model("random_init", seed=0), variant_model("random_init", seed=1)
    gates = [torch.cat([gate.flatten() for gate in m.gates()])
             for m in (first, second)]
    assert torch.equal(gates[0], gates[1])  # whatever torch's global seed (which drew different prompts)
    assert not torch.equal(first.adapter_query.weight, second.adapter_query.weight)
    assert gates[0].abs().min() > 0 and isinstance(first.layers[-1].attention.gate, torch.nn.Parameter)


def test_no_gate_adds_the_prompt_branch_at_weight_one_and_trains_the_prompts_alone():
    model = variant_model("no_gate")
    attn, a = model.layers[-1].attention, model.args
    x, prompt = last_layer_input(model)
    with torch.no_grad():
        ours = attn(x, None, model.rope[:9], prompt=prompt[None])
    assert torch.equal(torch.tanh(attn.gate), torch.ones(1, a.n_heads, 1, 1))  # eq7_reference reads tanh(gate) = 1
    torch.testing.assert_close(ours, eq7_reference(attn, x, prompt), rtol=1e-5, atol=1e-5)
    lladapter.mark_only_adapter_trainable(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_query.weight": a.adapter_layer * a.adapter_len * a.dim}  # the gates are gone
    assert set(lladapter.adapter_state_dict(model)) == {"adapter_query.weight"}


def prefix_reference(attn, x, prompt):
    """Prefix tuning as written: scores q [pk; k]^T / sqrt(head_dim) over [prompt; words] and ONE softmax, every
    position seeing all K prompts and the words causally; rotary embeddings in Meta's complex form on q and k (the
    prompts have no position); kv heads repeated for grouped-query attention; no gate."""
    bsz, n, _ = x.shape
    H, Hkv, d, K = attn.n_heads, attn.n_kv_heads, attn.head_dim, prompt.shape[0]
    q = (x @ attn.wq.weight.T).view(bsz, n, H, d)
    k = (x @ attn.wk.weight.T).view(bsz, n, Hkv, d)
    v = (x @ attn.wv.weight.T).view(bsz, n, Hkv, d)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    rot = torch.polar(torch.ones(n, d // 2), torch.outer(torch.arange(n).float(), freqs))  # (n, d/2) complex
    q = torch.view_as_real(torch.view_as_complex(q.reshape(bsz, n, H, d // 2, 2)) * rot[:, None]).flatten(-2)
    k = torch.view_as_real(torch.view_as_complex(k.reshape(bsz, n, Hkv, d // 2, 2)) * rot[:, None]).flatten(-2)
    pk, pv = (prompt @ attn.wk.weight.T).view(K, Hkv, d), (prompt @ attn.wv.weight.T).view(K, Hkv, d)
    keys = torch.cat([pk.expand(bsz, K, Hkv, d), k], dim=1).repeat_interleave(H // Hkv, dim=2)  # (bsz, K + n, H, d)
    values = torch.cat([pv.expand(bsz, K, Hkv, d), v], dim=1).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(d)  # (bsz, H, n, K + n)
    seen = torch.cat([torch.ones(n, K, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], dim=1)
    weights = scores.masked_fill(~seen, float("-inf")).softmax(-1)  # one softmax over [prompt; words]
    out = torch.einsum("bhqk,bkhd->bqhd", weights, values).reshape(bsz, n, H * d)
    return out @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_prefix_variant_is_one_softmax_over_prompts_and_words(n_kv_heads):
    model = variant_model("prefix", n_kv_heads=n_kv_heads)
    attn = model.layers[-1].attention
    x, prompt = last_layer_input(model)
    with torch.no_grad():
        ours = attn(x, None, model.rope[:9], prompt=prompt[None])
        torch.testing.assert_close(ours, prefix_reference(attn, x, prompt), rtol=1e-5, atol=1e-5)
        # not Eq. 7 with the gate at 1: in one softmax the prompts take attention from the words
        assert not torch.allclose(ours, eq7_reference(attn, x, prompt), atol=1e-3)
    lladapter.mark_only_adapter_trainable(model)
    assert not any(name.endswith(".gate") for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_prefix_variant_decodes_through_the_kv_cache_to_its_full_forward(n_kv_heads):
    model = variant_model("prefix", n_kv_heads=n_kv_heads)
    x = tokens(seqlen=20)
    with torch.no_grad():
        full = model(x)
    for chunks in ([1] * 20, [4, 6, 1, 9]):  # one token at a time; a prefill, then chunks of several
        torch.testing.assert_close(cached_logits(model, x, chunks), full, rtol=1e-4, atol=1e-4)
    # and greedy generation, whose positions come as a tensor, picks the full forward's argmax at every step
    prompt = x[0, :6].tolist()
    out = generation.generate(model, [prompt], max_gen_len=8, temperature=0)[0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1].argmax(-1)
    assert out == expected.tolist()


# ---- retention: the base's own behaviour with the adapter attached -----------------------------------------

def small_world_docs():
    from walkthrough import world as wt
    return wt.corpus_docs(wt.make_world(random.Random(0), 3))


def test_base_questions_are_the_corpus_own_q_and_a():
    from walkthrough import world as wt
    questions = base_questions(small_world_docs())
    assert len(questions) == 3 * len(wt.ATTRIBUTES)  # every creature and attribute
    for question, answer in questions:
        assert question.startswith("Q: ") and question.endswith("?\nA:") and answer.endswith(".")
        assert f"{question} {answer}" in small_world_docs()  # prompt + " " + answer is the document itself


def test_retention_probes_give_exactly_the_base_numbers_with_gates_closed(spm_tokenizer):
    # The zero-init property, as the probes see it: with every gate at 0 the adapted model's KL from the base is
    # exactly 0 and its answers to the base's questions are the base's own, however far the gates had opened.
    tokenizer = tokenizers.SentencePieceTokenizer(spm_tokenizer)
    model = tiny_model(open_gates=True, max_seq_len=256)
    base, docs = base_copy(model), small_world_docs()
    questions = base_questions(docs)
    with lladapter.gates_closed(model):
        assert kl_from_base(model, base, tokenizer, docs) == 0.0
        assert base_qa(model, tokenizer, questions) == base_qa(base, tokenizer, questions)
    assert kl_from_base(model, base, tokenizer, docs) > 0  # open gates move it


def test_a_variant_that_moves_the_base_at_step_0_has_kl_above_0_and_zero_init_exactly_0(spm_tokenizer):
    tokenizer, docs = tokenizers.SentencePieceTokenizer(spm_tokenizer), small_world_docs()
    for name in VARIANTS:
        model = variant_model(name, max_seq_len=256)
        kl = kl_from_base(model, base_copy(tiny_model(max_seq_len=256)), tokenizer, docs)
        assert (kl == 0.0) == (name == "zero_init") and kl >= 0, (name, kl)


def test_quick_ablations_run_every_variant_and_write_the_table_and_the_figure(tmp_path):
    # two runs at a time, on one thread each, as --jobs=2 promises (and CI's two cores finish sooner)
    result = subprocess.run([sys.executable, "-m", "walkthrough.ablations", "--quick", "--jobs=2",
                             f"--out_dir={tmp_path / 'abl'}", f"--walkthrough_dir={tmp_path / 'walk'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "abl" / "ablations.json").read_text())["rows"]}
    expected = (["base model alone", "zero_init (the paper)", "random_init", "no_gate", "prefix"] +
                [f"L={n}" for n in (1, 2, 3)] + ["L=4 (zero_init)"] +
                [f"K={n}" for n in (2, 5, 10)] + ["K=20 (zero_init)"])
    assert list(rows) == expected
    markdown = (tmp_path / "abl" / "ablations.md").read_text()
    assert all(f"| {name} |" in markdown for name in expected)
    full = {name: row["full"] for name, row in rows.items()}
    assert full["zero_init (the paper)"]["loss_at_0"] == full["base model alone"]["loss_at_0"]  # gates at 0: the base
    assert full["random_init"]["loss_at_0"] != full["base model alone"]["loss_at_0"]
    # the gates go from the trainable count with no_gate and prefix: as many as the walkthrough's model has
    model, _ = checkpoint.load_llama(world.paths(tmp_path / "walk", smoke=True)["ckpt_dir"], device="cpu",
                                     adapter_len=world.SETTINGS["adapter_len"],
                                     adapter_layer=world.SETTINGS["adapter_layer"])
    n_gates = sum(gate.numel() for gate in model.gates())
    assert full["zero_init (the paper)"]["trainable"] - full["no_gate"]["trainable"] == n_gates
    assert full["prefix"]["trainable"] == full["no_gate"]["trainable"]
    assert full["L=1"]["trainable"] * 4 == full["L=4 (zero_init)"]["trainable"]
    svg = ET.parse(tmp_path / "abl" / "ablations.svg").getroot()  # well-formed XML
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    curves = [e.get("id") for e in svg.iter() if e.get("class") == "loss-curve"]
    assert sorted(curves) == sorted(f"loss-{name}" for name in VARIANTS)
    assert len([e for e in svg.iter() if e.get("class") == "gate-curve"]) == 4  # one per adapted layer
    assert "z zero_init" in result.stdout and "wall time" in result.stdout
    # retention, probed at step 0, on the way and at the end; zero_init starts as exactly the base
    assert "| base Q/A at step 0 | KL at step 0 |" in markdown and "base Q/A (named), 2 epochs" in markdown
    assert full["zero_init (the paper)"]["at_0"]["kl"] == 0.0
    assert full["zero_init (the paper)"]["at_0"]["qa_exact_match"] == full["base model alone"]["qa_exact_match"]
    assert full["no_gate"]["at_0"]["kl"] > 0 and full["no_gate"]["kl"] > 0
    probes = json.loads((tmp_path / "abl" / "ablations.json").read_text())["curves"]["probes"]
    steps = [p["step"] for p in probes["zero_init"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) > 2  # step 0, the probe steps, the end
    assert sorted(e.get("id") for e in svg.iter() if e.get("class") == "retention-curve") == \
        sorted(f"retention-{name}" for name in VARIANTS)
    # the seed study: seed 0 is the runs above (reused, not trained again), seed 1 is new
    result = subprocess.run([sys.executable, "-m", "walkthrough.ablations", "--quick", "--seeds=2", "--jobs=2",
                             f"--out_dir={tmp_path / 'abl'}", f"--walkthrough_dir={tmp_path / 'walk'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    study = json.loads((tmp_path / "abl" / "seeds.json").read_text())
    assert study["seeds"] == [0, 1] and set(study["runs"]) == set(VARIANTS)
    assert study["runs"]["zero_init"][0]["kl"] == full["zero_init (the paper)"]["kl"]  # seed 0: the same run
    assert study["runs"]["zero_init"][0]["kl"] != study["runs"]["zero_init"][1]["kl"]  # seed 1: another
    assert "zero_init better than random_init" in (tmp_path / "abl" / "seeds.md").read_text()


def test_ablations_help_lists_the_settings_and_a_wrong_one_is_one_line():
    result = subprocess.run([sys.executable, "-m", "walkthrough.ablations", "--help"], cwd=ROOT, capture_output=True,
                            text=True)
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "--quick, --no-quick" in text and "(default: 5)" in text, text
    result = subprocess.run([sys.executable, "-m", "walkthrough.ablations", "--epochs=3"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: unrecognized arguments: --epochs=3")
    for wrong in ("--seeds=0", "--seeds=two"):  # refused before anything is built
        result = subprocess.run([sys.executable, "-m", "walkthrough.ablations", wrong], cwd=ROOT,
                                capture_output=True, text=True)
        assert result.returncode == 1 and result.stderr.startswith("error:") and "seeds" in result.stderr, wrong
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the walkthrough --------------------------------------------------------------------------------------

def test_walkthrough_heldout_answers_are_in_the_corpus_and_not_in_the_adapters_data(tmp_path):
    from walkthrough import world as wt
    world = wt.make_world(random.Random(wt.SEED), wt.PRETRAIN["n_creatures"])
    heldout, seen = world[:wt.PRETRAIN["n_heldout"]], world[wt.PRETRAIN["n_heldout"]:]
    corpus = "\n".join(wt.corpus_docs(world))
    adapter_data = json.dumps(wt.instructions(seen))
    for creature in heldout:
        assert creature["name"] not in adapter_data  # the adapter never hears of it
        for attribute in wt.ATTRIBUTES:  # but the base read every fact about it
            assert f"The {creature['name']} {wt.FACT[attribute].format(value=creature[attribute])}." in corpus


def test_walkthrough_smoke_runs_end_to_end_and_again_to_the_same_log(tmp_path):
    # The first run builds the world and the base model; the second reuses them and must train identically.
    import sys
    out = tmp_path / "walk"
    runs, logs = [], []
    for _ in range(2):
        runs.append(subprocess.run([sys.executable, "train.py", "--smoke", f"--out_dir={out}", f"--device={DEVICE}"],
                                   cwd=ROOT, capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}))
        assert runs[-1].returncode == 0, runs[-1].stderr
        logs.append((out / "log.jsonl").read_text())
    for line in ["pretraining step 20/20", "saved the base model", "step 10/10", "base model alone:", "base + adapter:"]:
        assert line in runs[0].stdout, line
    assert "reusing the base model" in runs[1].stdout
    counts = re.search(r"trainable: ([\d,]+) of ([\d,]+)", runs[0].stdout).groups()
    trainable, total = (int(c.replace(",", "")) for c in counts)
    assert 0 < trainable < 0.02 * total, "the adapter is a small fraction of the model"
    assert logs[0] == logs[1], "the same command twice gives the same numbers"
    base = world.paths(out, smoke=True)["ckpt_dir"]  # the base every smoke run beside `out` shares
    assert {p.name for p in Path(base).iterdir()} == {"consolidated.00.pth", "params.json", "tokenizer.model"}
    model, _ = checkpoint.load_llama(base, adapter_path=out / "adapter.pth", device="cpu")  # K, L: the file
    assert model.args.dim == 128 and model.args.vocab_size == 512
