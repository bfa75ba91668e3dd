"""nanolora/gguf_native.py: the C quantizer against its torch reference, and how it is built,
cached and refused. (Both paths against llama.cpp, byte for byte: test_gguf_quants.py.)"""
import shutil

import numpy as np
import pytest
import torch

from gguf_fixtures import torch_threads
from nanolora import gguf_native
from nanolora.gguf_quantize import quantize

TYPES = gguf_native.TYPES
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """gguf_native as in a new process (nothing loaded, nothing said), caching under tmp_path."""
    monkeypatch.setattr(gguf_native, "_loaded", {})
    monkeypatch.setattr(gguf_native, "_said", set())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("NANOLORA_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    return tmp_path / "nanolora"


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """The library, compiled once for the module in a cache folder of its own."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_native, "_loaded", {})
        mp.setenv("XDG_CACHE_HOME", str(folder))
        mp.delenv("NANOLORA_NATIVE", raising=False)
        mp.delenv("CC", raising=False)
        assert gguf_native.library() is not None
    [library] = (folder / "nanolora").glob("*.so")
    return library


def distributions(n_rows=512, seed=11):
    """Rows of 256 from several weight-like and unlike distributions, each at its own scale."""
    rng = np.random.default_rng(seed)
    make = {
        "normal": lambda shape: rng.standard_normal(shape),
        "uniform": lambda shape: rng.uniform(-1, 1, shape),
        "laplace": lambda shape: rng.laplace(size=shape),
        "student t, 1 dof (outliers)": lambda shape: rng.standard_t(1, shape),
        "signed lognormal": lambda shape: rng.lognormal(0, 2, shape) * rng.choice([-1, 1], shape),
        "bf16-rounded normal": lambda shape: torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                              .bfloat16().double().numpy(),
        "one sign": lambda shape: np.abs(rng.standard_normal(shape)),
        "few levels": lambda shape: rng.integers(-3, 4, shape) / 3,
    }
    return {name: (f(n_rows * 256).reshape(n_rows, 256) * 10.0 ** rng.uniform(-5, 3, (n_rows, 1))).astype(np.float32)
            for name, f in make.items()}


@needs_cc
@pytest.mark.parametrize("type_name", TYPES)
def test_native_equals_torch(type_name, monkeypatch):
    """Byte for byte, on 512 rows of each distribution, several chunks on 2 threads."""
    assert gguf_native.library() is not None
    from nanolora import gguf_quantize
    monkeypatch.setitem(gguf_quantize.CHUNK_VALUES, "native", 1 << 13)
    with torch_threads(2):
        for name, values in distributions().items():
            monkeypatch.delenv("NANOLORA_NATIVE", raising=False)
            native = quantize(values, type_name)
            monkeypatch.setenv("NANOLORA_NATIVE", "0")
            reference = quantize(values, type_name)
            differing = (native != reference).any(axis=1).nonzero()[0]
            assert not len(differing), (name, len(differing), differing[:5])


@needs_cc
def test_native_reads_any_float_dtype_and_layout():
    """bf16, f16 and non-contiguous inputs go through as their float32 values."""
    values = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    for variant in (values.bfloat16(), values.half(), values.T.contiguous().T, values.double()):
        assert np.array_equal(quantize(variant, "Q4_K"), quantize(variant.float().contiguous(), "Q4_K"))


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_widens_every_16bit_value_exactly(dtype):
    """The C code widens f16 (F16C, or its scalar f16_value) and bf16 sources itself, a tile
    of 4096 values at a time: every finite bit pattern of the type, spread over many tiles,
    quantizes to the bytes of its float32 value widened by torch. The patterns stay in order, so
    that a block holds neighbours of one magnitude, where a wrong low bit moves a level."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[every.isfinite()]
    values = finite[:len(finite) // 256 * 256].reshape(-1, 256)
    for type_name in TYPES:
        assert np.array_equal(quantize(values, type_name), quantize(values.float(), type_name)), type_name


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_switched_off(fresh, monkeypatch, capsys):
    monkeypatch.setenv("NANOLORA_NATIVE", "0")
    assert gguf_native.library() is None
    line = one_line(capsys)
    assert "NANOLORA_NATIVE=0" in line and "torch" in line
    assert gguf_native.library() is None and capsys.readouterr().err == ""  # said once


@pytest.mark.parametrize("compiler,said", [("/nonexistent/cc", "no C compiler found"),
                                           ("false", "failed"),  # runs, compiles nothing
                                           ("env false", "failed")])  # CC may carry words ("ccache gcc")
def test_no_or_broken_compiler_falls_back(fresh, monkeypatch, capsys, compiler, said):
    """One line on stderr, no traceback, no file left in the cache; quantize() still gives the
    torch path's bytes."""
    monkeypatch.setenv("CC", compiler)
    values = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    ours = quantize(values, "Q6_K")
    line = one_line(capsys)
    assert said in line and "torch" in line and "Traceback" not in line
    assert not fresh.exists() or not any(fresh.iterdir())
    monkeypatch.setenv("NANOLORA_NATIVE", "0")
    assert np.array_equal(ours, quantize(values, "Q6_K"))


@needs_cc
def test_unwritable_cache_falls_back(fresh, monkeypatch, tmp_path, capsys):
    """XDG_CACHE_HOME naming a file: the cache folder cannot be made; one line, torch's bytes."""
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    values = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    ours = quantize(values, "Q4_K")
    line = one_line(capsys)
    assert "cache folder" in line and "a file" in line
    monkeypatch.setenv("NANOLORA_NATIVE", "0")
    assert np.array_equal(ours, quantize(values, "Q4_K"))


def test_compile_error_is_one_line(fresh, monkeypatch, tmp_path, capsys):
    """A source the compiler refuses: its first error line, nothing cached."""
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C;\n")
    monkeypatch.setattr(gguf_native, "SOURCE", broken)
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    assert gguf_native.library() is None
    line = one_line(capsys)
    assert "broken.c" in line and "error" in line
    assert not any(fresh.iterdir())


@needs_cc
@pytest.mark.parametrize("damage", ["truncated", "one byte changed", "not a library", "empty"])
def test_damaged_cache_is_rebuilt(fresh, built_library, monkeypatch, tmp_path, capsys, damage):
    """A cached library that does not load (half written by a crash, overwritten) is compiled
    again, not trusted. (Built in one cache folder, damaged in another: a process dlopens a
    path once, and would hand back the copy it already holds.)"""
    good = built_library
    damaged = tmp_path / "other" / "nanolora" / good.name
    damaged.parent.mkdir(parents=True)
    changed = bytearray(good.read_bytes())
    changed[len(changed) // 2] ^= 0xFF
    damaged.write_bytes({"truncated": good.read_bytes()[:good.stat().st_size // 2], "one byte changed": changed,
                         "not a library": b"\x7fELF nonsense" * 100, "empty": b""}[damage])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    gguf_native._loaded.clear()
    lib = gguf_native.library()
    assert lib is not None and capsys.readouterr().err == ""
    assert damaged.read_bytes()[:4] == b"\x7fELF" and damaged.stat().st_size > 1000
    assert [p.name for p in damaged.parent.iterdir()] == [good.name]  # no temporary left behind
    values = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    out = np.zeros((4, 210), np.uint8)
    lib.nanolora_quantize_q6_k(values.ctypes.data, 0, 4, out.ctypes.data)  # src 0: float32
    monkeypatch.setenv("NANOLORA_NATIVE", "0")
    assert np.array_equal(out, quantize(values, "Q6_K"))


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0", "Q4_K"])
def test_quantize_empty(type_name):
    """No rows, or rows of no values: an empty result of the right shape, not an error."""
    assert quantize(np.zeros((3, 0), np.float32), type_name).shape == (3, 0)
    assert quantize(np.zeros((0, 256), np.float32), type_name).shape[0] == 0
