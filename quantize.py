"""
A frozen int8 base for LLaMA-Adapter, in plain PyTorch: load_llama(..., quantize="int8"), train.py and generate.py
--quantize=int8. A memory option, not a speed one: each matmul reads the int8 matrix and writes a 16-bit copy of it.

The seven matrices of every block (wq, wk, wv, wo, w1, w2, w3) and the output head are stored as int8 with one
symmetric scale per output row, scale = max|row| / 127, so w ~ int8 * scale: a quarter of fp32's bytes, half of
bf16's. Embeddings and norms stay in the base's dtype, the adapter in fp32 and exact: only frozen weights are
rounded, and the prompts and gates learn on top of the rounded model (the zero-init property holds for it).

Why a custom autograd Function: F.linear(x, int8_weight.to(x.dtype) * scales[:, None]) would make autograd keep that
dequantized weight for the backward pass, one per layer, more memory than a bf16 model. Here the backward keeps only
the int8 weight and its scales, which exist anyway, and rebuilds the copy it needs: the base is frozen, so only the
input's gradient is wanted.
"""
import torch
import torch.nn as nn


def dequantized(weight, scales, dtype):
    # (out, in) in `dtype`: each int8 times its row's scale, multiplied in fp32 and rounded once. The scale goes on
    # the weight, not on x @ weight^T: that product is the output times 127 / max|row| (10^3 and more), which
    # overflows fp16 (65504) on LLaMA's activations in the thousands. On a GPU one kernel reads the int8 matrix and
    # writes the 16-bit one (3 bytes moved per weight, where a 16-bit copy scaled in place moves 9); on a CPU torch
    # would run that call on fp32 copies of the int8 input and of the output (ATen/TensorIterator.h: "on the CPU,
    # temporary copies"), so there the copy is scaled in place. Both give the same bits.
    if weight.is_cuda:
        return torch.mul(weight, scales[:, None], out=torch.empty(weight.shape, dtype=dtype, device=weight.device))
    return weight.to(dtype).mul_(scales[:, None])


class Int8Matmul(torch.autograd.Function):
    """y = x W^T with W = weight * scales[:, None], its copy in x's dtype living for this matmul only."""

    @staticmethod
    def forward(ctx, x, weight, scales):
        # x: (..., in) in the activation dtype; weight: (out, in) int8; scales: (out,) fp32
        ctx.save_for_backward(weight, scales)  # nothing dequantized is kept
        return x @ dequantized(weight, scales, x.dtype).t()

    @staticmethod
    def backward(ctx, grad):
        # dL/dx = dL/dy @ W: (..., out) x (out, in). No gradient for the frozen weight or scales.
        weight, scales = ctx.saved_tensors
        return grad @ dequantized(weight, scales, grad.dtype), None, None


class Int8Linear(nn.Module):
    """A frozen nn.Linear (no bias): an int8 weight with one fp32 scale per output row. Parameters that never train,
    so that counts, .to() and state_dict() treat them as the model's weights; load_llama sets the model's precision
    before it quantizes, as a later .to(bf16) would round the scales."""

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


def int8_linears(model, quantize_from_weights=False):
    """Replace the seven matrices of every block and the output head by Int8Linear, on the model's device (the meta
    device in load_llama, which then fills them in); with quantize_from_weights, each from its own weight (tests,
    benchmarks). Embeddings and norms are left as they are."""
    for name in ["output"] + [f"layers.{i}.{part}" for i in range(len(model.layers)) for part in
                              ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features, device=linear.weight.device))
        if quantize_from_weights:
            getattr(parent, child).quantize_(linear.weight.detach().__getitem__)
    return model
