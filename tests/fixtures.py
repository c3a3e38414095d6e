"""Shared pieces of both test tiers: tiny seeded models, and writers of the files real checkpoints come as (Meta's
layout, Hugging Face's safetensors, SentencePiece and Llama 3's BPE tokenizers), written here independently of
checkpoint.py (its own writer, save_meta_checkpoint, is what the tests check against these)."""
import base64
import collections
import importlib.util
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
import lladapter
from lladapter import ModelArgs, Transformer
from tokenizer import llama3_special

ROOT = Path(__file__).resolve().parent.parent  # the reference's folder
SHARED = ROOT.parent / "shared"  # the real LLaMA-2 and Llama 3 tokenizers, where this checkout has them
VOCAB = 96
DEVICE = os.environ.get("LLADAPTER_TEST_DEVICE", "cpu")
# One CPU thread: tiny models gain nothing from more, and on a busy machine OpenMP's waiting threads spin, which made
# the tier several times slower (93 s against 14 s for the decoding tests, measured side by side at load 5.6).
torch.set_num_threads(1)
requires_tiktoken = pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None,
                                       reason="reading a Llama 3 tokenizer needs tiktoken (optional: pip install tiktoken)")


def tiny_args(**overrides):
    args = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=None, vocab_size=VOCAB, multiple_of=32, norm_eps=1e-5,
                max_seq_len=64, adapter_len=3, adapter_layer=2)
    return ModelArgs(**{**args, **overrides})


def tiny_model(seed=0, open_gates=False, **overrides):
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides)).to(DEVICE)
    if open_gates:  # as after some training: every head's gate somewhere in (-1, 1)
        with torch.no_grad():
            for gate in model.gates():
                gate.uniform_(-1.5, 1.5)
    return model


def base_copy(model):
    """The same weights in a plain LLaMA (adapter_layer=0), loaded strictly."""
    base = Transformer(ModelArgs(**{**vars(model.args), "adapter_layer": 0})).to(DEVICE)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)})
    return base


def as_adapter(model):
    """The adapter `model` holds, as checkpoint.read_adapter would give it from its file."""
    a = model.args
    return checkpoint.Adapter(Path("(a model in memory)"), a.adapter_len, a.adapter_layer, a.image_dim,
                              lladapter.adapter_state_dict(model))


def adapter_file_tensors(path):
    """The tensors of an adapter file, without the config that describes them."""
    return {k: v for k, v in torch.load(path).items() if k != "adapter_config"}


def tokens(bsz=2, seqlen=12, seed=1):
    return torch.randint(3, VOCAB, (bsz, seqlen), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def cached_logits(model, toks, chunks, image=None):
    """Logits from feeding `toks` through the KV cache in chunks of the given lengths (an int start_pos each)."""
    model.setup_cache(toks.shape[0], toks.shape[1], image)
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(toks[:, pos:pos + n], start_pos=pos))
            pos += n
    model.clear_cache()
    return torch.cat(out, dim=1)


class SDPACalls(torch.overrides.TorchFunctionMode):
    """Every scaled_dot_product_attention call made inside it, as (q, k, v, attn_mask); the calls still run."""

    def __enter__(self):
        self.calls = []
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls.append((*args[:3], kwargs.get("attn_mask", args[3] if len(args) > 3 else None)))
        return func(*args, **kwargs)


# ---- Meta's layout and SentencePiece -----------------------------------------------------------------------

# How Meta's model-parallel checkpoints split each tensor (as Meta's own loader joins them); norms are replicated.
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta_checkpoint(model, ckpt_dir, n_shards=1, vocab_size=None, embeddings_by_vocab=False, **more_params):
    """Write `model`'s base weights in Meta's layout, split into model-parallel shards as Meta splits them (Llama 3:
    embeddings_by_vocab, its rows split). more_params: params.json fields (Llama 3: rope_theta, use_scaled_rope)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not lladapter.is_adapter_key(k)}  # output.weight even if tied
    for rank in range(n_shards):
        shard = {}
        for key, tensor in state.items():
            dim = 0 if embeddings_by_vocab and key == "tok_embeddings.weight" else META_SPLIT.get(key.split(".")[-2])
            shard[key] = (tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank]).cpu().clone()
        shard["rope.freqs"] = torch.randn(8)  # Meta's files carry this table; it is not a weight
        torch.save(shard, ckpt_dir / f"consolidated.{rank:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, multiple_of=a.multiple_of, norm_eps=a.norm_eps,
                  vocab_size=a.vocab_size if vocab_size is None else vocab_size)
    if a.n_kv_heads:
        params["n_kv_heads"] = a.n_kv_heads
    (ckpt_dir / "params.json").write_text(json.dumps({**params, **more_params}))


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """A SentencePiece model with exactly VOCAB pieces and LLaMA's special ids, trained in a second on text written here."""
    from walkthrough.world import train_tokenizer
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(300)]
    train_tokenizer([" ".join(rng.choices(words, k=12)) for _ in range(2000)], d / "tokenizer", VOCAB)
    return d / "tokenizer.model"


# ---- Hugging Face's layout ----------------------------------------------------------------------------------

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

    state = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not a.tie_word_embeddings:  # tied (Llama 3.2 1B, 3B): Hugging Face's files have no lm_head
        state["lm_head.weight"] = model.output.weight
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


def write_hf_checkpoint(model, d, tokenizer, layout="model.safetensors", dtype=torch.float32, permute=True,
                        transformers_version=4):
    """`model`'s base weights in Hugging Face's layout: config.json, the tokenizer file and one of the weight layouts
    "model.safetensors", "two shards" (with model.safetensors.index.json) or "pytorch_model.bin". The rotary
    settings as transformers 4 writes them (rope_theta, rope_scaling) or as transformers 5 does (rope_parameters)."""
    d.mkdir(parents=True, exist_ok=True)
    a = model.args
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": model.layers[0].feed_forward.w1.weight.shape[0], "num_hidden_layers": a.n_layers,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads or a.n_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
              "max_position_embeddings": 2048, "hidden_act": "silu", "tie_word_embeddings": a.tie_word_embeddings,
              "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2}
    scaling = {"rope_type": "llama3", "factor": a.rope_scaling_factor, "low_freq_factor": a.rope_low_freq_factor,
               "high_freq_factor": a.rope_high_freq_factor,
               "original_max_position_embeddings": a.rope_original_max_position} if a.rope_scaling_factor != 1 else None
    if transformers_version == 4:
        config["rope_scaling"] = scaling
    else:
        config["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": config.pop("rope_theta")}
    (d / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer, d / Path(tokenizer).name)
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


# ---- Llama 3: its tokenizer's two files, a tiny Llama 3.2 ---------------------------------------------------

BPE_RANKS = 300  # the tiny BPE's: the 256 bytes and 44 merges; Llama 3 has 128,000
LLAMA3_VOCAB = BPE_RANKS + 256  # and 256 special tokens after them, as in Llama 3 (128,256)
BPE_TEXTS = ["The quick brown fox jumps over the lazy dog's back, they'll say.", "Tiếng Việt có dấu; Việt Nam.",
             "日本語のテキストです。", "Ελληνικά και русский текст", "def f(x):\n    return x ** 2  # 12345\n",
             "\t\tindented\r\n\n  two  spaces   ", "a llama 🦙🦙, 3.14159 and <|eot_id|> as plain text"]


def train_bpe(texts, n_ranks):
    """A byte-level BPE vocabulary {bytes: rank}: the 256 bytes, then the most frequent adjacent pair, merged."""
    words = [[bytes([b]) for b in w.encode()] for t in texts for w in re.findall(r" ?\S+|\s+", t)]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < n_ranks:
        pairs = collections.Counter(pair for w in words for pair in zip(w, w[1:]))
        (a, b), _ = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def write_bpe_tokenizer(ranks, d):
    """`ranks` as both files Llama 3 ships: Meta's tokenizer.model (a "base64 rank" line per rank) and Hugging Face's
    tokenizer.json (each token's bytes spelled in GPT-2's printable characters, the specials as added tokens)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    # GPT-2's table, written here from its definition: printable bytes are themselves, the rest U+0100 on, in order
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    spelled = {b: chr(b) for b in printable} | {b: chr(0x100 + n) for n, b in
                                                enumerate(b for b in range(256) if b not in printable)}
    vocab = {"".join(spelled[b] for b in t): r for t, r in ranks.items()}
    added = [{"id": i, "content": text, "special": True} for text, i in llama3_special(len(ranks)).items()]
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": added,
                                                 "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    return d


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """A folder with a tiny Llama-3-style BPE tokenizer in both file forms (tokenizer.model, tokenizer.json)."""
    return write_bpe_tokenizer(train_bpe(BPE_TEXTS, BPE_RANKS), tmp_path_factory.mktemp("bpe"))


def llama3_model(**overrides):
    """A tiny Llama 3.2: GQA, tied embeddings, theta 500,000, "llama3" rope scaling; head_dim 16, so that its 8
    frequencies fall in all three bands (kept, blended, divided by s)."""
    return tiny_model(seed=5, vocab_size=LLAMA3_VOCAB, n_kv_heads=2, rope_theta=500000.0, rope_scaling_factor=8.0,
                      tie_word_embeddings=True, **overrides)
