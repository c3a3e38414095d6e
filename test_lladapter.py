"""Tests for lladapter: each one checks a claim of the paper or of SPEC.md on a tiny seeded model.

Run: python -m pytest -q test_lladapter.py
Tests read the adapter's shapes (gate, K, L) from the model, so a change to one of them fails only the tests of
the property it breaks, with a message naming it. LLADAPTER_TEST_DEVICE=cuda runs the in-process model tests on
a GPU (gpu_check.py does).
"""
import io
import json
import math
import os
import pickle
import random
import re
import runpy
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import checkpoint
import cli
import lladapter
from data.ablations import VARIANTS
from lladapter import InputError, ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "llama2-tokenizer.model"
VOCAB = 96
DEVICE = os.environ.get("LLADAPTER_TEST_DEVICE", "cpu")


def tiny_args(**overrides):
    args = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=None, vocab_size=VOCAB, multiple_of=32, norm_eps=1e-5,
                max_seq_len=64, adapter_len=3, adapter_layer=2)
    return ModelArgs(**{**args, **overrides})


def tiny_model(seed=0, open_gates=False, **overrides):
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides)).to(DEVICE)
    if open_gates:  # as after some training: every head's gate somewhere in (-1, 1)
        with torch.no_grad():
            for layer in model.layers[model.first_adapted:]:
                layer.attention.gate.uniform_(-1.5, 1.5)
    return model


def gates(model):
    return [layer.attention.gate for layer in model.layers[model.first_adapted:]]


def base_copy(model):
    """The same weights in a plain LLaMA (adapter_layer=0), loaded strictly."""
    base = Transformer(ModelArgs(**{**vars(model.args), "adapter_layer": 0})).to(DEVICE)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)})
    return base


def adapter_tensors(path):
    """The tensors of an adapter file, without the config that describes them."""
    return {k: v for k, v in torch.load(path).items() if k != "adapter_config"}


def tokens(bsz=2, seqlen=12, seed=1):
    return torch.randint(3, VOCAB, (bsz, seqlen), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def cached_logits(model, toks, chunks):
    """Logits from feeding `toks` through the KV cache in chunks of the given lengths."""
    model.setup_cache(toks.shape[0], toks.shape[1])
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(toks[:, pos:pos + n], start_pos=pos))
            pos += n
    model.clear_cache()
    return torch.cat(out, dim=1)


# How Meta's model-parallel checkpoints split each tensor (SPEC.md section 1); norms are replicated.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta_checkpoint(model, ckpt_dir, n_shards=1, vocab_size=None):
    """Write `model`'s base weights in Meta's layout, split into model-parallel shards as Meta splits them."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)}
    for rank in range(n_shards):
        shard = {}
        for key, tensor in state.items():
            dim = META_SPLIT.get(key.split(".")[-2])
            shard[key] = (tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank]).cpu().clone()
        shard["rope.freqs"] = torch.randn(8)  # Meta's files carry this table; it is not a weight
        torch.save(shard, ckpt_dir / f"consolidated.{rank:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, multiple_of=a.multiple_of, norm_eps=a.norm_eps,
                  vocab_size=a.vocab_size if vocab_size is None else vocab_size)
    if a.n_kv_heads:
        params["n_kv_heads"] = a.n_kv_heads
    (ckpt_dir / "params.json").write_text(json.dumps(params))


def train_tokenizer(text_path, model_prefix, **options):
    """A SentencePiece model of VOCAB pieces with LLaMA's special ids, trained in a second."""
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_path), model_prefix=str(model_prefix), vocab_size=VOCAB, model_type="bpe",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, **options)


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """A SentencePiece model with exactly VOCAB pieces, trained in a second on text written here."""
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    (d / "text.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)))
    train_tokenizer(d / "text.txt", d / "tokenizer")
    return d / "tokenizer.model"


# ---- the paper's claims ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_zero_gates_give_exactly_the_base_model(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)  # fresh: random prompts, zero gates
    base = base_copy(model)
    x = tokens()
    zero_init = "zero-init attention: with its gates at 0 the adapted model must be exactly the base model"
    with torch.no_grad():
        assert torch.equal(model(x), base(x)), zero_init
    chunks = [5, 1, 1, 1, 4]  # a prefill, single tokens, and a later multi-token chunk
    assert torch.equal(cached_logits(model, x, chunks), cached_logits(base, x, chunks)), zero_init + ", decoding too"
    opened = tiny_model(open_gates=True, n_kv_heads=n_kv_heads)
    with lladapter.gates_closed(opened), torch.no_grad():  # closing an adapter's gates gives the base model back
        assert torch.equal(opened(x), base(x)), zero_init
    with torch.no_grad():  # and reopens them afterwards
        assert not torch.allclose(opened(x), base(x))
    with torch.no_grad():  # and the prompts do matter once a gate opens
        gates(model)[-1].fill_(0.5)
        assert not torch.allclose(model(x), base(x)), "an open gate must let the prompts change the output"


def test_only_the_adapter_trains_and_its_size_matches_the_formula():
    for L, K, C, H in [(2, 3, 64, 4), (4, 5, 32, 2), (1, 1, 64, 8)]:
        model = tiny_model(adapter_layer=L, adapter_len=K, dim=C, n_heads=H)
        lladapter.mark_only_adapter_trainable(model)
        trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        assert set(trainable) == {"adapter_query.weight"} | {f"layers.{i}.attention.gate" for i in range(4 - L, 4)}, \
            "only the prompts and the gates of the top L layers train"
        assert sum(trainable.values()) == L * K * C + L * H, \
            "the paper's count: K prompt vectors of width C for each of L layers, and one gate per head per layer"
    with torch.device("meta"):  # LLaMA-7B's shapes, no memory
        model = Transformer(ModelArgs(vocab_size=32000))  # defaults: 7B, K=10, L=30
    lladapter.mark_only_adapter_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == 30 * 10 * 4096 + 30 * 32 == 1_229_760, "the paper's 1.2M trainable parameters at 7B"
    assert total - trainable == 6_738_415_616, "LLaMA-7B as published"
    print(f"LLaMA-7B's shapes, K=10, L=30: {trainable:,} trainable of {total:,} parameters")  # shown with -s


def test_a_7b_adapter_file_is_about_4_7_mib(tmp_path):
    with torch.device("meta"):  # LLaMA-7B's shapes; only the adapter's tensors get real memory below
        model = Transformer(ModelArgs(vocab_size=32000))
    model.adapter_query.to_empty(device="cpu")
    for layer in model.layers[model.first_adapted:]:
        layer.attention.gate = torch.nn.Parameter(torch.empty_like(layer.attention.gate, device="cpu"))
    model.reset_adapter()
    checkpoint.save_adapter(model, tmp_path / "adapter.pth")  # what train.py writes
    size = (tmp_path / "adapter.pth").stat().st_size
    assert 1_229_760 * 4 < size < 1_229_760 * 4 + 64 * 1024  # the fp32 values and a little pickle
    assert 4.69 < size / 2**20 < 4.76, "the paper's 4.7 MB adapter file at 7B"
    print(f"LLaMA-7B's adapter file: {size:,} bytes ({size / 2**20:.2f} MiB)")  # shown with -s


def test_bottom_layers_build_no_graph_in_adapter_training():
    model = tiny_model()
    lladapter.mark_only_adapter_trainable(model)
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, inp, out: seen.append(out.requires_grad))
    model(tokens()).sum().backward()
    assert seen == [i >= model.first_adapted for i in range(model.args.n_layers)]


def test_prompt_gradient_is_zero_at_init_and_flows_after_one_step():
    model = tiny_model()
    lladapter.mark_only_adapter_trainable(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = tokens(seqlen=16)

    def loss_and_grads():
        optimizer.zero_grad()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
        return model.adapter_query.weight.grad, [gate.grad for gate in gates(model)]

    prompt_grad, gate_grads = loss_and_grads()
    assert torch.count_nonzero(prompt_grad) == 0, "zero-init: at step 0 the prompt's gradient is times tanh(0) = 0"
    assert all(torch.count_nonzero(g) == g.numel() for g in gate_grads), "at step 0 every gate gets a gradient"
    optimizer.step()
    with torch.no_grad():  # an evaluation pass in between must not break the next training step
        model(x)
    prompt_grad, _ = loss_and_grads()  # step 2: the gates are open, the prompt learns
    assert torch.count_nonzero(prompt_grad) > 0.9 * prompt_grad.numel(), "from step 2 on, the prompts learn"
    optimizer.step()
    lladapter.generate(model, [[1, 5, 7]], max_gen_len=3, temperature=0, eos_id=2)  # nor must a generation
    after_generation, _ = loss_and_grads()
    assert torch.count_nonzero(after_generation) > 0.9 * prompt_grad.numel()
    assert not torch.equal(after_generation, prompt_grad)  # computed from the updated prompt, not a stale copy


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_cached_decoding_matches_full_forward(n_kv_heads):
    model = tiny_model(open_gates=True, n_kv_heads=n_kv_heads)
    x = tokens(seqlen=20)
    with torch.no_grad():
        full = model(x)
    for chunks in ([1] * 20, [7] + [1] * 13, [4, 6, 1, 9]):
        torch.testing.assert_close(cached_logits(model, x, chunks), full, rtol=1e-4, atol=1e-4)


def test_logits_at_selects_positions_of_the_full_forward():
    model = tiny_model(open_gates=True)
    x = tokens(seqlen=10)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.4).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_at=mask), model(x)[mask], rtol=1e-5, atol=1e-5)
    assert model(x, logits_at=mask).shape == (int(mask.sum()), VOCAB)


def eq7_reference(attn, x, prompt, prompt_scale=None):
    """Paper Eq. 7 as written: scores over [prompt; words], each part softmaxed alone, the prompt part scaled by
    tanh(gate); rotary embeddings in Meta's complex form; kv heads repeated for grouped-query attention."""
    bsz, n, _ = x.shape
    H, Hkv, d, K = attn.n_heads, attn.n_kv_heads, attn.head_dim, prompt.shape[0]
    q = (x @ attn.wq.weight.T).view(bsz, n, H, d)
    k = (x @ attn.wk.weight.T).view(bsz, n, Hkv, d)
    v = (x @ attn.wv.weight.T).view(bsz, n, Hkv, d)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    rot = torch.polar(torch.ones(n, d // 2, device=x.device), torch.outer(torch.arange(n, device=x.device).float(), freqs))
    q = torch.view_as_real(torch.view_as_complex(q.reshape(bsz, n, H, d // 2, 2)) * rot[:, None]).flatten(-2)
    k = torch.view_as_real(torch.view_as_complex(k.reshape(bsz, n, Hkv, d // 2, 2)) * rot[:, None]).flatten(-2)
    pk = (prompt @ attn.wk.weight.T).view(K, Hkv, d)  # no rotation: prompts have no position
    pv = (prompt @ attn.wv.weight.T).view(K, Hkv, d)
    keys = torch.cat([pk.expand(bsz, K, Hkv, d), k], dim=1).repeat_interleave(H // Hkv, dim=2)
    values = torch.cat([pv.expand(bsz, K, Hkv, d), v], dim=1).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(d)  # (bsz, H, n, K + n)
    if prompt_scale is not None:  # to show that a wrong scale would be caught
        scores[..., :K] *= prompt_scale * math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    word_scores = scores[..., K:].masked_fill(~causal, float("-inf"))
    gate = torch.tanh(attn.gate)  # one per head, broadcast over the batch and positions
    weights = torch.cat([gate * scores[..., :K].softmax(-1), word_scores.softmax(-1)], dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, values).reshape(bsz, n, H * d)
    return out @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_attention_matches_paper_eq7(n_kv_heads):
    model = tiny_model(open_gates=True, n_kv_heads=n_kv_heads)
    attn = model.layers[-1].attention
    x = torch.randn(2, 9, model.args.dim, device=DEVICE)
    prompt = model.adapter_query.weight[-model.args.adapter_len:]  # the last layer's K prompts
    with torch.no_grad():
        ours = attn(x, torch.arange(9, device=DEVICE), model.rope[:9], prompt=prompt[None])
        torch.testing.assert_close(ours, eq7_reference(attn, x, prompt), rtol=1e-5, atol=1e-5, msg=lambda m: (
            "paper Eq. 7: two separate softmaxes, the prompt part times tanh(gate), prompt keys not rotated, "
            "scores over sqrt(head_dim)\n" + m))
        # the prompt scores are scaled by 1/sqrt(head_dim); 1/sqrt(dim), a bug peers shipped, would differ
        wrong = eq7_reference(attn, x, prompt, prompt_scale=1 / math.sqrt(model.args.dim))
    assert not torch.allclose(ours, wrong, atol=1e-3)


# ---- loading Meta checkpoints and adapter files -----------------------------------------------------------

@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_meta_checkpoint_in_one_or_two_shards_loads_to_identical_logits(tmp_path, spm_tokenizer, n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    x = tokens()
    with torch.no_grad():
        expected = base_copy(model)(x)
    logits = []
    for n_shards in (1, 2):
        ckpt = tmp_path / f"mp{n_shards}"
        write_meta_checkpoint(model, ckpt, n_shards, vocab_size=-1)  # -1: taken from the tokenizer, as in LLaMA
        loaded, tokenizer = checkpoint.load_llama(ckpt, tokenizer_path=spm_tokenizer, device=DEVICE,
                                                 max_seq_len=64, adapter_len=3, adapter_layer=2)
        assert loaded.args.vocab_size == tokenizer.n_words == VOCAB
        assert loaded.adapter_query.weight.dtype == torch.float32
        with torch.no_grad():
            logits.append(loaded(x))
    assert torch.equal(logits[0], logits[1])
    assert torch.equal(logits[0], expected), "zero-init: a loaded base with a new adapter is the base model"


def test_corrupted_checkpoint_shape_is_refused_naming_the_tensor(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path)
    shard = torch.load(tmp_path / "consolidated.00.pth")
    shard["layers.1.feed_forward.w3.weight"] = shard["layers.1.feed_forward.w3.weight"][:-1]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(InputError, match=r"layers\.1\.feed_forward\.w3\.weight has shape \[191, 64\].*\[192, 64\]"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, device="cpu", adapter_layer=2, adapter_len=3)


def test_renamed_or_missing_checkpoint_tensor_is_refused_by_name(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path)
    shard = torch.load(tmp_path / "consolidated.00.pth")
    shard["layers.2.attention.wq_renamed.weight"] = shard.pop("layers.2.attention.wq.weight")
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(InputError, match=r"missing \['layers.2.attention.wq.weight'\], "
                                         r"unexpected \['layers.2.attention.wq_renamed.weight'\]"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)
    del shard["layers.2.attention.wq_renamed.weight"]
    torch.save(shard, tmp_path / "consolidated.00.pth")
    with pytest.raises(InputError, match=r"missing \['layers.2.attention.wq.weight'\], unexpected \[\]"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)


def test_missing_checkpoint_files_are_named(tmp_path, spm_tokenizer):
    with pytest.raises(InputError, match="neither Meta's layout .params.json"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer)
    write_meta_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "consolidated.00.pth").unlink()
    with pytest.raises(InputError, match="no consolidated"):
        checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer)
    with pytest.raises(InputError, match="nothere.model: no such tokenizer"):
        checkpoint.load_llama(tmp_path, tokenizer_path=tmp_path / "nothere.model")


def test_adapter_save_and_reload_reproduce_the_logits_exactly(tmp_path):
    model = tiny_model(open_gates=True)
    path = tmp_path / "adapter.pth"
    checkpoint.atomic_save(lladapter.adapter_state_dict(model), path)
    saved = torch.load(path)
    assert set(saved) == {"adapter_query.weight", "layers.2.attention.gate", "layers.3.attention.gate"}
    assert all(v.dtype == torch.float32 for v in saved.values())
    fresh = tiny_model()  # same base weights (same seed), fresh adapter
    x = tokens()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        checkpoint.load_adapter(fresh, path)
        assert torch.equal(fresh(x), model(x))


def test_adapter_in_the_original_layout_with_zero_gates_everywhere_loads(tmp_path):
    model = tiny_model(open_gates=True)
    state = lladapter.adapter_state_dict(model)
    for i in range(model.first_adapted):  # the original's extra, zero gates for the layers it did not adapt
        state[f"layers.{i}.attention.gate"] = torch.zeros_like(state["layers.3.attention.gate"], dtype=torch.float16)
    torch.save(state, tmp_path / "original.pth")
    fresh = tiny_model()
    checkpoint.load_adapter(fresh, tmp_path / "original.pth")
    with torch.no_grad():
        assert torch.equal(fresh(tokens()), model(tokens()))
    state["layers.0.attention.gate"].view(-1)[0] = 0.1  # a gate this model does not have is not silently dropped
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"unexpected \['layers.0.attention.gate'\]"):
        checkpoint.load_adapter(fresh, tmp_path / "bad.pth")


@pytest.mark.parametrize("other", [dict(dim=32), dict(n_heads=2), dict(adapter_len=4), dict(adapter_layer=3)])
def test_adapter_for_another_model_is_refused(tmp_path, other):
    checkpoint.save_adapter(tiny_model(**other), tmp_path / "adapter.pth")  # with its config: the base it was made for
    with pytest.raises(InputError, match="adapter.pth: (it does not fit this model|an adapter for another base)"):
        checkpoint.load_adapter(tiny_model(), tmp_path / "adapter.pth")


def test_full_checkpoint_and_adapter_file_are_not_mistaken_for_each_other(tmp_path, spm_tokenizer):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "full.pth")
    with pytest.raises(InputError, match="a full checkpoint"):
        checkpoint.load_adapter(model, tmp_path / "full.pth")
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(model, ckpt)
    torch.save(lladapter.adapter_state_dict(model), ckpt / "consolidated.00.pth")
    with pytest.raises(InputError, match="an adapter file, not a base checkpoint"):
        checkpoint.load_llama(ckpt, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the pickle ran code"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, spm_tokenizer):
    marker = tmp_path / "pwned"
    evil = {"adapter_query.weight": torch.zeros(6, 64), "x": RunsCodeWhenUnpickled(str(marker))}
    torch.save(evil, tmp_path / "adapter.pth")
    with pytest.raises(InputError, match="refused to unpickle"):
        checkpoint.load_adapter(tiny_model(), tmp_path / "adapter.pth")
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(tiny_model(), ckpt)
    torch.save(evil, ckpt / "consolidated.00.pth")
    with pytest.raises(InputError, match="refused to unpickle"):
        checkpoint.load_llama(ckpt, tokenizer_path=spm_tokenizer, adapter_layer=2, adapter_len=3)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled(str(marker))))  # the payload is real: plain pickle runs it
    assert marker.exists()


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="../shared/llama2-tokenizer.model is not here")
def test_tokenizer_matches_llama2():
    tok = lladapter.Tokenizer(LLAMA2_TOKENIZER)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    text = "Below is an instruction that describes a task.\n\n### Response:"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


# ---- sampling ---------------------------------------------------------------------------------------------

def test_batched_greedy_generation_matches_one_prompt_at_a_time():
    model = tiny_model(open_gates=True, n_kv_heads=2)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 3, 4]]
    batched = lladapter.generate(model, prompts, max_gen_len=10, temperature=0, eos_id=2)
    alone = [lladapter.generate(model, [p], max_gen_len=10, temperature=0, eos_id=2)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 10 for out in alone)  # no EOS drawn here: each ran its full budget


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    model = tiny_model(open_gates=True)
    seq = [1, 5, 9, 14]
    out = lladapter.generate(model, [seq], max_gen_len=8, temperature=0, eos_id=2)[0]
    for _ in range(8):
        with torch.no_grad():
            seq = seq + [model(torch.tensor([seq], device=DEVICE))[0, -1].argmax().item()]
    assert out == seq[4:]


def test_generation_stops_at_eos_and_sampling_is_seeded():
    model = tiny_model(open_gates=True)
    greedy = lladapter.generate(model, [[1, 5, 9]], max_gen_len=6, temperature=0, eos_id=-5)[0]
    first = greedy[2]  # declare the third greedy token EOS: output stops before it
    assert lladapter.generate(model, [[1, 5, 9]], max_gen_len=6, temperature=0, eos_id=first)[0] == greedy[:greedy.index(first)]
    runs = [lladapter.generate(model, [[1, 5, 9]] * 3, max_gen_len=12, temperature=1.0, top_p=0.9, eos_id=-5,
                               generator=torch.Generator(DEVICE).manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {lladapter.sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2 and 3 are never drawn
    assert lladapter.sample_next(logits, 0, 0.75).item() == 0


def test_generation_refuses_a_prompt_longer_than_max_seq_len():
    with pytest.raises(InputError, match="max_seq_len=64"):
        lladapter.generate(tiny_model(), [[1] * 64], max_gen_len=4, eos_id=2)


# ---- the recipe's data side ------------------------------------------------------------------------------

def test_labels_score_exactly_the_response_and_eos(spm_tokenizer):
    tok = lladapter.Tokenizer(spm_tokenizer)
    records = [("abc def", "", "ghi jkl mno"), ("pa po", "ka ki", "no"), ("lo", "", "a b c d e f g h i j k l")]
    examples = [lladapter.encode_example(tok, *r, max_seq_len=512) for r in records]
    batch_tokens, labels = lladapter.pad_batch([(t, l) for t, l, _ in examples])
    for i, (instruction, input, output) in enumerate(records):
        prompt = tok.encode(lladapter.format_prompt(instruction, input), bos=True, eos=False)
        full = tok.encode(lladapter.format_prompt(instruction, input) + output, bos=True, eos=True)
        assert full[:len(prompt)] == prompt and full[0] == tok.bos_id and full[-1] == tok.eos_id
        expected = [-100] * len(prompt) + full[len(prompt):] + [-100] * (labels.shape[1] - len(full))
        assert labels[i].tolist() == expected
        assert batch_tokens[i, :len(full)].tolist() == full
    assert "### Input:\nka ki\n\n### Response:" in lladapter.format_prompt("pa po", "ka ki")
    assert lladapter.format_prompt("lo").endswith("### Instruction:\nlo\n\n### Response:")
    # too long: the response is cut; the prompt alone too long: the example is skipped
    prompt_len = len(tok.encode(lladapter.format_prompt("lo"), bos=True, eos=False))
    t, l, truncated = lladapter.encode_example(tok, *records[2], max_seq_len=prompt_len + 3)
    assert truncated and len(t) == len(l) == prompt_len + 3 and l[-3:] == t[-3:]
    assert lladapter.encode_example(tok, *records[2], max_seq_len=prompt_len) is None


def test_names_moved_out_of_the_model_file_still_import_from_it():
    for name in lladapter.MOVED:
        assert getattr(lladapter, name) is getattr(checkpoint if lladapter.MOVED[name] == "checkpoint" else cli, name)
    with pytest.raises(AttributeError):
        lladapter.no_such_name


def test_overrides_are_type_checked():
    settings = {"lr": 1e-3, "steps": 10, "name": "x", "resume": False, "prompt": []}
    got = cli.parse_overrides(settings, ["--lr=2e-4", "--steps=3", "--resume", "--prompt=a", "--prompt=b=c"])
    assert got == {"lr": 2e-4, "steps": 3, "resume": True, "prompt": ["a", "b=c"]}
    assert cli.parse_overrides(settings, ["--steps", "3", "--name", "y", "--resume"]) == \
        {"steps": 3, "name": "y", "resume": True}  # --key value works as --key=value does
    for bad, message in [(["--stepz=3"], "unknown argument"), (["--steps=1.5"], "expected a int"),
                         (["--resume=maybe"], "expected a bool"), (["steps=3"], "unknown argument"),
                         (["--steps"], "--steps needs a value"), (["--steps", "--lr=1"], "--steps needs a value")]:
        with pytest.raises(InputError, match=message):
            cli.parse_overrides(settings, bad)


@pytest.mark.parametrize("script, setting, comment", [
    ("train.py", "--base_lr=0.009", "the learning rate is base_lr * batch_size / 256"),
    ("generate.py", "--max_batch_size=32", "prompts decoded together")])
def test_help_lists_each_setting_with_its_default_and_comment(monkeypatch, capsys, script, setting, comment):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its own
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert stop.value.code == 0
    assert any(line.split() and line.split()[0] == setting and comment in line for line in lines), lines


def test_bf16_base_on_cpu_keeps_zero_init_exact_and_trains_an_fp32_adapter(tmp_path, spm_tokenizer):
    # The GPU recipe's precision, on a CPU: a bf16 base under bf16 autocast, the adapter fp32.
    write_meta_checkpoint(tiny_model(), tmp_path)
    model, _ = checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, device="cpu", dtype=torch.bfloat16,
                                    adapter_layer=2, adapter_len=3)
    base, _ = checkpoint.load_llama(tmp_path, tokenizer_path=spm_tokenizer, device="cpu", dtype=torch.bfloat16,
                                   adapter_layer=0)
    lladapter.mark_only_adapter_trainable(model)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "the adapter must stay fp32"
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert torch.equal(model(x), base(x)), "zero-init: with closed gates, exactly the base model, in bf16 too"
        optimizer = torch.optim.AdamW(trainable, lr=0.1)
        for _ in range(2):  # step 1 opens the gates; from step 2 the prompts get gradients
            optimizer.zero_grad()
            logits = model(x)
            logits.logsumexp(-1).mean().backward()
            optimizer.step()
    assert logits.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in trainable)
    assert torch.count_nonzero(model.adapter_query.weight.grad) > 0


def test_compiled_decoding_gives_the_tokens_of_eager_decoding():
    model = tiny_model(open_gates=True, n_kv_heads=2)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34]]  # different lengths: prompt tokens fed in steps
    eager = lladapter.generate(model, prompts, max_gen_len=12, temperature=0, eos_id=2)
    compiled = lladapter.generate(model, prompts, max_gen_len=12, temperature=0, eos_id=2, compile=True)
    assert compiled == eager
    assert all(len(out) == 12 for out in eager)


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
    (d / "text.txt").write_text("\n".join(text))
    ckpt = d / "ckpt"
    ckpt.mkdir()
    train_tokenizer(d / "text.txt", ckpt / "tokenizer", user_defined_symbols=COLOURS)  # a colour is one piece
    write_meta_checkpoint(tiny_model(max_seq_len=512), ckpt, vocab_size=-1)
    return d


def train(task, out, *args, nproc=1, check=True):
    """Run train.py as a user would; returns (returncode, stdout + stderr)."""
    import sys
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "train.py", f"--ckpt_dir={task / 'ckpt'}", f"--data_path={task / 'data.json'}",
           f"--out_dir={out}", "--adapter_layer=2", "--adapter_len=3", "--batch_size=8", "--micro_batch_size=2",
           "--epochs=2", "--warmup_epochs=0.5", "--val_fraction=0.05", "--log_interval=5", "--dtype=fp32",
           f"--device={DEVICE if nproc == 1 else 'cpu'}", *args]  # several processes: gloo on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # deterministic kernels, and no oversubscription under torchrun
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


def test_ddp_and_fsdp_on_two_processes_end_with_the_adapter_of_one_process(parallel_runs):
    d, _ = parallel_runs
    one = adapter_tensors(d / "one" / "adapter.pth")
    assert any(key.endswith("gate") and v.any() for key, v in one.items())  # the run moved the gates
    for name in ("ddp", "fsdp"):
        other = adapter_tensors(d / name / "adapter.pth")
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
    straight, resumed = adapter_tensors(d / "fsdp" / "adapter.pth"), adapter_tensors(d / "fsdp_resumed" / "adapter.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in log_of(d / "fsdp_resumed")] == [r["loss"] for r in log_of(d / "fsdp")]


SHARDED_FORWARD = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import checkpoint
dist.init_process_group("gloo")
model, _ = checkpoint.load_llama({ckpt!r}, adapter_path={adapter!r}, device="cpu", shard=checkpoint.fully_shard_base)
with torch.no_grad():
    logits = model(torch.load({tokens!r}))
if dist.get_rank() == 0:
    torch.save(logits, {out!r})
dist.destroy_process_group()
"""


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


def test_resumed_run_ends_bit_for_bit_where_an_uninterrupted_one_does(task, tmp_path):
    train(task, tmp_path / "straight", "--base_lr=1.0", "--save_interval=5")
    train(task, tmp_path / "stopped", "--base_lr=1.0", "--save_interval=5", "--stop_after=7")
    _, output = train(task, tmp_path / "stopped", "--base_lr=1.0", "--save_interval=5", "--resume")
    assert "resumed from" in output and "at step 7" in output
    straight = adapter_tensors(tmp_path / "straight" / "adapter.pth")
    resumed = adapter_tensors(tmp_path / "stopped" / "adapter.pth")
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
    assert all(torch.isfinite(v).all() for v in adapter_tensors(tmp_path / "adapter.pth").values())


def test_a_diverging_run_stops_with_a_message_and_keeps_the_last_good_checkpoint(task, tmp_path):
    code, output = train(task, tmp_path, "--base_lr=1e30", "--save_interval=1", check=False)
    assert code != 0 and "stopping. The last good checkpoint is in" in output
    assert "error: the loss is nan" in output or "error: the weights are no longer finite" in output
    saved = adapter_tensors(tmp_path / "adapter.pth")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not list(tmp_path.glob("*.tmp"))


def bad_inputs(task, d):
    good = json.loads((task / "data.json").read_text())
    cases = {
        "missing data": (["--data_path=" + str(d / "nope.json")], "nope.json: no such file"),
        "malformed": ('[{"instruction": "a", ', "malformed.json: not valid JSON"),
        "bad line.jsonl": ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c" "output": "d"}\n',
                           "bad_line.jsonl: line 3: not valid JSON"),
        "no output": ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 1 has no 'output'"),
        "no instruction": ([{"output": "b"}], "record 0 has no 'instruction'"),
        "not a string": (good[:3] + [{"instruction": "a", "input": 7, "output": "b"}], "record 3: 'input' is a int"),
        "empty": ([], "expected a non-empty list"),
        "missing checkpoint": (["--ckpt_dir=" + str(d / "nockpt")], "nockpt: no such checkpoint directory"),
        "unknown setting": (["--learning_rate=3"], "unknown argument '--learning_rate=3'"),
        "wrong type": (["--epochs=five"], "--epochs=five: expected a int"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, list) and all(isinstance(c, str) and c.startswith("--") for c in content) and content:
            yield name, content, message
        else:
            path = d / (name.replace(" ", "_") + ("" if name.endswith(".jsonl") else ".json"))
            path.write_text(content if isinstance(content, str) else json.dumps(content))
            yield name, [f"--data_path={path}"], message


def test_bad_input_exits_nonzero_with_one_clear_message_and_writes_nothing(task, tmp_path):
    for name, args, message in bad_inputs(task, tmp_path):
        out = tmp_path / ("out_" + name.replace(" ", "_"))
        code, output = train(task, out, *args, check=False)
        assert code != 0, name
        assert message in output, (name, output)
        assert "Traceback" not in output, (name, output)
        assert not out.exists(), name


# ---- generate.py ------------------------------------------------------------------------------------------

def run_generate(task, *args, adapter=None):
    import sys
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


def test_gate_heatmap_shows_the_gates_it_is_given(task, tmp_path):
    model = tiny_model(max_seq_len=512)
    # tanh(gate) per head; shaded by magnitude in quarters of the largest (0.9): 0, (0, 1/4], (1/4, 1/2], ...
    shade = {0.0: "  ", 0.2: "░░", -0.45: "▒▒", 0.9: "██", 0.45: "▒▒", 0.666: "▓▓", 0.684: "██"}
    values = {2: [0.0, 0.2, -0.45, 0.9], 3: [0.9, 0.45, 0.666, 0.684]}  # as many as the model has gates per layer
    with torch.no_grad():
        for i, row in values.items():
            gate = model.layers[i].attention.gate
            gate.copy_(torch.atanh(torch.tensor(row[:gate.numel()])).view_as(gate))
    checkpoint.save_adapter(model, tmp_path / "known.pth")
    code, stdout, _ = run_generate(task, "--show_gates", adapter=tmp_path / "known.pth")
    rows = {line.split("│")[0].strip(): line.split("│")[1] for line in stdout.splitlines() if "│" in line}
    assert code == 0 and "up to 0.900" in stdout
    for i, row in values.items():
        assert rows[f"layer   {i}"] == "".join(shade[v] for v in row[:model.layers[i].attention.gate.numel()])


def test_generate_bad_input_is_one_clear_message(task, tmp_path):
    torch.save(lladapter.adapter_state_dict(tiny_model(adapter_len=5)), tmp_path / "other.pth")  # K=5, no config
    checkpoint.save_adapter(tiny_model(dim=32), tmp_path / "small.pth")
    cases = [(["--prompt=hi"], {"adapter": tmp_path / "nope.pth"}, "nope.pth: no such file"),
             (["--prompt=hi", "--adapter_len=3"], {"adapter": tmp_path / "other.pth"},
              "other.pth: the file says adapter_len=5, the settings say adapter_len=3"),
             (["--prompt=hi"], {"adapter": tmp_path / "small.pth"}, "small.pth: an adapter for another base: it was "
              "trained on dim=32, n_layers=4, n_heads=4, this base has dim=64, n_layers=4, n_heads=4"),
             (["--prompt=" + "red " * 400], {}, "over max_seq_len=512"),
             (["--prompts_file=" + str(tmp_path / "none.txt")], {}, "none.txt: no such file"),
             (["--prompt=hi", "--image=" + str(tmp_path / "f.npy")], {}, "the adapter is text-only")]
    for args, kwargs, message in cases:
        code, stdout, stderr = run_generate(task, *args, **kwargs)
        assert code != 0 and message in stderr and "Traceback" not in stderr, (args, stderr)


# ---- image-conditioned prompts (paper Sec. 3.3) -----------------------------------------------------------

def test_zero_gates_give_the_base_model_with_or_without_an_image():
    model = tiny_model(image_dim=16)
    base = base_copy(model)
    x, image = tokens(), torch.randn(2, 16, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(model(x, image=image), model(x))
        assert torch.equal(model(x, image=image), base(x))
        assert torch.equal(cached_logits(model, x, [5, 1, 6]), cached_logits(base, x, [5, 1, 6]))


def test_open_gates_make_the_image_matter_and_the_projection_learns_from_step_two():
    model = tiny_model(image_dim=16)
    lladapter.mark_only_adapter_trainable(model)
    x, image = tokens(), torch.randn(2, 16, device=DEVICE)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    grads = []
    for _ in range(2):
        optimizer.zero_grad()
        model(x, image=image).logsumexp(-1).mean().backward()
        grads.append(model.adapter_image_proj.weight.grad.clone())
        optimizer.step()
    assert torch.count_nonzero(grads[0]) == 0 and torch.count_nonzero(grads[1]) > 0
    with torch.no_grad():
        a, b = model(x, image=image), model(x, image=torch.randn(2, 16, device=DEVICE))
        assert not torch.allclose(a, b)
        # each example's prompts carry its own image: the first row doesn't depend on the second's image
        torch.testing.assert_close(model(x[:1], image=image[:1]), a[:1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached_logits_with_image(model, x, image), a, rtol=1e-4, atol=1e-4)


def cached_logits_with_image(model, x, image):
    model.setup_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        out = torch.cat([model(x[:, :4], 0, image)] + [model(x[:, i:i + 1], i, image) for i in range(4, x.shape[1])], 1)
    model.clear_cache()
    return out


def test_adapter_with_image_projection_saves_and_reloads_exactly(tmp_path):
    model = tiny_model(open_gates=True, image_dim=16)
    checkpoint.atomic_save(lladapter.adapter_state_dict(model), tmp_path / "adapter.pth")
    assert {"adapter_image_proj.weight", "adapter_image_proj.bias"} <= set(torch.load(tmp_path / "adapter.pth"))
    fresh = tiny_model(image_dim=16)
    checkpoint.load_adapter(fresh, tmp_path / "adapter.pth")
    x, image = tokens(), torch.randn(2, 16, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x, image=image), model(x, image=image))
    with pytest.raises(InputError, match="does not fit this model"):
        checkpoint.load_adapter(tiny_model(), tmp_path / "adapter.pth")  # a text-only model


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
    answers = lladapter.generate(model, [prompt] * len(records), 1, 0, eos_id=tok.eos_id,
                                 image=image.to(DEVICE) if image_dim else None)
    return sum(tok.decode(a) == r["output"] for a, r in zip(answers, records)) / len(records)


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
    cases = [([{**good, "image": "missing.npy"}], ["--image_dim=16"], "record 0: image feature 'missing.npy'"),
             ([good, {**good, "image": [0.5] * 8}], ["--image_dim=16"], "record 0 has no 'image'"),
             ([{**good, "image": [0.5] * 8}] * 2, ["--image_dim=16"], "has shape [8], expected [16]"),
             ([{**good, "image": [0.5] * 16}], [], "record 0 has an image, but this adapter is text-only")]
    for i, (records, args, message) in enumerate(cases):
        (tmp_path / f"d{i}.json").write_text(json.dumps(records))
        code, output = train(task, tmp_path / f"out{i}", f"--data_path={tmp_path / f'd{i}.json'}", *args, check=False)
        assert code != 0 and message in output and "Traceback" not in output, (message, output)


# ---- bench.py ---------------------------------------------------------------------------------------------

def test_bench_runs_every_section_on_tiny_shapes(tmp_path):
    result = subprocess.run([sys.executable, "bench.py", "--quick", f"--json={tmp_path / 'bench.json'}"], cwd=ROOT,
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
    result = subprocess.run([sys.executable, "-c", "import bench, gpu_check"], cwd=ROOT, capture_output=True,
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
    result = subprocess.run([sys.executable, "bench.py", "--plan", "--quick", f"--json={tmp_path / 'plan.json'}"],
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
    "stop + --resume under torchrun = uninterrupted run", "walkthrough in bf16: its targets",
    "test suite, LLADAPTER_TEST_DEVICE=cpu", "decoding, batch 1, compiled", "decoding, batch 8, compiled",
]


def test_gpu_check_quick_runs_every_check_on_the_cpu_and_prints_every_row(tmp_path):
    result = subprocess.run([sys.executable, "gpu_check.py", "--quick", f"--json={tmp_path / 'check.json'}"],
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
    assert "identical logs" in next(r["result"] for r in rows if r["check"].startswith("stop + --resume"))


def test_gpu_check_runs_one_check_in_its_own_process_and_hands_back_its_rows(tmp_path):
    result = subprocess.run([sys.executable, "gpu_check.py", "--quick", "--step=zero_gates",
                             f"--deadline={time.time() + 120}", f"--work={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next(line for line in result.stdout.splitlines() if line.startswith("gpu_check result: "))
    rows = json.loads(line[len("gpu_check result: "):])
    assert [r["check"] for r in rows] == GPU_CHECK_ROWS[:2] and all(r["ok"] for r in rows)


def test_gpu_check_refuses_to_run_without_a_gpu_unless_quick():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, "gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no CUDA device here" in result.stderr and "Traceback" not in result.stderr


# ---- the paper's ablations in miniature (data/ablations.py) -----------------------------------------

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
    gates = [torch.cat([layer.attention.gate.flatten() for layer in m.layers[m.first_adapted:]])
             for m in (first, second)]
    assert torch.equal(gates[0], gates[1])  # whatever torch's global seed (which drew different prompts)
    assert not torch.equal(first.adapter_query.weight, second.adapter_query.weight)
    assert gates[0].abs().min() > 0 and isinstance(first.layers[-1].attention.gate, torch.nn.Parameter)


def test_no_gate_adds_the_prompt_branch_at_weight_one_and_trains_the_prompts_alone():
    model = variant_model("no_gate")
    attn, a = model.layers[-1].attention, model.args
    x, prompt = last_layer_input(model)
    with torch.no_grad():
        ours = attn(x, torch.arange(9), model.rope[:9], prompt=prompt[None])
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
        ours = attn(x, torch.arange(9), model.rope[:9], prompt=prompt[None])
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
    out = lladapter.generate(model, [prompt], max_gen_len=8, temperature=0)[0]
    with torch.no_grad():
        expected = model(torch.tensor([prompt + out]))[0, len(prompt) - 1:-1].argmax(-1)
    assert out == expected.tolist()


def test_quick_ablations_run_every_variant_and_write_the_table_and_the_figure(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data.ablations", "--quick", f"--out_dir={tmp_path / 'abl'}",
                             f"--walkthrough_dir={tmp_path / 'walk'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
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
    # the gates go from the trainable count with no_gate and prefix: 4 layers x 4 heads (the walkthrough's base)
    assert full["zero_init (the paper)"]["trainable"] - full["no_gate"]["trainable"] == 16
    assert full["prefix"]["trainable"] == full["no_gate"]["trainable"]
    assert full["L=1"]["trainable"] * 4 == full["L=4 (zero_init)"]["trainable"]
    svg = ET.parse(tmp_path / "abl" / "ablations.svg").getroot()  # well-formed XML
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    curves = [e.get("id") for e in svg.iter() if e.get("class") == "loss-curve"]
    assert sorted(curves) == sorted(f"loss-{name}" for name in VARIANTS)
    assert len([e for e in svg.iter() if e.get("class") == "gate-curve"]) == 4  # one per adapted layer
    assert "z zero_init" in result.stdout and "wall time" in result.stdout


def test_ablations_help_lists_the_settings_and_a_wrong_one_is_one_line():
    result = subprocess.run([sys.executable, "-m", "data.ablations", "--help"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--quick=False" in result.stdout and "--short_epochs=5" in result.stdout
    result = subprocess.run([sys.executable, "-m", "data.ablations", "--epochs=3"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: unknown argument '--epochs=3'")


# ---- the walkthrough --------------------------------------------------------------------------------------

def test_walkthrough_heldout_answers_are_in_the_corpus_and_not_in_the_adapters_data(tmp_path):
    from data import walkthrough as wt
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
    assert {p.name for p in (out / "base").iterdir()} == {"consolidated.00.pth", "params.json", "tokenizer.model"}
    model, _ = checkpoint.load_llama(out / "base", adapter_path=out / "adapter.pth", device="cpu")  # K, L: the file
    assert model.args.dim == 128 and model.args.vocab_size == 512


# ---- Hugging Face checkpoints ------------------------------------------------------------------------------

SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_raw_safetensors(path, header, data: bytes, header_bytes=None):
    """A safetensors file: an 8-byte little-endian header length, the JSON header, then the data."""
    text = header_bytes if header_bytes is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces: the data starts 8-byte aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def safetensors_layout(tensors, metadata=None):
    """(header, data) of `tensors` in the safetensors format: offsets counted from the end of the header."""
    header, chunks, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        # numpy has no bf16: its bytes are those of the same bits read as int16 (x86 is little-endian, as the format)
        raw = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def hf_state_dict(model, permute=True):
    """`model`'s base weights under Hugging Face's names, wq and wk with their rows reordered as Hugging Face's
    conversion reorders them: Meta rotates adjacent pairs (2i, 2i+1) of each head, HF pair i is rows (i, i + hd/2)."""
    a = model.args
    head_dim = a.dim // a.n_heads

    def permuted(w, heads):  # (heads * head_dim, dim) -> the same rows, each head's pairs split into two halves
        if not permute:
            return w
        return w.view(heads, head_dim // 2, 2, a.dim).transpose(1, 2).reshape(heads * head_dim, a.dim)

    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.output.weight}
    for i, layer in enumerate(model.layers):
        attn, ffn, p = layer.attention, layer.feed_forward, f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": permuted(attn.wq.weight, a.n_heads),
                      p + "self_attn.k_proj.weight": permuted(attn.wk.weight, a.n_kv_heads or a.n_heads),
                      p + "self_attn.v_proj.weight": attn.wv.weight, p + "self_attn.o_proj.weight": attn.wo.weight,
                      p + "mlp.gate_proj.weight": ffn.w1.weight, p + "mlp.down_proj.weight": ffn.w2.weight,
                      p + "mlp.up_proj.weight": ffn.w3.weight,
                      p + "input_layernorm.weight": layer.attention_norm.weight,
                      p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    return {k: v.detach().clone() for k, v in state.items()}


def write_hf_checkpoint(model, d, tokenizer, layout="model.safetensors", dtype=torch.float32, permute=True):
    """`model`'s base weights in Hugging Face's layout: config.json, tokenizer.model and one of the weight layouts
    "model.safetensors", "two shards" (with model.safetensors.index.json) or "pytorch_model.bin"."""
    d.mkdir(parents=True, exist_ok=True)
    a = model.args
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0], "num_hidden_layers": a.n_layers,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads or a.n_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": 2048, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer, d / "tokenizer.model")
    state = {k: v.to(dtype) for k, v in hf_state_dict(model, permute).items()}
    if layout == "pytorch_model.bin":
        torch.save(state, d / layout)
    elif layout == "model.safetensors":
        write_raw_safetensors(d / layout, *safetensors_layout(state, {"format": "pt"}))
    else:  # two shards: the first layers in one file, the rest (with the embeddings and head) in the other
        names = list(state)
        shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for file, keys in shards.items():
            write_raw_safetensors(d / file, *safetensors_layout({k: state[k] for k in keys}, {"format": "pt"}))
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rounded_to(model, dtype):
    """`model` with every weight rounded to `dtype` and back: the values a file in that dtype holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def base_logits(ckpt, x, **kwargs):
    model, _ = checkpoint.load_llama(ckpt, device=DEVICE, adapter_layer=0, **kwargs)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_hugging_face_checkpoint_loads_to_the_logits_of_the_same_weights_in_metas_layout(tmp_path, spm_tokenizer,
                                                                                        n_kv_heads):
    # Both layouts are read into fp32 from the same values, so the logits agree to float rounding. A wrong row order
    # for wq or wk (or the query heads' count used for the key heads' rows) would give other logits.
    x = tokens()
    for dtype, layouts in [(torch.float32, ["model.safetensors", "two shards"]),
                           (torch.float16, ["model.safetensors", "pytorch_model.bin"]), (torch.bfloat16, ["two shards"])]:
        model = rounded_to(tiny_model(seed=3, n_layers=2, adapter_layer=1, n_kv_heads=n_kv_heads), dtype)
        write_meta_checkpoint(model, tmp_path / f"meta-{dtype}")
        expected = base_logits(tmp_path / f"meta-{dtype}", x, tokenizer_path=spm_tokenizer)
        for layout in layouts:
            hf = tmp_path / f"hf-{layout}-{dtype}"
            write_hf_checkpoint(model, hf, spm_tokenizer, layout, dtype)
            torch.testing.assert_close(base_logits(hf, x), expected, rtol=1e-5, atol=1e-5)  # its tokenizer.model found
    # and the test can tell: the same weights without Hugging Face's row order load to other logits
    write_hf_checkpoint(model, tmp_path / "unpermuted", spm_tokenizer, dtype=dtype, permute=False)
    assert not torch.allclose(base_logits(tmp_path / "unpermuted", x), expected, rtol=1e-3, atol=1e-3)


def test_a_llama_saved_by_transformers_loads_to_its_logits_and_greedy_tokens(tmp_path, spm_tokenizer):
    # The other tests write Hugging Face's layout themselves; this one takes it from the library that defines it.
    # transformers is not a dependency: `pip install transformers` to run it.
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(spm_tokenizer, tmp_path / "tokenizer.model")
    model, _ = checkpoint.load_llama(tmp_path, device="cpu", adapter_layer=0, max_seq_len=64)
    x = tokens().cpu()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits.float(), rtol=1e-4, atol=1e-4)
        theirs = reference.generate(x, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    ours = lladapter.generate(model, x.tolist(), max_gen_len=16, temperature=0.0)
    assert ours == theirs[:, x.shape[1]:].tolist(), "greedy continuations differ from transformers' own"


def test_safetensors_data_need_not_be_aligned_to_the_element_size(tmp_path, spm_tokenizer):
    # The format packs tensors back to back: after a 6-byte tensor (here the rope table old Hugging Face files carry,
    # which is not a weight) every F32 tensor starts 2 bytes off a multiple of 4, and still loads.
    model = tiny_model(seed=3)
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    state = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(3, dtype=torch.float16),
             **hf_state_dict(model)}
    write_raw_safetensors(hf / "model.safetensors", *safetensors_layout(state))
    x = tokens()
    write_meta_checkpoint(model, tmp_path / "meta")
    torch.testing.assert_close(base_logits(hf, x), base_logits(tmp_path / "meta", x, tokenizer_path=spm_tokenizer),
                               rtol=1e-5, atol=1e-5)


def one_line_error(call, *names):
    """The message of the InputError that call() raises: one line, naming each of `names`."""
    with pytest.raises(InputError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(name) in message for name in names), message
    return message


def test_safetensors_header_that_lies_is_refused_in_one_line_naming_the_file_and_tensor(tmp_path, spm_tokenizer):
    model = tiny_model()
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    file, q = hf / "model.safetensors", "model.layers.1.self_attn.q_proj.weight"
    header, data = safetensors_layout(hf_state_dict(model))
    begin, end = header[q]["data_offsets"]
    lies = {  # q_proj's entry changed: what it then says, and the message that must name it
        "past the end": (dict(data_offsets=[len(data) - 8, len(data) - 8 + end - begin]),
                         f"data offsets [{len(data) - 8}, {len(data) - 8 + end - begin}] lie outside the file's "
                         f"{len(data)} data bytes"),
        "too few bytes": (dict(data_offsets=[begin, end - 4]),
                          "shape [64, 64] in F32 needs 16384 bytes, its offsets hold 16380"),
        "overlapping": (dict(data_offsets=[begin - 256, end - 256]), f"its data starts at byte {begin - 256}"),
        "not a float": (dict(dtype="I32"), "its values are torch.int32"),  # "F32" with one byte flipped
    }
    for lie, (entry, message) in lies.items():
        write_raw_safetensors(file, {**header, q: {**header[q], **entry}}, data)
        assert message in one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, q), lie
    state = hf_state_dict(model)  # a true header, but a q_proj one row short of what config.json implies
    write_raw_safetensors(file, *safetensors_layout({**state, q: state[q][:-1]}))
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, q,
                   "layers.1.attention.wq.weight has shape [63, 64], config.json implies [64, 64]")
    file.write_bytes((len(data) + 100).to_bytes(8, "little") + b"{}" + data)  # a header longer than the file
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, "header")
    write_raw_safetensors(file, None, data, header_bytes=json.dumps(header).encode()[:-20])  # cut short: not JSON
    one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file, "not JSON")


# ---- adapter files: K and L from the file -----------------------------------------------------------------

def generate_answers(task, adapter, *args):
    """generate.py's stdout for two prompts, greedy, given only the base and the adapter file (and `args`)."""
    code, stdout, stderr = run_generate(task, "--temperature=0", "--max_gen_len=8", "--prompt=Which colour is the owl?",
                                        "--prompt=Which colour is the emu?", *args, adapter=adapter)
    assert code == 0, stderr
    return stdout


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


def original_export(model, gates_open=True):
    """`model`'s adapter as the original code exported it: a gate for every layer (zero where it did not adapt), the
    prompts of all adapted layers in one [L*K, dim] tensor, and no description of itself."""
    state = lladapter.adapter_state_dict(model)
    for i in range(model.first_adapted):
        state[f"layers.{i}.attention.gate"] = torch.zeros(1, model.args.n_heads, 1, 1)
    if not gates_open:
        state = {k: torch.zeros_like(v) if k.endswith(".gate") else v for k, v in state.items()}
    return state


def test_original_layout_adapter_tells_its_K_and_L_by_its_nonzero_gates(tmp_path, spm_tokenizer):
    source = tiny_model(open_gates=True, adapter_layer=3, adapter_len=2)
    write_meta_checkpoint(source, tmp_path / "ckpt")
    path = tmp_path / "original.pth"
    torch.save(original_export(source), path)
    assert checkpoint.adapter_args(path, {"dim": 64, "n_layers": 4, "n_heads": 4}, {}) == \
        {"adapter_len": 2, "adapter_layer": 3, "image_dim": 0}
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path, device=DEVICE)
    assert (model.args.adapter_layer, model.args.adapter_len) == (3, 2)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    # With every gate zero (an untrained export) nothing tells which layers it adapts: the user is asked, and then
    # the prompts load into those layers.
    torch.save(original_export(source, gates_open=False), path)
    one_line_error(lambda: checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path), path,
                   "every gate is zero", "give --adapter_layer and --adapter_len")
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=path, adapter_layer=3,
                                     adapter_len=2)
    assert torch.equal(model.adapter_query.weight, source.adapter_query.weight)


def test_adapter_for_another_base_is_refused_naming_both_shapes(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path / "ckpt")
    adapter = tmp_path / "adapter.pth"
    checkpoint.save_adapter(tiny_model(dim=32, n_heads=2), adapter)
    one_line_error(lambda: checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=adapter), adapter,
                   "trained on dim=32, n_layers=4, n_heads=2", "this base has dim=64, n_layers=4, n_heads=4")


def test_adapter_in_our_older_layout_without_its_config_still_loads(tmp_path, spm_tokenizer):
    source = tiny_model(open_gates=True)  # L=2, K=3: only the adapted layers' gates, as we saved before the config
    write_meta_checkpoint(source, tmp_path / "ckpt")
    torch.save(lladapter.adapter_state_dict(source), tmp_path / "older.pth")
    model, _ = checkpoint.load_llama(tmp_path / "ckpt", spm_tokenizer, adapter_path=tmp_path / "older.pth", device=DEVICE)
    assert (model.args.adapter_layer, model.args.adapter_len) == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), source(tokens()), rtol=1e-5, atol=1e-5)


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
        assert all(set(a) == {"instruction", "input", "output"} for a in answers[batch])
    assert progress[2] == ["[2/5 answered]", "[4/5 answered]", "[5/5 answered]"]
    assert progress[1] == [f"[{n}/5 answered]" for n in range(1, 6)]
    assert [a["output"] for a in answers[2]] == [a["output"] for a in answers[1]]
    assert len({a["output"] for a in answers[1]}) > 1  # (the random base answers most prompts alike, not these)


# ---- damaged files and bad settings -----------------------------------------------------------------------

def record_spans(data: bytes) -> dict:
    """{record name: (first byte, end)} of the data each record of a zip (a torch file) holds."""
    spans = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for r in archive.infolist():
            name_len, extra_len = struct.unpack_from("<HH", data, r.header_offset + 26)  # from the record's own header
            start = r.header_offset + 30 + name_len + extra_len
            spans[r.filename] = (start, start + r.compress_size)
    return spans


def flipped(data: bytes, positions, seed=0):
    """(position, data with that byte changed), for each position: XOR-ed with a seeded random nonzero byte."""
    rng = random.Random(seed)
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= rng.randrange(1, 256)
        yield position, bytes(damaged)


def truncations(data: bytes):
    return [0, 1, 7, 8, 30, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 22, len(data) - 1]


def test_damaged_adapter_file_is_refused_in_one_line_and_never_loads_other_values(tmp_path):
    source, model = tiny_model(open_gates=True), tiny_model()
    good, bad = tmp_path / "adapter.pth", tmp_path / "damaged.pth"
    checkpoint.save_adapter(source, good)
    data = good.read_bytes()
    for n in truncations(data):
        bad.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_adapter(model, bad), bad)
    # torch.load checks no CRC32; load_adapter does (torch_load with verify), so a flip in any record is refused:
    # the tensors' bytes, the pickle, the format's own records. A flip elsewhere lands in the zip's structure, and
    # is refused too, except in the few bytes no reader uses (alignment padding, a record's attributes or time):
    # then the file must load exactly the adapter that was saved.
    records = list(record_spans(data).values())
    in_records = 0
    for position, damaged in flipped(data, random.Random(1).sample(range(len(data)), 400)):
        bad.write_bytes(damaged)
        in_records += any(start <= position < end for start, end in records)
        model.reset_adapter()
        try:
            checkpoint.load_adapter(model, bad)
        except InputError as e:
            assert "\n" not in str(e) and str(bad) in str(e), str(e)
            continue
        assert not any(start <= position < end for start, end in records), position
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in lladapter.adapter_state_dict(model).items())
    assert in_records > 150  # the sample did reach the records: most of the file (all but 0.13% of a 7B adapter)


def test_damaged_base_checkpoint_is_refused_in_one_line_or_loads_unchanged(tmp_path, spm_tokenizer):
    model = tiny_model(n_layers=1, adapter_layer=1)  # few tensors: torch.load's unpickler is slow
    ckpt = tmp_path / "ckpt"
    write_meta_checkpoint(model, ckpt)
    file = ckpt / "consolidated.00.pth"
    data = file.read_bytes()
    for n in truncations(data):
        file.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_llama(ckpt, spm_tokenizer, adapter_layer=0), file)
    # A base checkpoint is memory-mapped and its tensors' bytes are not verified (a 13 GB read): a flipped byte
    # among them loads silently. So flips go only where they can be caught: the zip's headers, the pickle, the
    # central directory at the end. The pickle is checked whole: a flip there is always refused.
    file.write_bytes(data)
    expected = checkpoint.torch_load(file)
    spans = record_spans(data)
    pickle_span = next(span for name, span in spans.items() if name.endswith("/data.pkl"))
    tensor_spans = [span for name, span in spans.items() if name.split("/")[-2] == "data"]
    structure = [p for p in range(len(data)) if not any(start <= p < end for start, end in tensor_spans)]
    in_pickle = 0
    for position, damaged in flipped(data, random.Random(2).sample(structure, 300)):
        file.write_bytes(damaged)
        in_pickle += pickle_span[0] <= position < pickle_span[1]
        try:
            state = checkpoint.torch_load(file, mmap=True)  # as load_llama reads it
        except InputError as e:
            assert "\n" not in str(e) and str(file) in str(e), str(e)
            continue
        assert not pickle_span[0] <= position < pickle_span[1], position
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), position
    assert in_pickle > 50  # the sample did reach the pickle


def test_damaged_safetensors_header_is_refused_in_one_line_or_loads_unchanged(tmp_path, spm_tokenizer):
    model = tiny_model()
    hf = tmp_path / "hf"
    write_hf_checkpoint(model, hf, spm_tokenizer)
    file = hf / "model.safetensors"
    data = file.read_bytes()
    for n in truncations(data):
        file.write_bytes(data[:n])
        one_line_error(lambda: checkpoint.load_llama(hf, adapter_layer=0), file)
    # The format has no checksum: a flip among the tensors' bytes is undetectable. One in the header length or the
    # JSON header is refused, or lands where it changes nothing (a space of the padding turned into a tab, say).
    file.write_bytes(data)
    expected = {k: v.clone() for k, v in checkpoint.load_llama(hf, adapter_layer=0)[0].state_dict().items()}
    header_end = 8 + int.from_bytes(data[:8], "little")
    caught = 0
    for position, damaged in flipped(data, random.Random(3).sample(range(header_end), 150)):
        file.write_bytes(damaged)
        try:
            loaded, _ = checkpoint.load_llama(hf, adapter_layer=0)
        except InputError as e:  # naming the file, or the folder and the name a flip made up
            assert "\n" not in str(e) and (str(file) in str(e) or f"{hf}: the weights don't match" in str(e)), str(e)
            caught += 1
            continue
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items()), position
    assert caught > 100


def test_files_that_are_not_utf8_are_refused_in_one_line(tmp_path, spm_tokenizer):
    write_meta_checkpoint(tiny_model(), tmp_path / "meta")
    write_hf_checkpoint(tiny_model(), tmp_path / "hf", spm_tokenizer)
    for file in (tmp_path / "meta" / "params.json", tmp_path / "hf" / "config.json"):
        file.write_bytes(b"\xff\xfe{" + file.read_bytes())
        one_line_error(lambda: checkpoint.load_llama(file.parent, spm_tokenizer), file, "not valid JSON")


def script_error(monkeypatch, script, *args):
    """The InputError that `script` stops with, run in this process: no second torch import to wait for. (That the
    scripts turn it into one line and exit status 1 is checked with real processes below.)"""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the script installs its own: ours comes back after
    with pytest.raises(InputError) as error:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


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
    assert "--max_batch_size=0: must be positive" in script_error(monkeypatch, "generate.py", *generates, "--prompt=hi",
                                                                  "--max_batch_size=0")
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


def test_shard_index_without_a_map_of_file_names_is_refused_in_one_line(tmp_path, spm_tokenizer):
    write_hf_checkpoint(tiny_model(), tmp_path, spm_tokenizer, "two shards")
    index = tmp_path / "model.safetensors.index.json"
    for text in ['[]', '{"metadata": {}}', '{"weight_map": {"lm_head.weight": 2}}']:
        index.write_text(text)
        one_line_error(lambda: checkpoint.load_llama(tmp_path, adapter_layer=0), index, "no 'weight_map'")
