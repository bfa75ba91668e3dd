"""A block's whole gated MLP with LoRA on gate, up and down, as one autograd Function.

    e = x W_g^T + s_g (x A_g^T) B_g^T            gate pre-activation   [T, inter]
    g = x W_u^T + s_u (x A_u^T) B_u^T            up                    [T, inter]
    h = act(e) * g                               act = silu (SwiGLU) or gelu_tanh (GeGLU)
    y = h W_d^T + s_d (h A_d^T) B_d^T                                  [T, hidden]

The three projections are kernels/lora_projections.py's (LoRA update added inside the GEMM,
NF4 dequantized just before each GEMM); the activation is one Triton kernel forward and one
backward, instead of act, multiply and their backward as separate passes.

What is kept for backward: x, e, g and the thin x A^T, h A_d^T [T, r]. Not h: it is as big as e
and is recomputed in the backward kernel, which reads e and g anyway. Nor is y needed by the
backward: when a checkpointed block is recomputed, the down GEMM (a quarter of a Llama
block's forward FLOPs) can be skipped (`skip_output`, see nanolora.ops.gated_mlp).

Backward, with dy = dL/dy [T, hidden]:

    dh    = dy W_d + (s_d dy B_d) A_d                     (down's input gradient: input_grad)
    h     = act(e) g                                       recomputed
    dg    = dh act(e)                                      dL/dg
    de    = dh g act'(e)                                   dL/de
        silu:      act(e) = e sigmoid(e),   act'(e) = sigmoid(e) (1 + e (1 - sigmoid(e)))
        gelu_tanh: act(e) = e/2 (1 + tanh(u)), u = c (e + 0.044715 e^3), c = sqrt(2/pi),
                   act'(e) = (1 + tanh(u))/2 + e/2 (1 - tanh(u)^2) c (1 + 3 * 0.044715 e^2)
    then down's dA_d, dB_d from (dy, h), and gate/up's backward from (de, dg) as in
    lora_projections.py, their two input gradients summed into one dx by the GEMMs.

The backward kernel writes h over dh, de over e and dg over g: each element is read before
it is written by the same program, and e and g are not needed after this (a second backward
through the same graph is not supported, as with any checkpointed block). The activation
runs in fp32 and is rounded to the compute dtype once.

The reference is nanolora.ops.gated_mlp_reference.
"""
import torch
import triton
import triton.language as tl

from nanolora.kernels.fp8_matmul import fits, quantize_rows
from nanolora.kernels.lora_projections import (Projection, gather_grads, input_grad,
                                               lora_parameters, project_group, project_group_backward,
                                               project_with_input_lora)

BLOCK = 1024  # elements per program: memory-bound, 4 warps x 32 threads x 8 elements


@triton.jit
def _tanh(x):
    # tanh from exp, in builtins only (no libdevice import, so the interpreter runs it too)
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _activation(e, GELU: tl.constexpr):
    """(act(e), act'(e)) in fp32, the formulas of the module docstring; one place for both
    kernels, so forward and backward cannot drift apart (the forward's act' is dead code the
    compiler drops)."""
    if GELU:
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = _tanh(c * (e + 0.044715 * e * e * e))
        act = 0.5 * e * (1.0 + t)
        d_act = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * e * e)
    else:
        sig = 1.0 / (1.0 + tl.exp(-e))
        act = e * sig
        d_act = sig * (1.0 + e * (1.0 - sig))
    return act, d_act


@triton.jit
def _gated_forward_kernel(e_ptr, g_ptr, h_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(e, GELU)
    tl.store(h_ptr + offsets, (act * g).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_backward_kernel(dh_ptr, e_ptr, g_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """In place: dh -> h, e -> de, g -> dg."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _activation(e, GELU)
    tl.store(dh_ptr + offsets, (act * g).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(e_ptr + offsets, (dh * g * d_act).to(e_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offsets, (dh * act).to(g_ptr.dtype.element_ty), mask=mask)


def gated_activation(e, g, activation):
    """act(e) * g for contiguous e, g (a new tensor)."""
    h = torch.empty_like(e)
    n = e.numel()
    _gated_forward_kernel[(triton.cdiv(n, BLOCK),)](e, g, h, n, GELU=activation == "gelu_tanh", BLOCK=BLOCK)
    return h


def gated_activation_backward_(dh, e, g, activation):
    """Overwrites dh with h = act(e) g, e with dL/de and g with dL/dg; returns (h, de, dg)."""
    n = e.numel()
    _gated_backward_kernel[(triton.cdiv(n, BLOCK),)](dh, e, g, n, GELU=activation == "gelu_tanh", BLOCK=BLOCK)
    return dh, e, g


class LoRAMLP(torch.autograd.Function):
    """y = down(act(gate(x)) * up(x)) with LoRA on any of the three; see the module docstring."""

    @staticmethod
    def forward(ctx, x, gate: Projection, up: Projection, down: Projection, dtype, activation, skip_output,
                gate_up_A_cat, fp8, *lora_params):
        x2d = x.reshape(-1, x.shape[-1])
        x2d = x2d if x2d.dtype == dtype else x2d.to(dtype)
        (e, g), xa_gate_up = project_group(x2d, (gate, up), dtype, gate_up_A_cat, fp8)
        h = gated_activation(e, g, activation)
        xa_down = h @ down.lora_A_cast.T if down.lora_A is not None else None
        ctx.projections, ctx.activation, ctx.x_shape, ctx.x_dtype = (gate, up, down), activation, x.shape, x.dtype
        ctx.gate_up_A_cat, ctx.fp8 = gate_up_A_cat, fp8
        ctx.save_for_backward(x2d, e, g, xa_gate_up, xa_down)
        if skip_output:  # a recompute whose output nobody reads: the graph is all it is for
            y = torch.empty(x2d.shape[0], down.weight.shape[0], device=x.device, dtype=dtype)
        else:
            h_fp8 = quantize_rows(h) if fp8 and fits(down.weight) else None
            y = project_with_input_lora(h, xa_down, down, dtype, h_fp8)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2d, e, g, xa_gate_up, xa_down = ctx.saved_tensors
        gate, up, down = ctx.projections
        dy = dy.reshape(-1, dy.shape[-1])
        dy = dy if dy.dtype == x2d.dtype else dy.to(x2d.dtype)
        # down: dh = dxa_d A_d + dy W_d; its dA_d = dxa_d^T h waits for the kernel to remake h
        grad_A_down = grad_B_down = dxa_down = None
        if down.lora_A is not None:
            dxa_down = dy @ down.scaled_B_cast  # [T, r]
            grad_B_down = (dy.T @ xa_down).mul_(down.scale).to(down.lora_B.dtype)
        dh = input_grad([dy], [down.weight], dxa_down, down.lora_A_cast, ctx.fp8)
        h, de, dg = gated_activation_backward_(dh, e, g, ctx.activation)
        if down.lora_A is not None:
            grad_A_down = (dxa_down.T @ h).to(down.lora_A.dtype)
        del h
        need_dx = ctx.needs_input_grad[0]
        dx, (grads_gate, grads_up) = project_group_backward((de, dg), x2d, xa_gate_up, (gate, up),
                                                            ctx.gate_up_A_cat, need_dx, ctx.fp8)
        if need_dx:
            dx = dx.view(ctx.x_shape)
            dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
        grads = [grads_gate, grads_up, (grad_A_down, grad_B_down)]
        return (dx, None, None, None, None, None, None, None, None, *gather_grads(ctx.projections, grads))


def lora_mlp(x, gate, up, down, dtype, activation="silu", skip_output=False, gate_up_A_cat=None, fp8=False):
    """The gated MLP of x [..., hidden] in the compute dtype, differentiable in x and in every
    LoRA A/B. gate_up_A_cat: gate's and up's A casts stacked (those with LoRA; ops.py caches it).
    Runs with autocast off: the dtypes are decided here.

    skip_output=True leaves the output's values uncomputed (an uninitialised tensor that
    carries the graph): for a checkpoint recompute, which needs only what the backward saves.
    The caller must know that nothing reads the values (ops.gated_mlp decides). fp8: the base
    GEMMs in FP8, forward and input gradient (kernels/fp8_matmul.py)."""
    if activation not in ("silu", "gelu_tanh"):
        raise ValueError(f"lora_mlp: activation {activation!r} is not supported (silu, gelu_tanh)")
    with torch.autocast(x.device.type, enabled=False):
        return LoRAMLP.apply(x, gate, up, down, dtype, activation, skip_output, gate_up_A_cat, fp8,
                             *lora_parameters((gate, up, down)))
