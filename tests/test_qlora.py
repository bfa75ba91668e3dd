"""QLoRA: NF4 base weights in the model, against transformers + bitsandbytes (the reference).

Covered: ops.linear's NF4 autograd Function (forward, backward, what it keeps alive),
load_model(load_in_4bit=True) and bitsandbytes pre-quantized checkpoints (logits and bytes),
skip_modules, LoRA and merging on a 4-bit base, the memory the NF4 weights take, train.py
--load_in_4bit, and bad input.

Reference setup: transformers loads the same fp32 checkpoint with BitsAndBytesConfig(nf4,
double quant, compute fp32) on the CPU and is put in training mode BEFORE its first forward:
in eval mode, on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the weights on the first
forward and from then on multiplies in bf16 (~1e-2 off any fp32 result). In training mode it
dequantizes to fp32 and calls F.linear, the QLoRA training path (the fixtures have no dropout,
so training mode changes nothing else). The packed weights are bit-identical to ours, so the
logits agree to fp32 rounding: the tolerance is test_model.py's 1e-5 (measured: 0.0).
"""
import gc
import json
import math
import random
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import train
from hf_fixtures import randomize_lora, save_checkpoint
from nanolora import load_model, ops
from nanolora.lora import attach_lora, count_parameters, lora_parameters, merge_lora, unmerge_lora
from nanolora.model import Linear
from nanolora.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from tok_fixtures import make_bpe_tokenizer_dir

TOL = 1e-5
# bitsandbytes' CPU kernels want in_features to be a multiple of the blocksize (64), so the
# MLP is 192 wide here rather than hf_fixtures' 160
SIZES = dict(intermediate_size=192)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def bnb_config(**extra):
    import transformers
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32, **extra)


def load_reference(folder, **extra):
    """transformers + bitsandbytes 4-bit model of `folder`, in training mode (see above)."""
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(**extra),
                                                             device_map="cpu", dtype=torch.float32).train()


def save_prequantized(ref, folder):
    """What a `*-bnb-4bit` repo holds: save_pretrained of the 4-bit model, plus a tokenizer."""
    ref.save_pretrained(folder)
    make_bpe_tokenizer_dir(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases beside NF4 weights
def quantized(request, tmp_path_factory):
    """An fp32 checkpoint, its bitsandbytes pre-quantized copy, and the reference logits."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(root / "fp", request.param, **SIZES)
    ref = load_reference(root / "fp")
    save_prequantized(ref, root / "nf4")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(ids).logits
    return dict(family=request.param, fp=root / "fp", nf4=root / "nf4", ids=ids, logits=logits)


def nf4_weights(model):
    return {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Weight)}


# ---- loading: logits and bytes against transformers + bitsandbytes --------------------------

def test_load_in_4bit_logits_equal_bitsandbytes(quantized):
    model, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    assert len(nf4_weights(model)) == 7 * model.config.n_layers
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter) and model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(model(quantized["ids"]), quantized["logits"]) <= TOL


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_prequantized_checkpoint_loads_as_stored(quantized, load_in_4bit):
    """A save_pretrained 4-bit checkpoint: same logits; every NF4 tensor is the stored one
    and equals what load_in_4bit quantizes from the fp32 checkpoint."""
    model, _ = load_model(quantized["nf4"], device="cpu", load_in_4bit=load_in_4bit)
    with torch.no_grad():
        assert rel_err(model(quantized["ids"]), quantized["logits"]) <= TOL
    ours, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    stored = load_file(quantized["nf4"] / "model.safetensors")
    loaded, quantized_here = nf4_weights(model), nf4_weights(ours)
    assert loaded.keys() == quantized_here.keys() and len(loaded) == 14
    for name, weight in loaded.items():
        assert torch.equal(weight.packed, stored[f"model.{name}.weight"])
        for part, tensor in quantized_here[name].tensors().items():
            assert torch.equal(getattr(weight, part), tensor), (name, part)


def test_prequantized_keys_in_any_order_across_shards(quantized, tmp_path):
    """The parts of one 4-bit weight split over two shards, in shuffled order: each weight is
    assembled once all its parts are in."""
    stored = load_file(quantized["nf4"] / "model.safetensors")
    keys = sorted(stored)
    random.Random(0).shuffle(keys)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: stored[k] for k in shard_keys}, tmp_path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((quantized["nf4"] / "config.json").read_text())
    make_bpe_tokenizer_dir(tmp_path)
    split = {k[:-len(".weight")] for k in stored if k.endswith(".weight")
             and {weight_map[p] for p in stored if p.startswith(k)} == set(shards)}
    assert split  # some weight really has parts in both shards
    model, _ = load_model(tmp_path, device="cpu")
    with torch.no_grad():
        assert rel_err(model(quantized["ids"]), quantized["logits"]) <= TOL


def test_skip_modules_stay_16bit(tmp_path):
    """skip_modules (ours) and llm_int8_skip_modules (a pre-quantized checkpoint's) keep those
    projections 16-bit, exactly as stored; transformers with the same list agrees on logits."""
    pytest.importorskip("bitsandbytes")
    save_checkpoint(tmp_path / "fp", "llama", **SIZES)
    skip = ["lm_head", "down_proj", "model.layers.0.self_attn.q_proj"]
    ref = load_reference(tmp_path / "fp", llm_int8_skip_modules=skip)
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        expected = ref(ids).logits
    save_prequantized(ref, tmp_path / "nf4")
    fp_weights = load_file(tmp_path / "fp" / "model.safetensors")
    for folder, skip_modules in ((tmp_path / "fp", ["down_proj", "layers.0.self_attn.q_proj"]),
                                 (tmp_path / "nf4", None)):  # the checkpoint's config says which
        model, _ = load_model(folder, device="cpu", load_in_4bit=True, skip_modules=skip_modules)
        kept = {name for name, m in model.named_modules() if isinstance(m, Linear)} - set(nf4_weights(model))
        assert kept == {"layers.0.mlp.down_proj", "layers.1.mlp.down_proj", "layers.0.self_attn.q_proj"}
        for name in kept:
            assert torch.equal(model.get_submodule(name).weight, fp_weights[f"model.{name}.weight"])
        with torch.no_grad():
            assert rel_err(model(ids), expected) <= TOL


def test_lm_head_quantized_in_checkpoint_is_dequantized(tmp_path):
    """llm_int8_skip_modules=[] quantizes lm_head too; nanolora's head stays 16-bit, so it
    reads the stored 4-bit head and dequantizes it (to the values bitsandbytes computes with)."""
    pytest.importorskip("bitsandbytes")
    save_checkpoint(tmp_path / "fp", "llama", **SIZES)
    ref = load_reference(tmp_path / "fp", llm_int8_skip_modules=[])
    save_prequantized(ref, tmp_path / "nf4")
    assert "lm_head.weight.absmax" in load_file(tmp_path / "nf4" / "model.safetensors")
    ids = torch.randint(0, 512, (2, 11))
    model, _ = load_model(tmp_path / "nf4", device="cpu")
    assert isinstance(model.lm_head.weight, torch.nn.Parameter) and len(nf4_weights(model)) == 14
    with torch.no_grad():
        assert rel_err(model(ids), ref(ids).logits) <= TOL


# ---- the NF4 linear (ops.linear with an NF4Weight) ------------------------------------------

def random_nf4(out_features, in_features, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return quantize_nf4((torch.randn(out_features, in_features, generator=g) * 0.05).to(device))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 128)])
def test_nf4_linear_equals_dense_reference(bias, shape):
    """fp32: forward x W~^T + b and dL/dx = dL/dy W~ (and dL/db) equal the dense reference,
    W~ = dequantize(W), differentiated by autograd. Same fp32 matmuls: rounding-level agreement."""
    torch.manual_seed(0)
    weight = random_nf4(96, shape[-1])
    dense = dequantize_nf4(weight, torch.float32)
    b = torch.randn(96, requires_grad=True) if bias else None
    x = torch.randn(*shape, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], 96)

    y = ops.linear(x, weight, b)
    y.backward(grad_out)
    got = [y.detach(), x.grad] + ([b.grad] if bias else [])
    x.grad = None
    if bias:
        b.grad = None
    y_ref = x @ dense.T + (b if bias else 0)
    y_ref.backward(grad_out)
    expected = [y_ref.detach(), x.grad] + ([b.grad] if bias else [])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


def test_nf4_linear_under_autocast():
    """Under autocast the compute dtype is autocast's: W is dequantized straight into bf16 and
    the result is what F.linear on bf16 inputs gives; dL/dx comes back in x's dtype (fp32)."""
    torch.manual_seed(0)
    weight = random_nf4(64, 128)
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, weight)
    assert y.dtype == torch.bfloat16
    w16 = dequantize_nf4(weight, torch.bfloat16)
    assert torch.equal(y, F.linear(x.detach().bfloat16(), w16))
    grad_out = torch.randn(4, 64, dtype=torch.bfloat16)
    y.backward(grad_out)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, (grad_out @ w16).float())


def test_nf4_linear_keeps_no_dequantized_weight(monkeypatch):
    """Between forward and backward nothing of the dequantized weight survives: the Function
    saves no tensor for backward (saved_tensors_hooks sees none), every dequantized copy made
    in forward is freed when forward returns (weak references die), and backward makes its own."""
    made = []

    def recording_dequantize(weight, dtype):
        w = dequantize_nf4(weight, dtype)
        made.append(weakref.ref(w))
        return w
    monkeypatch.setattr(ops, "dequantize_nf4", recording_dequantize)
    weight = random_nf4(256, 128)
    x = torch.randn(8, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.linear(x, weight)
    gc.collect()
    assert saved == []
    assert len(made) == 1 and made[0]() is None
    y.sum().backward()
    assert len(made) == 2 and made[1]() is None
    torch.testing.assert_close(x.grad, dequantize_nf4(weight, torch.float32).sum(0).expand(8, -1))


def test_qlora_model_saves_no_weight_sized_tensor(quantized):
    """A whole QLoRA forward with a loss: of all the tensors autograd keeps for backward, none
    has the shape of a projection weight (13 tokens: no activation is [32 or 64 or 192, ...])."""
    model, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    attach_lora(model, "all", r=4, alpha=8)
    ids = quantized["ids"][:, :13]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids, labels=ids)
    weight_shapes = {tuple(w.shape) for w in nf4_weights(model).values()}
    weight_shapes |= {s[::-1] for s in weight_shapes}
    assert saved and not any(tuple(t.shape) in weight_shapes for t in saved)
    loss.backward()


# ---- LoRA on a 4-bit base --------------------------------------------------------------------

def test_lora_on_nf4_base_trains_only_lora_and_matches_peft(quantized, tmp_path):
    """Only LoRA matrices get gradients (also with gradient checkpointing); logits and LoRA
    gradients equal peft's LoRA on the transformers + bitsandbytes 4-bit model with our adapter.
    Gradients: 1e-4, as they sum over every token and layer in a different order."""
    peft = pytest.importorskip("peft")
    from nanolora.peft import peft_key, save_adapter
    model, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    ids = quantized["ids"]
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} and len(trainable) == 28

    save_adapter(model, tmp_path, quantized["fp"])
    ref = peft.PeftModel.from_pretrained(load_reference(quantized["fp"]), tmp_path, is_trainable=True)
    ref_logits = ref(ids).logits
    assert rel_err(logits.detach(), ref_logits.detach()) <= TOL
    F.cross_entropy(ref_logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    ref_grads = {n.replace(".default", ""): p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module, matrix = name.rsplit(".", 1)
            assert rel_err(p.grad, ref_grads[peft_key(module, matrix)]) <= 1e-4, name

    def lora_grads():
        for p in lora_parameters(model):
            p.grad = None
        model(ids, labels=ids).backward()
        return torch.cat([p.grad.flatten() for p in lora_parameters(model)])
    model.train()
    plain = lora_grads()
    model.grad_checkpointing = True  # re-runs each block's NF4 forward inside backward
    assert rel_err(lora_grads(), plain) <= 1e-6


def test_merge_into_nf4_base(quantized):
    """merge() replaces a 4-bit base by a 16-bit dequantize(W) + scale B A: the same forward as
    NF4 + LoRA unmerged; unmerge() keeps the 16-bit copy and takes the update out again."""
    model, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    ids = quantized["ids"]
    layer = model.layers[1].mlp.down_proj
    dequantized = dequantize_nf4(layer.weight, torch.float32)
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        assert not nf4_weights(model)
        assert isinstance(layer.weight, torch.nn.Parameter) and layer.weight.dtype == torch.float32
        assert not layer.weight.requires_grad
        torch.testing.assert_close(layer.weight, dequantized + layer.delta_weight(), rtol=0, atol=0)
        merged = model(ids)
        unmerge_lora(model)
        again = model(ids)
    assert rel_err(merged, unmerged) <= TOL and rel_err(again, unmerged) <= TOL
    torch.testing.assert_close(layer.weight, dequantized, rtol=0, atol=1e-6)

    model16, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True, dtype=torch.bfloat16)
    attach_lora(model16, "q", r=4, alpha=8)
    merge_lora(model16)  # into the model's dtype
    assert model16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


# ---- memory ----------------------------------------------------------------------------------

def test_memory_accounting(quantized):
    """Each NF4 weight of n values takes exactly n/2 (codes) + n/64 (8-bit scales)
    + 4 ceil(n/64/256) (fp32 scales of the scales) + 4*256 + 4*16 (code books) + 4 (offset)
    bytes; everything else is a 16-bit (here fp32) parameter of the checkpoint, and the
    parameter count is transformers'."""
    import transformers
    model, _ = load_model(quantized["fp"], device="cpu", load_in_4bit=True)
    weights = nf4_weights(model)
    for name, w in weights.items():
        n = w.numel()
        assert w.packed.dtype == torch.uint8 and w.packed.numel() == n // 2, name
        assert w.absmax.dtype == torch.uint8 and w.absmax.numel() == n // 64, name
        assert w.nbytes == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * 256 + 4 * 16 + 4, name
    cfg = model.config
    per_block = (cfg.hidden_size * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
                 + cfg.n_heads * cfg.head_dim * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert sum(w.numel() for w in weights.values()) == cfg.n_layers * per_block

    ref = transformers.AutoModelForCausalLM.from_pretrained(quantized["fp"], dtype=torch.float32)
    projection_weights = {f"model.layers.{i}.{p}.weight" for i in range(cfg.n_layers) for p in PROJECTIONS}
    kept = {n: p for n, p in ref.named_parameters() if n not in projection_weights}
    params = dict(model.named_parameters())
    nf4_parts = {n for n in params if ".weight." in n}  # registered: <projection>.weight.packed, ...
    assert nf4_parts == {f"{name}.weight.{part}" for name in weights for part in
                         ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")}
    assert all(not params[n].requires_grad for n in nf4_parts)
    params = {n: p for n, p in params.items() if n not in nf4_parts}
    assert {f"model.{n}" if not n.startswith("lm_head") else n for n in params} == set(kept)
    assert sum(p.numel() * p.element_size() for p in params.values()) == \
        sum(p.numel() * 4 for p in kept.values())  # fp32 here; bf16 on a GPU
    assert count_parameters(model) == (0, sum(p.numel() for p in ref.parameters()))
    attach_lora(model, "q,v", r=4, alpha=8)  # LoRA layers and plain projections both counted
    n_lora = sum(p.numel() for p in lora_parameters(model))
    assert count_parameters(model) == (n_lora, sum(p.numel() for p in ref.parameters()) + n_lora)


# ---- train.py --------------------------------------------------------------------------------

def test_train_load_in_4bit(tmp_path, capsys):
    save_checkpoint(tmp_path / "ckpt", "qwen2", **SIZES)
    model = train.main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--load_in_4bit", "true",
                        "--data", train.DEFAULTS["data"], "--seq_len", "256", "--batch_size", "2",
                        "--eval_size", "2", "--samples", "1", "--log_every", "1", "--warmup_steps", "2",
                        "--max_steps", "8", "--lr", "3e-3"])
    assert len(nf4_weights(model)) == 14
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    assert "(changed)" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


# ---- bad input -------------------------------------------------------------------------------

@pytest.fixture
def prequantized(tmp_path):
    """A small llama checkpoint as bitsandbytes 4-bit, written without bitsandbytes: our
    quantize_nf4 + to_bnb_state write the same bytes (tests/test_nf4.py), and config.json gets
    the quantization_config transformers writes."""
    save_checkpoint(tmp_path, "llama", **SIZES)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if any(f".{p}.weight" in k for p in PROJECTIONS)]:
        tensors.update(quantize_nf4(tensors.pop(key)).to_bnb_state(key[:-len(".weight")]))
    save_file({k: v.clone() for k, v in tensors.items()}, file, metadata={"format": "pt"})  # code books are shared
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "llm_int8_skip_modules": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_prequantized_fixture_loads(prequantized):
    model, _ = load_model(prequantized, device="cpu")
    assert len(nf4_weights(model)) == 14


@pytest.mark.parametrize("changes, message", [
    (dict(bnb_4bit_quant_type="fp4"), r"quantization_config.bnb_4bit_quant_type = 'fp4' is not supported \(supported: 'nf4'"),
    (dict(load_in_4bit=False, load_in_8bit=True), r"quantization_config.load_in_8bit = True is not supported"),
    (dict(quant_method="gptq"), r"quantization_config.quant_method = 'gptq' is not supported"),
    (dict(llm_int8_skip_modules="lm_head"), r"quantization_config.llm_int8_skip_modules = 'lm_head'"),
])
def test_unsupported_quantization_config(prequantized, changes, message):
    edit_config(prequantized, **changes)
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        load_model(prequantized, device="cpu")


def test_prequantized_missing_absmax(prequantized):
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    edit_tensors(prequantized, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {key}: missing"):
        load_model(prequantized, device="cpu")


def test_prequantized_inconsistent_quant_state(prequantized):
    key = "model.layers.0.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4"

    def edit(tensors):
        state = json.loads(bytes(tensors[key].tolist()))
        state["shape"] = [128, 64]
        tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    edit_tensors(prequantized, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.self_attn\.o_proj\.weight: "
                                         r"expected 4096 packed bytes \(shape \[128, 64\]"):
        load_model(prequantized, device="cpu")


def test_prequantized_weight_of_the_wrong_shape(prequantized):
    """Complete, self-consistent 4-bit parts under the wrong name: q_proj's parts as k_proj's."""
    def edit(tensors):
        for key in [k for k in tensors if "layers.0.self_attn.k_proj" in k]:
            tensors[key] = tensors[key.replace("k_proj", "q_proj")].clone()
    edit_tensors(prequantized, edit)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                         r"\[64, 64\] in its quant_state, expected \[32, 64\]"):
        load_model(prequantized, device="cpu")


def test_size_not_a_multiple_of_64(tmp_path):
    """hidden 40: k_proj is [20, 40], 800 values, not whole blocks of 64. The error names the
    tensor and the way out, which works."""
    save_checkpoint(tmp_path, "llama", hidden_size=40, intermediate_size=96)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has 800 values, "
                                         r"not a multiple of 64.*skip_modules=\['model\.layers\.0\.self_attn\.k_proj'\]"):
        load_model(tmp_path, device="cpu", load_in_4bit=True)
    model, _ = load_model(tmp_path, device="cpu", load_in_4bit=True, skip_modules=["k_proj", "v_proj"])
    assert {n.split(".")[-1] for n in nf4_weights(model)} == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_skip_modules_that_name_nothing(tmp_path):
    save_checkpoint(tmp_path, "llama", **SIZES)
    with pytest.raises(ValueError, match=r"skip_modules: 'dwn_proj' names no module of this model"):
        load_model(tmp_path, device="cpu", load_in_4bit=True, skip_modules=["dwn_proj"])


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_nf4_linear_triton_equals_reference():
    """On CUDA ops.linear dequantizes with the Triton kernel; it equals F.linear on the torch
    reference's dequantized weight bit for bit in bf16 (the kernel is bit-exact and the matmul
    is the same call), forward and backward, with and without autocast."""
    weight = random_nf4(3072, 1024, device="cuda")
    dense = dequantize_nf4(weight, torch.bfloat16)
    x = torch.randn(4, 37, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = ops.linear(x, weight)
    assert torch.equal(y, F.linear(x.detach(), dense))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert torch.equal(x.grad, grad_out @ dense)
    x32 = torch.randn(4, 37, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ops.linear(x32, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x32.bfloat16(), dense))


@pytest.mark.gpu
def test_gpu_load_in_4bit_peak_memory(tmp_path):
    """Quantizing as the weights stream in: peak GPU memory stays within the NF4 weights, the
    16-bit parameters that are not quantized, and one block's projections in 16-bit. (The whole
    model in bf16 first would be ~4x the NF4 part.)"""
    save_checkpoint(tmp_path, "llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=64)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = load_model(tmp_path, load_in_4bit=True)
    peak = torch.cuda.max_memory_allocated() - base
    nf4_bytes = sum(w.nbytes for w in nf4_weights(model).values())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_16bit = 2 * sum(w.numel() for name, w in nf4_weights(model).items() if name.startswith("layers.0."))
    print(f"peak {peak / 2**20:.1f} MiB: NF4 {nf4_bytes / 2**20:.1f} + 16-bit params {param_bytes / 2**20:.1f} "
          f"+ one block in 16-bit {block_16bit / 2**20:.1f} MiB")
    assert len(nf4_weights(model)) == 56 and model.embed_tokens.weight.dtype == torch.bfloat16
    assert peak <= nf4_bytes + param_bytes + block_16bit


@pytest.mark.gpu
def test_gpu_train_load_in_4bit(tmp_path):
    """The QLoRA path on the GPU: bf16 autocast through the NF4 Function, loss going down."""
    save_checkpoint(tmp_path / "ckpt", "llama", **SIZES)
    train.main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--load_in_4bit", "true",
                "--data", train.DEFAULTS["data"], "--seq_len", "256", "--batch_size", "4", "--eval_size", "4",
                "--samples", "1", "--log_every", "1", "--warmup_steps", "2", "--max_steps", "10", "--lr", "3e-3"])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
