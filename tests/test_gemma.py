"""Gemma 2 and Gemma 3 (text-only), the worked example of adding an architecture.

The logits parity tests are test_model.py's, run on hf_fixtures' "gemma2" and "gemma3"
families (windows shorter than the sequences, padding, generation; bf16 on the GPU). Here:
the config as transformers reads it, Gemma's new ops against their references, and the rest
of what a family must support (LoRA on all seven projections, PEFT adapters, merged export,
QLoRA, train.py), each against transformers / peft / bitsandbytes.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import export
import train
from hf_fixtures import randomize_lora, save_checkpoint
from nanolora import load_model, ops
from nanolora.config import ModelConfig
from nanolora.lora import attach_lora, lora_layers, merge_lora
from nanolora.peft import save_adapter

TOL = 1e-5  # fp32, as test_model.py
GEMMAS = ["gemma2", "gemma3"]


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> HF folder; the MLP is 192 wide (bitsandbytes' CPU kernels want multiples of 64)."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            save_checkpoint(made[family], family, intermediate_size=192)
        return made[family]
    return get


# ------------------------------------------------------------------------------ config.json

# config.json as transformers 4 wrote them (no layer_types, rope_theta + rope_local_base_freq,
# sliding_window_pattern, rope_scaling), the form of most Gemma checkpoints on the hub
OLD_STYLE = {
    "gemma2": dict(model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=32, sliding_window=7, rope_theta=10000.0,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=13, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=7,
                        sliding_window_pattern=4, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


@pytest.mark.parametrize("model_type", list(OLD_STYLE))
@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_config_reads_as_transformers_does(model_type, style, tmp_path):
    """Layer kinds, RoPE bases and scaling, caps, tying: what transformers makes of the same
    config.json (transformers 4's form, and the one transformers 5 writes back)."""
    import transformers
    hf_class = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[model_type]
    raw = OLD_STYLE[model_type]
    hf = hf_class(**{k: v for k, v in raw.items() if k != "model_type"})
    if style == "transformers5":
        hf.save_pretrained(tmp_path)
        raw = json.loads((tmp_path / "config.json").read_text())
    ours = ModelConfig.from_hf(raw)
    assert ours.layer_types == hf.layer_types
    assert ours.sliding_window == hf.sliding_window
    assert ours.tie_word_embeddings == hf.tie_word_embeddings is True
    assert ours.final_logit_softcapping == hf.final_logit_softcapping
    assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar
    params = hf.rope_parameters
    if model_type == "gemma3_text":
        full, local = params["full_attention"], params["sliding_attention"]
        assert ours.rope_theta == full["rope_theta"] and ours.rope_local_theta == local["rope_theta"]
        assert ours.rope_scaling["rope_type"] == full["rope_type"] == "linear"
        assert ours.rope_scaling["factor"] == full["factor"] and local["rope_type"] == "default"
        assert ours.attn_logit_softcapping is None  # transformers' Gemma 3 attention ignores it
    else:
        assert ours.rope_theta == params["rope_theta"] and ours.rope_scaling is None
        assert ours.attn_logit_softcapping == hf.attn_logit_softcapping


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["sliding_attention"]), "layer_types must list 'sliding_attention' or 'full_attention' "
                                              "for each of the 13 layers"),
    (dict(layer_types=["local"] * 13), "layer_types must list"),
    (dict(hidden_activation="relu"), "hidden_activation 'relu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    (dict(sliding_window=0), "sliding_window must be a positive integer"),
    (dict(model_type="gemma3"), "model_type 'gemma3' is not supported"),  # the multimodal wrapper
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "yarn", "factor": 2.0}}),
     "sliding_attention rope_type 'yarn' is not supported"),
])
def test_bad_config_is_one_clear_error(change, message):
    raw = {**OLD_STYLE["gemma3_text"], **change}
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig.from_hf(raw, source="x/config.json")
    assert str(e.value).startswith("x/config.json: ")


# -------------------------------------------------------------------------------------- ops

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_plus_one_equals_gemma_norm(dtype):
    """Bit for bit transformers' Gemma2RMSNorm (fp32 normalise, times (1 + w) in fp32, one
    cast), in 16-bit too, where Llama's order (cast, then times w) rounds differently."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    torch.manual_seed(0)
    norm = Gemma2RMSNorm(123, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = torch.randn(5, 7, 123, dtype=dtype) * 3
    with torch.no_grad():
        assert torch.equal(ops.rms_norm(x, norm.weight, 1e-6, plus_one=True), norm(x))
    if dtype != torch.float32:  # the order matters: the other one is off somewhere
        llama_order = (1 + norm.weight) * ops.rms_norm_reference(x, torch.ones_like(norm.weight), 1e-6)
        assert not torch.equal(llama_order, norm(x).detach())


@pytest.mark.parametrize("masked", [False, True])
def test_attention_reference_equals_sdpa(masked):
    """Without a cap, the written-out attention is SDPA's (custom scale, GQA, causal or a
    padded sliding-window mask); the cap is the only thing SDPA lacks."""
    from nanolora.model import build_attention_mask
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16, requires_grad=True)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = None
    if masked:
        padding = torch.ones(2, 9, dtype=torch.long)
        padding[1, :3] = 0
        mask = build_attention_mask(2, 9, 9, "cpu", key_padding=padding, sliding_window=4)
    ref = ops.attention_reference(q, k, v, mask, scale=24 ** -0.5)
    sdpa = ops.attention(q, k, v, mask, scale=24 ** -0.5)
    torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-6)
    capped = ops.attention(q, k, v, mask, scale=24 ** -0.5, softcap=1.0)
    assert (capped - sdpa).abs().max() > 1e-2  # the cap bends these scores (|s| up to ~10)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_cross_entropy_with_final_softcap_matches_torch(weight_trains):
    """The chunked loss with Gemma's final-logit cap: value and gradients (hidden, and the
    head when it trains) equal autograd through soft_cap + F.cross_entropy on full logits."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 32, requires_grad=True)
    weight = (torch.randn(97, 32) * 0.5).requires_grad_(weight_trains)
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = -100
    ours = ops.cross_entropy_sum(hidden, weight, labels, chunk_size=7, softcap=3.0)
    ours.backward()
    got = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad, weight.grad = None, None
    logits = ops.soft_cap(hidden[:, :-1] @ weight.T, 3.0)
    ref = F.cross_entropy(logits.reshape(-1, 97), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if weight_trains:
        torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)
    uncapped = ops.cross_entropy_sum(hidden, weight, labels, chunk_size=7)
    assert abs(uncapped.item() - ours.item()) > 1.0  # the cap is not a no-op on these logits


# ------------------------------------------------------------------- what a family supports

@pytest.mark.parametrize("family", GEMMAS)
def test_peft_adapter_on_all_projections(checkpoints, family, tmp_path):
    """LoRA on all seven projections of every layer; peft reads our adapter onto the
    transformers model and gives our logits, and our loss equals transformers' (its loss
    applies the final cap too)."""
    import peft
    import transformers
    model, _ = load_model(checkpoints(family), device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    assert len(lora_layers(model)) == 7 * model.config.n_layers
    randomize_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path=checkpoints(family))
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints(family), dtype=torch.float32)
    ref.config._attn_implementation = "eager"
    ref = peft.PeftModel.from_pretrained(ref, tmp_path).eval()
    ids = torch.randint(0, 480, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(ids, labels=ids)
        assert rel_err(model(ids), out.logits) <= TOL
        n_labels = ids.shape[0] * (ids.shape[1] - 1)
        torch.testing.assert_close(model(ids, labels=ids) / n_labels, out.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", GEMMAS)
def test_merged_export_loads_in_transformers(checkpoints, family, tmp_path):
    """export.py --format merged: transformers loads the folder (config.json keeps its
    Gemma architecture) and gives nanolora's merged logits."""
    from transformers import AutoModelForCausalLM
    model, _ = load_model(checkpoints(family), device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    export.main(["--base", str(checkpoints(family)), "--adapter", str(tmp_path / "adapter"),
                 "--format", "merged", "--dtype", "f32", "--out", str(tmp_path / "merged")])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]]
    merge_lora(model)
    # eager: transformers 5.17's default for gemma2 is SDPA, which drops the attention soft-cap
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    ids = torch.randint(0, 480, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) <= TOL


def test_gguf_export_is_refused_clearly(checkpoints, tmp_path):
    """For now: export.py (which prints the message as its one line) says why, writes nothing."""
    model, _ = load_model(checkpoints("gemma2"), device="cpu")
    attach_lora(model, "q", r=2, alpha=2)
    save_adapter(model, tmp_path / "adapter")
    for fmt in ("gguf", "gguf-lora"):
        with pytest.raises(ValueError, match="GGUF export: model_type 'gemma2' has no llama.cpp architecture"):
            export.main(["--base", str(checkpoints("gemma2")), "--adapter", str(tmp_path / "adapter"),
                         "--format", fmt, "--out", str(tmp_path / f"{fmt}.gguf")])
        assert not (tmp_path / f"{fmt}.gguf").exists()


@pytest.mark.parametrize("family", GEMMAS)
def test_qlora_nf4_equals_bitsandbytes(checkpoints, family):
    """load_in_4bit: the seven projections in NF4, logits equal transformers + bitsandbytes
    (setup and tolerance as tests/test_qlora.py), and LoRA trains on top."""
    pytest.importorskip("bitsandbytes")
    from test_qlora import load_reference, nf4_weights
    ref = load_reference(checkpoints(family))
    ref.config._attn_implementation = "eager"
    model, _ = load_model(checkpoints(family), device="cpu", load_in_4bit=True)
    assert len(nf4_weights(model)) == 7 * model.config.n_layers
    ids = torch.randint(0, 480, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) <= TOL
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    model(ids, labels=ids).backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for _, layer in lora_layers(model))


@pytest.mark.parametrize("family", GEMMAS)
def test_train_cli_runs(checkpoints, family, tmp_path, capsys):
    """python train.py --model <gemma folder> on the CPU: the loss falls and the adapter it
    writes loads back."""
    model = train.main(["--model", str(checkpoints(family)), "--out", str(tmp_path), "--data", train.DEFAULTS["data"],
                        "--seq_len", "256", "--batch_size", "4", "--eval_size", "4", "--samples", "0",
                        "--max_steps", "6", "--lr", "3e-3", "--warmup_steps", "2", "--log_every", "1"])
    assert model.config.model_type == {"gemma2": "gemma2", "gemma3": "gemma3_text"}[family]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    load_model(checkpoints(family), device="cpu", adapter=tmp_path)
