"""The seam between the model and the kernels.

Model code calls the functions here and never tests for CUDA itself. Each function below is
the torch reference for its op; where a Triton kernel covers the case (CUDA tensors, a
supported dtype) it dispatches to kernels/ instead, and tests compare the two.
"""
import torch
import torch.nn.functional as F

from nanolora import nf4
from nanolora.nf4 import NF4Weight


def rms_norm(x, weight, eps):
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos and sin [batch, seq, head_dim] for positions [batch, seq], computed in fp32.

    HF's rotate-half convention: frequency i drives the pair (i, i + head_dim/2), so the
    angles are repeated twice along the last dimension.
    """
    angles = position_ids[..., None].float() * inv_freq.float()  # [batch, seq, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x [batch, heads, seq, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask):
    """Scaled dot-product attention with grouped-query heads.

    q [batch, n_heads, q_len, head_dim], k/v [batch, n_kv_heads, kv_len, head_dim].
    mask: None for plain causal attention over a whole sequence (lets SDPA pick its flash
    kernel), else a boolean [batch or 1, 1, q_len, kv_len], True where a query may look.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def swiglu(gate, up):
    """silu(gate) * up: the gated activation between the MLP's up and down projections."""
    return F.silu(gate) * up


def dequantize_nf4(weight: NF4Weight, dtype):
    """An NF4Weight as a dense tensor in `dtype`: the Triton kernel on CUDA, the torch
    reference elsewhere (the two are equal bit for bit, tests/test_nf4_kernel.py)."""
    if weight.device.type == "cuda":
        from nanolora.kernels.nf4_dequant import dequantize_nf4_triton
        return dequantize_nf4_triton(weight, dtype)
    return nf4.dequantize_nf4(weight, dtype)


class _NF4Linear(torch.autograd.Function):
    """y = x W^T + b with W held in NF4 and dequantized on the fly, in forward AND backward.

    With W~ = dequantize(W) in the compute dtype, forward is y = x W~^T + b. W is frozen, so
    backward needs only
        dL/dx = dL/dy W~                      [..., out] @ [out, in] -> [..., in]
        dL/db = dL/dy summed over all but the last dimension  (only if b trains)
    and no dL/dW = dL/dy^T x: neither x nor W~ has to be kept for backward. Backward
    dequantizes W again instead of saving W~ from forward. Saving it would keep a 16-bit copy
    of every quantized weight alive from its forward to its backward, i.e. the whole model in
    16-bit at the end of the forward pass, which is what QLoRA exists to avoid. Dequantizing
    is memory-bound and cheap beside the matmul: on an H100, x [8, 512, 4096] through a
    [14336, 4096] weight takes 1.31 ms forward + backward in NF4 against 1.21 ms in bf16.
    ctx keeps only a reference to the NF4Weight itself (its tensors exist anyway).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.weight, ctx.x_dtype = weight, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        w = dequantize_nf4(weight, dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ dequantize_nf4(ctx.weight, grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def linear(x, weight, bias=None):
    """x W^T + b for a frozen base weight: a 16-bit tensor, or an NF4Weight (QLoRA).

    An NF4 weight is computed in x's dtype, or under torch.autocast in the autocast dtype
    (what autocast would do for F.linear): the weight is dequantized straight into that
    dtype, and x and b are cast to it. The output has that dtype; dL/dx comes back in x's.
    """
    if isinstance(weight, NF4Weight):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return _NF4Linear.apply(x, weight, bias, dtype)
    return F.linear(x, weight, bias)


def lora_linear(x, layer):
    """A LoRALinear's forward: x W^T + b + scale * (dropout(x) A^T) B^T.

    A and B are fp32 master copies; they are cast to the activation dtype here (autocast
    would do the same) so that a bf16 model without autocast, e.g. in generate(), works too.
    """
    base = linear(x, layer.weight, layer.bias)
    lora_x = layer.dropout(x)
    update = F.linear(F.linear(lora_x, layer.lora_A.to(lora_x.dtype)), layer.lora_B.to(lora_x.dtype))
    return base + layer.scale * update


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, label_i) over rows with a label, one chunk of rows at a time.

    Full-vocabulary fp32 logits for n tokens cost 4 * n * vocab bytes (4 GiB for 8k tokens of
    a 128k vocabulary). Here only one chunk's logits exist at a time, and the backward needs
    none: d loss / d logits = softmax - onehot is known as soon as the chunk's logits are,
    so the forward already computes d loss / d hidden = (softmax - onehot) W (and d/dW when W
    trains) and the backward only scales them by the incoming gradient.

    Rows whose label is -100 contribute zero loss and zero gradient. They are computed rather
    than filtered out: selecting the labelled rows would need their count on the host, a
    device sync in every micro-batch.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        # hidden [n, d], labels [n]
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            has_label = (y != -100)[:, None]
            y = y.clamp(min=0)
            logits = (h @ w.T).float()  # [chunk, vocab]
            target_logit = logits.gather(-1, y[:, None])
            # softmax by hand, in place in the logits' own buffer: one [chunk, vocab] tensor
            # and five passes over it instead of logsumexp's and softmax's separate copies
            row_max = logits.amax(-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(-1, keepdim=True)
            token_loss = row_max + sum_exp.log() - target_logit  # log Z - logit[label]
            total += token_loss.masked_fill(~has_label, 0.0).sum()
            d_logits = probs.div_(sum_exp)  # softmax, becoming softmax - onehot, masked
            d_logits.scatter_add_(-1, y[:, None], torch.full_like(token_loss, -1.0))
            d_logits.masked_fill_(~has_label, 0.0)
            grad_hidden[start:start + chunk_size] = d_logits.to(h.dtype) @ w
            if grad_weight is not None:
                grad_weight += d_logits.T @ h.float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None


def cross_entropy_sum(hidden, weight, labels, chunk_size=None):
    """Summed next-token cross-entropy over label positions (labels == -100 are skipped).

    hidden [batch, seq, d] are the final-norm states, weight [vocab, d] the output head,
    labels [batch, seq] aligned with the inputs (position t is predicted from t-1, as in HF).
    Returns the fp32 sum. Dividing is the training loop's job: it knows how many label
    tokens the whole accumulation window holds.
    """
    # ~256 MiB of fp32 logits per chunk (512 rows of a 128k vocabulary): big enough for
    # efficient matmuls, small beside the activations of a long sequence.
    chunk_size = chunk_size or max(64, 2**26 // weight.shape[0])
    d = hidden.shape[-1]
    hidden = hidden[:, :-1].reshape(-1, d)
    labels = labels[:, 1:].reshape(-1)
    return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size)
