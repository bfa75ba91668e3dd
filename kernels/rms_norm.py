"""RMSNorm forward and backward, one row per program, for a frozen weight.

Forward, in the casting order of the reference (nanolora.ops.rms_norm_reference, which is HF's):

    rstd  = 1 / sqrt(mean(x^2) + eps)          fp32, over the row
    x_hat = (x * rstd) rounded to x's dtype
    y     = w * x_hat                          computed in fp32, rounded to x's dtype

(torch's 16-bit multiply also computes in fp32 and rounds once, so y matches the reference
up to the order of the mean's sum, which can move rstd by an ulp of fp32.) rstd [rows] is kept
for backward; x is kept too (it is the block's input, alive anyway).

Backward (w frozen: no dw), with dy = dL/dy and n = row length. x_hat's rounding is treated as
the identity, as autograd treats the reference's cast:

    dx = rstd * (dy w - x_hat_32 * mean(dy w x_hat_32)),   x_hat_32 = x * rstd in fp32

derived from y_i = w_i x_i r with r = (mean(x^2) + eps)^-1/2 and dr/dx_j = -r^3 x_j / n.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    x_hat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    x_hat = x * rstd
    dy_w = dy * w
    dx = rstd * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / n_cols))
    tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _warps(block):
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = x.reshape(-1, x.shape[-1])
        n_rows, n_cols = x2d.shape
        y = torch.empty_like(x2d)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n_cols)
        _rms_norm_forward_kernel[(n_rows,)](x2d, weight, y, rstd, n_cols, eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        dy = dy.reshape(n_rows, n_cols).contiguous()
        dx = torch.empty_like(x2d)
        block = triton.next_power_of_2(n_cols)
        _rms_norm_backward_kernel[(n_rows,)](dy, x2d, weight, rstd, dx, n_cols, BLOCK=block, num_warps=_warps(block))
        return dx.view(ctx.x_shape), None, None


def rms_norm_triton(x, weight, eps):
    """RMSNorm of x [..., n] with a frozen weight [n] of x's dtype."""
    return RMSNorm.apply(x.contiguous(), weight, float(eps))
