"""The seam between the model and the kernels.

Model code calls the functions here and never tests for CUDA itself. Each function below is
the torch reference for its op; where a Triton kernel covers the case (CUDA tensors, a
supported dtype) it dispatches to kernels/ instead, and tests compare the two.
"""
import torch
import torch.nn.functional as F


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


def linear(x, weight, bias=None):
    """x W^T + b for a frozen base weight: a 16-bit tensor, or an NF4Weight (QLoRA)."""
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
            log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
            token_loss = log_z - logits.gather(-1, y[:, None])
            total += token_loss.masked_fill(~has_label, 0.0).sum()
            d_logits = torch.softmax(logits, dim=-1)  # becomes softmax - onehot, masked
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
