"""NF4 (nanolora/nf4.py) against bitsandbytes, the reference: bytes, scales and values.

bitsandbytes 0.50 runs NF4 on the CPU; every comparison here is exact (torch.equal), because
nanolora reproduces its CPU arithmetic operation for operation (see nanolora/nf4.py).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanolora.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Weight,
    quantize_dynamic_8bit,
    dequantize_nf4,
    quantize_nf4,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = torch.tensor(float("inf"))
PREFIX = "model.layers.0.mlp.up_proj"


def weight_like_a_checkpoint(shape, dtype, seed=0):
    """Normal weights whose scale varies every 128 elements over ~3 decades (so the
    double-quantized absmax spans a wide range), with one all-zero block and two outliers."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    scale = torch.exp(torch.randn(-(-numel // 128), 1, generator=g) * 1.5) * 0.02
    w = (torch.randn(scale.shape[0], 128, generator=g) * scale).flatten()[:numel]
    w[:64] = 0.0
    w[64 * 3 + 5] = 1.5
    w[-1] = -0.7
    return w.view(shape).to(dtype)


def bnb_quantize(w, double_quant, blocksize=64):
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)


def bnb_dequantize(packed, state, dtype):
    """bitsandbytes' dequantize_4bit into ``dtype`` (it writes the state's dtype). Its CPU
    path returns a 1-D weight as [1, n]; we give it back in the original shape."""
    original = state.dtype
    state.dtype = dtype
    try:
        return bnb_functional.dequantize_4bit(packed, state, quant_type="nf4").reshape(state.shape)
    finally:
        state.dtype = original


def test_code_books_are_bitsandbytes():
    assert torch.equal(NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnb_functional.create_dynamic_map(signed=True))
    assert DYNAMIC_CODE[0].item() == pytest.approx(-0.99296875, abs=1e-7)  # float32 of the mean
    assert DYNAMIC_CODE[-1].item() == 1.0 and (DYNAMIC_CODE.diff() > 0).all()
    # NF4 are normal quantiles (QLoRA): 8 positive, 7 negative, 0, scaled to [-1, 1]. bitsandbytes
    # computed them with scipy's ndtri; torch's agrees to within one float32 ulp.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    quantiles = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close((quantiles / quantiles.abs().max()).float(), NF4_CODE, rtol=0, atol=6e-8)


@pytest.mark.parametrize("shape", [(64, 64), (300, 64), (128, 320), (1000, 512), (64 * 257,)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_quantize_and_dequantize_equal_bitsandbytes(shape, dtype, double_quant):
    w = weight_like_a_checkpoint(shape, dtype)
    packed, state = bnb_quantize(w, double_quant)
    q = quantize_nf4(w, blocksize=64, double_quant=double_quant)

    numel = w.numel()
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (numel // 2, 1)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.absmax, state.absmax)  # uint8 codes (double quant) or float32 scales
    assert torch.equal(q.code, state.code)
    if double_quant:
        assert q.absmax.dtype == torch.uint8
        assert torch.equal(q.offset, state.offset.reshape(1))
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.nested_blocksize == state.state2.blocksize == 256
    else:
        assert q.absmax.dtype == torch.float32 and q.nested_absmax is None
    assert q.shape == w.shape and q.dtype == dtype and q.blocksize == 64

    for out_dtype in DTYPES:
        ours = dequantize_nf4(q, out_dtype)
        assert ours.dtype == out_dtype and ours.shape == w.shape
        assert torch.equal(ours, bnb_dequantize(packed, state, out_dtype)), out_dtype
    assert torch.equal(dequantize_nf4(q), bnb_dequantize(packed, state, dtype))  # default: original dtype


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = weight_like_a_checkpoint((96, 256), torch.bfloat16, seed=1)
    packed, state = bnb_quantize(w, True, blocksize)
    q = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax) and torch.equal(q.offset, state.offset.reshape(1))
    assert torch.equal(dequantize_nf4(q, torch.float32), bnb_dequantize(packed, state, torch.float32))


def test_packing_layout():
    """The first element of a pair is the high nibble; codes are the nearest NF4 value."""
    w = torch.tensor([-1.0, 1.0] + [0.0] * 62)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed[0, 0].item() == 0x0F
    assert q.packed[1:].flatten().tolist() == [0x77] * 31  # 0.0 is code 7
    assert q.absmax.tolist() == [1.0]


def test_every_midpoint_tie_matches_bitsandbytes():
    """x exactly on the float32 midpoint of codes k and k+1 takes k (the lower index);
    one ulp above takes k+1. Checked for all 15 midpoints, at several block scales."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    points = torch.cat([midpoints, torch.nextafter(midpoints, INF), torch.nextafter(midpoints, -INF),
                        NF4_CODE])
    n = points.numel()  # 61
    block = torch.cat([torch.tensor([1.0]), points, torch.zeros(64 - 1 - n)])  # absmax 1: x == w
    for scale in (1.0, 0.5, 2.0**-7, 3.0):  # powers of two keep x exactly on the midpoint
        w = block * scale
        packed, _ = bnb_quantize(w, False)
        q = quantize_nf4(w, double_quant=False)
        assert torch.equal(q.packed, packed), scale
        if scale == 3.0:
            continue  # x = w * (1/3) moves off the midpoints; bitsandbytes still agrees above
        codes = torch.stack([q.packed.flatten() >> 4, q.packed.flatten() & 15], 1).flatten()[1:1 + n]
        assert codes[:15].tolist() == list(range(15)), scale  # ties go down
        assert codes[15:30].tolist() == list(range(1, 16)), scale  # one ulp up goes up
        assert codes[30:45].tolist() == list(range(15)), scale
        assert codes[45:].tolist() == list(range(16)), scale


def test_double_quant_rounding_matches_bitsandbytes_on_hard_values():
    """The 8-bit scale quantizer on values chosen to break a wrong rounding: every dynamic
    code value, every code midpoint, every point of bitsandbytes' 65536-point grid and the
    midpoints between them, each also one ulp either side; plus an all-zero block and a
    partial last block."""
    code = DYNAMIC_CODE
    g = torch.arange(65536, dtype=torch.float32)
    grid = (g + g) / 65535 - 1
    points = torch.cat([code, (code[:-1] + code[1:]) / 2, grid, (grid[1:] + grid[:-1]) / 2])
    points = torch.cat([points, torch.nextafter(points, INF), torch.nextafter(points, -INF)]).clamp(-1, 1)
    per_block = 255  # each block of 256 also holds a 1.0, so its absmax is 1
    n_blocks = -(-points.numel() // per_block)
    blocks = torch.zeros(n_blocks, 256)
    blocks[:, 0] = 1.0
    blocks[:, 1:] = torch.cat([points, torch.zeros(n_blocks * per_block - points.numel())]).view(n_blocks, -1)
    for scale in (1.0, 0.37, 3.1e-3):
        values = torch.cat([torch.zeros(256), (blocks * scale).flatten(), torch.randn(100)])
        expected, state = bnb_functional.quantize_blockwise(values, blocksize=256)
        ours, absmax = quantize_dynamic_8bit(values, 256)
        assert torch.equal(absmax, state.absmax), scale
        assert torch.equal(ours, expected), f"scale {scale}: {(ours != expected).sum()} of {ours.numel()} differ"


def linear4bit_state_dict(w, double_quant):
    """What transformers' save_pretrained writes for one bnb 4-bit linear (its state_dict)."""
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compress_statistics=double_quant,
                              quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4", blocksize=64)
    layer = layer.to("cpu")  # quantizes
    return layer.state_dict(prefix=f"{PREFIX}.")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_bnb_state_round_trip(tmp_path, dtype, double_quant):
    w = weight_like_a_checkpoint((300, 64), dtype, seed=2)
    expected = linear4bit_state_dict(w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    ours = q.to_bnb_state(PREFIX)

    assert list(ours) == list(expected)  # same keys, same order
    for key, tensor in expected.items():
        assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
        assert torch.equal(ours[key], tensor), key  # includes the quant_state JSON bytes

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in expected.items()}, str(path))
    loaded = NF4Weight.from_bnb_state(load_file(str(path)), PREFIX, source=str(path))
    assert loaded.shape == q.shape and loaded.dtype == dtype and loaded.blocksize == 64
    assert loaded.double_quant == double_quant
    for name, tensor in q.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert torch.equal(dequantize_nf4(loaded), dequantize_nf4(q))
    assert list(loaded.to_bnb_state(PREFIX)) == list(expected)


def test_bnb_state_with_wider_quant_storage():
    """bnb_4bit_quant_storage=bfloat16 (FSDP QLoRA) stores the same packed bytes as bf16 [n/4, 1]."""
    w = weight_like_a_checkpoint((300, 64), torch.float32, seed=3)
    layer = bnb.nn.Linear4bit(64, 300, bias=False, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                     quant_storage=torch.bfloat16)
    state = layer.to("cpu").state_dict(prefix=f"{PREFIX}.")
    assert state[f"{PREFIX}.weight"].dtype == torch.bfloat16
    loaded = NF4Weight.from_bnb_state(state, PREFIX, source="fsdp.safetensors")
    assert torch.equal(loaded.packed, quantize_nf4(w).packed)
    assert torch.equal(dequantize_nf4(loaded), dequantize_nf4(quantize_nf4(w)))


def test_transformers_save_pretrained_checkpoint(tmp_path):
    """A whole checkpoint written by transformers + bitsandbytes: every quantized linear reads
    back with from_bnb_state, and quantizing the same fp weights ourselves writes the same
    tensors (keys, dtypes, shapes, bytes)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    fp_weights = load_file(str(tmp_path / "fp" / "model.safetensors"))
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb_config,
                                                          device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "nf4")
    path = str(tmp_path / "nf4" / "model.safetensors")
    saved = load_file(path)

    prefixes = sorted(k[: -len(".weight.quant_map")] for k in saved if k.endswith(".weight.quant_map"))
    assert len(prefixes) == 7  # q, k, v, o, gate, up, down
    for prefix in prefixes:
        loaded = NF4Weight.from_bnb_state(saved, prefix, source=path)
        module = model.get_submodule(prefix)
        assert torch.equal(dequantize_nf4(loaded), bnb_functional.dequantize_4bit(
            module.weight.data, module.weight.quant_state, quant_type="nf4"))
        ours = quantize_nf4(fp_weights[f"{prefix}.weight"].to(torch.bfloat16)).to_bnb_state(prefix)
        written = {k: v for k, v in saved.items() if k.startswith(f"{prefix}.weight")}
        assert sorted(ours) == sorted(written)
        for key, tensor in written.items():
            assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
            assert torch.equal(ours[key], tensor), key


def test_nf4weight_container():
    w = weight_like_a_checkpoint((128, 320), torch.bfloat16)
    q = quantize_nf4(w)
    n_blocks = w.numel() // 64
    assert q.nbytes == w.numel() // 2 + n_blocks + 4 * (-(-n_blocks // 256)) + 4 * 256 + 4 * 16 + 4
    assert quantize_nf4(w, double_quant=False).nbytes == w.numel() // 2 + 4 * n_blocks + 4 * 16
    # registered, frozen tensors: state_dict() and model.to() see them (to() moves in place)
    assert set(q.state_dict()) == {"packed", "absmax", "code", "nested_absmax", "nested_code", "offset"}
    assert not any(p.requires_grad for p in q.parameters())
    assert q.to("meta") is q and q.packed.is_meta and q.offset.is_meta
    q = quantize_nf4(w)
    assert "NF4Weight(shape=[128, 320]" in repr(q)
    # quantizing the dequantized weight again changes nothing (codes are fixed points)
    again = quantize_nf4(dequantize_nf4(q, torch.float32), double_quant=False)
    assert torch.equal(again.packed, quantize_nf4(w, double_quant=False).packed)


# ---- errors --------------------------------------------------------------------------------

def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \[3, 40\].*120 elements.*blocksize 64"):
        quantize_nf4(torch.randn(3, 40))
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_nf4(torch.randn(64, 48), blocksize=48)
    with pytest.raises(ValueError, match="torch.int32 is not supported"):
        quantize_nf4(torch.zeros(64, 64, dtype=torch.int32))


def bnb_state(double_quant=True):
    return NF4Weight.to_bnb_state(quantize_nf4(weight_like_a_checkpoint((300, 64), torch.bfloat16),
                                               double_quant=double_quant), PREFIX)


def with_quant_state(state, **changes):
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(state[key].numpy()).decode())
    fields.update(changes)
    return {**state, key: torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("suffix", ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                    ".quant_state.bitsandbytes__nf4"])
def test_from_bnb_state_missing_key(suffix):
    state = bnb_state()
    key = f"{PREFIX}.weight{suffix}"
    del state[key]
    with pytest.raises(ValueError, match=rf"^ckpt/model-00001\.safetensors: {key}: missing"):
        NF4Weight.from_bnb_state(state, PREFIX, source="ckpt/model-00001.safetensors")


def test_from_bnb_state_fp4_is_refused():
    w = weight_like_a_checkpoint((300, 64), torch.float32)
    layer = bnb.nn.Linear4bit(64, 300, bias=False, quant_type="fp4")
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="fp4", blocksize=64)
    state = layer.to("cpu").state_dict(prefix=f"{PREFIX}.")
    with pytest.raises(ValueError, match=r"^m\.safetensors: .*bitsandbytes__fp4: only NF4 is supported"):
        NF4Weight.from_bnb_state(state, PREFIX, source="m.safetensors")
    # an "nf4" key whose JSON says fp4
    with pytest.raises(ValueError, match=r"quant_type 'fp4' is not supported \(expected 'nf4'\)"):
        NF4Weight.from_bnb_state(with_quant_state(bnb_state(), quant_type="fp4"), PREFIX, source="m")


@pytest.mark.parametrize("changes, message", [
    ({"shape": [301, 64]}, r": expected 9632 packed bytes \(shape \[301, 64\]"),
    ({"shape": [300, 60]}, r"18000 elements, not a multiple of blocksize 64"),
    ({"blocksize": 128}, r"absmax: expected torch.uint8 \[150\]"),
    ({"blocksize": 48}, r"blocksize 48 is not one of"),
    ({"dtype": "int8"}, r"dtype 'int8' is not one of"),
    ({"nested_dtype": "float16"}, r"nested_dtype 'float16' is not supported"),
    ({"nested_blocksize": 128}, r"nested_absmax: expected torch.float32 \[3\]"),
])
def test_from_bnb_state_inconsistent_quant_state(changes, message):
    with pytest.raises(ValueError, match=rf"^src: {PREFIX}\.weight.*{message}"):
        NF4Weight.from_bnb_state(with_quant_state(bnb_state(), **changes), PREFIX, source="src")


def test_from_bnb_state_quant_state_without_a_field():
    state = bnb_state()
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(state[key].numpy()).decode())
    del fields["shape"]
    state[key] = torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected a JSON object with the fields \('quant_type', 'blocksize', "
                                         r"'dtype', 'shape'"):
        NF4Weight.from_bnb_state(state, PREFIX, source="src")


def test_from_bnb_state_bad_tensors():
    state = bnb_state()
    state[f"{PREFIX}.weight.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match=r"quant_map: expected the NF4 code book"):
        NF4Weight.from_bnb_state(state, PREFIX, source="src")
    state = bnb_state(double_quant=False)
    state[f"{PREFIX}.weight.absmax"] = state[f"{PREFIX}.weight.absmax"].half()
    with pytest.raises(ValueError, match=r"absmax: expected torch.float32 \[300\].*got torch.float16"):
        NF4Weight.from_bnb_state(state, PREFIX, source="src")
    state = bnb_state()
    state[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"could not parse"):
        NF4Weight.from_bnb_state(state, PREFIX, source="src")
