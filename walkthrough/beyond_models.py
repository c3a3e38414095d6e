"""
The models of walkthrough/beyond.py: a small pre-norm transformer encoder (ViT-style on image patches, BERT-style
on word pieces) with its own attention, in which learnable prompts in the top L layers enter in one of two ways:

- zero-initialized attention (the paper's Eq. 7): the prompts go through the layer's own frozen key and value
  projections, get a softmax of their own, and their output is scaled per head by tanh(gate), the gate starting at
  0, then added to the tokens' attention output;
- ungated prompts (VPT-deep, P-tuning v2): the same prompt keys and values join the tokens' in ONE softmax, with no
  gate, so they take attention from the tokens from the first step on.

Then the adaptation methods compared at the same K, L and budget (linear probe, full fine-tuning, ungated prompts,
zero-init and its gate variants), one training loop for all, and the pretraining of the three miniatures.
The encoder's attention is held to the literal Eq. 7 of the fast tier (test_lladapter.eq7_reference, with causal
and rotary off) by tests/test_beyond.py; lladapter.py is not used: its decoder is causal, with RoPE.
"""
import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# The encoder


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with bias-free projections (the names eq7_reference reads). The
    prompt branch is off until adapt() sets `gate` (and `scale`), or sets `one_softmax` for ungated prompts."""

    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = self.n_kv_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate = None  # (1, n_heads, 1, 1): a Parameter, or a fixed tensor for the gate-at-1 variant
        self.scale = torch.tanh  # what multiplies the prompts' output: scale(gate), tanh in the paper
        self.one_softmax = False  # ungated prompts: prompts and tokens in one softmax

    def heads(self, x):  # (bsz, n, dim) -> (bsz, n_heads, n, head_dim), the layout of scaled_dot_product_attention
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x, prompt=None, mask=None):
        # x: (bsz, n, dim); prompt: (K, dim) or None; mask: (bsz, 1, 1, n), True for a real token, or None
        bsz, n, dim = x.shape
        q, k, v = self.heads(self.wq(x)), self.heads(self.wk(x)), self.heads(self.wv(x))
        if prompt is not None:  # the prompts through this layer's own frozen wk, wv: no position, no new weights
            pk = self.heads(self.wk(prompt)[None]).expand(bsz, -1, -1, -1)  # (bsz, n_heads, K, head_dim)
            pv = self.heads(self.wv(prompt)[None]).expand(bsz, -1, -1, -1)
        if prompt is not None and self.one_softmax:
            # ungated: softmax(q [pk; k]^T / sqrt(d)) [pv; v], every token sees every prompt
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # (bsz, n_heads, K + n, head_dim)
            if mask is not None:
                mask = torch.cat([mask.new_ones(bsz, 1, 1, prompt.shape[0]), mask], -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # the tokens' own attention, the very computation of the frozen encoder
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (bsz, n_heads, n, head_dim)
            if prompt is not None:
                # paper Eq. 7: softmax(q k^T / sqrt(d)) v + scale(gate) * softmax(q pk^T / sqrt(d)) pv, per head.
                # With the gate at 0 the second term is exactly 0 and `out` is the frozen encoder's to the bit.
                out = out + self.scale(self.gate) * F.scaled_dot_product_attention(q, pk, pv)
        return self.wo(out.transpose(1, 2).reshape(bsz, n, dim))


class Block(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, n_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, prompt=None, mask=None):
        x = x + self.attention(self.norm1(x), prompt, mask)
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """A pre-norm transformer encoder. kind "image": 3 x S x S images cut into patch x patch patches, a learnt [CLS]
    vector first (ViT); kind "text": token ids, [CLS] being the first id (BERT). Learnt absolute positions, added
    to the input, so attention itself has no position (eq7_reference's rotary=False)."""

    def __init__(self, kind, dim, n_layers, n_heads, positions, vocab_size=0, patch=4, pad_id=0):
        super().__init__()
        self.kind, self.dim, self.patch, self.pad_id = kind, dim, patch, pad_id
        if kind == "image":
            # A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better") in place of
            # ViT's one linear map per patch: a 3x3 convolution, then one patch x patch, stride patch, to dim. With
            # the linear map alone this miniature's ViT learnt the shapes far too slowly for a CPU (23% of 10 after
            # 900 steps); the transformer above it is unchanged.
            self.embed = nn.Sequential(nn.Conv2d(3, dim // 2, 3, padding=1), nn.GELU(),
                                       nn.Conv2d(dim // 2, dim, patch, stride=patch))
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(positions, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.prompts = None  # (L, K, dim) for the top L layers, set by adapt()

    def mask(self, x):
        """(bsz, 1, 1, n) True for real tokens, or None for images (no padding)."""
        return None if self.kind == "image" else (x != self.pad_id)[:, None, None, :]

    def bottom(self, x, upto):
        """The embedded input through layers[:upto]: (bsz, n, dim). x: uint8 images (bsz, 3, S, S) or ids (bsz, n)."""
        if self.kind == "image":
            patches = self.embed(x.float() / 255).flatten(2).transpose(1, 2)  # (bsz, dim, S/p, S/p) -> (bsz, (S/p)^2, dim)
            h = torch.cat([self.cls.expand(len(x), -1, -1), patches], 1)  # (bsz, 1 + (S/p)^2, dim)
        else:
            h = self.embed(x)  # (bsz, n, dim)
        h = h + self.pos[:h.shape[1]]
        mask = self.mask(x)
        for layer in self.layers[:upto]:
            h = layer(h, mask=mask)
        return h

    def top(self, h, mask, start):
        """Layers[start:] on h (the output of layers[:start]), the prompts in the layers that have them, then the
        final norm: (bsz, n, dim)."""
        first = len(self.layers) - (len(self.prompts) if self.prompts is not None else 0)
        for i in range(start, len(self.layers)):
            h = self.layers[i](h, prompt=self.prompts[i - first] if i >= first else None, mask=mask)
        return self.norm(h)

    def forward(self, x):
        return self.top(self.bottom(x, 0), self.mask(x), 0)


# ----------------------------------------------------------------------------------------------------------
# The methods. Each run gets its own copy of the pretrained encoder; adapt() gives it prompts and gates.

METHODS = {
    # name: (what trains, how the prompts enter: one_softmax, or a gate's start and scale; None: no prompts)
    "zero_shot": ("head", None),  # CLIP's: no training at all (its head, the pretrained projection, stays frozen)
    "linear_probe": ("head", None),
    "full_finetune": ("all", None),
    "ungated": ("prompts", "one_softmax"),
    "zero_init": ("prompts", ("zero", "tanh")),  # the paper
    "random_gate": ("prompts", ("random", "tanh")),  # the gate drawn N(0, 1) per head instead of 0
    "gate_one": ("prompts", ("one", None)),  # no gate: the prompts' own softmax added at weight 1
    "linear_gate": ("prompts", ("zero", "linear")),  # the gate itself, unbounded, also 0 at 0, instead of tanh(gate)
}
MAIN_METHODS = ["linear_probe", "full_finetune", "ungated", "zero_init"]
GATE_VARIANTS = ["zero_init", "random_gate", "gate_one", "linear_gate"]


def identity(g):
    return g


def adapt(encoder, method, K, L, generator):
    """Give the encoder's top L layers K prompts each (N(0, 1), as lladapter's) and the method's way in; return the
    parameters that train besides the head."""
    what, way = METHODS[method]
    if what == "head":
        encoder.requires_grad_(False)
        return []
    if what == "all":
        encoder.requires_grad_(True)
        return list(encoder.parameters())
    encoder.requires_grad_(False)
    encoder.prompts = nn.Parameter(torch.randn(L, K, encoder.dim, generator=generator))
    trainable = [encoder.prompts]
    gate_draws = torch.Generator().manual_seed(0)  # random_gate's draw is fixed: the variant, not a seed's luck
    for layer in encoder.layers[len(encoder.layers) - L:]:
        attention = layer.attention
        if way == "one_softmax":
            attention.one_softmax = True
            continue
        start, scale = way
        shape = (1, attention.n_heads, 1, 1)
        if start == "one":  # fixed, not trained: scale(gate) = 1
            attention.gate, attention.scale = torch.ones(shape), identity
            continue
        attention.gate = nn.Parameter(torch.zeros(shape) if start == "zero" else torch.randn(shape, generator=gate_draws))
        attention.scale = torch.tanh if scale == "tanh" else identity
        trainable.append(attention.gate)
    return trainable


def gates_of(encoder):
    """scale(gate) per adapted layer and head, [[...], ...], or None without gates."""
    gated = [l.attention for l in encoder.layers if l.attention.gate is not None]
    return [a.scale(a.gate).flatten().tolist() for a in gated] or None


@torch.no_grad()
def cached_hidden(encoder, x, start, batch_size=256):
    """The frozen layers' output, computed once per data set: layers[:start] (all of them for the probe)."""
    return torch.cat([encoder.bottom(x[i:i + batch_size], start) for i in range(0, len(x), batch_size)])


class Run:
    """One adaptation run: a method at one learning rate and seed, trained for `steps` steps of `batch_size`
    examples from the task's training set, then scored on its validation and test sets.

    task: an object with .train, .val, .test (dicts whose "x" is the encoder input), .head(dim) -> nn.Module or
    None, .loss(out, batch, head), .score(encoder_fn, head, split) -> {metric: value}. The frozen layers' outputs
    come from `cache` ({start: {split: tensor}}), filled on first use and shared by every run of the task."""

    def __init__(self, task, pretrained, method, lr, seed, cfg, cache):
        self.task, self.method, self.cfg = task, method, cfg
        torch.manual_seed(seed)  # the head's init
        self.generator = torch.Generator().manual_seed(seed)  # the prompts' init and the data order
        self.encoder = copy.deepcopy(pretrained)
        self.head = task.head(pretrained.dim, method)
        trainable = adapt(self.encoder, method, cfg["K"], cfg["L"], self.generator)
        what = METHODS[method][0]
        n_layers = len(self.encoder.layers)
        # where training starts: the raw input for full fine-tuning, the prompts' first layer, or the final features
        self.start = {"all": 0, "prompts": n_layers - cfg["L"], "head": n_layers}[what]
        self.cache = cache
        params = [p for p in trainable + list(self.head.parameters()) if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.get("weight_decay", 0.01)) if params else None
        self.lr = lr

    def hidden(self, split):
        """The frozen layers' output for a whole split (None for full fine-tuning, which starts from the input)."""
        if self.start == 0:
            return None
        splits = self.cache.setdefault(self.start, {})
        if split not in splits:
            splits[split] = cached_hidden(self.encoder, getattr(self.task, split)["x"], self.start)
        return splits[split]

    def features(self, split, idx):
        """The encoder's final hidden states for examples idx of a split: (len(idx), n, dim)."""
        x = getattr(self.task, split)["x"][idx]
        h = self.hidden(split)
        h = self.encoder.bottom(x, 0) if h is None else h[idx]
        return self.encoder.top(h, self.encoder.mask(x), self.start)

    def train(self):
        data = self.task.train
        n, bs, steps = len(data["x"]), self.cfg["batch_size"], self.cfg["steps"]
        warmup = max(1, steps // 10)
        order, losses, start = torch.empty(0, dtype=torch.long), [], time.time()
        self.encoder.train()
        for step in range(steps):
            # linear warmup over a tenth of the steps, then cosine to 0
            progress = max(0.0, (step - warmup) / max(1, steps - warmup))
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
            if len(order) < bs:  # epochs in a fresh random order each
                order = torch.cat([order, torch.randperm(n, generator=self.generator)])
            idx, order = order[:bs], order[bs:]
            loss = self.task.loss(self.features("train", idx), {k: v[idx] for k, v in data.items()
                                                                  if torch.is_tensor(v)}, self.head)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        self.seconds = time.time() - start
        return losses

    @torch.no_grad()
    def score(self, split):
        self.encoder.eval()
        n = len(getattr(self.task, split)["x"])

        def features(idx):
            return self.features(split, idx)
        return self.task.score(features, n, self.head, split)


# ----------------------------------------------------------------------------------------------------------
# Pretraining: each miniature's encoder once, on its own data, every weight trainable; AdamW, linear warmup over
# 5% of the steps, then cosine down to a tenth of the peak (as the walkthrough's base).


def pretrain(params, loss_of_batch, steps, lr, log, what):
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    warmup, start = max(1, steps // 20), time.time()
    for step in range(steps):
        progress = max(0.0, (step - warmup) / max(1, steps - warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        loss = loss_of_batch(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"  {what}: pretraining step {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)")


def mlm_batch(ids, pieces, generator, rate=0.15):
    """BERT's masking: 15% of the real tokens ([CLS], [SEP] and padding never) are predicted; of those 80% become
    [MASK], 10% a random piece, 10% stay. Returns (input ids, targets with -100 where nothing is predicted)."""
    special = (ids == pieces.cls) | (ids == pieces.sep) | (ids == pieces.pad)
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & ~special
    targets = torch.where(chosen, ids, -100)
    roll = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), pieces.mask, ids)
    randoms = torch.randint(FIRST_WORD_PIECE, pieces.vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), randoms, inputs)
    return inputs, targets


FIRST_WORD_PIECE = 7  # after unk, bos, eos and the four special pieces ([CLS] ...): never drawn as replacements
