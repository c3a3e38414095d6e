"""Slow tier: the Hugging Face layout and PEFT's adapters checked against the libraries that define them (skipped
without transformers and peft, which are not dependencies)."""
import shutil

import pytest
import torch

import checkpoint
import generation
import lladapter

from tests.fixtures import VOCAB, tokens


def saved_llama(transformers, folder, tokenizer, n_layers):
    """A tiny Llama with grouped-query attention, made and saved by transformers (seeded), our tokenizer beside it."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=n_layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return model


def test_a_llama_saved_by_transformers_loads_to_its_logits_and_greedy_tokens(tmp_path, spm_tokenizer):
    # The other tests write Hugging Face's layout themselves; this one takes it from the library that defines it.
    # transformers is not a dependency: `pip install transformers` to run it.
    transformers = pytest.importorskip("transformers")
    reference = saved_llama(transformers, tmp_path, spm_tokenizer, n_layers=2)
    model, _ = checkpoint.load_llama(tmp_path, device="cpu", adapter_layer=0, max_seq_len=64)
    x = tokens().cpu()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits.float(), rtol=1e-4, atol=1e-4)
        theirs = reference.generate(x, max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    ours = generation.generate(model, x.tolist(), max_gen_len=16, temperature=0.0)
    assert ours == theirs[:, x.shape[1]:].tolist(), "greedy continuations differ from transformers' own"


def test_an_adapter_trained_with_peft_loads_to_the_logits_peft_computes(tmp_path, spm_tokenizer):
    # PEFT's adaption_prompt, saved by PEFT itself, its gates set to known values in (-1, 1): this code's model, with
    # the adapter converted on loading (tanh(atanh(g)) = g), gives PEFT's logits. peft is not a dependency either:
    # `pip install transformers peft` to run this.
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = saved_llama(transformers, tmp_path / "base", spm_tokenizer, n_layers=3)
    adapted = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2,
                                                                 task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for i, (name, p) in enumerate((n, p) for n, p in adapted.named_parameters() if "adaption_gate" in n):
            p.fill_([0.7, -0.45][i])
    adapted.save_pretrained(tmp_path / "peft")
    model, _ = checkpoint.load_llama(tmp_path / "base", adapter_path=tmp_path / "peft", device="cpu", max_seq_len=64)
    assert (model.args.adapter_layer, model.args.adapter_len) == (2, 5)
    x = tokens().cpu()
    with torch.no_grad():
        theirs = adapted(input_ids=x).logits.float()
        torch.testing.assert_close(model(x), theirs, rtol=1e-4, atol=1e-4)
        with lladapter.gates_closed(model):
            assert not torch.allclose(model(x), theirs, atol=1e-3)
