"""The fast tier: the paper's and the model's properties, in one process, on tiny seeded models (under a minute).

Run: python -m pytest -q test_lladapter.py
Tests read the adapter's shapes (gate, K, L) from the model, so a change to one of them fails only the tests of
the property it breaks, with a message naming it. LLADAPTER_TEST_DEVICE=cuda runs the in-process model tests on
a GPU (python -m tools.gpu_check does). The tiny models and the writers of checkpoint files are in tests/fixtures.py.
"""
import base64
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import generation
import lladapter
import tokenizer as tokenizers
from cli import InputError
from lladapter import ModelArgs, Transformer
from tests.fixtures import (BPE_RANKS, BPE_TEXTS, DEVICE, LLAMA3_VOCAB, SHARED, VOCAB, as_adapter, base_copy, base_logits,
                            bpe_tokenizer, cached_logits, llama3_model, requires_tiktoken, rounded_to, spm_tokenizer,
                            tiny_model, tokens, write_bpe_tokenizer, write_hf_checkpoint, write_meta_checkpoint)

LLAMA2_TOKENIZER, LLAMA3_TOKENIZER = SHARED / "llama2-tokenizer.model", SHARED / "llama3" / "tokenizer.model"


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
        model.gates()[-1].fill_(0.5)
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
    for layer in model.layers[model.first_adapted:]:  # real memory for the gates
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
        return model.adapter_query.weight.grad, [gate.grad for gate in model.gates()]

    prompt_grad, gate_grads = loss_and_grads()
    assert torch.count_nonzero(prompt_grad) == 0, "zero-init: at step 0 the prompt's gradient is times tanh(0) = 0"
    assert all(torch.count_nonzero(g) == g.numel() for g in gate_grads), "at step 0 every gate gets a gradient"
    optimizer.step()
    with torch.no_grad():  # an evaluation pass in between must not break the next training step
        model(x)
    prompt_grad, _ = loss_and_grads()  # step 2: the gates are open, the prompt learns
    assert torch.count_nonzero(prompt_grad) > 0.9 * prompt_grad.numel(), "from step 2 on, the prompts learn"
    optimizer.step()
    generation.generate(model, [[1, 5, 7]], max_gen_len=3, temperature=0, eos_id=2)  # nor must a generation
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


def eq7_reference(attn, x, prompt, prompt_scale=None, causal=True, rotary=True):
    """Paper Eq. 7 as written: scores over [prompt; words], each part softmaxed alone, the prompt part scaled by
    tanh(gate); rotary embeddings in Meta's complex form; kv heads repeated for grouped-query attention. prompt None:
    LLaMA's own attention. causal and rotary off: the same equation in a bidirectional encoder whose positions are
    already in x (walkthrough/beyond)."""
    bsz, n, _ = x.shape
    prompt = x.new_zeros(0, x.shape[-1]) if prompt is None else prompt
    H, Hkv, d, K = attn.n_heads, attn.n_kv_heads, attn.head_dim, prompt.shape[0]
    q = (x @ attn.wq.weight.T).view(bsz, n, H, d)
    k = (x @ attn.wk.weight.T).view(bsz, n, Hkv, d)
    v = (x @ attn.wv.weight.T).view(bsz, n, Hkv, d)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=x.device).float() / d))
    rot = torch.polar(torch.ones(n, d // 2, device=x.device), torch.outer(torch.arange(n, device=x.device).float(), freqs))
    if rotary:
        q = torch.view_as_real(torch.view_as_complex(q.reshape(bsz, n, H, d // 2, 2)) * rot[:, None]).flatten(-2)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(bsz, n, Hkv, d // 2, 2)) * rot[:, None]).flatten(-2)
    pk = (prompt @ attn.wk.weight.T).view(K, Hkv, d)  # no rotation: prompts have no position
    pv = (prompt @ attn.wv.weight.T).view(K, Hkv, d)
    keys = torch.cat([pk.expand(bsz, K, Hkv, d), k], dim=1).repeat_interleave(H // Hkv, dim=2)
    values = torch.cat([pv.expand(bsz, K, Hkv, d), v], dim=1).repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(d)  # (bsz, H, n, K + n)
    if prompt_scale is not None:  # to show that a wrong scale would be caught
        scores[..., :K] *= prompt_scale * math.sqrt(d)
    seen = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(0 if causal else n)  # (query, key)
    word_scores = scores[..., K:].masked_fill(~seen, float("-inf"))
    gate = torch.tanh(attn.gate) if K else 0  # one per head, broadcast over the batch and positions
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
        ours = attn(x, None, model.rope[:9], prompt=prompt[None])
        torch.testing.assert_close(ours, eq7_reference(attn, x, prompt), rtol=1e-5, atol=1e-5, msg=lambda m: (
            "paper Eq. 7: two separate softmaxes, the prompt part times tanh(gate), prompt keys not rotated, "
            "scores over sqrt(head_dim)\n" + m))
        # the prompt scores are scaled by 1/sqrt(head_dim); 1/sqrt(dim), a bug peers shipped, would differ
        wrong = eq7_reference(attn, x, prompt, prompt_scale=1 / math.sqrt(model.args.dim))
    assert not torch.allclose(ours, wrong, atol=1e-3)


# ---- LLaMA itself, held to what it did not compute ---------------------------------------------------------------

REFERENCE = Path(__file__).resolve().parent / "tests" / "reference"


@pytest.mark.parametrize("name", ["llama2-tiny", "llama3-tiny"])
def test_llama_gives_the_logits_that_transformers_computed(name, spm_tokenizer):
    # Tiny seeded Llamas that Hugging Face's transformers built and ran (tests/reference/make_llamas.py): LLaMA-2's
    # shape, and Llama 3.2's (grouped-query attention, "llama3" rotary scaling, tied embeddings). Read through
    # checkpoint.py's Hugging Face path, rotary row permutation included. Any one-line break of RMSNorm, RoPE,
    # SwiGLU, a residual, a norm or the head changes these logits.
    model, _ = checkpoint.load_llama(REFERENCE / name, tokenizer_path=spm_tokenizer, device=DEVICE, dtype=torch.float32,
                                     adapter_layer=0, max_seq_len=64)
    expected = torch.load(REFERENCE / name / "logits.pt")
    with torch.no_grad():
        logits = model(expected["tokens"].to(DEVICE))
    torch.testing.assert_close(logits, expected["logits"].to(DEVICE), rtol=1e-5, atol=1e-5, msg=lambda m: (
        f"LLaMA ({name}) no longer computes the logits transformers computed for the same weights\n" + m))


def rms_norm_reference(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight  # x / RMS(x), times a weight per channel


def llama_reference(model, tokens):
    """LLaMA's forward written out as Meta's paper and code define it: the embedding; per block a pre-norm attention
    (eq7_reference without a prompt) added to its input, then a pre-norm SwiGLU feed-forward, w2(silu(w1 x) * w3 x),
    added to its input; the final norm; the output head. silu(x) = x * sigmoid(x)."""
    eps = model.args.norm_eps
    h = model.tok_embeddings.weight[tokens]
    for block in model.layers:
        h = h + eq7_reference(block.attention, rms_norm_reference(h, block.attention_norm.weight, eps), None)
        f, g = block.feed_forward, rms_norm_reference(h, block.ffn_norm.weight, eps)
        gate, up = g @ f.w1.weight.T, g @ f.w3.weight.T
        h = h + (gate * torch.sigmoid(gate) * up) @ f.w2.weight.T
    return rms_norm_reference(h, model.norm.weight, eps) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_llama_is_the_block_written_out_literally(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads, adapter_layer=0, seed=7)
    with torch.no_grad():  # norms away from 1, so that a norm's weight matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        x = tokens(seqlen=14)
        torch.testing.assert_close(model(x), llama_reference(model, x), rtol=1e-5, atol=1e-5, msg=lambda m: (
            "LLaMA: pre-norm attention and SwiGLU, each added to its input; RMSNorm x / sqrt(mean(x^2) + eps) * "
            "weight; rotary pairs (2i, 2i+1)\n" + m))


def test_the_loss_is_the_next_tokens_cross_entropy_over_the_response_alone():
    model = tiny_model(open_gates=True)
    x = tokens(seqlen=12)
    labels = x.clone()
    labels[0, :5], labels[1, :8] = lladapter.IGNORE_INDEX, lladapter.IGNORE_INDEX  # the prompts: not scored
    with torch.no_grad():
        logits = model(x)  # logits[b, i] predict token i + 1
        expected = sum(-torch.log_softmax(logits[b, i - 1], -1)[labels[b, i]] for b in range(2) for i in range(1, 12)
                       if labels[b, i] != lladapter.IGNORE_INDEX)
        torch.testing.assert_close(lladapter.response_loss(model, x, labels), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: "the loss sums -log p(token i | tokens before i) over scored i\n" + m)


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


@pytest.mark.parametrize("other", [dict(dim=32), dict(n_heads=2), dict(adapter_len=4), dict(adapter_layer=3)])
def test_adapter_for_another_model_is_refused(tmp_path, other):
    checkpoint.save_adapter(tiny_model(**other), tmp_path / "adapter.pth")  # with its config: the base it was made for
    with pytest.raises(InputError, match="adapter.pth: (it does not fit this model|an adapter for another base)"):
        checkpoint.load_adapter(tiny_model(), tmp_path / "adapter.pth")


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="a known-answer test: Meta's LLaMA-2 tokenizer "
                    "is not at ../shared/llama2-tokenizer.model")
def test_tokenizer_matches_llama2():
    tok = tokenizers.SentencePieceTokenizer(LLAMA2_TOKENIZER)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    text = "Below is an instruction that describes a task.\n\n### Response:"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


# ---- sampling ---------------------------------------------------------------------------------------------

def test_batched_greedy_generation_matches_one_prompt_at_a_time():
    model = tiny_model(open_gates=True, n_kv_heads=2)
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34, 35, 36, 37], [1, 3, 4]]
    batched = generation.generate(model, prompts, max_gen_len=10, temperature=0, eos_id=2)
    alone = [generation.generate(model, [p], max_gen_len=10, temperature=0, eos_id=2)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 10 for out in alone)  # no EOS drawn here: each ran its full budget


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    model = tiny_model(open_gates=True)
    seq = [1, 5, 9, 14]
    out = generation.generate(model, [seq], max_gen_len=8, temperature=0, eos_id=2)[0]
    for _ in range(8):
        with torch.no_grad():
            seq = seq + [model(torch.tensor([seq], device=DEVICE))[0, -1].argmax().item()]
    assert out == seq[4:]


def test_generation_stops_at_eos_and_sampling_is_seeded():
    model = tiny_model(open_gates=True)
    greedy = generation.generate(model, [[1, 5, 9]], max_gen_len=6, temperature=0, eos_id=-5)[0]
    first = greedy[2]  # declare the third greedy token EOS: output stops before it
    assert generation.generate(model, [[1, 5, 9]], max_gen_len=6, temperature=0, eos_id=first)[0] == greedy[:greedy.index(first)]
    runs = [generation.generate(model, [[1, 5, 9]] * 3, max_gen_len=12, temperature=1.0, top_p=0.9, eos_id=-5,
                               generator=torch.Generator(DEVICE).manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {generation.sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2 and 3 are never drawn
    assert generation.sample_next(logits, 0, 0.75).item() == 0


def test_generation_refuses_a_prompt_longer_than_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generation.generate(tiny_model(), [[1] * 64], max_gen_len=4, eos_id=2)


# ---- the recipe's data side ------------------------------------------------------------------------------

def test_labels_score_exactly_the_response_and_eos(spm_tokenizer):
    tok = tokenizers.SentencePieceTokenizer(spm_tokenizer)
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
    eager = generation.generate(model, prompts, max_gen_len=12, temperature=0, eos_id=2)
    compiled = generation.generate(model, prompts, max_gen_len=12, temperature=0, eos_id=2, compile=True)
    assert compiled == eager
    assert all(len(out) == 12 for out in eager)


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
        chunks = [4] + [1] * (x.shape[1] - 4)  # each row's own image in its prompts' cached keys and values
        torch.testing.assert_close(cached_logits(model, x, chunks, image), a, rtol=1e-4, atol=1e-4)


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


# ---- Hugging Face checkpoints ------------------------------------------------------------------------------

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


# ---- Llama 3: rope scaling, tied embeddings, the BPE tokenizer, Meta's and Hugging Face's layouts -------------

def llama3_frequencies(head_dim, theta, s, low=1.0, high=4.0, L0=8192):
    """The issue's formula, in float64, band by band: (frequencies, the band of each)."""
    out, bands = [], []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        w = 2 * math.pi / f
        if w < L0 / high:
            out.append(f), bands.append("kept")
        elif w > L0 / low:
            out.append(f / s), bands.append("divided")
        else:
            sigma = (L0 / w - low) / (high - low)
            out.append((1 - sigma) * f / s + sigma * f), bands.append("blended")
    return torch.tensor(out, dtype=torch.float64), bands


@pytest.mark.parametrize("s", [8.0, 32.0])
def test_llama3_rope_scaling_follows_the_formula(s):
    expected, bands = llama3_frequencies(16, 500000.0, s)
    assert set(bands) == {"kept", "blended", "divided"}
    rope = lladapter.precompute_rope(16, 600, 500000.0, factor=s)  # (positions, 8, 2): cos, sin
    freqs = torch.atan2(rope[1, :, 1], rope[1, :, 0]).double()  # the angle at position 1 is the frequency
    torch.testing.assert_close(freqs, expected, rtol=1e-6, atol=0)
    unscaled = lladapter.precompute_rope(16, 600, 500000.0)
    assert (rope[511] - unscaled[511]).abs().max() > 0.1, "the scaling changes positions below L0 too"


def test_meta_params_use_scaled_rope_means_8_but_32_for_the_llama_3_2_shapes(tmp_path):
    for (dim, n_layers), factor in {(4096, 32): 8.0, (2048, 16): 32.0, (3072, 28): 32.0, (8192, 80): 8.0}.items():
        d = tmp_path / f"{dim}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(dict(dim=dim, n_layers=n_layers, n_heads=32, use_scaled_rope=True)))
        torch.save({"norm.weight": torch.ones(2)}, d / "consolidated.00.pth")
        params, _ = checkpoint.meta_checkpoint(d)
        assert params["rope_scaling_factor"] == factor and "use_scaled_rope" not in params


def test_llama3_in_every_layout_loads_to_the_same_logits(tmp_path, spm_tokenizer):
    # The weights alone: any tokenizer file will do (a SentencePiece one here, so that no tiktoken is needed)
    model = llama3_model()
    x = torch.randint(0, LLAMA3_VOCAB, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        expected = base_copy(model)(x)
    hf4, hf5 = tmp_path / "Llama-3.2-hf4", tmp_path / "Llama-3.2-hf5"
    write_hf_checkpoint(model, hf4, spm_tokenizer)  # one file, no lm_head
    write_hf_checkpoint(model, hf5, spm_tokenizer, "two shards", transformers_version=5)
    write_meta_checkpoint(model, hf4 / "original", 2, embeddings_by_vocab=True, rope_theta=500000.0,
                          use_scaled_rope=True)  # as downloaded: Meta's files in original/, with output.weight
    assert "lm_head.weight" not in checkpoint.read_safetensors(hf4 / "model.safetensors")
    for ckpt in (hf4, hf5, hf4 / "original"):
        loaded, _ = checkpoint.load_llama(ckpt, device=DEVICE, adapter_layer=0, max_seq_len=64)
        assert loaded.args.rope_scaling_factor == 8.0 and loaded.args.rope_theta == 500000.0
        with torch.no_grad():
            logits = loaded(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        print(f"{ckpt.relative_to(tmp_path)}: max |logit difference| {(logits - expected).abs().max():.2e}")  # -s
        assert (loaded.output.weight is loaded.tok_embeddings.weight) == (ckpt != hf4 / "original"), \
            "Hugging Face's tied model shares one matrix; Meta's files hold output.weight apart"
    unscaled, _ = checkpoint.load_llama(hf4, device=DEVICE, adapter_layer=0, max_seq_len=64, rope_scaling_factor=1.0)
    with torch.no_grad():
        assert (unscaled(x) - expected).abs().max() > 1e-3, "without the scaling the logits must differ"


def test_a_fresh_adapter_on_a_llama3_base_gives_exactly_its_logits(tmp_path, spm_tokenizer):
    model = llama3_model()
    write_hf_checkpoint(model, tmp_path, spm_tokenizer)  # a property of the model: no tokenizer package needed
    adapted, _ = checkpoint.load_llama(tmp_path, device=DEVICE, max_seq_len=64)  # adapter_layer: the default
    base, _ = checkpoint.load_llama(tmp_path, device=DEVICE, max_seq_len=64, adapter_layer=0)
    assert adapted.args.adapter_layer == adapted.args.n_layers - 2, "the default: all but the bottom two layers"
    x = torch.randint(0, LLAMA3_VOCAB, (2, 12), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        assert torch.equal(adapted(x), base(x)), "zero-init attention: a fresh adapter is exactly the base model"
    state = adapted.state_dict()  # tied: both names in the state dict, one tensor; strict loading takes it back
    assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()
    fresh = Transformer(adapted.args).to(DEVICE)
    fresh.load_state_dict(state)
    assert fresh.output.weight is fresh.tok_embeddings.weight


@requires_tiktoken
def test_llama3_generation_ends_where_generation_config_says_or_at_any_of_its_three_end_tokens(tmp_path, bpe_tokenizer):
    n = BPE_RANKS
    (tmp_path / "original").mkdir()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": n + 1}))  # a base model's
    assert checkpoint.stop_ids_of(tmp_path) == checkpoint.stop_ids_of(tmp_path / "original") == {n + 1}  # or beside it
    assert tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.json", {n + 1}).stop_ids == {n + 1}
    assert checkpoint.stop_ids_of(tmp_path / "original" / "elsewhere") is None  # no file: <|end_of_text|>,
    assert tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.json").stop_ids == {n + 1, n + 8, n + 9}  # eom, eot


@requires_tiktoken
def test_bpe_tokenizer_reads_the_same_from_metas_rank_file_and_tokenizer_json(bpe_tokenizer):
    meta = tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.model")  # told apart by content, not by name
    hf = tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.json")
    for tok in (meta, hf):
        assert (tok.n_words, tok.bos_id, tok.eos_id) == (LLAMA3_VOCAB, BPE_RANKS, BPE_RANKS + 1)
        assert tok.special["<|eot_id|>"] == BPE_RANKS + 9 and tok.special["<|start_header_id|>"] == BPE_RANKS + 6
    for text in BPE_TEXTS + ["", " ", "\n\n\n", "naïve café ñ", "🦙", "x\u200by", "<|begin_of_text|>"]:
        ids = meta.encode(text, bos=True, eos=True)
        assert ids == hf.encode(text, bos=True, eos=True), text
        assert ids[0] == meta.bos_id and ids[-1] == meta.eos_id and meta.decode(ids[1:-1]) == text
        assert not set(ids[1:-1]) & set(meta.special.values()), "special-token text in data must stay text"
    assert len(meta.encode(BPE_TEXTS[0], False, False)) < 0.75 * len(BPE_TEXTS[0].encode()), "merges must apply"


@requires_tiktoken
def test_a_whole_pretokenized_piece_in_the_vocabulary_is_one_token(tmp_path):
    ranks = {bytes([b]): b for b in range(256)} | {" xyz".encode(): 256}  # no merge path leads to " xyz"
    tok = tokenizers.read_tokenizer(write_bpe_tokenizer(ranks, tmp_path) / "tokenizer.model")
    assert tok.encode(" xyz", False, False) == [256]
    assert tok.encode(" xy", False, False) == [32, 120, 121] and tok.encode(" xyzx", False, False) == [32, 120, 121, 122, 120]


def test_tokenizer_problems_are_one_line_naming_the_file(tmp_path, bpe_tokenizer, monkeypatch):
    (tmp_path / "bad.model").write_text("QUJD 0\nnot base64! 1\n")
    with pytest.raises(InputError, match=r"bad.model: line 2: expected 'base64-bytes rank'"):
        tokenizers.read_tokenizer(tmp_path / "bad.model")
    (tmp_path / "short.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
    with pytest.raises(InputError, match=r"short.model: not a byte-level BPE: byte 0xc8 has no token"):
        tokenizers.read_tokenizer(tmp_path / "short.model")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01junk")
    with pytest.raises(InputError, match="junk.model: neither a SentencePiece model nor a Llama 3 tokenizer"):
        tokenizers.read_tokenizer(tmp_path / "junk.model")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if not installed
    with pytest.raises(InputError, match=r"tokenizer.json: a Llama 3 tokenizer, which needs tiktoken: pip install tiktoken"):
        tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.json")


@requires_tiktoken
@pytest.mark.skipif(not LLAMA3_TOKENIZER.is_file(), reason="a known-answer test: Meta's Llama 3 tokenizer "
                    "is not at ../shared/llama3/tokenizer.model")
def test_tokenizer_matches_llama3():
    tok = tokenizers.read_tokenizer(LLAMA3_TOKENIZER)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.encode("This is a test sentence.", bos=False, eos=False) == [2028, 374, 264, 1296, 11914, 13]
    assert tok.encode(" Việt", bos=False, eos=False) == [101798]
    assert [tok.special[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>")] == \
        [128006, 128007, 128008, 128009]


@requires_tiktoken
def test_llama3_template_scores_the_response_and_eot_and_keeps_markers_as_ids(bpe_tokenizer):
    tok = tokenizers.read_tokenizer(bpe_tokenizer / "tokenizer.model")
    s = tok.special
    tokens, labels, _ = lladapter.encode_example(tok, "Say <|eot_id|> twice", "ctx", "ok ok", 512, template="llama3")
    prompt = lladapter.encode_prompt(tok, "Say <|eot_id|> twice", "ctx", template="llama3")
    text = lambda t: tok.encode(t, False, False)  # noqa: E731
    header = lambda role: [s["<|start_header_id|>"], *text(role), s["<|end_header_id|>"], *text("\n\n")]  # noqa: E731
    assert prompt == [tok.bos_id, *header("user"), *text("Say <|eot_id|> twice\n\nctx"), s["<|eot_id|>"],
                      *header("assistant")]
    assert tokens == prompt + text("ok ok") + [s["<|eot_id|>"]]
    assert labels == [-100] * len(prompt) + tokens[len(prompt):], "the loss covers the response and <|eot_id|> only"
    # the Alpaca template on a Llama 3 base: BOS <|begin_of_text|>, the targets end in <|end_of_text|>
    tokens, labels, _ = lladapter.encode_example(tok, "Say hi", "", "hi", 512)
    assert tokens[0] == s["<|begin_of_text|>"] and labels[-1] == tokens[-1] == s["<|end_of_text|>"]


def test_generation_stops_at_any_of_several_stop_ids():
    model = tiny_model(open_gates=True)
    greedy = generation.generate(model, [[1, 5, 9]], max_gen_len=8, temperature=0, eos_id=None)[0]
    a, b = greedy[2], greedy[5]
    assert generation.generate(model, [[1, 5, 9]], max_gen_len=8, temperature=0, eos_id={b, a})[0] == \
        greedy[:min(greedy.index(a), greedy.index(b))]
    assert generation.generate(model, [[1, 5, 9]], max_gen_len=8, temperature=0, eos_id=[-5, b])[0] == \
        greedy[:greedy.index(b)]


# ---- memory options: an int8 base (quantize.py), activation checkpointing, the chunked loss --------------------

def int8_model(**overrides):
    import quantize
    return quantize.int8_linears(tiny_model(**overrides), quantize_from_weights=True)


def saved_by_autograd(fn):
    """(result of fn(), the distinct tensors autograd saved for backward while it ran, by storage)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, list(saved.values())


def test_int8_linear_is_within_its_rounding_bound_and_its_backward_is_through_the_dequantized_weight():
    import quantize
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    q = quantize.Int8Linear(64, 96)
    q.quantize_(linear.weight.detach().__getitem__, rows_at_once=40)  # in blocks of rows: the scales are per row
    x = torch.randn(5, 64, requires_grad=True)
    exact, y = linear(x), q(x)
    # each weight moves by at most half its row's scale, so each output by at most |x| . scale / 2
    bound = x.detach().abs().sum(-1, keepdim=True) * q.scales / 2
    assert ((y - exact).abs() <= bound + 1e-6).all()
    assert (y - exact).norm() / exact.norm() < 0.01, "per-row int8 of N(0, 1) weights: within 1% of the fp32 output"
    assert torch.equal(q.weight.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))  # scale = max|row| / 127
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    x2 = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(x2 @ quantize.dequantized(q.weight, q.scales, torch.float32).t(), x2, grad)
    torch.testing.assert_close(gx, expected, rtol=1e-5, atol=1e-6)


def test_a_training_step_on_an_int8_base_keeps_no_dequantized_weight():
    # The naive int8 linear (F.linear with weight.float() * scales) would save a full-precision copy of every matrix.
    model = int8_model(open_gates=True)
    lladapter.mark_only_adapter_trainable(model)
    x = tokens()
    labels = x.clone()
    loss, saved = saved_by_autograd(lambda: lladapter.response_loss(model, x, labels))
    loss.backward()
    assert model.adapter_query.weight.grad.abs().sum() > 0
    int8 = [m for m in model.modules() if type(m).__name__ == "Int8Linear"]
    shapes = {tuple(m.weight.shape) for m in int8}
    dequantized = [t for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]
    assert not dequantized, f"autograd keeps {len(dequantized)} dequantized weights for backward"
    kept_int8 = sum(t.untyped_storage().nbytes() for t in saved if t.dtype == torch.int8)
    adapted = sum(m.weight.numel() for name, m in model.named_modules() if m in int8 and
                  (name == "output" or int(name.split(".")[1]) >= model.first_adapted))
    # what backward keeps of the weights is the int8 matrices themselves, which exist anyway (not all of the lowest
    # adapted layer's: wq, wk and wv there get an input that needs no gradient)
    assert 0 < kept_int8 <= adapted


def test_zero_gates_on_an_int8_base_give_exactly_the_int8_base_logits():
    import quantize
    model = tiny_model()
    base = quantize.int8_linears(base_copy(model), quantize_from_weights=True)
    quantize.int8_linears(model, quantize_from_weights=True)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x)), "zero-init: with closed gates, exactly the (int8) base model"


def adapter_step(model, x, labels, **options):
    model.zero_grad()
    loss = lladapter.response_loss(model, x, labels, **options)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less():
    model = tiny_model(open_gates=True)
    lladapter.mark_only_adapter_trainable(model)
    x = tokens(seqlen=32)
    labels = x.clone()
    (plain, kept_plain) = saved_by_autograd(lambda: adapter_step(model, x, labels))
    model.activation_checkpointing = True
    (recomputed, kept_checkpointed) = saved_by_autograd(lambda: adapter_step(model, x, labels))
    assert torch.equal(plain[0], recomputed[0]) and plain[1].keys() == recomputed[1].keys()
    for name in plain[1]:
        assert torch.equal(plain[1][name], recomputed[1][name]), name
    assert plain[1]["adapter_query.weight"].abs().sum() > 0, "the prompt gets its gradient through the checkpoint"
    # checkpointing keeps each adapted block's input outside autograd's saved tensors: count it in
    inputs = model.args.adapter_layer * x.numel() * model.args.dim * 4
    nbytes = [sum(t.untyped_storage().nbytes() for t in kept) for kept in (kept_plain, kept_checkpointed)]
    assert nbytes[1] + inputs < nbytes[0] / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_gives_the_loss_and_gradients_of_the_unchunked_one(dtype):
    model = tiny_model(open_gates=True)
    for name, p in model.named_parameters():  # the base in dtype, the adapter fp32, as load_llama does
        p.data = p.data if lladapter.is_adapter_key(name) else p.data.to(dtype)
    lladapter.mark_only_adapter_trainable(model)
    x = tokens(seqlen=20)
    labels = x.clone()
    labels[:, :6] = lladapter.IGNORE_INDEX  # 2 x 13 scored positions: chunks of 5 leave a short last one
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        whole = adapter_step(model, x, labels)
        chunked, kept = saved_by_autograd(lambda: adapter_step(model, x, labels, chunk=5))
    torch.testing.assert_close(chunked[0], whole[0], **tolerance)
    for name in whole[1]:
        torch.testing.assert_close(chunked[1][name], whole[1][name], **tolerance)
    assert not [t for t in kept if t.dim() and t.shape[-1] == VOCAB], "no chunk's logits are kept for backward"


# ---- many adapters on one base, in one batch -------------------------------------------------------------------

def three_adapters(**overrides):
    """Adapters of one base (the same seed draws the same base weights whatever K and L), with different L and K."""
    return {name: tiny_model(open_gates=True, adapter_layer=L, adapter_len=K, **overrides)
            for name, (L, K) in {"L2": (2, 3), "L4": (4, 3), "L1K5": (1, 5)}.items()}


def test_each_row_of_a_mixed_batch_gets_what_its_adapter_alone_gives():
    models = three_adapters()
    base = base_copy(models["L2"])
    bank = generation.AdapterBank(base, {name: as_adapter(m) for name, m in models.items()})
    prompts = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34], [1, 3, 4], [1, 8, 8, 8, 8], [1, 2], [1, 60, 61]]
    rows = [0, 1, 2, 3, 1, 0, 3]  # the base, and each adapter: ragged prompts, every row its own
    mixed = generation.generate(base, prompts, 8, temperature=0, bank=bank, rows=rows)
    for prompt, row, tokens in zip(prompts, rows, mixed):
        alone = base if row == 0 else models[bank.names[row]]  # the adapter loaded the ordinary way
        assert tokens == generation.generate(alone, [prompt], 8, temperature=0)[0], (bank.names[row], prompt)
    assert len({tuple(t) for t in mixed[:4]}) == 4, "the adapters answer differently, or the test shows nothing"


def test_the_banks_prompt_keys_values_and_gates_are_those_the_model_computes():
    models = three_adapters()
    base = base_copy(models["L2"])
    bank = generation.AdapterBank(base, {name: as_adapter(m) for name, m in models.items()})
    assert bank.first == 0 and bank.names == ["base", "L2", "L4", "L1K5"]
    for i in range(base.args.n_layers):
        keys, values, gates, seen = bank.layers[i]
        assert not gates[0].any() and seen is not None  # the base: every gate zero; K of 3 and 5: masked
        for n, model in enumerate(models.values(), 1):
            if i < model.first_adapted:  # a layer this adapter leaves alone: gate zero, exactly the base there
                assert not gates[n].any()
                continue
            prompt = model.adapter_prompts()[:, i - model.first_adapted]
            pk, pv = model.layers[i].attention.prompt_keys_values(prompt, torch.float32, 1)
            K = model.args.adapter_len
            assert torch.equal(keys[n, :, :K], pk[0]) and torch.equal(values[n, :, :K], pv[0])
            assert torch.equal(gates[n], model.layers[i].attention.gate[0].expand_as(gates[n]))  # one per head
            assert seen[n, ..., :K].all()
            assert not seen[n, ..., K:].any()
    assert bank.nbytes == 4 * 4 * 2 * base.args.n_heads * 5 * (base.args.dim // base.args.n_heads) * 4
