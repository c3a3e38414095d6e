"""
LLaMA-Adapter in one file: Meta's LLaMA, plus learnable adaption prompts injected through
zero-initialized, tanh-gated attention.

Paper: Zhang et al., "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-initialized
Attention", arXiv 2303.16199. The base model is LLaMA as Meta published it (same module and tensor names, so
Meta's consolidated.NN.pth files load with no converter). The adapter is a fenced delta on it, marked
"LLaMA-Adapter" below: three ModelArgs fields (K, L, an optional image width), the prompt tensor `adapter_query`,
one gate per head per adapted layer, and one branch in Attention.forward (the paper's Eq. 7). With adapter_layer=0
this is plain LLaMA.

Where we follow the paper, and where we chose differently:
- The top `adapter_layer` (L) layers each get `adapter_len` (K) prompt vectors, projected by that layer's own
  frozen wk and wv, with no RoPE. Their attention is softmaxed apart from the words' and scaled by tanh(gate),
  with gates starting at zero: at step 0 the model is exactly the pretrained one.
- tanh is applied at inference too (the original inference code used the raw gate, which training never saw).
- Word attention uses torch's scaled_dot_product_attention; the prompt branch is a second, small one beside it,
  with no causal mask (only a padding mask where a batch's rows use adapters of different K). Both softmaxes run in
  fp32 (SDPA accumulates in fp32).
- Precision lives in one place: frozen base weights in bf16 on a GPU (fp16 below compute capability 8.0, fp32 on a
  CPU; the scripts' --dtype), adapter tensors always fp32, local fp32 upcasts in RMSNorm and softmax, fp32 logits.
- The model keeps generation's KV cache (setup_cache); decoding, sampling and serving many adapters at once live
  in generation.py, as Meta keeps generation apart from the model.
- Optional image conditioning (paper Sec. 3.3): with image_dim > 0, a projected image feature is added to every
  prompt token of every adapted layer.
- Beyond the paper: the Llama 3 family (rotary scaling, tied embeddings), activation checkpointing of the adapted
  blocks and a chunked loss for small cards (an int8 base is in quantize.py).
"""
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    # Meta's params.json fields (LLaMA-1 and LLaMA-2); the defaults are LLaMA-7B's.
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # grouped-query attention (LLaMA-2 70B); None: one kv head per head
    vocab_size: int = -1  # -1 in Meta's files: taken from the tokenizer
    multiple_of: int = 256  # Meta's SwiGLU width: 8/3 dim, times ffn_dim_multiplier, rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    hidden_dim: Optional[int] = None  # the SwiGLU width when a checkpoint states it (Hugging Face); None: Meta's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # length of the rotary tables; the training recipe's sequence limit
    # Llama 3.1, 3.2 and 3.3: "llama3" scaling of the rotary frequencies (see precompute_rope); factor 1: none
    rope_scaling_factor: float = 1.0  # s: 8 for 3.1 and 3.3, 32 for 3.2 1B and 3B
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192  # L0, the context length Llama 3 was pretrained at
    tie_word_embeddings: bool = False  # Llama 3.2 1B and 3B: the output head is the embedding matrix
    # --- LLaMA-Adapter ---
    adapter_len: int = 10  # K: prompt vectors per adapted layer
    adapter_layer: int = -1  # L: how many of the top layers get a prompt (0: plain LLaMA; -1: all but the bottom two)
    image_dim: int = 0  # width of precomputed image features (e.g. CLIP); 0: text only (paper Sec. 3.3)

    def __post_init__(self):
        if self.adapter_layer == -1:  # the paper's share: 30 of LLaMA-7B's 32 layers
            self.adapter_layer = max(1, self.n_layers - 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps), in fp32 whatever the model dtype: the mean of squares loses too much in bf16.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float, device=None, factor=1.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position=8192):
    # Rotation angle of pair i at position t: t * theta^(-2i / head_dim), as its (cos, sin). Real tables rather than
    # Meta's complex freqs_cis: NCCL cannot broadcast a complex buffer, and torch.compile fuses real arithmetic.
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if factor != 1:
        # Llama 3.1's "llama3" scaling, for a longer context than the pretraining's L0: a frequency f of wavelength
        # w = 2 pi / f is kept where w < L0 / high, divided by the factor s where w > L0 / low, and blended between:
        #   f' = (1 - sigma) f / s + sigma f,  sigma = (L0 / w - low) / (high - low), clamped to [0, 1].
        # It changes the angles at every position, not only beyond L0.
        wavelength = 2 * math.pi / freqs  # (head_dim/2,)
        sigma = (original_max_position / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        sigma = sigma.clamp(0, 1)  # 1: short waves, kept; 0: long waves, divided by s
        freqs = (1 - sigma) * freqs / factor + sigma * freqs
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), freqs)  # (max_seq_len, head_dim/2)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)  # (max_seq_len, head_dim/2, 2)


def rope_of(args: ModelArgs, device=None):
    return precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, device,
                           args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                           args.rope_original_max_position)


def apply_rope(x, rope):
    # x: (bsz, seqlen, heads, head_dim); rope: (seqlen, head_dim/2, 2). Meta rotates adjacent pairs (x0, x1),
    # (x2, x3), ... as complex numbers times e^(i * angle); here the same product, written out in reals.
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (bsz, seqlen, heads, head_dim/2) each
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]  # (seqlen, 1, head_dim/2), broadcast over heads
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def attention(q, k, v, mask=None, is_causal=False):
    # softmax(q k^T / sqrt(head_dim) + mask) v, the softmax in fp32 inside torch's kernels. q: (bsz, n_heads, seqlen,
    # head_dim); k, v: (bsz, n_kv_heads, keys, head_dim), each kv head shared by a group of n_heads / n_kv_heads query
    # heads (grouped-query attention); mask: True where a query sees a key, broadcast to (bsz, heads, seqlen, keys).
    bsz, n_heads, seqlen, head_dim = q.shape
    group = n_heads // k.shape[1]
    if group > 1 and mask is not None and mask.shape[-2] == 1:
        # A mask the same for every query (a decoding step's, or the padding of shorter prompts): each group of query
        # heads folds into the query axis, (bsz, n_kv_heads, group * seqlen, head_dim), exactly. A mask together with
        # grouped heads would send the call to torch's math kernel, which copies k and v per query head, in fp32.
        out = F.scaled_dot_product_attention(q.reshape(bsz, -1, group * seqlen, head_dim), k, v, attn_mask=mask)
        return out.reshape(bsz, n_heads, seqlen, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=group > 1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, adapted: bool):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # --- LLaMA-Adapter: the gate, one scalar per head, used as tanh(gate); it starts at zero (reset_adapter) ---
        if adapted:
            self.gate = nn.Parameter(torch.empty(1, self.n_heads, 1, 1))
        # Generation's state, set by Transformer.setup_cache; a training forward (start_pos None) never reads it.
        self.register_buffer("cache_k", None, persistent=False)  # (bsz, cache_len, n_kv_heads, head_dim)
        self.register_buffer("cache_v", None, persistent=False)
        self.prompt_kv = None  # (keys, values, gate, seen): the batch's prompt here, projected once per call

    def forward(self, x, start_pos, rope, mask=None, prompt=None):
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv(x, start_pos, rope)
        # LLaMA's word attention: softmax(q k^T / sqrt(head_dim) + causal mask) v. No mask tensor where the keys are
        # the queries' own (training, a prefill from position 0: is_causal) or one query sees every key (a decoding
        # step), so that the fused kernels take it; `mask` (True: seen) where cached keys lie beyond a query.
        out = attention(q, k, v, mask, is_causal=mask is None and seqlen > 1)

        # --- LLaMA-Adapter, paper Eq. 7: zero-initialized attention ---
        # Scores over [prompt; words] are softmaxed in two separate parts, so the prompt never takes probability
        # mass from the words; the prompt part is scaled by tanh(gate), per head:
        #   out = softmax(q k^T / sqrt(d)) v + tanh(gate) * softmax(q pk^T / sqrt(d)) pv
        # Every position sees all K prompts, which have no position: their keys are not rotated.
        if prompt is not None:  # training: rebuilt every time, so the prompt keeps receiving gradients
            prompt_kv = (*self.prompt_keys_values(prompt, x.dtype, bsz), self.gate, None)
        else:  # generation: projected once per call (setup_cache); `seen` hides the padding of an adapter's fewer K
            prompt_kv = self.prompt_kv if start_pos is not None else None
        if prompt_kv is not None:
            pk, pv, gate, seen = prompt_kv  # gate: (1 or bsz, n_heads, 1, 1), fp32
            out = out + (torch.tanh(gate) * attention(q, pk, pv, seen)).type_as(out)

        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.wo(out)

    def prompt_keys_values(self, prompt, dtype, bsz):
        # The prompt goes through this layer's own frozen wk and wv: no norm, no RoPE, no new weights.
        # prompt: (1 or bsz, K, dim) fp32 -> keys, values: (bsz, n_kv_heads, K, head_dim). A text-only prompt is
        # shared by the batch, yet expanded first and so projected once per sequence: bsz small (K, dim) matmuls
        # per step, on purpose: SDPA gets real tensors, not stride-0 views, which one CUDA kernel family got wrong.
        prompt = prompt.to(dtype).expand(bsz, -1, -1)
        pk = self.wk(prompt).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        pv = self.wv(prompt).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        return pk, pv

    def qkv(self, x, start_pos, rope):
        """Queries, and the keys and values they attend to, as (bsz, heads, length, head_dim), the layout of
        scaled_dot_product_attention. start_pos None (training): the keys are the chunk's own. In generation the
        chunk goes into the cache at its positions, and the keys are the cache up to the chunk's end, as Meta slices
        it; with start_pos a tensor (the compiled step, whose shapes never change), the whole cache."""
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rope(xq, rope), apply_rope(xk, rope)
        if start_pos is not None:
            chunk, seen = ((slice(start_pos, start_pos + seqlen), slice(start_pos + seqlen)) if isinstance(start_pos, int)
                           else (start_pos + torch.arange(seqlen, device=x.device), slice(None)))
            self.cache_k[:, chunk], self.cache_v[:, chunk] = xk, xv
            xk, xv = self.cache_k[:, seen], self.cache_v[:, seen]  # (bsz, keys, n_kv_heads, head_dim)
        return xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Meta's hidden size: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to multiple_of.
        hidden = int(2 * 4 * args.dim / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.hidden_dim or args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)  # 7B: 11008
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, adapted: bool):
        super().__init__()
        self.attention = Attention(args, adapted)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, rope, mask=None, prompt=None):
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask, prompt)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size={args.vocab_size}: set it, or load with load_llama to take it from the tokenizer")
        if not 0 <= args.adapter_layer <= args.n_layers:
            raise ValueError(f"adapter_layer={args.adapter_layer} must be between 0 and n_layers={args.n_layers}")
        if args.dim % args.n_heads or args.n_heads % (args.n_kv_heads or args.n_heads):
            raise ValueError(f"dim={args.dim}, n_heads={args.n_heads}, n_kv_heads={args.n_kv_heads} don't divide")
        self.args = args
        self.first_adapted = args.n_layers - args.adapter_layer  # layers below this one run as plain LLaMA
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, adapted=i >= self.first_adapted) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # one matrix, (vocab_size, dim), read as rows in and multiplied out
            self.output.weight = self.tok_embeddings.weight
        # The rotary table is derived from args, so it is not saved with the weights.
        self.register_buffer("rope", rope_of(args), persistent=False)
        self.cache_len = None  # set by setup_cache: the length of every layer's KV cache
        self.activation_checkpointing = False  # train.py --activation_checkpointing: see forward
        # --- LLaMA-Adapter: the adaption prompts, K vectors for each of the top L layers ---
        # Row l*K + j is prompt j of layer first_adapted + l.
        if args.adapter_layer:
            self.adapter_query = nn.Embedding(args.adapter_layer * args.adapter_len, args.dim)
            if args.image_dim:  # paper Sec. 3.3: an image feature, projected to dim, joins every prompt token
                self.adapter_image_proj = nn.Linear(args.image_dim, args.dim)
            if not self.adapter_query.weight.is_meta:  # on the meta device, load_llama calls it once there are values
                self.reset_adapter()

    def reset_adapter(self):
        """The adapter's initial values, for a model built here and for one loaded by load_llama alike."""
        with torch.no_grad():
            self.adapter_query.weight.normal_()  # prompts N(0, 1)
            # Gates start at zero so the prompts, still random, add nothing: the adapted model begins as exactly
            # the pretrained one, and training opens each head's gate only as far as the prompts prove useful.
            for gate in self.gates():
                gate.zero_()
            if self.args.image_dim:
                self.adapter_image_proj.reset_parameters()

    def gates(self):  # the adapted layers' gates, bottom to top: (1, n_heads, 1, 1) each
        return [layer.attention.gate for layer in self.layers[self.first_adapted:]]

    def adapter_prompts(self, image=None):
        # (1 or bsz, L, K, dim), fp32. Without an image every sequence shares one set of prompts.
        L, K, dim = self.args.adapter_layer, self.args.adapter_len, self.args.dim
        prompts = self.adapter_query.weight.view(1, L, K, dim)
        if image is not None:
            if not self.args.image_dim:
                raise ValueError("an image was given to a text-only model (image_dim=0)")
            image_prompt = self.adapter_image_proj(image.float())  # (bsz, image_dim) -> (bsz, dim): I_p
            prompts = prompts + image_prompt[:, None, None, :]  # P_l + repeat(I_p, K), for every adapted layer
        return prompts

    def forward(self, tokens, start_pos=None, image=None, logits_at=None, hidden=False):
        # start_pos None: the whole sequence at once (training, scoring). In generation, after setup_cache: where
        # tokens[:, 0] sits, an int (generate's prefill and eager steps), or a one-element tensor (compiled_step: the
        # same code and shapes at every step). Only an int is checked against max_seq_len; generate keeps a tensor in
        # bounds itself. image: (bsz, image_dim) features, in training (generation takes them in setup_cache).
        # logits_at: the positions whose logits are wanted, as the output head is big: a (bsz, seqlen) bool mask or
        # its (rows, columns) indices (training scores only the response), or a slice of the sequence.
        # hidden: the final norm's output there instead of logits, for a loss that applies the head itself.
        bsz, seqlen = tokens.shape
        start = 0 if start_pos is None else start_pos
        if isinstance(start, int) and start + seqlen > self.args.max_seq_len:
            raise ValueError(f"{start + seqlen} positions exceed max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        positions = torch.arange(seqlen, device=tokens.device) + start
        rope = self.rope[positions]  # (seqlen, head_dim/2, 2)
        mask = None  # causal, or one query that sees every key: see Attention.forward
        if isinstance(start_pos, torch.Tensor) or (start_pos and seqlen > 1):  # keys a query must not see are cached
            keys = self.cache_len if isinstance(start_pos, torch.Tensor) else start_pos + seqlen
            mask = positions[:, None] >= torch.arange(keys, device=tokens.device)  # (seqlen, keys): key <= query
        prompts = self.adapter_prompts(image) if self.args.adapter_layer and start_pos is None else None
        # Frozen layers below the first adapted one build no autograd graph and keep no activations:
        # nothing they compute requires a gradient until the first prompt enters.
        for i, layer in enumerate(self.layers):
            prompt = prompts[:, i - self.first_adapted] if prompts is not None and i >= self.first_adapted else None
            if self.activation_checkpointing and prompt is not None and torch.is_grad_enabled():
                # Keep only the adapted block's input; its activations are recomputed in the backward pass.
                # Non-reentrant: the reentrant kind gives no gradient to the prompt when the block's input
                # (the frozen layers' output) does not require one.
                h = checkpoint(layer, h, start_pos, rope, mask, prompt, use_reentrant=False)
            else:
                h = layer(h, start_pos, rope, mask, prompt)
        if logits_at is not None:
            h = h[:, logits_at] if isinstance(logits_at, slice) else h[logits_at]
        if hidden:  # (bsz, seqlen, dim), or (positions, dim) for a mask or indices
            return self.norm(h)
        return self.output(self.norm(h)).float()  # (bsz, seqlen, vocab_size), or (positions, vocab_size)

    def setup_cache(self, batch_size: int, cache_len: int, image=None, prompt_kv=None):
        """Generation's state for a batch: each layer's KV cache (batch_size, cache_len, n_kv_heads, head_dim) in the
        weights' dtype and on their device (plain tensors even when the weights are sharded), and each adapted
        layer's prompt keys, values and gate, projected once (from each row's image for an image adapter).
        prompt_kv: {layer: (keys, values, gate, seen)} instead of the model's own adapter (generation.AdapterBank:
        each row its own adapter's). Tensors of the last call's shapes are reused in place: the CUDA graph of a
        compiled step, recorded on their addresses, then replays instead of recording again. Their stale values
        are never read: a position is written before any query sees it."""
        def reused(old, new):  # new's values in old's memory if it has new's shape and dtype; never in a parameter
            if old is None or new is None or isinstance(old, nn.Parameter) or (old.shape, old.dtype) != (new.shape,
                                                                                                     new.dtype):
                return new
            return old.copy_(new)

        weight = self.tok_embeddings.weight
        if prompt_kv is None and self.args.adapter_layer:
            prompts = self.adapter_prompts(image)  # (1 or bsz, L, K, dim)
            prompt_kv = {i: (*self.layers[i].attention.prompt_keys_values(prompts[:, i - self.first_adapted],
                                                                          weight.dtype, batch_size),
                             self.layers[i].attention.gate, None) for i in range(self.first_adapted, len(self.layers))}
        for i, layer in enumerate(self.layers):
            a = layer.attention
            shape = (batch_size, cache_len, a.n_kv_heads, a.head_dim)
            if a.cache_k is None or a.cache_k.shape != shape or a.cache_k.dtype != weight.dtype:
                a.cache_k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
                a.cache_v = torch.zeros_like(a.cache_k)
            state = (prompt_kv or {}).get(i)
            a.prompt_kv = state and tuple(map(reused, a.prompt_kv or (None,) * 4, state))
        self.cache_len = cache_len

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = layer.attention.prompt_kv = None
        self.cache_len = None


# ----------------------------------------------------------------------------------------------------------
# The adapter's parameters

def is_adapter_key(name: str) -> bool:
    return name.startswith("adapter_") or name.endswith(".attention.gate")


def set_precision(model, dtype):
    """The one precision rule: the frozen base in `dtype` (bf16 on a GPU), the adapter's tensors in fp32, where
    small updates don't round away. Returns the model."""
    model.to(dtype)
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            p.data = p.data.float()
    return model


def mark_only_adapter_trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_key(name))


@contextmanager
def gates_closed(model):
    """Every gate at zero while inside: the model is then exactly its base model (the zero-init property)."""
    gates = model.gates()
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for g, value in zip(gates, saved):
                g.copy_(value)


def adapter_tensors(model) -> dict:
    """The adapter's tensors in the model, by name: the live ones, not copies. Read from the modules directly (not
    state_dict(), whose hooks would change a sharded model's state in one process only)."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    return {name: t for name, t in named if is_adapter_key(name)}


def adapter_state_dict(model):
    """The adapter alone: adapter_query.weight [L*K, dim], layers.{i}.attention.gate [1, H, 1, 1], fp32."""
    return {k: v.detach().float().cpu() for k, v in adapter_tensors(model).items()}


# ----------------------------------------------------------------------------------------------------------
# The Alpaca recipe: prompt template and loss mask (defined here once, used by train.py and generate.py)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")
IGNORE_INDEX = -100  # not 0, which is a real token id (<unk>): the original lost those targets


def format_prompt(instruction: str, input: str = "") -> str:
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


TEMPLATES = ("alpaca", "llama3")  # "llama3": the chat format of Llama 3's instruct models, for adapting those


def encode_prompt(tokenizer, instruction: str, input: str = "", template: str = "alpaca") -> list:
    """The prompt's tokens, BOS first: the Alpaca template, or Llama 3's chat format (the user's turn holds the
    instruction, and the input after a blank line; see tokenizer.py)."""
    if template == "alpaca":
        return tokenizer.encode(format_prompt(instruction, input), bos=True, eos=False)
    return tokenizer.chat_prompt(instruction + (f"\n\n{input}" if input else ""))  # a SentencePiece one refuses


def response_end_id(tokenizer, template: str = "alpaca") -> int:
    """The token a response ends with: EOS in the Alpaca template, <|eot_id|> (end of turn) in Llama 3's."""
    return tokenizer.eos_id if template == "alpaca" else tokenizer.special["<|eot_id|>"]


def encode_example(tokenizer, instruction, input, output, max_seq_len, template="alpaca"):
    """Tokens [BOS] + sp(prompt + response) + [EOS], and labels that score only the response and EOS.

    labels[i] is tokens[i] where scored, IGNORE_INDEX elsewhere: the logits at position i - 1, which predict
    token i, are the ones scored against it. Returns (tokens, labels, truncated), or None when the prompt alone
    leaves no room for a response. In Llama 3's chat format the response is encoded on its own after the
    assistant's header and ends with <|eot_id|>, as the instruct models saw it.
    """
    prompt = encode_prompt(tokenizer, instruction, input, template)
    if template == "alpaca":
        tokens = tokenizer.encode(format_prompt(instruction, input) + output, bos=True, eos=True)
    else:
        tokens = prompt + tokenizer.encode(output, bos=False, eos=False) + [response_end_id(tokenizer, template)]
    if len(prompt) >= max_seq_len:
        return None
    # The prompt's tokens begin the whole example's, unless SentencePiece merged a piece across the boundary;
    # then the merged piece is scored too.
    n_prompt = next((i for i, (a, b) in enumerate(zip(prompt, tokens)) if a != b), len(prompt))
    labels = [IGNORE_INDEX] * n_prompt + tokens[n_prompt:]
    return tokens[:max_seq_len], labels[:max_seq_len], len(tokens) > max_seq_len


def response_loss(model, tokens, labels, image=None, chunk=0):
    """Summed next-token cross-entropy over the scored tokens of a padded batch (see encode_example).

    The logits at position i predict token i + 1; only the scored positions go through the output head, found
    where the labels are: on the CPU (as pad_batch leaves them) the host never waits for the device here.
    chunk: that many scored positions at a time through the head and the loss, each chunk recomputed in the
    backward pass, so that the fp32 logits of only one chunk exist at once (at a 128K vocabulary, 0.5 MB per
    position); 0: all at once.
    """
    targets = labels[:, 1:]
    scored = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # (rows, columns) of the scored positions
    targets, scored = to_device(targets[scored], tokens.device), tuple(to_device(i, tokens.device) for i in scored)
    if not chunk:
        logits = model(tokens[:, :-1], image=image, logits_at=scored)  # (scored positions, vocab_size)
        return F.cross_entropy(logits, targets, reduction="sum")
    h = model(tokens[:, :-1], image=image, logits_at=scored, hidden=True)  # (scored positions, dim)
    head = getattr(model, "module", model).output  # the head itself, also under DDP

    def chunk_loss(h, y):
        return F.cross_entropy(head(h).float(), y, reduction="sum")
    return sum(checkpoint(chunk_loss, h_part, y_part, use_reentrant=False)
               for h_part, y_part in zip(h.split(chunk), targets.split(chunk)))


def pad_batch(examples, device="cpu"):
    """Right-pad (tokens, labels) pairs to the longest in the batch; padding is never scored. Unshifted: see
    encode_example. The tokens go to `device`, the labels stay on the CPU (see response_loss)."""
    tokens, labels = (pad_sequence([torch.tensor(e[i]) for e in examples], batch_first=True,
                                   padding_value=(0, IGNORE_INDEX)[i]) for i in (0, 1))
    return to_device(tokens, device), labels


def to_device(tensor, device):
    """A CPU tensor on `device`; to a GPU through pinned memory, so the copy doesn't wait for the work queued there."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
