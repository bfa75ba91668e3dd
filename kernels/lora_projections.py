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
gradients meet in one buffer without a separate sum (under --fp8, _scaled_mm cannot add into
its output: see input_grad). x itself is saved once for all the projections that read it.

This file holds no Triton: cuBLAS does the GEMMs. The NF4 dequantization is
kernels/nf4_dequant.py's. The reference is nanolora.ops.projection_reference.
"""
from typing import NamedTuple

import torch

from nanolora.kernels.fp8_matmul import (fits, fp8_input_grad, fp8_matmul, inverse_scales, quantize_rows,
                                         quantize_rows_transposed)


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


def fp8_weight(weight, dtype, transposed=False):
    """The frozen base weight in e4m3 with its row scales [out, 1], as fp8_matmul takes it: an
    NF4 weight whose blocks lie within rows straight from its 4-bit codes, in one pass (its
    row_absmax scales each row to E4M3_MAX; 1.5 bytes moved per value); any other through
    dense_weight and quantize_rows. transposed: W8^T [in, out], as fp8_input_grad takes it,
    the same bytes written transposed by the kernels (nf4_dequant's transposed one, or
    fp8_matmul.quantize_rows_transposed)."""
    row_absmax = getattr(weight, "row_absmax", None)
    if row_absmax is None:
        dense = dense_weight(weight, dtype)
        return quantize_rows_transposed(dense) if transposed else quantize_rows(dense)
    from nanolora.kernels.nf4_dequant import dequantize_nf4_triton
    inverse = inverse_scales(row_absmax)
    if weight.packed.is_cuda:
        w8 = dequantize_nf4_triton(weight, torch.float8_e4m3fn, inverse, transposed)
    else:  # Triton's interpreter (the tests on a CPU) casts to e4m3 wrongly near powers of two:
        # the kernel's float32 values, cast by torch (the GPU test checks the two casts agree)
        w8 = dequantize_nf4_triton(weight, torch.float32, inverse, transposed).to(torch.float8_e4m3fn)
    return w8, inverse.reciprocal()[:, None]


def project_with_input_lora(x, xa, p: Projection, dtype, x_fp8=None):
    """y = x W^T + b + xa B~^T for x [T, in], given xa = x A^T (None without LoRA).

    The thin update GEMM runs first and writes y; the big GEMM then adds x W^T into y with
    beta = 1, reading y in its epilogue, where a compute-bound GEMM has bandwidth to spare.
    (The other order, big GEMM first and then y.addmm_(xa, B~^T), makes the thin GEMM read
    and write all of y: a memory-bound pass as slow as a separate add.)

    x_fp8: x as fp8_matmul.quantize_rows gives it, for the base GEMM in FP8 (--fp8); _scaled_mm
    cannot add into y, so there the update is added after it, as that memory-bound pass.
    """
    if x_fp8 is not None and fits(p.weight):
        y = fp8_matmul(*x_fp8, *fp8_weight(p.weight, dtype))
        y = y if y.dtype == dtype else y.to(dtype)
        if p.bias is not None:
            y += p.bias.to(dtype)
        return y if xa is None else y.addmm_(xa, p.scaled_B_cast.T)
    w = dense_weight(p.weight, dtype)
    if xa is None:
        return x @ w.T if p.bias is None else torch.addmm(p.bias.to(dtype), x, w.T)
    y = xa @ p.scaled_B_cast.T if p.bias is None else torch.addmm(p.bias.to(dtype), xa, p.scaled_B_cast.T)
    return y.addmm_(x, w.T)


def input_grad(dys, weights, dxa, lora_A, fp8=False):
    """dL/dx = sum_i dy_i W_i + dxa A for frozen bases W_i [out_i, in], with the LoRA terms
    stacked (dxa [T, sum r] the s_i dy_i B_i side by side, A [sum r, in]; dxa None without LoRA).

    cuBLAS accumulates each term after the first into dx inside its GEMM (beta = 1), so the
    thin LoRA GEMM goes first: the big GEMMs then read dx in their epilogues, where they have
    bandwidth to spare, while a thin GEMM adding into dx would be a memory-bound pass. fp8: the
    terms whose W fits go through fp8_matmul.fp8_input_grad, and _scaled_mm cannot add into its
    output, so those come first: the first becomes dx itself, each later one a [T, in]
    temporary added in a pass."""
    in_fp8 = [fp8 and fits(w) for w in weights]
    dx = None
    for dy, w, fp8_term in zip(dys, weights, in_fp8):
        if fp8_term:
            base = fp8_input_grad(dy, *fp8_weight(w, dy.dtype, transposed=True))  # bf16
            dx = base.to(dy.dtype) if dx is None else dx.add_(base)
    if dxa is not None:
        dx = dxa @ lora_A if dx is None else dx.addmm_(dxa, lora_A)
    for dy, w, fp8_term in zip(dys, weights, in_fp8):
        if not fp8_term:
            w16 = dense_weight(w, dy.dtype)
            dx = dy @ w16 if dx is None else dx.addmm_(dy, w16)
    return dx


def project_group(x, projections, dtype, lora_A_cat, fp8=False):
    """Every projection of the same x [T, in]: ([y_i], xa_cat). The LoRA projections' A's come
    stacked (lora_A_cat [sum r, in], cast once per step by ops.py), so x is read by one thin
    GEMM for all of them: xa_cat = x [A_1; A_2; ...]^T [T, sum r], whose column blocks are
    each projection's x A_i^T. fp8: the base GEMMs in FP8, x quantized once for all of them."""
    xa_cat = x @ lora_A_cat.T if lora_A_cat is not None else None
    xas = _column_blocks(xa_cat, projections)
    x_fp8 = quantize_rows(x) if fp8 and any(fits(p.weight) for p in projections) else None
    return [project_with_input_lora(x, xa, p, dtype, x_fp8) for p, xa in zip(projections, xas)], xa_cat


def project_group_backward(dys, x, xa_cat, projections, lora_A_cat, need_dx, fp8=False):
    """project_group's backward: (dL/dx or None, [(dA_i, dB_i)]). The LoRA terms of dx and of the
    A gradients are one GEMM each over the stacked [T, sum r] dxa_cat; dx is input_grad's."""
    xas = _column_blocks(xa_cat, projections)
    grads, dxas = [], []
    for p, dy, xa in zip(projections, dys, xas):
        if p.lora_A is None:
            grads.append((None, None))
            continue
        dxas.append(dy @ p.scaled_B_cast)  # [T, r_i] = s_i dy_i B_i
        grads.append([None, (dy.T @ xa).mul_(p.scale).to(p.lora_B.dtype)])
    dxa_cat = None
    if dxas:
        dxa_cat = dxas[0] if len(dxas) == 1 else torch.cat(dxas, dim=1)
        grad_A_cat = dxa_cat.T @ x  # [sum r, in]
        rows = 0
        for pair, p in zip(grads, projections):
            if p.lora_A is not None:
                r = p.lora_A.shape[0]
                pair[0] = grad_A_cat[rows:rows + r].to(p.lora_A.dtype)
                rows += r
    dx = input_grad(dys, [p.weight for p in projections], dxa_cat, lora_A_cat, fp8) if need_dx else None
    return dx, [tuple(pair) for pair in grads]


def _column_blocks(xa_cat, projections):
    """xa_cat's column block of each LoRA projection (None for the others)."""
    blocks, start = [], 0
    for p in projections:
        if p.lora_A is None:
            blocks.append(None)
        else:
            r = p.lora_A.shape[0]
            blocks.append(xa_cat[:, start:start + r])
            start += r
    return blocks


def lora_parameters(projections):
    """The trainable tensors of the projections, flattened: autograd needs them as inputs."""
    return [t for p in projections if p.lora_A is not None for t in (p.lora_A, p.lora_B)]


def gather_grads(projections, grads):
    """[(dA, dB) per projection] -> the flat order of lora_parameters (Nones skipped)."""
    return [g for p, pair in zip(projections, grads) if p.lora_A is not None for g in pair]


class LoRAProjections(torch.autograd.Function):
    """(y_1, ..., y_n) = each projection of the same x; see the module docstring."""

    @staticmethod
    def forward(ctx, x, projections, dtype, lora_A_cat, fp8, *lora_params):
        x2d = x.reshape(-1, x.shape[-1])
        x2d = x2d if x2d.dtype == dtype else x2d.to(dtype)
        ys, xa_cat = project_group(x2d, projections, dtype, lora_A_cat, fp8)
        ctx.projections, ctx.lora_A_cat, ctx.x_shape, ctx.x_dtype = projections, lora_A_cat, x.shape, x.dtype
        ctx.fp8 = fp8
        ctx.save_for_backward(x2d, xa_cat)
        return tuple(y.view(*x.shape[:-1], -1) for y in ys)

    @staticmethod
    def backward(ctx, *grad_outputs):
        x2d, xa_cat = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dys = [dy.reshape(-1, dy.shape[-1]) for dy in grad_outputs]
        dys = [dy if dy.dtype == x2d.dtype else dy.to(x2d.dtype) for dy in dys]
        dx, grads = project_group_backward(dys, x2d, xa_cat, ctx.projections, ctx.lora_A_cat, need_dx, ctx.fp8)
        if need_dx:
            dx = dx.view(ctx.x_shape)
            dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
        return (dx, None, None, None, None, *gather_grads(ctx.projections, grads))


def lora_projections(x, projections, dtype, lora_A_cat, fp8=False):
    """Each projection applied to x [..., in], in the compute dtype; differentiable in x and in
    every LoRA A/B. lora_A_cat: the LoRA projections' A casts stacked (ops.lora_A_stacked).
    fp8: the base GEMMs in FP8, forward and input gradient (kernels/fp8_matmul.py). Runs with
    autocast off: the dtypes are decided here."""
    with torch.autocast(x.device.type, enabled=False):
        return LoRAProjections.apply(x, projections, dtype, lora_A_cat, fp8, *lora_parameters(projections))
