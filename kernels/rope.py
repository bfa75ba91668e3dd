"""RoPE on queries and keys in one launch, forward and backward.

HF's rotate-half convention: with half = head_dim / 2, the pair (x1, x2) = (x[i], x[i + half])
turns by the angle of frequency i:

    out1 = x1 cos - x2 sin
    out2 = x2 cos + x1 sin

A rotation's transpose is the rotation by minus the angle, so the backward is the same kernel
with sin negated:

    dx1 = d1 cos + d2 sin
    dx2 = d2 cos - d1 sin

One program per token rotates all of that token's query heads and key heads: cos/sin are read
once for both. The reference (nanolora.ops.apply_rope_reference) multiplies and adds in the
compute dtype, rounding after each step; this kernel computes in fp32 and rounds once, so the
two differ by at most about one unit in the last place of the 16-bit result.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, out_ptr, token, n_heads, cos, sin, HALF: tl.constexpr,
            BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    first = token * n_heads * (2 * HALF) + heads * (2 * HALF) + dims  # element offsets of x1
    x1 = tl.load(x_ptr + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + first + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, n_q_heads, n_k_heads,
                 SIN_SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    # cos/sin [tokens, 2 * HALF] hold each angle twice (rotate-half layout): read the first half
    cos = tl.load(cos_ptr + token * (2 * HALF) + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * (2 * HALF) + dims, mask=dims < HALF, other=0.0).to(tl.float32) * SIN_SIGN
    _rotate(q_ptr, q_out_ptr, token, n_q_heads, cos, sin, HALF, BLOCK_Q, BLOCK_HALF)
    _rotate(k_ptr, k_out_ptr, token, n_k_heads, cos, sin, HALF, BLOCK_K, BLOCK_HALF)


def _rope(q, k, cos, sin, sin_sign):
    """q [..., n_q_heads, head_dim], k [..., n_k_heads, head_dim] (contiguous, same leading
    dims), cos/sin [..., head_dim] -> rotated copies."""
    head_dim = q.shape[-1]
    tokens = q.numel() // (q.shape[-2] * head_dim)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _rope_kernel[(tokens,)](
        q, k, q_out, k_out, cos, sin, q.shape[-2], k.shape[-2],
        SIN_SIGN=sin_sign, HALF=head_dim // 2, BLOCK_Q=triton.next_power_of_2(q.shape[-2]),
        BLOCK_K=triton.next_power_of_2(k.shape[-2]), BLOCK_HALF=triton.next_power_of_2(head_dim // 2))
    return q_out, k_out


class RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(q, k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = _rope(grad_q.contiguous(), grad_k.contiguous(), cos, sin, -1.0)
        return grad_q, grad_k, None, None


def rope_qk_triton(q, k, cos, sin):
    """q [batch, seq, n_heads, head_dim] and k [batch, seq, n_kv_heads, head_dim] rotated by
    cos/sin [batch, seq, head_dim] (ops.rope_cos_sin); same dtype throughout."""
    batch, seq = q.shape[:2]
    if q.shape[-1] % 2 or cos.shape != (batch, seq, q.shape[-1]):
        raise ValueError(f"rope_qk_triton: q {tuple(q.shape)} and cos {tuple(cos.shape)} do not fit")
    return RoPE.apply(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous())
