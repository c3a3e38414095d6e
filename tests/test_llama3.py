"""Slow tier: Llama 3 through the scripts (train.py --template=llama3, generate.py), and a Llama 3 config saved by
transformers (skipped without transformers)."""
import json
import shutil

import pytest
import torch

import checkpoint
import generation
from tests.conftest import log_of, run_generate, train
from tests.fixtures import BPE_RANKS, LLAMA3_VOCAB, llama3_model, write_hf_checkpoint


def test_train_py_adapts_a_llama3_base_in_its_chat_format_and_generate_py_reads_the_adapter_back(task, tmp_path,
                                                                                                   bpe_tokenizer):
    base, out = tmp_path / "Llama-3-tiny", tmp_path / "out"
    write_hf_checkpoint(llama3_model(max_seq_len=512), base, bpe_tokenizer / "tokenizer.json")
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [BPE_RANKS + 1, BPE_RANKS + 9]}))
    # --adapter_layer=-1 restores the default that train() overrides: all but the bottom two layers
    train(task, out, f"--ckpt_dir={base}", "--template=llama3", "--adapter_layer=-1", "--epochs=3",
          "--base_lr=10.0", "--micro_batch_size=8")
    log = log_of(out)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert len(log[0]["gates"]) == 4 - 2, "the default adapts all but the bottom two of the 4 layers"
    code, stdout, stderr = run_generate(task, f"--ckpt_dir={base}", "--template=llama3", "--temperature=0",
                                        "--max_gen_len=8", "--prompt=Which colour is the owl?", adapter=out / "adapter.pth")
    assert code == 0, stderr  # K and L came from the adapter file: no flag gave them
    assert f"adapter {out / 'adapter.pth'}" in stderr
    assert "<|eot_id|>" not in stdout, "a response ends at <|eot_id|>, the chat format's end of turn"


def test_a_llama3_saved_by_transformers_loads_to_its_logits_and_greedy_tokens(tmp_path, bpe_tokenizer):
    # transformers writes its own config style (rope_scaling in 4.x, rope_parameters in 5) and leaves out the tied
    # lm_head; transformers is not a dependency: `pip install transformers` to run this.
    transformers = pytest.importorskip("transformers")
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=176,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                                      rope_scaling=rope, tie_word_embeddings=True)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(bpe_tokenizer / "tokenizer.json", tmp_path)
    model, _ = checkpoint.load_llama(tmp_path, device="cpu", adapter_layer=0, max_seq_len=600)
    assert model.args.rope_scaling_factor == 32.0 and model.output.weight is model.tok_embeddings.weight
    x = torch.randint(0, LLAMA3_VOCAB, (2, 500), generator=torch.Generator().manual_seed(1))  # long: the scaling shows
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits.float(), rtol=1e-4, atol=1e-4)
        theirs = reference.generate(x[:, :12], max_new_tokens=16, do_sample=False, min_new_tokens=16, pad_token_id=0)
    ours = generation.generate(model, x[:, :12].tolist(), max_gen_len=16, temperature=0.0)
    assert ours == theirs[:, 12:].tolist(), "greedy continuations differ from transformers' own"
