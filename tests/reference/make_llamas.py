"""Makes the fast tier's outside reference: two tiny seeded Llamas built, saved and run by Hugging Face's transformers
(an implementation of LLaMA independent of this project's), and the logits transformers computes for fixed tokens.

    pip install transformers && python tests/reference/make_llamas.py

writes tests/reference/<name>/ (config.json and model.safetensors, as transformers saves them) and
tests/reference/<name>/logits.pt ({"tokens": (2, 16) ids, "logits": (2, 16, vocab) fp32}) for
- llama2-tiny: LLaMA-2's shape (one kv head per head, rope theta 10,000, an output head of its own);
- llama3-tiny: Llama 3.2's (grouped-query attention, theta 500,000, "llama3" rotary scaling with factor 8, the output
  head tied to the embeddings; head_dim 16, so that its 8 rotary frequencies fall in all three scaling bands).
The weights are drawn by transformers' own initialisation from a fixed seed, rounded to bf16 values and saved in bf16
(so the files stay small), and the logits computed in fp32 from those very values. test_lladapter.py loads each
folder with checkpoint.load_llama, Hugging Face's path (with its rotary row permutation), and holds the model to
these logits within 1e-5. Run again only to change the references; the output is the same on any machine for the
same transformers and torch (made with transformers 5.25.0 and torch 2.13.0).
"""
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
VOCAB = 96
SHAPES = {
    "llama2-tiny": dict(max_position_embeddings=4096, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-tiny": dict(max_position_embeddings=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def main():
    for seed, (name, shape) in enumerate(SHAPES.items()):
        config = transformers.LlamaConfig(vocab_size=VOCAB, rms_norm_eps=1e-5,
                                          hidden_act="silu", **shape)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # bf16 values, so that the bf16 file holds them exactly
                p.copy_((p + 0.02 * torch.randn_like(p)).to(torch.bfloat16).float())  # norms away from 1 too
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(input_ids=tokens).logits.float()
        model.to(torch.bfloat16).save_pretrained(HERE / name, safe_serialization=True)
        torch.save({"tokens": tokens, "logits": logits}, HERE / name / "logits.pt")
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, logits {list(logits.shape)}")


if __name__ == "__main__":
    main()
