"""
A frozen int8 base for LLaMA-Adapter, in plain PyTorch: load_llama(..., quantize="int8"), train.py and generate.py
--quantize=int8.

The seven matrices of every block (wq, wk, wv, wo, w1, w2, w3) and the output head are stored as int8 with one
symmetric scale per output row, scale = max|row| / 127, so w ~ int8 * scale: a quarter of fp32's bytes, half of
bf16's. Embeddings and norms stay in the base's dtype, the adapter in fp32 and exact: only frozen weights are
rounded, and the prompts and gates learn on top of the rounded model (the zero-init property holds for it).

Why a custom autograd Function: the obvious forward, F.linear(x, int8_weight.to(x.dtype) * scales[:, None]),
makes autograd keep that dequantized weight for the backward pass, one per layer, which is more memory than a bf16
model. Here the backward keeps only the int8 weight and its scales, which exist anyway, and rebuilds the product
it needs: the base is frozen, so only the input's gradient is wanted.
"""
import torch
import torch.nn as nn


class Int8Matmul(torch.autograd.Function):
    """y = x W^T with W = weight * scales[:, None]: computed as (x @ weight^T) * scales, never forming W."""

    @staticmethod
    def forward(ctx, x, weight, scales):
        # x: (..., in) in the activation dtype; weight: (out, in) int8; scales: (out,) fp32
        ctx.save_for_backward(weight, scales)  # nothing dequantized is kept
        return ((x @ weight.to(x.dtype).t()) * scales).to(x.dtype)  # the cast copy lives only for this matmul

    @staticmethod
    def backward(ctx, grad):
        # dL/dx = (dL/dy * scales) @ weight: (..., out) x (out, in). No gradient for the frozen weight or scales.
        weight, scales = ctx.saved_tensors
        return (grad * scales).to(grad.dtype) @ weight.to(grad.dtype), None, None


class Int8Linear(nn.Module):
    """A frozen nn.Linear (no bias) whose weight is int8 with one fp32 scale per output row. Parameters that never
    train, so that counts, .to() and state_dict() treat them as the model's weights."""

    def __init__(self, in_features, out_features, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x):
        return Int8Matmul.apply(x, self.weight, self.scales)

    @torch.no_grad()
    def quantize_(self, read, rows_at_once=4096):
        """Fill in from a full-precision weight, a block of rows at a time: read(rows) returns those rows of it
        (any float dtype). Each row's scale is its own, so blocks are exact and the whole weight is never held."""
        for start in range(0, self.weight.shape[0], rows_at_once):
            rows = slice(start, start + rows_at_once)
            w = read(rows).to(self.weight.device, torch.float32)  # (rows, in)
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps scale ~0 and int8 0
            self.weight[rows] = torch.round(w / scale[:, None]).to(torch.int8)  # in [-127, 127]
            self.scales[rows] = scale

    def dequantized(self):
        return self.weight.float() * self.scales[:, None]  # (out, in) fp32: for tests and comparisons only


def int8_linears(model):
    """Replace the seven matrices of every block and the output head by Int8Linear, on the model's device (the
    meta device in load_llama, which then fills them in with quantize_); embeddings and norms are left as they are."""
    names = ["output"] + [f"layers.{i}.{part}" for i in range(len(model.layers)) for part in
                          ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features, device=linear.weight.device))
    return model


def quantize_model_(model):
    """An already built model's base quantized in place (tests, benchmarks): each linear from its own weight."""
    full = {name: module.weight for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    int8_linears(model)
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            module.quantize_(full[name].__getitem__)
    return model
