"""Causal attention whose output is kept for the checkpoint's recompute instead of recomputed.

A checkpointed block runs its forward twice: once in the forward pass, keeping only its input,
and again just before its backward. The second time, every op is recomputed so that autograd
has the tensors its backward needs. For attention, those are q, k, v, the output and the
per-row log-sum-exp of the scores (what flash-style kernels save). q, k and v are cheap to
recompute (a GEMM on the block's input), the output is not: it is the attention forward itself,
whose cost grows with the square of the sequence, a third of attention's time and ~10% of an
8B step at 32k tokens (bench/run.py). So the first forward hands its output and log-sum-exp to
a keeper (nanolora/checkpointing.py: both go to CPU memory beside the block's input; the
log-sum-exp is 1/64 of the output's size at head_dim 128), and the recompute takes them back
instead of running the kernel:

    forward pass:  out, lse = attention_forward(q, k, v)          keeper.keep(out, lse)
    recompute:     out, lse = keeper.take()                       (no attention kernel)
    backward:      dq, dk, dv = attention_backward(dout, q, k, v, out, lse)

The backward is the fused kernel's own: given out and lse it recomputes the probabilities
tile by tile, P = exp(q k^T * scale - lse), and from dout forms dv = P^T dout, dP = dout v^T,
dS = P * (dP - rowsum(dout * out)), dq = dS k * scale, dk = dS^T q * scale, the same whether
out came from this forward or the first. So the gradients equal those of recomputing: same
kernels, same bytes (tests/test_checkpointing.py, tests/test_kept_attention.py).

The kernels are cuDNN's fused attention on CUDA (grouped-query heads natively) and PyTorch's
flash kernel on the CPU, called through their aten ops, which return the log-sum-exp that
SDPA's public function does not; the path runs only where SDPA would pick the same kernel.
"""
import torch
from torch.nn.attention import SDPBackend

aten = torch.ops.aten

# Shorter sequences recompute their attention. Keeping costs a copy of the output to CPU
# memory and back, and the attention forward it saves grows with the length: measured on an
# H200 (bench/step_time.py, 8B NF4, offloaded): 2 x 2048 tokens -1.2% tok/s, 1 x 8192 +3.7%,
# 1 x 32768 +11.5%.
MIN_LENGTH = 4096


def supported(q, k, v, scale=None) -> bool:
    """Whether this path covers the case and pays: plain causal attention over at least
    MIN_LENGTH tokens, where SDPA would run the very kernel called here (cuDNN's on CUDA, as it
    does on Hopper; PyTorch's flash kernel on the CPU), so that keeping changes no bytes."""
    if q.shape[2] < MIN_LENGTH or q.device.type not in ("cuda", "cpu"):
        return False
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return choice == (SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.FLASH_ATTENTION).value


def attention_forward(q, k, v, scale):
    """(out, lse) of causal softmax(q k^T * scale) v; q [batch, heads, seq, dim], k/v with
    heads or fewer (grouped-query)."""
    if q.is_cuda:
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
        return out, lse
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)


def attention_backward(dout, q, k, v, out, lse, scale):
    """(dq, dk, dv) from the forward's out and lse."""
    if q.is_cuda:
        # dropout is 0, so the RNG state the kernel takes is never read; max_q/max_k are the lengths
        no_rng = torch.zeros((), dtype=torch.int64, device=q.device)
        return aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, no_rng, no_rng, None, None, None, q.shape[2], k.shape[2], 0.0, True,
            scale=scale)
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, True, scale=scale)


class KeptAttention(torch.autograd.Function):
    """Causal attention that keeps (out, lse) with `keeper` in the forward pass and takes them
    back in the recompute (`recompute` True) instead of running the kernel again."""

    @staticmethod
    def forward(ctx, q, k, v, scale, keeper, recompute):
        if recompute:
            out, lse = keeper.take()
        else:
            out, lse = attention_forward(q, k, v, scale)
            keeper.keep(out, lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None
