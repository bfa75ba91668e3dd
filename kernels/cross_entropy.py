"""Summed cross-entropy through the output head, chunk by chunk, with a Triton row kernel.

Same algorithm as the reference (nanolora.ops.LinearCrossEntropySumReference): for each chunk
of rows, logits = h W^T, and since d loss / d logits = softmax - onehot is known as soon as the
logits are, the forward already computes d loss / d h = (softmax - onehot) W, so no logits
survive the chunk. What changes is the softmax. The reference copies the chunk's 16-bit logits
to fp32 and makes about ten passes over that copy (max, subtract, exp, sum, log, gather, divide,
scatter, mask, cast back). Here one program per row streams over the row twice:

    pass 1: running max m and running sum s of exp(logit - m) (rescaled when m grows), fp32
    loss   = m + log(s) - logit[label]                       (0 where label = -100)
    pass 2: logit <- exp(logit - m) / s - [j == label]       written in place, in the logits'
                                                             dtype; 0 for a row without label

so the 16-bit logits are read twice and written once, and no fp32 copy exists. The gradient
is rounded to the logits' dtype, as the reference rounds it (`d_logits.to(h.dtype)`) before
its matmul. Only for a frozen head: a trainable one (full fine-tuning) takes the reference,
which accumulates its gradient in fp32.
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096  # columns per step of the row loop: 8 KiB of bf16, 16 elements per thread at 8 warps


@triton.jit
def _softmax_xent_kernel(logits_ptr, labels_ptr, loss_ptr, n_cols, stride_row, ignore_index,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    has_label = label != ignore_index
    cols = tl.arange(0, BLOCK)
    running_max = tl.full((), -float("inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        logits = tl.load(row_ptr + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
    safe_label = tl.where(has_label, label, 0)
    target = tl.load(row_ptr + safe_label).to(tl.float32)
    loss = running_max + tl.log(running_sum) - target
    tl.store(loss_ptr + row, tl.where(has_label, loss, 0.0))
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        logits = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(logits - running_max) / running_sum - tl.where(start + cols == safe_label, 1.0, 0.0)
        grad = tl.where(has_label, grad, 0.0)
        tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_xent_(logits, labels, ignore_index=-100):
    """Per-row loss [n] (fp32, 0 without label); logits [n, vocab] become softmax - onehot."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    _softmax_xent_kernel[(n_rows,)](logits, labels, loss, n_cols, logits.stride(0), ignore_index,
                                    BLOCK=min(BLOCK, triton.next_power_of_2(n_cols)), num_warps=8)
    return loss


class LinearCrossEntropySum(torch.autograd.Function):
    """sum over labelled rows of CE(hidden W^T, label), a chunk of rows at a time; W frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden [n, d], labels [n]
        w = weight.to(hidden.dtype)
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            logits = h @ w.T  # [chunk, vocab], in hidden's dtype
            total += softmax_xent_(logits, labels[start:start + chunk_size].contiguous()).sum()
            torch.mm(logits, w, out=grad_hidden[start:start + chunk_size])
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def linear_cross_entropy_sum(hidden, weight, labels, chunk_size):
    """Summed CE of hidden [n, d] through the frozen head weight [vocab, d] against labels [n]."""
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size)
