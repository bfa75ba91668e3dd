"""Tiny random checkpoints of each family, saved by transformers as real HF folders.

Every parameter (norms and biases included) is drawn at random, so a weight that loads into
the wrong place, or a norm/bias that is skipped, changes the logits.
"""
import torch

VOCAB = 512  # tests/tok_fixtures.py's BPE tokenizer fits in this

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)

FAMILIES = {
    # Llama-3.1-style: GQA and llama3 rope scaling (tiny original context so all three
    # wavelength bands are exercised at head_dim 16)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    # attention_bias on a Llama puts a bias on q, k, v and o (unlike Qwen2: q, k, v only)
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # window shorter than the test sequences (which are 12+ tokens)
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    # explicit head_dim (32) != hidden_size / heads (16)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    # Gemma: window 5 (test sequences are 12+ tokens) on alternate layers, query_pre_attn_scalar
    # != head_dim, and soft-caps small enough to bend these tiny models' scores and logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    # Gemma 3: q/k norm, its own RoPE base on the sliding layers and linear scaling on the
    # full ones, layer types as listed (HF's default would make all 3 sliding), untied head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
        num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        tie_word_embeddings=False)),
}


def make_hf_model(family, seed=0, **overrides):
    import transformers
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save_checkpoint(path, family, seed=0, max_shard_size=None, **overrides):
    """Write a random `family` checkpoint (with a BPE tokenizer) to `path`; return the HF model."""
    from tok_fixtures import make_bpe_tokenizer_dir
    model = make_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_bpe_tokenizer_dir(path)
    return model


def checkpoint_fixture(family, **overrides):
    """A module-scoped pytest fixture: the folder of a tiny random `family` checkpoint, written
    once per test module (`checkpoint = checkpoint_fixture("qwen2")`); `overrides` go to
    save_checkpoint (config fields, e.g. intermediate_size=192)."""
    import pytest

    @pytest.fixture(scope="module")
    def folder(tmp_path_factory):
        path = tmp_path_factory.mktemp(family)
        save_checkpoint(path, family, **overrides)
        return path
    return folder


def randomize_lora(model, seed=0):
    """Give every LoRA matrix random values (B included), as a trained adapter has."""
    from nanolora.lora import lora_parameters
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def lora_loss_and_grads(model, batch):
    """The model's loss on `batch` (its keyword arguments) and the LoRA gradients, from zero."""
    from nanolora.lora import lora_parameters
    for p in lora_parameters(model):
        p.grad = None
    loss = model(**batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]
