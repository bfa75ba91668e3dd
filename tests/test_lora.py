"""LoRA math, the summed cross-entropy, and PEFT-format adapters (peft is the reference)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hf_fixtures import checkpoint_fixture, randomize_lora, save_checkpoint
from nanolora import load_model, ops
from nanolora.lora import attach_lora, lora_layers, lora_parameters, merge_lora, parse_targets, summary, unmerge_lora
from nanolora.peft import save_adapter


checkpoint = checkpoint_fixture("llama")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_zero_B_at_init_leaves_logits_unchanged(checkpoint):
    model, _ = load_model(checkpoint, device="cpu")
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        before = model(ids)
        attach_lora(model, "all", r=4, alpha=8)
        after = model(ids)
    assert torch.equal(before, after)
    # ...while A is initialised like nn.Linear: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    layer = model.layers[0].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0


def test_merge_equals_unmerged_forward(checkpoint):
    model, _ = load_model(checkpoint, device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    ids = torch.randint(0, 512, (2, 13))
    base_weight = model.layers[1].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    assert rel_err(merged, unmerged) < 1e-5
    assert rel_err(again, unmerged) < 1e-5
    assert torch.allclose(model.layers[1].self_attn.q_proj.weight, base_weight, atol=1e-6)


def test_lora_linear_matches_the_formula():
    """y = x W^T + b + scale * (x A^T) B^T, written out independently."""
    from nanolora.lora import LoRALinear
    torch.manual_seed(0)
    w, b = torch.randn(24, 16), torch.randn(24)
    for rslora, scale in ((False, 12 / 4), (True, 12 / 2)):
        layer = LoRALinear(torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(b, requires_grad=False),
                           r=4, alpha=12, rslora=rslora)
        assert layer.scale == scale
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(3, 5, 16)
        expected = x @ w.T + b + scale * (x @ layer.lora_A.T) @ layer.lora_B.T
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_only_lora_parameters_get_gradients(checkpoint):
    model, _ = load_model(checkpoint, device="cpu")
    attach_lora(model, "q,v,down", r=4, alpha=4)
    randomize_lora(model)
    ids = torch.randint(0, 512, (2, 9))
    model(ids, labels=ids).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert trainable == {f"layers.{i}.{m}.{ab}" for i in range(2)
                         for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
                         for ab in ("lora_A", "lora_B")}
    assert summary(model).startswith(f"{sum(p.numel() for p in lora_parameters(model)):,} trainable of ")


def test_dropout_only_on_lora_path(checkpoint):
    model, _ = load_model(checkpoint, device="cpu")
    layer_in = torch.randn(4, 7, 64)
    attach_lora(model, "q", r=4, alpha=4, dropout=0.5)
    layer = model.layers[0].self_attn.q_proj
    model.train()
    base = F.linear(layer_in, layer.weight)
    # B = 0: the output must equal the base output exactly, whatever dropout does
    assert torch.equal(layer(layer_in), base)
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(0)
    out = layer(layer_in)
    torch.manual_seed(0)
    dropped = F.dropout(layer_in, 0.5, training=True)
    expected = base + layer.scale * (dropped @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.allclose(out, expected, atol=1e-5)
    model.eval()  # no dropout at eval
    assert torch.allclose(layer(layer_in), base + layer.scale * (layer_in @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-5)


def test_parse_targets():
    assert parse_targets("all") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert parse_targets("v,q_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="LoRA target 'qkv' is not a projection name"):
        parse_targets("qkv")


def test_targets_are_found_by_leaf_name_anywhere():
    """A fork that adds a projection (here a gate on the block's output, as a module of the
    block itself rather than of self_attn/mlp) declares its name and LoRA finds it."""
    from nanolora.config import ModelConfig
    from nanolora.model import Linear, Transformer

    class Forked(Transformer):
        projection_names = Transformer.projection_names + ("out_gate",)

        def __init__(self, cfg):
            super().__init__(cfg)
            for block in self.layers:
                block.out_gate = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    cfg = ModelConfig("llama", 32, 16, 24, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8)
    model = Forked(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    attach_lora(model, "out_gate,q", r=2, alpha=2)
    assert [name for name, _ in lora_layers(model)] == [
        "layers.0.self_attn.q_proj", "layers.0.out_gate", "layers.1.self_attn.q_proj", "layers.1.out_gate"]
    assert model.lora_config.targets == ["q_proj", "out_gate"]
    with pytest.raises(ValueError, match="LoRA target 'o_gate' is not a projection name"):
        attach_lora(Forked(cfg), "o_gate")


@pytest.mark.parametrize("bad,match", [(dict(r=0), "rank r must be an integer >= 1"),
                                       (dict(r=2.5), "rank r must be an integer >= 1"),
                                       (dict(dropout=1.0), r"dropout must be in \[0, 1\)")])
def test_lora_config_refuses_bad_settings(checkpoint, bad, match):
    model, _ = load_model(checkpoint, device="cpu")
    with pytest.raises(ValueError, match=match):
        attach_lora(model, "all", **bad)


@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_cross_entropy_matches_torch(weight_trains):
    """Sum over label tokens of F.cross_entropy on full logits (the reference), forward and
    backward, with ignored positions, several chunks and a ragged last one."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    got = ops.cross_entropy_sum(hidden, weight, labels, chunk_size=7)
    got.backward(torch.tensor(0.37))
    got_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if weight_trains else [])
    hidden.grad = weight.grad = None
    logits = hidden[:, :-1] @ weight.T
    expected = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    (expected * 0.37).backward()
    expected_grads = [hidden.grad] + ([weight.grad] if weight_trains else [])
    assert torch.allclose(got, expected, rtol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-5)


def test_adapter_round_trip_with_peft(checkpoint, tmp_path):
    """Our adapter read by peft on the transformers model gives our logits; an adapter made by
    peft (non-zero B, rsLoRA) read by us gives peft's logits."""
    import peft
    import transformers
    model, _ = load_model(checkpoint, device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model, seed=1)
    save_adapter(model, tmp_path / "ours", base_model_name_or_path=checkpoint)
    ids = torch.randint(0, 512, (2, 13))
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(model(ids), peft_model(ids).logits) <= 1e-5

    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], use_rslora=True)
    theirs = peft.get_peft_model(ref, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    ours, _ = load_model(checkpoint, device="cpu", adapter=tmp_path / "theirs")
    assert {n.split(".")[-1] for n, _ in lora_layers(ours)} == {"q_proj", "v_proj", "gate_proj"}
    assert lora_layers(ours)[0][1].scale == 16 / math.sqrt(8)
    with torch.no_grad():
        assert rel_err(ours(ids), theirs.eval()(ids).logits) <= 1e-5


def test_adapter_for_another_base_is_refused(checkpoint, tmp_path):
    save_checkpoint(tmp_path / "wide", "llama", hidden_size=96, head_dim=24)
    wide, _ = load_model(tmp_path / "wide", device="cpu")
    attach_lora(wide, "all", r=4, alpha=4)
    save_adapter(wide, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor 'base_model\.model\.model\.layers\.0\.\S+' "
                                         r"has shape \[(96, 4|4, 96)\], but the base model needs \[(64, 4|4, 64)\]"):
        load_model(checkpoint, device="cpu", adapter=tmp_path / "adapter")
