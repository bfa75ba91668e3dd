"""kernels/nf4_dequant.py against the torch reference nanolora.nf4.dequantize_nf4, bit for bit.

On the CPU the kernel runs in Triton's interpreter, in a private copy of the module
(tests/triton_interpreter.py; the kernel uses only triton builtins, see its comment on tl.join).

The interpreter's float32 -> bfloat16 cast truncates instead of rounding (measured-here.md),
so on the CPU we compare fp32 and fp16 outputs; bf16 is compared on the GPU.
"""

import pytest
import torch

from nanolora.nf4 import dequantize_absmax, dequantize_nf4, quantize_nf4
from triton_interpreter import interpreted_copy

pytest.importorskip("triton")
import nanolora.kernels.nf4_dequant as nf4_dequant  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    """A copy of nanolora.kernels.nf4_dequant whose kernel runs in the Triton interpreter."""
    return interpreted_copy(nf4_dequant)


def random_weight(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Normal weights whose scale varies every 128 elements over ~3 decades (so the
    double-quantized absmax spans a wide range), with one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    scale = torch.exp(torch.randn(-(-numel // 128), 1, generator=g) * 1.5) * 0.02
    w = (torch.randn(scale.shape[0], 128, generator=g) * scale).flatten()[:numel]
    w[:64] = 0.0
    return w.view(shape).to(device=device, dtype=dtype)


def test_interpreter_is_used_in_this_process(interpreted):
    assert type(interpreted._nf4_dequant_kernel).__name__ == "InterpretedFunction"


# (130, 320): 650 blocks, not a multiple of the 64 blocks per program, so the last program is
# masked; (64 * 257,): 257 absmax values, so the last nested block of 256 is partial.
@pytest.mark.parametrize("shape", [(64, 64), (300, 64), (130, 320), (64 * 257,)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=str)
def test_interpreted_kernel_equals_reference(interpreted, shape, double_quant, out_dtype):
    q = quantize_nf4(random_weight(shape, torch.bfloat16), double_quant=double_quant)
    ours = interpreted.dequantize_nf4_triton(q, out_dtype)
    assert ours.shape == q.shape and ours.dtype == out_dtype
    assert torch.equal(ours, dequantize_nf4(q, out_dtype))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_interpreted_kernel_other_blocksizes(interpreted, blocksize):
    q = quantize_nf4(random_weight((96, 512), seed=1), blocksize=blocksize)
    assert torch.equal(interpreted.dequantize_nf4_triton(q, torch.float32), dequantize_nf4(q, torch.float32))


def test_interpreted_kernel_default_dtype_and_errors(interpreted):
    q = quantize_nf4(random_weight((64, 128), torch.float16))
    out = interpreted.dequantize_nf4_triton(q)
    assert out.dtype == torch.float16 and torch.equal(out, dequantize_nf4(q))
    with pytest.raises(ValueError, match="dtype torch.int8 is not supported"):
        interpreted.dequantize_nf4_triton(q, torch.int8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 14336), (14336, 4096), (1024, 4096), (300, 64), (130, 320)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_gpu_kernel_equals_reference(shape, double_quant):
    w = random_weight(shape, torch.bfloat16, device="cuda")
    q = quantize_nf4(w, double_quant=double_quant)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours = nf4_dequant.dequantize_nf4_triton(q, out_dtype)
        reference = dequantize_nf4(q, out_dtype)
        assert ours.dtype == out_dtype and ours.shape == q.shape
        assert torch.equal(ours, reference), f"{out_dtype}: {(ours != reference).sum()} differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quantize_equals_cpu_quantize():
    """quantize_nf4 on the GPU writes the same codes and scales as on the CPU (where it is
    checked against bitsandbytes). Only the double-quant offset, a mean, may differ in its
    last bit (another summation order), and the 8-bit scales with it."""
    w = random_weight((1024, 4096), torch.bfloat16)
    on_gpu = quantize_nf4(w.cuda(), double_quant=False)
    on_cpu = quantize_nf4(w, double_quant=False)
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)
    assert torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
    on_gpu, on_cpu = quantize_nf4(w.cuda()).to("cpu"), quantize_nf4(w)
    assert torch.equal(on_gpu.packed, on_cpu.packed)
    torch.testing.assert_close(on_gpu.offset, on_cpu.offset, rtol=1e-6, atol=0)
    if torch.equal(on_gpu.offset, on_cpu.offset):
        assert torch.equal(on_gpu.nested_absmax, on_cpu.nested_absmax)
        assert torch.equal(on_gpu.absmax, on_cpu.absmax)
    else:
        # v = absmax - offset moves by an ulp, which can move it across a rounding boundary
        # of the 8-bit code: one code step at most, and the widest steps of the dynamic code
        # (its top decade, 0.9 / 64 = 0.01406) are 0.0141 of the nested absmax.
        torch.testing.assert_close(on_gpu.nested_absmax, on_cpu.nested_absmax, rtol=1e-6, atol=0)
        step = 0.0141 * on_cpu.nested_absmax.repeat_interleave(256)[: on_cpu.absmax.numel()]
        moved = (dequantize_absmax(on_gpu) - dequantize_absmax(on_cpu)).abs()
        assert (moved <= step).all()
        assert (on_gpu.absmax != on_cpu.absmax).float().mean() < 0.01  # measured: 1 code in 65536


# ---- row scales: the NF4 weight straight into FP8 (--fp8, kernels/fp8_matmul.py) ------------

def row_scaled_reference(q, inverse, dtype):
    return (dequantize_nf4(q, torch.float32) * inverse[:, None]).to(dtype)


@pytest.mark.parametrize("shape", [(64, 64), (130, 320), (48, 448)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_interpreted_row_scaled_kernel_equals_reference(interpreted, shape, double_quant):
    """Each row multiplied by its own factor after the dequantization, before the cast: in
    float32 (the interpreter casts to e4m3 wrongly; the GPU test checks e4m3) equal to the
    torch reference bit for bit, with rows of 1, 5 and 7 blocks, so programs of 64 blocks
    start mid-row."""
    q = quantize_nf4(random_weight(shape, torch.bfloat16), double_quant=double_quant)
    inverse = torch.rand(shape[0], generator=torch.Generator().manual_seed(3)) * 100 + 0.5
    assert torch.equal(interpreted.dequantize_nf4_triton(q, torch.float32, inverse),
                       row_scaled_reference(q, inverse, torch.float32))


@pytest.mark.parametrize("shape", [(64, 64), (130, 320), (48, 448), (5, 128)])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_interpreted_transposed_kernel_equals_reference(interpreted, shape, double_quant):
    """The transposed kernel (--fp8's W^T for dL/dx) writes the row-scaled values as [cols,
    rows]: equal to the torch reference transposed, bit for bit, in float32, with row counts
    that fill its 64-row tiles, leave one part-filled, or stay under one."""
    q = quantize_nf4(random_weight(shape, torch.bfloat16), double_quant=double_quant)
    inverse = torch.rand(shape[0], generator=torch.Generator().manual_seed(3)) * 100 + 0.5
    got = interpreted.dequantize_nf4_triton(q, torch.float32, inverse, transposed=True)
    assert got.shape == (shape[1], shape[0]) and got.is_contiguous()
    assert torch.equal(got, row_scaled_reference(q, inverse, torch.float32).T)


def test_row_absmax_bounds_each_row(interpreted):
    """NF4Weight.row_absmax is each row's largest |value| (a block's largest value is its scale
    exactly), or above it for a row with an all-zero block, whose double-quantized scale is
    not zero; None where blocks straddle rows. The refusals name what is wrong."""
    w = random_weight((130, 320), torch.bfloat16)
    q = quantize_nf4(w)
    true_max = dequantize_nf4(q, torch.float32).abs().amax(1)
    assert torch.all(q.row_absmax >= true_max) and torch.equal(q.row_absmax[1:], true_max[1:])  # row 0: zero block
    assert quantize_nf4(random_weight((96, 96))).row_absmax is None  # 96 values a row: blocks straddle rows
    assert "row_absmax" not in quantize_nf4(w).state_dict()
    with pytest.raises(ValueError, match=r"rows are whole blocks and one scale per row; got shape \[130, 320\], "
                                         r"blocksize 64, \[7\] scales"):
        interpreted.dequantize_nf4_triton(q, torch.float8_e4m3fn, torch.ones(7))
    with pytest.raises(ValueError, match=r"float8_e4m3fn is not supported \(expected float32, float16, bfloat16\)"):
        interpreted.dequantize_nf4_triton(q, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="transposed=True needs row_inverse"):
        interpreted.dequantize_nf4_triton(q, torch.float32, transposed=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "fp32_absmax"])
def test_gpu_row_scaled_kernel_casts_to_e4m3_as_torch(double_quant):
    """The kernel's own cast to e4m3 (round to nearest even, in range by construction: each
    row's largest value scales to 448) against torch's, bit for bit, on a 4096 x 14336 weight;
    and the transposed kernel's, against the same bytes transposed."""
    q = quantize_nf4(random_weight((4096, 14336), torch.bfloat16, device="cuda"), double_quant=double_quant)
    inverse = 448.0 / q.row_absmax.clamp(min=1e-30)
    ours = nf4_dequant.dequantize_nf4_triton(q, torch.float8_e4m3fn, inverse)
    reference = row_scaled_reference(q, inverse, torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours.view(torch.uint8), reference)
    transposed = nf4_dequant.dequantize_nf4_triton(q, torch.float8_e4m3fn, inverse, transposed=True)
    assert torch.equal(transposed.view(torch.uint8), reference.T)
