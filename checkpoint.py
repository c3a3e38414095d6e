"""
Weights and adapters, read and written without running code from any file. load_llama, first below, builds the model.

- Base checkpoints in Meta's layout (params.json, consolidated.NN.pth: one file per model-parallel rank) and in
  Hugging Face's (config.json, then model.safetensors, sharded safetensors with their index, or pytorch_model*.bin),
  LLaMA-1, 2 and Llama 3.x. Torch files go through torch.load's weights_only unpickler; safetensors files are read
  here, memory-mapped. Every tensor is read lazily and only the rows asked for: an FSDP process reads just its own
  rows, and an int8 base (quantize.py) is quantized as its rows are read, never whole in full precision.
- Adapter files: the adapter's fp32 tensors plus "adapter_config" (K, L, the image width and the base's shape), so
  `--adapter=` needs no other flag; the original export's files (K and L read off the tensors) and PEFT's
  adaption_prompt folders load too.

Every problem a user can cause is an InputError naming the file, and the tensor where there is one.
"""
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cli import InputError, device_of, read_json
from lladapter import ModelArgs, Transformer, adapter_state_dict, adapter_tensors, is_adapter_key, rope_of, set_precision
from tokenizer import SentencePieceTokenizer, read_tokenizer


# ----------------------------------------------------------------------------------------------------------
# Building the model from a checkpoint

def load_llama(ckpt_dir, tokenizer_path=None, adapter_path=None, device=None, dtype=None, shard=None, quantize="",
               **model_args):
    """Build a Transformer from a base checkpoint in Meta's or Hugging Face's layout; returns (model, tokenizer).

    The tokenizer is tokenizer.model or tokenizer.json in ckpt_dir, or tokenizer.model beside it (any kind that
    read_tokenizer reads). model_args override the checkpoint's own (max_seq_len, by default the model's context;
    adapter_len, adapter_layer, image_dim, rope_scaling_factor); with adapter_path, K, L and the image width come
    from the adapter (this project's file, the original release's, or a PEFT adaption_prompt folder).
    The base weights go to `dtype` (default bf16 on a GPU, fp32 on CPU), the adapter stays fp32; without adapter_path
    the adapter is new. shard: a function applied to the model before any weight is read (FSDP's fully_shard, in
    train.py --fsdp); a parameter it splits is read only for this process's rows.
    quantize="int8": the block matrices and the output head int8 with a scale per row (quantize.py), quantized as
    they are read, a block of rows at a time, so the full-precision model never exists in memory.
    """
    ckpt_dir, device = Path(ckpt_dir), device_of(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if quantize not in ("", "int8"):
        raise InputError(f"quantize={quantize!r}: expected int8, or nothing")
    if quantize and shard is not None:  # FSDP2 gathers a block's tensors as one buffer of a single dtype
        raise InputError("--quantize=int8 with a sharded (--fsdp) base is not supported: use DDP, or one process")
    source, read_checkpoint = layout_of(ckpt_dir)
    if tokenizer_path is None:
        candidates = [ckpt_dir / "tokenizer.model", ckpt_dir / "tokenizer.json", ckpt_dir.parent / "tokenizer.model"]
        tokenizer_path = next((p for p in candidates if p.is_file()), candidates[0])
    tokenizer = read_tokenizer(tokenizer_path, stop_ids_of(ckpt_dir))
    params, stored = read_checkpoint(ckpt_dir)
    unknown = params.keys() - ModelArgs.__dataclass_fields__.keys()
    if unknown:
        raise InputError(f"{source}: unknown fields {sorted(unknown)}")
    for key, value in params.items():
        if not isinstance(value, (int, float, type(None))):
            raise InputError(f"{source}: {key} is {value!r}, not a number")
    adapter = read_adapter(adapter_path, params, model_args) if adapter_path is not None else None
    try:
        args = ModelArgs(**{**params, **model_args, **(adapter.settings() if adapter else {})})
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        with torch.device("meta"):  # shapes only: the values come from the checkpoint, no time spent on init
            model = Transformer(args)
    except (ValueError, TypeError) as e:  # heads that don't divide dim, a string where a number goes, ...
        raise InputError(f"{source}: {e}") from None
    check_weights(model, stored, ckpt_dir, source)
    set_precision(model, dtype)  # the adapter (absent from a base file, present in a full fine-tune's) in fp32
    if quantize:
        import quantize as quantization  # the reference needs it only here
        quantization.int8_linears(model)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    if args.tie_word_embeddings and not quantize:  # to_empty gave each its own tensor: share the one matrix again
        model.output.weight = model.tok_embeddings.weight
    fill_weights(model, stored)
    model.rope = rope_of(args, device)
    if any(k not in stored for k in adapter_tensors(model)):
        model.reset_adapter()
    if adapter is not None:
        load_adapter(model, adapter)
    return model, tokenizer


def layout_of(ckpt_dir):
    """(the file that describes the checkpoint, the function that reads it) for Hugging Face's layout or Meta's."""
    if not ckpt_dir.is_dir():
        raise InputError(f"{ckpt_dir}: no such checkpoint directory")
    if (ckpt_dir / "config.json").is_file():
        return ckpt_dir / "config.json", hf_checkpoint
    if (ckpt_dir / "params.json").is_file():
        return ckpt_dir / "params.json", meta_checkpoint
    raise InputError(f"{ckpt_dir}: neither Meta's layout (params.json, consolidated.00.pth) nor Hugging Face's "
                     f"(config.json, *.safetensors)")


def check_weights(model, stored, ckpt_dir, source):
    """Refuse a checkpoint whose tensors are not exactly the model's (the adapter's may be absent), or of other
    shapes, naming them: no weight is ever left at its initial value unnoticed."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    unexpected = sorted(stored.keys() - expected.keys())
    missing = sorted(k for k in expected.keys() - stored.keys() if not is_adapter_key(k))
    if unexpected or missing:
        hint = " (an adapter file, not a base checkpoint?)" if stored and all(map(is_adapter_key, stored)) else ""
        raise InputError(f"{ckpt_dir}: the weights don't match {source.name}{hint}: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for key, tensor in stored.items():
        if tensor.shape != expected[key]:
            raise InputError(f"{tensor.where}: {key} has shape {list(tensor.shape)}, {source.name} implies "
                             f"{list(expected[key])}")


@torch.no_grad()
def fill_weights(model, stored):
    """The checkpoint's values into the model's (empty) tensors, one at a time and only the rows this process holds;
    an int8 matrix quantized from its full-precision rows as they are read."""
    for name, p in model.named_parameters():
        if name in stored and p.is_floating_point():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.copy_(stored[name].read(local_rows(p, stored[name].shape[0])))
    for name, module in model.named_modules():
        if hasattr(module, "quantize_"):  # quantize.Int8Linear
            module.quantize_(stored[f"{name}.weight"].read)


def local_rows(param, n_rows) -> slice:
    """The rows of the whole tensor that this process holds: all of them, or its shard when FSDP split the
    parameter (torch.chunk's split along dim 0: ceil(n / world) rows per process, fewer for the last)."""
    if not hasattr(param, "to_local"):
        return slice(None)
    mesh_rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    start = min(n_rows, mesh_rank * math.ceil(n_rows / world))
    return slice(start, start + param.to_local().shape[0])


def fully_shard_base(model):
    """Shard the frozen base over the processes with FSDP2, for load_llama(shard=...) (train.py --fsdp).

    Each TransformerBlock is a unit whose weights are gathered only while it runs; the embeddings, final norm and
    output head belong to the root. The adapter stays whole in every process, in fp32: FSDP ignores it, and
    train.py sums its gradients over processes, as DDP would.
    """
    from torch.distributed.fsdp import fully_shard
    adapter = set(adapter_tensors(model).values())
    for layer in model.layers:
        fully_shard(layer, ignored_params=adapter & set(layer.parameters()))
    fully_shard(model, ignored_params=adapter)


def stop_ids_of(ckpt_dir):
    """The ids that end a generation, from generation_config.json (in ckpt_dir, or beside it as for Meta's files in
    a Hugging Face download's original/): eos_token_id, an int or a list; None where no such file says."""
    for path in (ckpt_dir / "generation_config.json", ckpt_dir.parent / "generation_config.json"):
        if path.is_file():
            config = read_json(path)
            ids = config.get("eos_token_id") if isinstance(config, dict) else None
            ids = [ids] if isinstance(ids, int) else ids
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise InputError(f"{path}: eos_token_id is {ids!r}, not an id or a list of ids")
            return set(ids)
    return None


# ----------------------------------------------------------------------------------------------------------
# Base checkpoints as lazily read tensors, named as Meta names them

# A tensor of a checkpoint, not yet read: read(rows) returns those rows (a slice) of the whole tensor; `where`
# names its file (and the file's own name for it) in messages.
Stored = namedtuple("Stored", "shape read where")

# How Meta's model-parallel checkpoints split each tensor (as Meta's own loader joins them); norms are replicated.
MODEL_PARALLEL_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def joined(parts, dim, where, key) -> Stored:
    """torch.cat(parts, dim), never built: rows are read from the parts that hold them."""
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    if any(list(p.shape[:dim]) + list(p.shape[dim + 1:]) != shape[:dim] + shape[dim + 1:] for p in parts):
        raise InputError(f"{where}: {key}: the shards' shapes {[list(p.shape) for p in parts]} don't join along "
                         f"dim {dim}")

    def read(rows):
        if dim == 1:  # every part holds some columns of every row
            return torch.cat([p[rows] for p in parts], dim=1)
        start, stop, _ = rows.indices(shape[0])
        pieces, offset = [], 0
        for p in parts:  # the parts hold consecutive runs of rows
            lo, hi = max(start - offset, 0), min(stop - offset, len(p))
            if lo < hi:
                pieces.append(p[lo:hi])
            offset += len(p)
        return torch.cat(pieces) if pieces else parts[0][:0]
    return Stored(torch.Size(shape), read, where)


def meta_checkpoint(ckpt_dir):
    """Meta's layout: (params.json as a dict, {name: Stored}), the model-parallel shards memory-mapped."""
    params = read_json(ckpt_dir / "params.json")
    if not isinstance(params, dict):
        raise InputError(f"{ckpt_dir / 'params.json'}: not a JSON object")
    scaled = params.pop("use_scaled_rope", False)
    if scaled:
        # Llama 3.1, 3.2, 3.3: params.json says only that the frequencies are scaled. The factor is 8, but 32 for 3.2
        # 1B and 3B (Hugging Face's configs state it; Meta's reference hard-codes 8): known by their shapes.
        # load_llama(rope_scaling_factor=...) overrides it.
        llama_3_2 = (params.get("dim"), params.get("n_layers")) in ((2048, 16), (3072, 28))
        params["rope_scaling_factor"] = 32.0 if llama_3_2 else 8.0
    # The context, which params.json does not state: Llama 3.1 and later 131,072 tokens, Llama 3 8,192 (its 128K
    # vocabulary tells it), LLaMA-1 2,048 (LLaMA-2's is 4,096: load_llama(max_seq_len=4096) for that)
    params.setdefault("max_seq_len", 131072 if scaled else 8192 if params.get("vocab_size", 0) >= 128000 else 2048)
    files = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not files:
        raise InputError(f"{ckpt_dir}: no consolidated.*.pth checkpoint files")
    shards = [torch_load(f, mmap=True) for f in files]  # memory-mapped: pages are read as rows are used
    for shard, file in zip(shards, files):
        if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
            raise InputError(f"{file}: not a checkpoint (expected a dict of tensors)")
    keys = shards[0].keys() - {"rope.freqs"}  # rope.freqs is a precomputed table, not a weight
    for shard, file in zip(shards[1:], files[1:]):
        if shard.keys() - {"rope.freqs"} != keys:
            raise InputError(f"{file} holds other tensors than {files[0]}")
    where = files[0] if len(files) == 1 else ckpt_dir / f"{files[0].name}..{files[-1].name}"
    stored = {}
    for key in keys:
        parts = [shard[key] for shard in shards]
        dim = MODEL_PARALLEL_DIM.get(key.split(".")[-2])  # "layers.3.attention.wq.weight" -> "wq"
        if key == "tok_embeddings.weight" and parts[0].shape[-1] == params.get("dim"):
            dim = 0  # Llama 3 splits the embeddings by vocabulary (whole rows), LLaMA-1 and 2 by width
        if len(parts) == 1 or dim is None:  # one file, or a norm (every shard holds a copy)
            stored[key] = Stored(parts[0].shape, parts[0].__getitem__, where)
        else:
            stored[key] = joined(parts, dim, where, key)
    return params, stored


# Hugging Face's names for Meta's, per layer and for the rest
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                  "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                  "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
                  "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def meta_name(hf_name):
    if hf_name in HF_NAMES:
        return HF_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.weight"
    return None


def hf_params(config, path) -> dict:
    """config.json as params.json fields."""
    problems = [f"model_type is {config.get('model_type')!r}, not 'llama'"] if config.get("model_type") != "llama" else []
    problems += [f"{k} is {config[k]!r}" for k in ("attention_bias", "mlp_bias") if config.get(k)]
    problems += [f"hidden_act is {config['hidden_act']!r}"] if config.get("hidden_act", "silu") != "silu" else []
    # The rotary settings: transformers 4 writes rope_theta and rope_scaling (null, or Llama 3.1's "llama3" numbers),
    # transformers 5 both inside rope_parameters.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise InputError(f"{path}: rope_parameters or rope_scaling is {rope!r}, not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems += [f"its rope scaling is {rope_type!r}"] if rope_type not in ("default", "llama3") else []
    try:
        dim, n_heads, hidden = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
        params = dict(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads, hidden_dim=hidden,
                      n_kv_heads=config.get("num_key_value_heads"), vocab_size=config["vocab_size"],
                      norm_eps=config.get("rms_norm_eps", 1e-6),
                      rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                      max_seq_len=config.get("max_position_embeddings", 2048))  # the context
        if rope_type == "llama3":
            params.update(rope_scaling_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                          rope_high_freq_factor=rope["high_freq_factor"],
                          rope_original_max_position=rope["original_max_position_embeddings"])
    except KeyError as e:
        raise InputError(f"{path}: no {e.args[0]!r}") from None
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        problems.append(f"head_dim is {config['head_dim']}, not hidden_size / num_attention_heads")
    if problems:
        raise InputError(f"{path}: not a LLaMA this code implements: {'; '.join(problems)}")
    return params


def unpermuted(stored, n_heads) -> Stored:
    """wq or wk as Meta stores it. Meta rotates adjacent pairs (2i, 2i+1) of each head; Hugging Face's conversion
    reordered each head's rows so that pair i sits at (i, i + head_dim/2). Meta row h*head_dim + 2i + j is
    Hugging Face row h*head_dim + j*head_dim/2 + i."""
    head_dim = stored.shape[0] // n_heads

    def read(rows):
        r = torch.arange(stored.shape[0])[rows]
        head, i, j = r // head_dim, (r % head_dim) // 2, r % 2
        return stored.read(head * head_dim + j * (head_dim // 2) + i)
    return Stored(stored.shape, read, stored.where)


def hf_checkpoint(ckpt_dir):
    """Hugging Face's layout: (config.json as params.json fields, {Meta name: Stored})."""
    config = read_json(ckpt_dir / "config.json")
    params = hf_params(config, ckpt_dir / "config.json")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (ckpt_dir / index_name).is_file():
            index = read_json(ckpt_dir / index_name)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise InputError(f"{ckpt_dir / index_name}: no 'weight_map' from tensor names to file names")
            files = sorted(set(weight_map.values()))
            break
        if (ckpt_dir / single).is_file():
            files = [single]
            break
    else:
        raise InputError(f"{ckpt_dir}: config.json but no model.safetensors, model.safetensors.index.json, "
                         f"pytorch_model.bin or pytorch_model.bin.index.json")
    stored = {}
    for name in files:
        file = ckpt_dir / name
        if not file.is_file():
            raise InputError(f"{file}: no such file (named in the checkpoint's index)")
        tensors = read_safetensors(file) if file.suffix == ".safetensors" else torch_load(file, mmap=True)
        for hf_name, tensor in tensors.items():
            key = meta_name(hf_name)
            if key is not None and not tensor.is_floating_point():  # e.g. "F32" read as "I32": a damaged header
                raise InputError(f"{file}: {hf_name}: its values are {tensor.dtype}, not a weight's floating point")
            if key is None and not hf_name.endswith("rotary_emb.inv_freq"):  # a rope table, not a weight
                key = hf_name  # reported as unexpected by load_llama
            if key is not None:
                stored[key] = Stored(tensor.shape, tensor.__getitem__, f"{file}: {hf_name}")
    if "output.weight" not in stored and config.get("tie_word_embeddings"):
        stored["output.weight"] = stored.get("tok_embeddings.weight")  # one matrix for the input and output
    for key in list(stored):
        if key.endswith(("attention.wq.weight", "attention.wk.weight")) and stored[key] is not None:
            heads = params["n_heads"] if key.endswith("wq.weight") else params["n_kv_heads"] or params["n_heads"]
            stored[key] = unpermuted(stored[key], heads)
    return params, {k: v for k, v in stored.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------
# Adapter files

ADAPTER_CONFIG = "adapter_config"  # the key under which an adapter file describes itself (plain ints)
ADAPTER_FIELDS, BASE_FIELDS = ("adapter_len", "adapter_layer", "image_dim"), ("dim", "n_layers", "n_heads")


@dataclass
class Adapter:
    """An adapter as read from its file: its K, L and image width, and its fp32 tensors by name (adapter_query.weight
    [L*K, dim], layers.{i}.attention.gate [1, n_heads, 1, 1] of its top L layers, and an image adapter's
    adapter_image_proj), checked against the base it was read for. `path` names it in messages."""
    path: Path
    adapter_len: int
    adapter_layer: int
    image_dim: int
    tensors: dict

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in ADAPTER_FIELDS}


def save_adapter(model, path):
    """The adapter's tensors (fp32) and what is needed to rebuild it on its base, written atomically."""
    config = {k: getattr(model.args, k) for k in (*ADAPTER_FIELDS, *BASE_FIELDS)}
    atomic_save({**adapter_state_dict(model), ADAPTER_CONFIG: config}, path)


def read_adapter(path, params, given=None, model=None) -> Adapter:
    """The adapter at `path` (this project's file, the original release's, or a PEFT adaption_prompt folder) for a
    base with `params` (params.json's fields), read once and checked against that base.

    K, L and the image width come from the file's adapter_config when it has one. Otherwise they are read off the
    tensors: the original export stores a gate for every layer, zero where it did not adapt, so the adapted layers
    are the top ones from the lowest nonzero gate up; our older files store only the adapted layers' gates;
    K = rows of adapter_query / L. `given` (the user's settings) settles what the file leaves open, and must not
    contradict what it says. model: the tensors must fit this model's adapter as it is instead."""
    state = read_peft_adapter(Path(path), params) if Path(path).is_dir() else torch_load(path, verify=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for k, v in state.items() if k != ADAPTER_CONFIG):
        raise InputError(f"{path}: not an adapter file (expected a dict of tensors)")
    config = state.pop(ADAPTER_CONFIG, None)
    base = {k: (config or {}).get(k) for k in BASE_FIELDS}
    if config is not None and base != {k: params[k] for k in BASE_FIELDS}:
        raise InputError(f"{path}: an adapter for another base: it was trained on {fields_text(base)}, this base "
                         f"has {fields_text({k: params[k] for k in BASE_FIELDS})}")
    if model is not None:
        args, expected = model.args, adapter_tensors(model)
    else:
        found = ({k: config[k] for k in ADAPTER_FIELDS} if config is not None else
                 adapter_settings_of_tensors(path, state, params["n_layers"], given or {}))
        clash = {k: v for k, v in (given or {}).items() if k in found and v and v != found[k]}
        if clash:
            raise InputError(f"{path}: the file says {fields_text({k: found[k] for k in clash})}, the settings say "
                             f"{fields_text(clash)}")
        args = ModelArgs(**{**{k: v for k, v in params.items() if k in ModelArgs.__dataclass_fields__},
                            "vocab_size": 1, **found})
        with torch.device("meta"):  # the tensors a model of these settings has: names and shapes
            expected = adapter_tensors(Transformer(args))
    if not expected:
        raise InputError(f"{path}: this model has no adapter to load it into (adapter_layer=0)")
    # The original export also stores zero gates for the layers it did not adapt: accept those, only those.
    state = {k: v for k, v in state.items() if k in expected or not (k.endswith(".attention.gate") and not v.any())}
    about = (f"it does not fit this model (dim={args.dim}, n_heads={args.n_heads}, adapter_layer={args.adapter_layer}, "
             f"adapter_len={args.adapter_len}, image_dim={args.image_dim})")
    if config is not None:
        about += f"; it was made for {fields_text(config)}"
    extra, missing = sorted(state.keys() - expected.keys()), sorted(expected.keys() - state.keys())
    if extra or missing:
        what = " (a full checkpoint?)" if len(extra) > 10 else ""
        raise InputError(f"{path}: {about}{what}: unexpected {extra[:4]}, missing {missing[:4]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise InputError(f"{path}: {about}: {k} has shape {list(v.shape)}, expected {list(expected[k].shape)}")
    return Adapter(Path(path), args.adapter_len, args.adapter_layer, args.image_dim,
                   {k: v.float() for k, v in state.items()})


def adapter_settings_of_tensors(path, state, n_layers, given) -> dict:
    """adapter_len, adapter_layer and image_dim of an adapter file that does not state them (see read_adapter)."""
    if "adapter_query.weight" not in state:
        hint = " (a full checkpoint?)" if any(k.endswith("attention.wq.weight") for k in state) else ""
        raise InputError(f"{path}: not an adapter file{hint}: no adapter_query.weight")
    gates = {int(k.split(".")[1]): v for k, v in state.items() if re.fullmatch(r"layers\.\d+\.attention\.gate", k)}
    if len(gates) == n_layers:  # a gate for every layer: the adapted ones are nonzero
        nonzero = [i for i in sorted(gates) if gates[i].any()]
        L = n_layers - nonzero[0] if nonzero else given.get("adapter_layer")
        if not L:
            raise InputError(f"{path}: every gate is zero, so the file doesn't say which layers it adapts: "
                             f"give --adapter_layer and --adapter_len")
    else:
        L = len(gates)
    rows = state["adapter_query.weight"].shape[0]
    if not L or rows % L:
        raise InputError(f"{path}: {rows} prompt rows don't split over the {L} adapted layers its gates imply")
    image = state.get("adapter_image_proj.weight")
    return {"adapter_len": rows // L, "adapter_layer": L, "image_dim": image.shape[1] if image is not None else 0}


def load_adapter(model, adapter):
    """Copy an adapter into `model`: an Adapter, or the path of one, whose tensors must fit this model as it is."""
    adapter = adapter if isinstance(adapter, Adapter) else read_adapter(adapter, vars(model.args), model=model)
    with torch.no_grad():
        for k, v in adapter_tensors(model).items():
            v.copy_(adapter.tensors[k])


def read_peft_adapter(folder, params) -> dict:
    """A PEFT adaption_prompt adapter (adapter_config.json, adapter_model.safetensors or .bin), as this code's
    adapter file: its prompts, [1, K, dim] in each of the top L layers, go into adapter_query as they are (both
    project them with the frozen wk and wv, no RoPE); its gate is applied raw, one per layer, where this code
    applies tanh(gate) per head, so gate = atanh(g) in every head gives tanh(gate) = g, for |g| < 1 only."""
    config = read_json(folder / "adapter_config.json")
    if not isinstance(config, dict) or config.get("peft_type") != "ADAPTION_PROMPT":
        raise InputError(f"{folder / 'adapter_config.json'}: not a PEFT adaption_prompt adapter (peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    file = next((folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()), None)
    if file is None:
        raise InputError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    tensors = read_safetensors(file) if file.suffix == ".safetensors" else torch_load(file, verify=True)
    found = {(int(m.group(1)), m.group(2)): t for name, t in tensors.items()
             if (m := re.search(r"layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$", name))}
    n, H, K, L = params["n_layers"], params["n_heads"], config.get("adapter_len"), config.get("adapter_layers")
    if sorted(found) != sorted((i, part) for i in range(n - (L or 0), n) for part in ("prompt", "gate")) or not L:
        raise InputError(f"{file}: expected a prompt and a gate in each of the top adapter_layers={L} of this base's "
                         f"{n} layers, found {sorted(found)[:4]}...")
    state = {}
    for i in range(n - L, n):
        gate = found[i, "gate"].float().flatten()
        if gate.numel() not in (1, H) or found[i, "prompt"].shape[-2:] != (K, params["dim"]):
            raise InputError(f"{file}: layer {i}: prompt {list(found[i, 'prompt'].shape)}, gate {list(gate.shape)}: "
                             f"not adapter_len={K} prompts of width {params['dim']} and one gate, or one per head")
        if not gate.abs().max() < 1:
            raise InputError(f"{file}: layer {i}: gate {gate.abs().max().item():.6g}: this code applies tanh(gate), "
                             f"which reaches no value of 1 or more")
        state[f"layers.{i}.attention.gate"] = torch.atanh(gate).expand(H).reshape(1, H, 1, 1).clone()
    state["adapter_query.weight"] = torch.cat([found[i, "prompt"].float().reshape(K, -1) for i in range(n - L, n)])
    state[ADAPTER_CONFIG] = {"adapter_len": K, "adapter_layer": L, "image_dim": 0,
                             **{k: params[k] for k in BASE_FIELDS}}
    return state


def fields_text(d):
    return ", ".join(f"{k}={v}" for k, v in d.items())


PARAMS_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "hidden_dim", "norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_position", "tie_word_embeddings")


def save_meta_checkpoint(model, ckpt_dir, tokenizer=None, n_shards=1, dtype=None):
    """The model's weights in Meta's layout, which load_llama reads back: params.json, consolidated.NN.pth (split
    into n_shards model-parallel shards the way LLaMA-1 and 2 are), and the tokenizer's file; each written atomically.
    Used for the walkthrough's base, train.py --mode=full's result and the tools' random bases."""
    ckpt_dir = Path(ckpt_dir)
    state = {k: v.detach().to(dtype or v.dtype).cpu() for k, v in model.state_dict().items()}
    for rank in range(n_shards):
        split = {k: MODEL_PARALLEL_DIM.get(k.split(".")[-2]) if n_shards > 1 else None for k in state}
        atomic_save({k: v if split[k] is None else v.chunk(n_shards, dim=split[k])[rank].clone()
                     for k, v in state.items()}, ckpt_dir / f"consolidated.{rank:02d}.pth")
    atomic_save(json.dumps({k: getattr(model.args, k) for k in PARAMS_FIELDS}, indent=1).encode(), ckpt_dir / "params.json")
    if tokenizer is not None:  # the file it was read from (SentencePiece's under the name Meta gives it)
        name = "tokenizer.model" if isinstance(tokenizer, SentencePieceTokenizer) else tokenizer.path.name
        atomic_save(tokenizer.path.read_bytes(), ckpt_dir / name)


# ----------------------------------------------------------------------------------------------------------
# Files: safe torch.load, atomic writes, safetensors, JSON

def torch_load(path, mmap=False, verify=False):
    """torch.load that can't run code: weights_only refuses any pickle holding more than tensors and containers.

    torch's reader checks no CRC-32, so the zip's records are read through Python's zipfile first, which does: the
    pickle always; with verify (adapters, resume states: small files) every record, and the tensors are then loaded
    from those very bytes, so a flipped byte anywhere in a record is refused. A base checkpoint's tensor bytes are
    not verified (a 13 GB read): `python -m tools.verify DIR` checks a download whole.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    source = path
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's format since 1.6; older files are a bare pickle stream
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                records = [r for r in archive.infolist() if verify or r.filename.split("/")[-2:-1] != ["data"]]
                data = {r.filename: archive.read(r) for r in records}  # BadZipFile on a CRC-32 mismatch
            if verify:
                source = io.BytesIO()
                with zipfile.ZipFile(source, "w") as clean:
                    for name, value in data.items():
                        clean.writestr(name, value)
                source.seek(0)
    except Exception as e:  # a damaged zip fails in Python's reader in many ways
        raise InputError(f"{path}: corrupted ({first_line(e)})") from None
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and source is path)
    except Exception as e:  # a corrupted file can fail in the unpickler in many ways
        refusal = re.search(r"Unsupported global: [^.]*", str(e))  # what the file asked to run
        if isinstance(e, pickle.UnpicklingError) and refusal:
            raise InputError(f"{path}: refused to unpickle, it holds more than tensors ({refusal.group(0)})") from None
        if isinstance(e, RuntimeError) and mmap and "mmap" in str(e):  # files in torch's pre-1.6 format can't be
            return torch_load(path, verify=verify)  # memory-mapped: read them whole
        raise InputError(f"{path}: not a readable torch file, truncated or corrupted? ({first_line(e)})") from None


def atomic_save(obj, path):
    """torch.save (or, for bytes, the bytes) to a temporary name, flushed to disk, then renamed: a crash never leaves
    a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    """{name: tensor} of a .safetensors file, memory-mapped: no tensor byte is read until it is used.

    The format: an 8-byte little-endian header length N, N bytes of JSON ({name: {"dtype", "shape",
    "data_offsets": [begin, end]}}, offsets counted from the end of the header), then the raw little-endian data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise InputError(f"{path}: not a safetensors file, or truncated (a {n}-byte header in {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a safetensors file, its header is not JSON ({first_line(e)})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file, its header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, spans = size - 8 - n, []
    with warnings.catch_warnings():  # a read-only map: torch warns that it can't write to it; it never has to
        warnings.simplefilter("ignore")
        data = torch.from_numpy(np.memmap(path, np.uint8, "r", offset=8 + n)) if data_size else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            assert all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
        except (KeyError, TypeError, ValueError, AssertionError):
            raise InputError(f"{path}: {name}: malformed header entry {str(entry)[:100]}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not begin <= end <= data_size:
            raise InputError(f"{path}: {name}: data offsets [{begin}, {end}] lie outside the file's {data_size} data bytes")
        if end - begin != nbytes:
            raise InputError(f"{path}: {name}: shape {shape} in {entry['dtype']} needs {nbytes} bytes, "
                             f"its offsets hold {end - begin}")
        raw = data[begin:end]
        if begin % dtype.itemsize:  # the format packs tensors back to back, so one may start off its element size
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
        spans.append((begin, end, name))
    # The format has no checksum, but it requires the tensors to tile the data exactly: a header length or an offset
    # that a flipped byte put off would otherwise read tensors from shifted places, silently.
    covered = 0
    for begin, end, name in sorted(spans):
        if begin != covered:
            raise InputError(f"{path}: {name}: its data starts at byte {begin}, not at {covered} where the one "
                             f"before ends")
        covered = end
    if covered != data_size:
        raise InputError(f"{path}: its tensors end at byte {covered} of its {data_size} data bytes")
    return tensors


def first_line(error) -> str:
    # Exception texts from torch can run to paragraphs and carry terminal escape codes; a one-line error wants neither.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
