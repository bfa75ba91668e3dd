"""The seam between the model and the kernels.

Model code calls the ops here, once per block piece (a whole MLP, the q/k/v projections with
RoPE, one projection, RMSNorm, the loss), and never tests for CUDA itself. Each op has a torch
reference, named `<op>_reference` and written out beside its dispatcher: that is the op's
definition, and the tests compare the fused kernels in kernels/ against it (forward and
backward). An op dispatches to its kernel when the tensors are on CUDA, kernels are enabled
and the case is one the kernel covers (e.g. LoRA dropout 0); otherwise the reference runs.

`NANOLORA_KERNELS=0` in the environment, or `ops.use_kernels(False)` from Python, forces the
references everywhere. `ops.use_fp8(True)` (train.py --fp8 true) runs the frozen base's GEMMs
of the fused projection and MLP ops in FP8, forward and input gradient (kernels/fp8_matmul.py);
LoRA and the references stay in the compute dtype.
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from nanolora import document_attention, kept_attention, nf4
from nanolora.nf4 import NF4Weight

_kernels_enabled = os.environ.get("NANOLORA_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def use_kernels(enabled: bool):
    """Turn the Triton/fused paths on or off for this process (the references run when off)."""
    global _kernels_enabled
    _kernels_enabled = bool(enabled)


def kernels_enabled() -> bool:
    return _kernels_enabled


_fp8 = False


def use_fp8(enabled: bool):
    """The base's GEMMs (forward and input gradient) in FP8 on the fused path (an opt-in: it
    changes the numbers)."""
    global _fp8
    _fp8 = bool(enabled)


def _fast(*tensors) -> bool:
    """True when the fused path may run: kernels on and every tensor on CUDA."""
    return _kernels_enabled and all(t.is_cuda for t in tensors)


def compute_dtype(x):
    """The dtype matmuls run in: autocast's when autocast is on for x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm_reference(x, weight, eps, plus_one=False):
    """weight * x / sqrt(mean(x^2) + eps), as HF computes it: x normalised in fp32, cast back
    to x's dtype, then times weight (Llama's order).

    plus_one (Gemma): the weight is stored as w - 1, so the scale is (1 + w); Gemma's order
    differs too: the product (1 + w.float()) * normalised x is taken in fp32 and cast once.
    """
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:
        return (x * (1.0 + weight.float())).to(dtype)
    return weight * x.to(dtype)


def rms_norm(x, weight, eps, plus_one=False):
    # the Triton kernel has Llama's order and no (1 + w): Gemma's norms take the reference
    if _fast(x, weight) and not plus_one and not weight.requires_grad and weight.dtype == x.dtype:
        from nanolora.kernels.rms_norm import rms_norm_triton
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps, plus_one)


def soft_cap(x, cap):
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's attention scores
    and Gemma's final logits); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim, theta, scaling=None):
    """Per-pair inverse frequencies [head_dim/2] (fp32): theta^(-2i/head_dim), with HF's
    `rope_scaling` applied (None, {"rope_type": "linear", "factor"} or "llama3").

    llama3 scaling (transformers' `_compute_llama3_parameters`): wavelengths longer than
    orig/low_freq_factor are slowed down by `factor`, shorter than orig/high_freq_factor
    are kept, and those in between are interpolated linearly in 1/wavelength.
    """
    # on the CPU even inside `torch.device("meta")` (load.py builds the model there): meta ops
    # run torch's Python references, whose first use imports torch._dynamo (~1 s of every start)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    scaling = scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        orig = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos and sin [batch, seq, head_dim] for positions [batch, seq], computed in fp32.

    HF's rotate-half convention: frequency i drives the pair (i, i + head_dim/2), so the
    angles are repeated twice along the last dimension.
    """
    angles = position_ids[..., None].float() * inv_freq.float()  # [batch, seq, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope_reference(x, cos, sin):
    """Rotate x [batch, seq, heads, head_dim] by the angles in cos/sin [batch, seq, head_dim]."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_qk(q, k, cos, sin):
    """q [batch, seq, n_heads, head_dim] and k [batch, seq, n_kv_heads, head_dim], rotated."""
    if _fast(q, k, cos) and q.dtype == k.dtype == cos.dtype:
        from nanolora.kernels.rope import rope_qk_triton
        return rope_qk_triton(q, k, cos, sin)
    return apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)


# ----------------------------------------------------------------------------- projections
def dequantize_nf4(weight: NF4Weight, dtype):
    """An NF4Weight as a dense tensor in `dtype`: the Triton kernel on CUDA, the torch
    reference elsewhere (the two are equal bit for bit, tests/test_nf4_kernel.py)."""
    if weight.device.type == "cuda":
        from nanolora.kernels.nf4_dequant import dequantize_nf4_triton
        return dequantize_nf4_triton(weight, dtype)
    return nf4.dequantize_nf4(weight, dtype)


def dense_weight(weight, dtype):
    """A frozen weight as a dense tensor in `dtype`: a tensor cast (detached), an NF4Weight dequantized."""
    if isinstance(weight, NF4Weight):
        return dequantize_nf4(weight, dtype)
    return weight.detach().to(dtype)


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
        return _NF4Linear.apply(x, weight, bias, compute_dtype(x))
    return F.linear(x, weight, bias)


def has_lora(layer) -> bool:
    """True for an unmerged LoRALinear (duck-typed: ops.py does not import lora.py)."""
    return getattr(layer, "lora_A", None) is not None and not layer.merged


def projection_reference(x, layer):
    """One projection's forward, as written: x W^T + b, plus scale * (dropout(x) A^T) B^T for
    an unmerged LoRA layer.

    A and B are fp32 master copies; they are cast to the activation dtype here (autocast
    would do the same) so that a bf16 model without autocast, e.g. in generate(), works too.
    """
    base = linear(x, layer.weight, layer.bias)
    if not has_lora(layer):
        return base
    lora_x = layer.dropout(x)
    # the scale multiplies the rank-r intermediate, r columns instead of out_features (on a CPU
    # the [tokens, out] multiply, forward and backward, cost ~3% of a default-run step)
    low_rank = F.linear(lora_x, layer.lora_A.to(lora_x.dtype)) * layer.scale
    return base + F.linear(low_rank, layer.lora_B.to(lora_x.dtype))


def _fused_projection(layer, dtype):
    """The layer's state as the fused kernels take it (kernels/lora_projections.Projection),
    or None when the fused path does not cover it: LoRA dropout active, or a trainable base
    weight or bias (full fine-tuning)."""
    from nanolora.kernels.lora_projections import Projection
    weight, bias = layer.weight, layer.bias
    if getattr(weight, "requires_grad", False) or (bias is not None and bias.requires_grad):
        return None
    if not has_lora(layer):
        return Projection(weight, bias, None, None, None, None, 0.0)
    if layer.training and getattr(layer.dropout, "p", 0.0) > 0:
        return None
    lora_A, scaled_B = lora_weights_cast(layer, dtype)
    return Projection(weight, bias, layer.lora_A, layer.lora_B, lora_A, scaled_B, layer.scale)


# Every optimizer step (any torch.optim.Optimizer subclass: fused AdamW, 8-bit AdamW, SGD...)
# bumps this, through torch's global post-step hook; the LoRA casts below are keyed on it.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@torch.no_grad()
def lora_weights_cast(layer, dtype):
    """(A, scale * B) in the compute dtype, cast once and reused until A or B may have changed.

    The fp32 masters change only at optimizer steps, but every forward (and every checkpoint
    recompute) needs them in bf16: the cast is cached on the layer, keyed on the count of
    optimizer steps taken in this process and on the tensors' version counters. Both are
    needed: the fused AdamW kernel updates parameters in place WITHOUT bumping their version
    counters (tests/test_kernels.py shows it), while a copy_ or load_state_dict bumps them
    without any optimizer step.
    """
    A, B = layer.lora_A, layer.lora_B
    key = (_optimizer_steps, A._version, B._version, A.data_ptr(), B.data_ptr(), dtype, layer.scale)
    cached = getattr(layer, "_lora_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, A.to(dtype), (B * layer.scale).to(dtype))
        layer._lora_cast = cached
    return cached[1], cached[2]


def forget_lora_casts(model):
    """Drop every layer's cached LoRA casts (lora_weights_cast, lora_A_stacked), so that the
    next forward makes them afresh. nanolora/cuda_graphs.py does so around a capture: there the
    casts must be recorded into the graph, and must not outlive it in the cache."""
    for module in model.modules():
        for name in ("_lora_cast", "_lora_A_stacked"):
            module.__dict__.pop(name, None)


def _fused_projections(x, layers):
    """(Projection states, compute dtype) when every layer is fusable, else None (then the
    reference runs)."""
    if not _fast(x):
        return None
    dtype = compute_dtype(x)
    states = [_fused_projection(layer, dtype) for layer in layers]
    return None if any(s is None for s in states) else (states, dtype)


@torch.no_grad()
def lora_A_stacked(layers, states):
    """The A casts of those layers that have LoRA, stacked [sum r, in] (None if none has), so
    that a fused op reads their shared input with one thin GEMM. Cached like the casts."""
    with_lora = [(layer, state) for layer, state in zip(layers, states) if state.lora_A is not None]
    if len(with_lora) <= 1:
        return with_lora[0][1].lora_A_cast if with_lora else None
    key = tuple(layer._lora_cast[0] for layer, _ in with_lora)
    cached = getattr(with_lora[0][0], "_lora_A_stacked", None)
    if cached is None or cached[0] != key:
        cached = (key, torch.cat([state.lora_A_cast for _, state in with_lora]))
        with_lora[0][0]._lora_A_stacked = cached
    return cached[1]


def projection(x, layer):
    """A frozen projection (model.Linear) or a LoRA one (lora.LoRALinear) applied to x."""
    fused = _fused_projections(x, [layer])
    if fused is None:
        return projection_reference(x, layer)
    from nanolora.kernels.lora_projections import lora_projections
    states, dtype = fused
    return lora_projections(x, states, dtype, lora_A_stacked([layer], states), _fp8)[0]


# ----------------------------------------------------------------------------- attention
def qkv_rope_reference(x, q_proj, k_proj, v_proj, cos, sin, head_dim, q_norm=None, k_norm=None):
    """Queries, keys and values for attention: the three projections of x [batch, seq, hidden],
    split into heads, q/k RMSNorm over head_dim (Qwen3), RoPE on q and k.
    Returns q [batch, n_heads, seq, head_dim], k and v [batch, n_kv_heads, seq, head_dim]."""
    batch, seq, _ = x.shape
    q = projection_reference(x, q_proj).view(batch, seq, -1, head_dim)
    k = projection_reference(x, k_proj).view(batch, seq, -1, head_dim)
    v = projection_reference(x, v_proj).view(batch, seq, -1, head_dim)
    if q_norm is not None:
        q = rms_norm_reference(q, q_norm.weight, q_norm.eps, q_norm.plus_one)
        k = rms_norm_reference(k, k_norm.weight, k_norm.eps, k_norm.plus_one)
    q, k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def qkv_rope(x, q_proj, k_proj, v_proj, cos, sin, head_dim, q_norm=None, k_norm=None):
    """qkv_rope_reference's result; on CUDA the three projections run as one fused LoRA op
    (x read once for the backward, the three input gradients summed inside the GEMMs) and
    RoPE rotates q and k in one kernel."""
    fused = _fused_projections(x, [q_proj, k_proj, v_proj])
    if fused is None:
        return qkv_rope_reference(x, q_proj, k_proj, v_proj, cos, sin, head_dim, q_norm, k_norm)
    from nanolora.kernels.lora_projections import lora_projections
    states, dtype = fused
    lora_A = lora_A_stacked([q_proj, k_proj, v_proj], states)
    batch, seq, _ = x.shape
    q, k, v = (t.view(batch, seq, -1, head_dim) for t in lora_projections(x, states, dtype, lora_A, _fp8))
    if q_norm is not None:
        q, k = rms_norm(q, q_norm.weight, q_norm.eps, q_norm.plus_one), rms_norm(k, k_norm.weight, k_norm.eps, k_norm.plus_one)
    q, k = rope_qk(q, k, cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def attention_reference(q, k, v, mask, scale=None, softcap=None):
    """softmax(soft_cap(q k^T * scale) masked) v, written out: what SDPA computes, plus the
    attention-score soft-capping SDPA has no slot for (Gemma 2).

    Shapes as for `attention`. scale defaults to head_dim ** -0.5. The scores are
    [batch, n_heads, q_len, kv_len]: fine for a reference, too big for long sequences.
    """
    q_len, kv_len = q.shape[-2], k.shape[-2]
    if mask is None:  # causal over a whole sequence
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = soft_cap(scores, softcap).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def attention(q, k, v, mask, scale=None, softcap=None):
    """Scaled dot-product attention with grouped-query heads.

    q [batch, n_heads, q_len, head_dim], k/v [batch, n_kv_heads, kv_len, head_dim].
    mask: None for plain causal attention over a whole sequence (lets SDPA pick its flash
    kernel), else a boolean [batch or 1, 1, q_len, kv_len], True where a query may look.
    scale: the factor on q k^T (default head_dim ** -0.5). softcap: Gemma 2's cap on the
    scores; SDPA cannot apply it, so capped attention runs attention_reference.

    mask may also be the Documents of packed rows (nanolora/document_attention.py), handed
    over by documents_or_mask only where flash attention's variable-length kernel covers them:
    causal attention within each document, by that kernel.

    In a checkpointed block whose offloads keep tensors (checkpoint_contexts), plain causal
    attention keeps its output for the recompute instead of computing it twice
    (nanolora/kept_attention.py; same kernels, same bytes).
    """
    if isinstance(mask, document_attention.Documents):  # documents_or_mask found the kernel covers them
        return document_attention.attention(q, k, v, mask, scale)
    if softcap is not None:
        return attention_reference(q, k, v, mask, scale, softcap)
    # the recompute does what the forward did (the switches supported() reads could change between)
    if _keeper is not None and mask is None and (
            _keeper.holds_kept() if _recomputing else _kernels_enabled and kept_attention.supported(q, k, v, scale)):
        return kept_attention.KeptAttention.apply(q, k, v, scale, _keeper, _recomputing)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def documents_or_mask(documents, x, head_dim, softcap=None):
    """What packed rows' full-attention layers get as `mask` (x: the hidden states [batch, seq,
    hidden]): the documents themselves where flash attention's variable-length kernel will run,
    else the reference's boolean mask, built here once for all the layers.

    The kernel takes q, k and v in one 16-bit dtype. With x in another (fp32 weights under
    autocast), RoPE's cos/sin follow x and q, k come out fp32 beside a 16-bit v: the mask's
    way then, whose SDPA autocast casts."""
    dtype = compute_dtype(x)
    if _kernels_enabled and softcap is None and x.dtype == dtype \
            and document_attention.covers(x.device, dtype, head_dim):
        return documents
    return documents.mask(x.shape[0], x.shape[1])


# ----------------------------------------------------------------------------- MLP
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def gated_mlp_reference(x, gate_proj, up_proj, down_proj, activation="silu"):
    """down(act(gate(x)) * up(x)): SwiGLU with silu (Llama, Mistral, Qwen), GeGLU with gelu_tanh."""
    gate = projection_reference(x, gate_proj)
    up = projection_reference(x, up_proj)
    return projection_reference(ACTIVATIONS[activation](gate) * up, down_proj)


def gated_mlp(x, gate_proj, up_proj, down_proj, activation="silu", output_only_added=False):
    """gated_mlp_reference's result; on CUDA one fused op: the gate/up GEMMs with their LoRA
    terms folded in, the activation and its backward in one Triton kernel each, the down GEMM.

    output_only_added: the caller promises that the output is only ever added to something
    (the residual stream of a Llama block) and is the last thing its checkpointed block
    computes. A backward needs nothing from such a value, so when the block is recomputed
    for its backward (see checkpointed_block) the down GEMM is skipped.
    """
    fused = _fused_projections(x, [gate_proj, up_proj, down_proj])
    if fused is None:
        return gated_mlp_reference(x, gate_proj, up_proj, down_proj, activation)
    from nanolora.kernels.lora_mlp import lora_mlp
    (gate, up, down), dtype = fused
    return lora_mlp(x, gate, up, down, dtype, activation, skip_output=output_only_added and _recomputing,
                    gate_up_A_cat=lora_A_stacked([gate_proj, up_proj], [gate, up]), fp8=_fp8)


# ----------------------------------------------------------------------------- checkpointing
_recomputing = False  # inside a checkpoint's recompute of a block (see gated_mlp's output_only_added)
_keeper = None  # the running checkpointed block's offloads, where attention keeps its output


@contextmanager
def checkpointed_block(keeper, recompute):
    """Marks a checkpointed block's forward (recompute False) or its recompute for the backward;
    keeper: its checkpointing.BlockOffloads, or None (then attention is recomputed)."""
    global _recomputing, _keeper
    previous, (_recomputing, _keeper) = (_recomputing, _keeper), (recompute, keeper)
    try:
        yield
    finally:
        _recomputing, _keeper = previous


def checkpoint_contexts(keeper=None):
    """torch.utils.checkpoint's context_fn for one block: its forward and its recompute."""
    return checkpointed_block(keeper, False), checkpointed_block(keeper, True)


# ----------------------------------------------------------------------------- the loss
class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i W^T, label_i) over rows with a label, one chunk of rows at a time.

    Full-vocabulary fp32 logits for n tokens cost 4 * n * vocab bytes (4 GiB for 8k tokens of
    a 128k vocabulary). Here only one chunk's logits exist at a time, and the backward needs
    none: d loss / d logits = softmax - onehot is known as soon as the chunk's logits are,
    so the forward already computes d loss / d hidden = (softmax - onehot) W (and d/dW when W
    trains) and the backward only scales them by the incoming gradient.

    With softcap (Gemma), the logits are z = cap * tanh(raw / cap) and
    d loss / d raw = (softmax(z) - onehot) * (1 - (z / cap)^2): the chain rule through tanh,
    applied in the forward too (one more [chunk, vocab] buffer, only when capping).

    Rows whose label is -100 contribute zero loss and zero gradient. They are computed rather
    than filtered out on a GPU: selecting the labelled rows would need their count on the
    host, a device sync in every micro-batch (cross_entropy_sum filters them on the CPU).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, softcap=None):
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
            if softcap is not None:
                tanh = logits.div_(softcap).tanh_()
                d_cap = 1.0 - tanh.square()  # d capped / d raw
                logits = tanh.mul_(softcap)
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
            if softcap is not None:
                d_logits.mul_(d_cap)
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
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None, None


def cross_entropy_sum_reference(hidden, weight, labels, chunk_size=None, softcap=None):
    """Summed next-token cross-entropy over label positions (labels == -100 are skipped).

    hidden [batch, seq, d] are the final-norm states, weight [vocab, d] the output head,
    labels [batch, seq] aligned with the inputs (position t is predicted from t-1, as in HF).
    softcap: Gemma's final-logit cap (logits -> cap * tanh(logits / cap)), or None.
    Returns the fp32 sum. Dividing is the training loop's job: it knows how many label
    tokens the whole accumulation window holds.
    """
    hidden, labels, chunk_size = _shifted_rows(hidden, weight, labels, chunk_size)
    return _LinearCrossEntropySum.apply(hidden, weight, labels, chunk_size, softcap)


def cross_entropy_sum(hidden, weight, labels, chunk_size=None, softcap=None):
    """cross_entropy_sum_reference's result; on CUDA with a frozen head, the softmax and its
    gradient in one Triton pass over each chunk's 16-bit logits (kernels/cross_entropy.py).
    The kernel has no soft-cap: Gemma's capped logits take the reference."""
    if not (_fast(hidden, weight) and not weight.requires_grad and softcap is None):
        return cross_entropy_sum_reference(hidden, weight, labels, chunk_size, softcap)
    from nanolora.kernels.cross_entropy import linear_cross_entropy_sum
    hidden, labels, chunk_size = _shifted_rows(hidden, weight, labels, chunk_size)
    return linear_cross_entropy_sum(hidden, weight, labels, chunk_size)


def _shifted_rows(hidden, weight, labels, chunk_size):
    """hidden rows 0..seq-2 and labels 1..seq-1, flattened; the chunk size in rows."""
    # ~256 MiB of fp32 logits per chunk (512 rows of a 128k vocabulary): big enough for
    # efficient matmuls, small beside the activations of a long sequence.
    chunk_size = chunk_size or max(64, 2**26 // weight.shape[0])
    d = hidden.shape[-1]
    hidden, labels = hidden[:, :-1].reshape(-1, d), labels[:, 1:].reshape(-1)
    # No device to sync with on the CPU: skip the head's matmuls for prompt and padding rows
    # (the default run: 42% of its rows, ~113 of ~540 MFLOP per row, so ~9% of a step's work)
    if hidden.device.type == "cpu":
        has_label = labels != -100
        hidden, labels = hidden[has_label], labels[has_label]
    return hidden, labels, chunk_size
