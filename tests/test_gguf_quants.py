"""nanolora/gguf_quants.py's quantizers and dequantizers, block by block, on ordinary and awkward rows.

Oracles: gguf-py's numpy quantizers where it has them (F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1) and its
dequantizers for all; llama.cpp's own quantizers (llama_model_quantize through
llama-cpp-python) for every type, on a GGUF whose one weight holds the rows below.
Tests that take a `quantizer` run twice: on the CPU's native quantizer (nanolora/gguf_quantize.c)
and on the torch one that is its reference (NANOLORA_NATIVE=0).
"""
import shutil

import numpy as np
import pytest
import torch

import gguf
from export_fixtures import llama_cpp_quantize, needs_llama_cpp
from gguf_fixtures import rewrite_gguf, torch_threads
from hf_fixtures import save_checkpoint
from nanolora import gguf_native, load_model
from nanolora.gguf_quantize import quantize
from nanolora.gguf_quants import dequantize
from nanolora.gguf_write import write_gguf_model

COLS = 256  # one K-quant block, eight 32-blocks per row


@pytest.fixture(params=["native", "torch"])
def quantizer(request, monkeypatch):
    """Which CPU quantizer quantize() runs: the C one (needs a C compiler: where `cc` exists it
    must build) or the torch one."""
    if request.param == "torch":
        monkeypatch.setenv("NANOLORA_NATIVE", "0")
    else:
        monkeypatch.delenv("NANOLORA_NATIVE", raising=False)
        if gguf_native.library() is None:
            if shutil.which("cc"):
                pytest.fail("a C compiler is here, but the native quantizer did not build (see stderr)")
            pytest.skip("no C compiler: the native quantizer cannot be built")
    return request.param


def awkward_rows():
    """Rows of 256 that exercise the branches of the reference quantizers, all exactly
    representable in f16 (llama.cpp quantizes from an f16 file)."""
    rng = np.random.default_rng(0)
    normal = lambda scale=1.0: rng.standard_normal(COLS) * scale
    rows = {
        "zeros": np.zeros(COLS),
        "negative zeros": np.full(COLS, -0.0),
        "constant": np.full(COLS, 0.5),
        "negative constant": np.full(COLS, -0.5),
        "one outlier": np.where(np.arange(COLS) == 77, 100.0, normal(0.01)),
        "tiny (f16 subnormals)": normal(1e-6),
        "integers (ties)": rng.integers(-8, 8, COLS).astype(float),
        "half integers (ties)": rng.integers(-16, 16, COLS) + 0.5,
        "all positive": np.abs(normal()),
        "all negative": -np.abs(normal()),
        "sparse": np.where(rng.random(COLS) < 0.05, normal(), 0.0),
        "sub-blocks of very different scale": normal() * np.repeat(10.0 ** rng.integers(-3, 3, 16), 16),
        "large": normal(3e4).clip(-6e4, 6e4),
        "zero first half": np.concatenate([np.zeros(COLS // 2), normal()[:COLS // 2]]),
    }
    for i in range(64 - len(rows)):  # and ordinary rows at many scales
        rows[f"normal {i}"] = normal(10.0 ** rng.uniform(-3, 1))
    return {name: row.astype(np.float16).astype(np.float32) for name, row in rows.items()}


@pytest.mark.parametrize("type_name", ["F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_equal_to_gguf_py(type_name, quantizer):
    rows = awkward_rows()
    values = np.stack([row for name, row in rows.items() if name != "negative zeros"])
    qtype = gguf.GGMLQuantizationType[type_name]
    ref = np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8).reshape(len(values), -1)
    assert np.array_equal(quantize(values, type_name), ref)


# where each block type keeps its f16 scales (ggml-common.h): random bytes elsewhere are valid blocks
F16_SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                     "Q5_K": (0, 2), "Q6_K": (208,)}
GGUF_PY_QUANTIZES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@pytest.mark.parametrize("type_name", list(F16_SCALE_OFFSETS))
def test_dequantize_equals_gguf_py(type_name):
    """Bit for bit, on blocks from our quantizer, from gguf-py's (where it has one), and of
    random bytes (every 4/5/6-bit code and 6-bit scale, sign bits, ...) with finite f16 scales."""
    qtype = gguf.GGMLQuantizationType[type_name]
    values = np.stack(list(awkward_rows().values()))
    rng = np.random.default_rng(1)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    random_blocks = rng.integers(0, 256, (256, block_bytes), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[type_name]:
        scales = rng.standard_normal(256) * 10.0 ** rng.uniform(-6, 4, 256)
        random_blocks[:, offset:offset + 2] = scales.astype("<f2").view(np.uint8).reshape(-1, 2)
    sources = {"random bytes": random_blocks}
    if type_name != "Q4_1":  # we write no Q4_1
        sources["ours"] = quantize(values, type_name)
    if type_name in GGUF_PY_QUANTIZES:
        sources["gguf-py"] = np.asarray(gguf.quants.quantize(values, qtype)).view(np.uint8)
    for source, raw in sources.items():
        raw = np.ascontiguousarray(raw).reshape(-1)
        ours = dequantize(raw, int(qtype))
        ref = gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32)
        assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), source


def test_negative_zero_block_as_ggml(quantizer):
    """A 32-block of -0.0: ggml's loops start from max = +0.0 and keep it, so d = +0.0 / -8
    = -0.0 (bytes 00 80); gguf-py takes the -0.0 itself and writes +0.0. We follow ggml (the
    llama.cpp comparison below checks it byte for byte)."""
    out = quantize(np.full((1, 32), -0.0, np.float32), "Q4_0")
    assert out[0, :2].tolist() == [0x00, 0x80] and (out[0, 2:] == 0x88).all()


@pytest.mark.parametrize("type_name,rms", [("Q8_0", 7e-3), ("Q5_0", 5.5e-2), ("Q5_1", 5e-2), ("Q4_0", 0.11),
                                           ("Q4_K", 9e-2), ("Q5_K", 4.5e-2), ("Q6_K", 2.5e-2)])
def test_errors(type_name, rms, quantizer):
    """Dequantized by gguf-py: zeros stay zeros, and normal rows come back within the type's
    usual relative RMS error (median / worst of the 50 rows measured: Q8_0 5.4e-3 / 6.3e-3,
    Q5_0 4.3e-2 / 4.9e-2, Q5_1 3.8e-2 / 4.3e-2, Q4_0 8.6e-2 / 9.7e-2, Q4_K 7.1e-2 / 7.9e-2,
    Q5_K 3.6e-2 / 4.2e-2, Q6_K 1.8e-2 / 2.1e-2).
    Rows of values near 1e-6 are lost (scales below f16's range round to zero; Q4_K's min
    even overshoots), in llama.cpp exactly as here: see test_equal_to_llama_cpp."""
    rows = awkward_rows()
    values = np.stack(list(rows.values()))
    got = gguf.quants.dequantize(quantize(values, type_name), gguf.GGMLQuantizationType[type_name])
    got = dict(zip(rows, got.reshape(values.shape)))
    assert not got["zeros"].any() and not got["negative zeros"].any()
    for name, row in rows.items():
        if name.startswith("normal"):
            assert np.sqrt(((got[name] - row) ** 2).mean() / (row ** 2).mean()) <= rms, name


@pytest.fixture(scope="module")
def awkward_gguf(tmp_path_factory):
    """An f16 GGUF of a tiny model whose blk.0.ffn_up.weight rows are awkward_rows()."""
    root = tmp_path_factory.mktemp("quants")
    rows = awkward_rows()
    save_checkpoint(root / "base", "qwen2", hidden_size=COLS, intermediate_size=len(rows),
                    num_attention_heads=4, num_key_value_heads=2)
    model, tokenizer = load_model(root / "base", device="cpu")
    write_gguf_model(model, tokenizer, root / "plain.gguf", "f16", source=root / "base")
    values = np.stack(list(rows.values()))
    raw = values.astype(np.float16).view(np.uint8)
    return rewrite_gguf(root / "plain.gguf", root / "awkward.gguf",
                        replace_tensors={"blk.0.ffn_up.weight": (raw, gguf.GGMLQuantizationType.F16)}), values


@needs_llama_cpp
@pytest.mark.parametrize("type_name,ftype", [("Q8_0", 7), ("Q4_0", 2), ("Q5_0", 8), ("Q5_1", 9), ("Q4_K", 14),
                                             ("Q5_K", 16), ("Q6_K", 18)])
def test_equal_to_llama_cpp(awkward_gguf, tmp_path, type_name, ftype, quantizer):
    """llama_model_quantize (pure: every weight in the one type) on the awkward rows: our
    blocks are llama.cpp's, byte for byte, row by row."""
    path, values = awkward_gguf
    out = llama_cpp_quantize(path, tmp_path / "q.gguf", ftype, pure=True)
    tensor = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.ffn_up.weight")
    assert tensor.tensor_type.name == type_name
    ours = quantize(values, type_name)
    theirs = np.asarray(tensor.data).reshape(ours.shape)
    differing = [name for name, a, b in zip(awkward_rows(), ours, theirs) if not np.array_equal(a, b)]
    assert not differing, differing


# ------------------------------------------- ggml's own quantizer on float32 rows, CPU and CUDA

def ggml_quantize(values: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's ggml_quantize_chunk (what llama_model_quantize calls per tensor; without
    an importance matrix it runs quantize_row_*_ref), from the libggml-base that
    llama-cpp-python ships, on float32 rows [rows, cols]."""
    import ctypes
    from pathlib import Path

    import llama_cpp
    from nanolora.gguf_quants import TYPE_IDS, row_bytes
    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    values = np.ascontiguousarray(values, np.float32)
    out = np.zeros((len(values), row_bytes(type_name, values.shape[1])), np.uint8)
    written = lib.ggml_quantize_chunk(TYPE_IDS[type_name], values.ctypes.data, out.ctypes.data, 0, len(values),
                                      values.shape[1], None)
    assert written == out.size
    return out


def float32_rows(n_random=1536, seed=2):
    """awkward_rows() plus rows that f16 cannot hold: float32 rows at magnitudes from 1e-30
    (fp32 subnormal products) to 1e6 (past f16's range: d overflows to inf there, in llama.cpp
    as here), heavy tails, values rounding to exact ties after scaling, every sub-block of a
    different kind, and ordinary rows at many scales: [rows, 256] float32, names per row."""
    rng = np.random.default_rng(seed)
    rows = dict(awkward_rows())
    kinds = {
        "float32 subnormal scale": lambda: rng.standard_normal(32) * 1e-40,
        "1e-30": lambda: rng.standard_normal(32) * 1e-30,
        "1e6": lambda: rng.standard_normal(32) * 1e6,
        "1e9 (f16 scales overflow, levels from inf)": lambda: rng.standard_normal(32) * 1e9,
        "-1e8 + 1e3 noise (f16 dmin overflows, d not)": lambda: rng.standard_normal(32) * 1e3 - 1e8,
        "student t (heavy tails)": lambda: rng.standard_t(2, 32),
        "uniform": lambda: rng.uniform(-1, 1, 32),
        "ties: multiples of 1/64": lambda: rng.integers(-64, 64, 32) / 64,
        "ties: k/15 of a power of two": lambda: rng.integers(0, 16, 32) / 15 * 2.0 ** rng.integers(-4, 4),
        "two values": lambda: rng.choice([-1.0, 3.0], 32),
        "zero but one": lambda: np.where(np.arange(32) == rng.integers(32), rng.standard_normal(), 0.0),
        "all positive": lambda: np.abs(rng.standard_normal(32)) + 1,
        "constant": lambda: np.full(32, rng.standard_normal()),
        "signed zeros": lambda: rng.choice([0.0, -0.0], 32),
    }
    names = list(kinds)
    for i in range(64):  # each sub-block of 32 of another kind
        picks = [names[j] for j in rng.integers(0, len(names), 8)]
        rows[f"mixed {i}: {', '.join(picks)}"] = np.concatenate([kinds[p]() for p in picks])
    for name, make in kinds.items():
        rows[f"all {name}"] = np.concatenate([make() for _ in range(8)])
    for i in range(n_random):
        rows[f"normal {i}"] = rng.standard_normal(256) * 10.0 ** rng.uniform(-4, 1)
    return list(rows), np.stack([np.asarray(r, np.float32) for r in rows.values()])


ALL_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@needs_llama_cpp
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_equal_to_ggml_on_float32_rows(type_name, quantizer, monkeypatch):
    """The CPU quantizer (worker threads, several chunks: the chunk size is lowered so that
    1700 rows make 27 chunks) against ggml's own, byte for byte, row by row."""
    from nanolora import gguf_quantize
    names, values = float32_rows()
    monkeypatch.setitem(gguf_quantize.CHUNK_VALUES, "cpu", 1 << 14)
    monkeypatch.setitem(gguf_quantize.CHUNK_VALUES, "native", 1 << 14)
    with torch_threads(2):
        ours = quantize(values, type_name)
    theirs = ggml_quantize(values, type_name)
    differing = [name for name, a, b in zip(names, ours, theirs) if not np.array_equal(a, b)]
    assert not differing, (len(differing), differing[:5])


@pytest.mark.parametrize("type_name", ALL_TYPES + ["F16", "BF16"])
def test_no_rows(type_name, quantizer):
    from nanolora.gguf_quants import row_bytes
    assert quantize(np.zeros((0, 256), np.float32), type_name).shape == (0, row_bytes(type_name, 256))


@needs_llama_cpp
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_uneven_chunks_equal_to_ggml(type_name, quantizer):
    """Rows that do not share out evenly into the threads' chunks (one block; 37 blocks on 2
    threads: chunks of 19 and 18) keep ggml's bytes."""
    values = (np.random.default_rng(4).standard_normal((37, 256)) * 0.02).astype(np.float32)
    with torch_threads(2):
        assert np.array_equal(quantize(values[:1], type_name), ggml_quantize(values[:1], type_name))
        assert np.array_equal(quantize(values, type_name), ggml_quantize(values, type_name))


@pytest.mark.gpu
@pytest.mark.parametrize("type_name", ALL_TYPES + ["F16", "BF16"])
def test_cuda_equals_cpu_and_ggml(type_name):
    """On CUDA (one kernel per float32 operation, sums in C's order) the same bytes as on the
    CPU, and as ggml's where llama-cpp-python is installed; also on a chunk of more than a
    million blocks, where a kernel's launch shape differs."""
    import importlib.util
    names, values = float32_rows()
    on_gpu = quantize(torch.from_numpy(values).cuda(), type_name)
    differing = [name for name, a, b in zip(names, on_gpu, quantize(values, type_name)) if not np.array_equal(a, b)]
    assert not differing, (len(differing), differing[:5])
    if importlib.util.find_spec("llama_cpp") and type_name in ALL_TYPES:
        assert np.array_equal(on_gpu, ggml_quantize(values, type_name))
    big = torch.randn(16384, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    assert np.array_equal(quantize(big, type_name, "cuda")[::97], quantize(big[::97], type_name))


@needs_llama_cpp
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_equal_to_ggml_on_many_blocks(type_name, quantizer):
    """8192 blocks of 256 weight-like values (normal, one scale per row from 1e-3 to 1): a
    difference that hits one block in 10^4 (torch's float32 sqrt is not correctly rounded on
    ~0.7% of inputs, which moved one Q4_K block in 10^4 before av_x's sqrt went to double)
    shows up here, where 1700 awkward rows can miss it."""
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((8192, 256)) * 10.0 ** rng.uniform(-3, 0, (8192, 1))).astype(np.float32)
    ours, theirs = quantize(values, type_name), ggml_quantize(values, type_name)
    assert (ours != theirs).any(axis=1).sum() == 0
