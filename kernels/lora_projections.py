"""LoRA projections of one input, fused into the GEMMs: no elementwise pass of their own.

For each projection i of the same input x [T, d_in] (q, k and v of a block; or o alone):

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T

W_i [out, in] is the frozen base (16-bit, or NF4 dequantized into a temporary just before its
GEMM and dropped after it), A_i [r, in] and B_i [out, r] the trainable pair, s_i the LoRA scale.
The written-out formula costs, per projection, a GEMM for the base, two thin GEMMs for the
update, then a pass to scale the update and a pass to add it to the base: two extra round
trips of the [T, out] output through memory, and two more in backward. Here the scale is
folded into B once (B~ = s B, cast to the compute dtype once per optimizer step by ops.py),
and the two terms meet inside a GEMM: the thin one writes u = (x A^T) B~^T, then
u.addmm_(x, W^T) computes u + x W^T with the "+ u" in cuBLAS' epilogue (beta = 1), so the
output is written by GEMMs only, with no elementwise pass of its own.

Backward (dy_i = dL/dy_i [T, out]; W frozen, so no dW; b frozen, so no db):

    xa_i   = x A_i^T                      [T, r]   saved from forward (r columns, cheap)
    dxa_i  = dy_i B~_i = s_i dy_i B_i     [T, r]   dL/d(x A_i^T)
    dA_i   = dxa_i^T x                    [r, in]
    dB_i   = s_i dy_i^T xa_i              [out, r]
    dx     = sum_i (dy_i W_i + dxa_i A_i) [T, in]

and every term of dx is accumulated in place by addmm_ (beta = 1), so q, k and v's input
gradients meet in one buffer without a separate sum. x itself is saved once for all the
projections that read it.

This file holds no Triton: cuBLAS does the GEMMs. The NF4 dequantization is
kernels/nf4_dequant.py's. The reference is nanolora.ops.projection_reference.
"""
from typing import NamedTuple

import torch


class Projection(NamedTuple):
    """One projection's state, as ops.py hands it over (A/B None for a projection without LoRA)."""
    weight: object  # frozen base W [out, in]: a tensor, or an NF4 weight (packed + absmax ...)
    bias: torch.Tensor | None  # frozen
    lora_A: torch.Tensor | None  # the trainable fp32 parameter [r, in] (gradients go here)
    lora_B: torch.Tensor | None  # the trainable fp32 parameter [out, r]
    lora_A_cast: torch.Tensor | None  # A in the compute dtype
    scaled_B_cast: torch.Tensor | None  # s * B in the compute dtype
    scale: float


def dense_weight(weight, dtype):
    """The frozen base weight as a dense [out, in] tensor in dtype (NF4 dequantized now)."""
    if isinstance(weight, torch.Tensor):
        return weight if weight.dtype == dtype else weight.to(dtype)
    from nanolora.kernels.nf4_dequant import dequantize_nf4_triton
    return dequantize_nf4_triton(weight, dtype)


def project(x, p: Projection, dtype):
    """y = x W^T + b + (x A^T) B~^T for x [T, in]; returns (y, x A^T or None).

    The thin update GEMM runs first and writes y; the big GEMM then adds x W^T into y with
    beta = 1, reading y in its epilogue, where a compute-bound GEMM has bandwidth to spare.
    (The other order, big GEMM first and then y.addmm_(xa, B~^T), makes the thin GEMM read
    and write all of y: a memory-bound pass as slow as a separate add.)
    """
    xa = x @ p.lora_A_cast.T if p.lora_A is not None else None  # [T, r]
    return project_with_input_lora(x, xa, p, dtype), xa


def project_with_input_lora(x, xa, p: Projection, dtype):
    """project()'s y, given xa = x A^T already computed (None without LoRA)."""
    w = dense_weight(p.weight, dtype)
    if xa is None:
        return x @ w.T if p.bias is None else torch.addmm(p.bias.to(dtype), x, w.T)
    y = xa @ p.scaled_B_cast.T if p.bias is None else torch.addmm(p.bias.to(dtype), xa, p.scaled_B_cast.T)
    return y.addmm_(x, w.T)


def add_input_grad(dx, dy, w):
    """dx + dy w, with dx None meaning zero (then it is allocated here)."""
    return dy @ w if dx is None else dx.addmm_(dy, w)


def project_backward(dy, x, xa, p: Projection, dx, need_dx=True):
    """Adds this projection's dL/dx into dx (allocated on first use; skipped when the input
    needs no gradient, e.g. the first block's); returns (dx, dA, dB). As in forward, the thin
    LoRA term goes into dx before the big GEMM, which then accumulates in its epilogue."""
    grad_A = grad_B = None
    if p.lora_A is not None:
        dxa = dy @ p.scaled_B_cast  # [T, r]
        if need_dx:
            dx = add_input_grad(dx, dxa, p.lora_A_cast)
        grad_A = (dxa.T @ x).to(p.lora_A.dtype)
        grad_B = (dy.T @ xa).mul_(p.scale).to(p.lora_B.dtype)
    if need_dx:
        dx = add_input_grad(dx, dy, dense_weight(p.weight, dy.dtype))
    return dx, grad_A, grad_B


def lora_parameters(projections):
    """The trainable tensors of the projections, flattened: autograd needs them as inputs."""
    return [t for p in projections if p.lora_A is not None for t in (p.lora_A, p.lora_B)]


def gather_grads(projections, grads):
    """[(dA, dB) per projection] -> the flat order of lora_parameters (Nones skipped)."""
    return [g for p, pair in zip(projections, grads) if p.lora_A is not None for g in pair]


class LoRAProjections(torch.autograd.Function):
    """(y_1, ..., y_n) = each projection of the same x; see the module docstring."""

    @staticmethod
    def forward(ctx, x, projections, dtype, *lora_params):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        outputs, xas = [], []
        for p in projections:
            y, xa = project(x2d, p, dtype)
            outputs.append(y.view(*x.shape[:-1], -1))
            xas.append(xa)
        ctx.projections, ctx.x_shape, ctx.x_dtype = projections, x.shape, x.dtype
        ctx.save_for_backward(x2d, *[xa for xa in xas if xa is not None])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x2d, *saved_xas = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, grads = None, []
        for p, dy in zip(ctx.projections, grad_outputs):
            xa = saved_xas.pop(0) if p.lora_A is not None else None
            dy = dy.reshape(-1, dy.shape[-1]).to(x2d.dtype)
            dx, grad_A, grad_B = project_backward(dy, x2d, xa, p, dx, need_dx)
            grads.append((grad_A, grad_B))
        dx = dx.view(ctx.x_shape).to(ctx.x_dtype) if need_dx else None
        return (dx, None, None, *gather_grads(ctx.projections, grads))


def lora_projections(x, projections, dtype):
    """Each projection applied to x [..., in], in the compute dtype; differentiable in x and in
    every LoRA A/B. Runs with autocast off: the dtypes are decided here."""
    with torch.autocast(x.device.type, enabled=False):
        return LoRAProjections.apply(x, projections, dtype, *lora_parameters(projections))
