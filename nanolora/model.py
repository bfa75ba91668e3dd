"""The decoder shared by Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3.

Module names follow the HF checkpoints minus their leading `model.` (see `hf_key`), so
`model.layers.3.mlp.up_proj.weight` in a safetensors file is `layers[3].mlp.up_proj.weight`
here. Family differences are ModelConfig fields:

- attention_bias (Qwen2, or Llama/Qwen3 configs that ask): q/k/v projections carry a bias;
  o_bias: o_proj too (Llama/Qwen3 with attention_bias)
- qk_norm (Qwen3): RMSNorm over head_dim on every query and key head, before RoPE
- sliding_window (Mistral): a query sees at most the last `sliding_window` keys, itself included
- tie_word_embeddings: the output head reuses the embedding matrix
- rope_scaling (llama3, linear): folded into the RoPE inverse frequencies (ops.rope_inv_freq)
- Gemma 2/3: hidden_act gelu_tanh (GeGLU); norm_plus_one (norms scale by 1 + w);
  scale_embeddings (times sqrt(hidden)); sandwich_norms (a norm after attention and after the
  MLP too); query_pre_attn_scalar (the attention scale); attn_logit_softcapping and
  final_logit_softcapping; layer_types (sliding-window or full attention, per layer);
  rope_local_theta (Gemma 3: the sliding layers' RoPE base)
"""
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanolora import checkpointing, ops
from nanolora.config import ModelConfig
from nanolora.nf4 import NF4Weight


def hf_key(name: str) -> str:
    """Our parameter name -> the HF checkpoint key (the one explicit rename)."""
    return name if name.startswith("lm_head.") else "model." + name


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, plus_one=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.plus_one = eps, plus_one

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps, self.plus_one)


class Linear(nn.Module):
    """A frozen projection y = x W^T + b whose W [out, in] is a 16-bit parameter or, for QLoRA,
    an NF4Weight submodule (its packed codes and scales are frozen parameters); `ops.projection`
    computes either. Both are registered, so model.to(), state_dict() and FSDP2 see them.
    """

    def __init__(self, in_features, out_features, bias):
        super().__init__()
        # left uninitialised: the model is built on the meta device and load_model fills it
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x):
        return ops.projection(x, self)

    def extra_repr(self):
        out_features, in_features = self.weight.shape
        kind = "nf4" if isinstance(self.weight, NF4Weight) else str(self.weight.dtype).removeprefix("torch.")
        return f"in={in_features}, out={out_features}, bias={self.bias is not None}, weight={kind}"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.sliding = sliding  # a sliding-window layer (its mask and, for Gemma 3, its RoPE)
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.norm_plus_one)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_start=0):
        batch, seq, _ = x.shape
        # q [batch, n_heads, seq, head_dim], k/v [batch, n_kv_heads, seq, head_dim]
        q, k, v = ops.qkv_rope(x, self.q_proj, self.k_proj, self.v_proj, cos, sin, self.head_dim,
                               self.q_norm, self.k_norm)
        if kv_cache is not None:  # write this step's keys/values, attend to everything so far
            k_cache, v_cache = kv_cache
            end = cache_start + seq
            k_cache[:, :, cache_start:end] = k
            v_cache[:, :, cache_start:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        out = ops.attention(q, k, v, mask, self.scale, self.softcap)  # [batch, n_heads, seq, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.activation = cfg.hidden_act
        self.output_only_added = not cfg.sandwich_norms

    def forward(self, x):
        # output_only_added: a Llama block adds this to the residual stream and reads it nowhere
        # else, so a checkpoint recompute may skip computing it (ops.gated_mlp); Gemma's
        # post_feedforward_layernorm reads it, so there it must be computed
        return ops.gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, activation=self.activation,
                             output_only_added=self.output_only_added)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, sliding)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg)
        # Gemma's "sandwich": HF calls the norm on the attention output post_attention_layernorm,
        # the name Llama gives to the norm before the MLP; Gemma's are pre/post_feedforward_layernorm
        self.pre_feedforward_layernorm = norm() if cfg.sandwich_norms else None
        self.post_feedforward_layernorm = norm() if cfg.sandwich_norms else None

    def forward(self, x, cos, sin, mask, kv_cache=None, cache_start=0):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, cache_start)
        if self.pre_feedforward_layernorm is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def build_attention_mask(batch, q_len, kv_len, device, *, q_start=0, key_padding=None,
                         segment_ids=None, sliding_window=None):
    """Boolean [batch or 1, 1, q_len, kv_len] mask (True = may attend), or None when plain
    causal attention over a whole sequence says it all.

    Queries sit at absolute positions q_start .. q_start+q_len-1 of the keys. A query sees a
    key when the key is not later (causal), is within the sliding window, is not padding
    (key_padding [batch, kv_len], True = real token), and belongs to the same packed example
    (segment_ids [batch, kv_len]). Every query also sees itself, so that a padding query is
    never left with nothing to attend to (SDPA would return NaN for that row); its output is
    never used.
    """
    if key_padding is None and segment_ids is None and sliding_window is None \
            and q_start == 0 and q_len == kv_len:
        return None
    q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None].expand(batch, q_len, kv_len)
    if key_padding is not None:
        mask = mask & key_padding[:, None, :].bool()
    if segment_ids is not None:
        q_segments = segment_ids[:, q_start:q_start + q_len]
        mask = mask & (q_segments[:, :, None] == segment_ids[:, None, :])
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


class Transformer(nn.Module):
    # The frozen projections (model.Linear) by leaf name, in the order LoRA targets are
    # listed: what `--targets all` means. A fork that adds a projection adds its name here.
    projection_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Built on the meta device and filled from a checkpoint (load.py), so the table gets no
        # random init: nn.Embedding's normal_ on meta imports torch._dynamo, ~1 s of every start
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        sliding = [cfg.sliding_window is not None and (cfg.layer_types is None or kind == "sliding_attention")
                   for kind in (cfg.layer_types or [None] * cfg.n_layers)]
        self.layers = nn.ModuleList(Block(cfg, sliding[i]) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        # a checkpoint's recompute replays the forward's RNG state (LoRA dropout); a CUDA graph
        # capture turns this off (nanolora/cuda_graphs.py): torch cannot read that state then
        self.preserve_rng_state = True
        self.compute_rope()

    def compute_rope(self, device=None):
        """(Re)compute the RoPE frequency buffers, e.g. on `device` after building on "meta"
        (buffers are not in the checkpoint, so loading does not fill them)."""
        cfg = self.config
        inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_inv_freq", inv_freq.to(device), persistent=False)
        # Gemma 3's sliding layers: their own base, no scaling
        local = None if cfg.rope_local_theta is None else ops.rope_inv_freq(cfg.head_dim, cfg.rope_local_theta)
        self.register_buffer("rope_local_inv_freq", None if local is None else local.to(device), persistent=False)

    @property
    def head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                      kv_cache=None, cache_start=0, documents=None):
        """Final-norm hidden states [batch, seq, hidden].

        attention_mask [batch, kv_len]: 1 for real tokens, 0 for padding (with a KV cache it
        covers the cached keys too). Pass None when there is no padding: SDPA then takes its
        causal fast path. (Checking for an all-ones mask here would sync with the device.) position_ids [batch, seq] default to cache_start + 0..seq-1.
        segment_ids [batch, seq]: packed examples; attention stays within one segment.
        documents: the same packing as document_attention.Documents (train.py finds them on the
        host), for the full-attention layers to attend within documents without a mask.
        """
        batch, seq = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + seq, device=device).expand(batch, seq)
        kv_len = cache_start + seq
        x = self.embed_tokens(input_ids)
        if self.config.scale_embeddings:  # sqrt(hidden) rounded to the model dtype first, as HF does
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        # (cos, sin, mask) for full-attention layers [False] and sliding-window ones [True]
        cos, sin = ops.rope_cos_sin(self.rope_inv_freq, position_ids, x.dtype)
        local_cos, local_sin = (cos, sin) if self.rope_local_inv_freq is None else \
            ops.rope_cos_sin(self.rope_local_inv_freq, position_ids, x.dtype)
        inputs = {}
        for sliding in {block.self_attn.sliding for block in self.layers}:
            if documents is not None and not sliding:  # packed rows: attention within documents
                mask = ops.documents_or_mask(documents, x, self.config.head_dim, self.config.attn_logit_softcapping)
            else:
                mask = build_attention_mask(batch, seq, kv_len, device, q_start=cache_start,
                                            key_padding=attention_mask, segment_ids=segment_ids,
                                            sliding_window=self.config.sliding_window if sliding else None)
            inputs[sliding] = (local_cos, local_sin, mask) if sliding else (cos, sin, mask)
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        offloader = checkpointing.offloader_for(self.grad_checkpointing, x.device) if checkpointed else None
        for i, block in enumerate(self.layers):
            layer_cache = None if kv_cache is None else kv_cache[i]
            layer_cos, layer_sin, mask = inputs[block.self_attn.sliding]
            if checkpointed:  # keep only the block's input: on the GPU, or offloaded to CPU memory
                offloads = offloader.block(x) if offloader else None  # with the attention's output
                with offloads.hooks() if offloads else nullcontext():
                    x = checkpoint(block, x, layer_cos, layer_sin, mask, layer_cache, cache_start,
                                   use_reentrant=False, context_fn=partial(ops.checkpoint_contexts, offloads),
                                   preserve_rng_state=self.preserve_rng_state)
            else:
                x = block(x, layer_cos, layer_sin, mask, layer_cache, cache_start)
        if offloader:
            offloader.forward_done()
        return self.norm(x)

    def logits(self, hidden):
        """The output head on hidden states [..., hidden] -> [..., vocab] (soft-capped for Gemma)."""
        return ops.soft_cap(F.linear(hidden, self.head_weight), self.config.final_logit_softcapping)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, labels=None,
                documents=None):
        """Logits [batch, seq, vocab]; or, given labels [batch, seq] (-100 = none), the next-token
        cross-entropy summed over label tokens (fp32 scalar), without materialising the logits."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids, documents=documents)
        if labels is not None:
            return ops.cross_entropy_sum(hidden, self.head_weight, labels,
                                         softcap=self.config.final_logit_softcapping)
        return self.logits(hidden)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=64, *, attention_mask=None, temperature=0.0,
                 top_p=1.0, eos_token_id=None, generator=None, on_token=None):
        """Continue input_ids [batch, seq] (left-padded when attention_mask is given).

        Greedy when temperature == 0, else sampling from softmax(logits / temperature) cut to
        the smallest set of tokens whose probability reaches top_p. A row stops at any id in
        eos_token_id (int or list); finished rows are filled with the first eos id. Returns
        the prompt followed by the new tokens. on_token(ids [batch]) is called as each step's
        tokens are picked (chat.py streams them).
        """
        batch, prompt_len = input_ids.shape
        device, cfg = input_ids.device, self.config
        eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                               device=device, dtype=torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        max_len = prompt_len + max_new_tokens
        cache_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        dtype = self.embed_tokens.weight.dtype
        kv_cache = [(torch.empty(cache_shape, device=device, dtype=dtype),
                     torch.empty(cache_shape, device=device, dtype=dtype)) for _ in self.layers]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, step_ids, start = [input_ids], input_ids, 0
        for _ in range(max_new_tokens):
            hidden = self.hidden_states(step_ids, attention_mask, position_ids, kv_cache=kv_cache,
                                        cache_start=start)
            logits = self.logits(hidden[:, -1]).float()
            next_ids = _pick_next(logits, temperature, top_p, generator)
            if len(eos_ids):
                next_ids = torch.where(finished, eos_ids[0], next_ids)
                finished |= torch.isin(next_ids, eos_ids)
            tokens.append(next_ids[:, None])
            if on_token:
                on_token(next_ids)
            start += step_ids.shape[1]
            step_ids = next_ids[:, None]
            position_ids = position_ids[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            if finished.all():
                break
        return torch.cat(tokens, dim=1)


def _pick_next(logits, temperature, top_p, generator):
    """One token id per row of logits [batch, vocab]: argmax, or a top-p sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep a token while the mass before it is below top_p (the most likely always stays)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)
