"""Slow tier: the Hugging Face layout checked against the library that defines it (skipped without transformers)."""
import shutil

import pytest
import torch

import checkpoint
import lladapter

from tests.fixtures import VOCAB, tokens

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
