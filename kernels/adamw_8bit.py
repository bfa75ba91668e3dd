"""One AdamW step of one parameter with 8-bit blockwise moments, in one Triton launch (per 16M elements).

The torch reference is ``nanolora.adamw_8bit.adamw_step_reference`` (its module docstring
derives the update and the state layout); this kernel does the same float32 operations in the
same order and equals it bit for bit (tests/test_adamw_8bit.py). Per element, in a tile of whole
quantization blocks of 256:

    m = code_signed[m_q] * m_absmax[b];   v = code_unsigned[v_q] * v_absmax[b]   (8-bit state)
    m = m * beta1 + g * (1 - beta1);      v = v * beta2 + (g * g) * (1 - beta2)
    p = p * (1 - lr * wd);                p = p + (m / (sqrt(v) * (1 / c2) + eps)) * (-lr / c1)
    m_absmax[b] = max |m| over the block, and m_q = the code nearest m / m_absmax[b] (same for v)

What keeps it exact: ``enable_fp_fusion=False`` (no multiply-add contracted into one rounding),
``div_rn`` and ``sqrt_rn`` (IEEE division and square root; Triton's plain ``/`` and ``sqrt``
are approximate on the GPU), and the quantizer of ``nanolora.nf4.quantize_dynamic_8bit``:
x = clamp(m * (1 / absmax), -1, 1) snapped to a grid of 65536 points, g = trunc(fma((x + 1) / 2,
65535, 0.5)), computed in float64 where it is exact, then the grid point's nearest code is read
from a 64 KiB table (one gather instead of a binary search over the code).

A bf16 parameter may be rounded stochastically: the launcher is then given ``noise``, a function
n -> int32 [n] of random bits in [0, 2^16) (drawn by torch, nanolora/stochastic_rounding.py),
and the kernel adds them to the float32 result's bit pattern and zeroes its low 16 bits, the
reference's ``round_with_noise`` in the same integer ops; the bf16 store is then exact. The
parameter is stepped LAUNCH_ELEMENTS at a time, so the noise costs at most 64 MiB.

Small parameters (fewer than the optimizer's min_8bit_size elements) keep fp32 moments: the
same kernel with QUANTIZED=False reads and writes them directly.
"""

import math

import torch
import triton
import triton.language as tl

# Tuning: memory-bound (a bf16 parameter reads and writes 2 + 2 bytes, its gradient 2, the two
# codes 2 + 2; the scales and code tables are L1/L2-resident). 4 blocks of 256 = 1024 elements
# per program, 4 warps: 8 elements per thread, and ~1M programs for 1B parameters. Not measured
# against other choices yet (no GPU where this was written): bench/optim_step.py times it.
BLOCKSIZE = 256
BLOCKS_PER_PROGRAM = 4
NUM_WARPS = 4
_GRID = tl.constexpr(65535.0)  # a global a @triton.jit function reads must be a constexpr
# Elements per launch: 64 MiB of int32 noise at most, and a multiple of the 2^20 elements the
# noise is drawn in (stochastic_rounding.NOISE_CHUNK), so the kernel sees the reference's noise.
LAUNCH_ELEMENTS = 1 << 24


@triton.jit
def _codes(values, absmax, index_ptr):
    """uint8 codes of ``values`` [B, 256] in blocks of scale ``absmax`` [B] (quantize_dynamic_8bit)."""
    inverse = tl.where(absmax == 0.0, 0.0, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax))
    x = values * inverse[:, None]
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    t = (x + 1.0) * 0.5
    grid = (t.to(tl.float64) * _GRID + 0.5).to(tl.float32).to(tl.int32)  # trunc: t >= 0
    grid = tl.minimum(tl.maximum(grid, 0), 65535)  # a NaN moment (NaN gradient) must not read out of the table
    codes = tl.load(index_ptr + grid)
    return tl.where(absmax[:, None] == 0.0, 0, codes).to(tl.uint8)  # an all-zero block: index 0


@triton.jit
def _adamw_kernel(
    param_ptr,  # fp32 / fp16 / bf16 [n], updated in place
    grad_ptr,  # fp32 / fp16 / bf16 [n]
    exp_avg_ptr,  # uint8 [n] codes (QUANTIZED) or float32 [n]
    exp_avg_sq_ptr,  # uint8 [n] codes (QUANTIZED) or float32 [n]
    exp_avg_absmax_ptr,  # float32 [n_blocks] (QUANTIZED only)
    exp_avg_sq_absmax_ptr,  # float32 [n_blocks] (QUANTIZED only)
    signed_code_ptr,  # float32 [256]
    unsigned_code_ptr,  # float32 [256]
    signed_index_ptr,  # uint8 [65536]: grid point -> nearest signed code
    unsigned_index_ptr,  # uint8 [65536]
    noise_ptr,  # int32 [n] in [0, 2^16): random low bits (STOCHASTIC only)
    n,
    n_blocks,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, inverse_correction2,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    QUANTIZED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # [B]
    element = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [B, BLOCKSIZE]
    in_range = element < n
    grad = tl.load(grad_ptr + element, mask=in_range, other=0.0).to(tl.float32)
    param = tl.load(param_ptr + element, mask=in_range, other=0.0).to(tl.float32)
    if QUANTIZED:
        block_in_range = block < n_blocks
        m_absmax = tl.load(exp_avg_absmax_ptr + block, mask=block_in_range, other=0.0)
        v_absmax = tl.load(exp_avg_sq_absmax_ptr + block, mask=block_in_range, other=0.0)
        m_q = tl.load(exp_avg_ptr + element, mask=in_range, other=0).to(tl.int32)
        v_q = tl.load(exp_avg_sq_ptr + element, mask=in_range, other=0).to(tl.int32)
        # past the end (a partial last block) code 0 would read as -0.99 * absmax: zero there, so the
        # moments stay 0 and do not count in the block's new absmax
        m = tl.where(in_range, tl.load(signed_code_ptr + m_q) * m_absmax[:, None], 0.0)
        v = tl.where(in_range, tl.load(unsigned_code_ptr + v_q) * v_absmax[:, None], 0.0)
    else:
        m = tl.load(exp_avg_ptr + element, mask=in_range, other=0.0)
        v = tl.load(exp_avg_sq_ptr + element, mask=in_range, other=0.0)

    m = m * beta1 + grad * one_minus_beta1
    v = v * beta2 + (grad * grad) * one_minus_beta2
    param = param * decay
    denom = tl.sqrt_rn(v) * inverse_correction2 + eps
    param = param + tl.div_rn(m, denom) * step_size
    if STOCHASTIC:  # add random low bits, truncate: round_with_noise; exact in bf16 afterwards
        noise = tl.load(noise_ptr + element, mask=in_range, other=0)
        param = ((param.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(param_ptr + element, param.to(param_ptr.dtype.element_ty), mask=in_range)

    if QUANTIZED:
        m_absmax = tl.max(tl.abs(m), axis=1)
        v_absmax = tl.max(v, axis=1)  # v >= 0
        tl.store(exp_avg_absmax_ptr + block, m_absmax, mask=block_in_range)
        tl.store(exp_avg_sq_absmax_ptr + block, v_absmax, mask=block_in_range)
        tl.store(exp_avg_ptr + element, _codes(m, m_absmax, signed_index_ptr), mask=in_range)
        tl.store(exp_avg_sq_ptr + element, _codes(v, v_absmax, unsigned_index_ptr), mask=in_range)
    else:
        tl.store(exp_avg_ptr + element, m, mask=in_range)
        tl.store(exp_avg_sq_ptr + element, v, mask=in_range)


def adamw_step_triton(param, grad, state, lr, beta1, beta2, eps, weight_decay, tables, noise=None):
    """``adamw_step_reference``, one launch per LAUNCH_ELEMENTS: ``param`` (contiguous) and
    ``state`` updated in place, ``state["step"]`` already counting this step. ``tables``: (signed
    code, unsigned code, signed grid index, unsigned grid index) on the parameter's device
    (``nanolora.adamw_8bit.code_tables``). ``noise``: None (round to nearest) or, for a bf16
    ``param``, a function n -> int32 [n], the next n elements' random low bits, called in order."""
    t = state["step"]
    step_size, decay = -lr / (1 - beta1**t), 1 - lr * weight_decay  # rounded to float32 at the launch
    # a float32 reciprocal of float32 c2, as torch's `x / c2` computes it (the reference's order)
    inverse_correction2 = torch.tensor(math.sqrt(1 - beta2**t), dtype=torch.float32).reciprocal().item()
    quantized = "exp_avg_absmax" in state
    exp_avg_absmax = state["exp_avg_absmax"] if quantized else state["exp_avg"]  # unused when not quantized
    exp_avg_sq_absmax = state["exp_avg_sq_absmax"] if quantized else state["exp_avg_sq"]
    if noise is not None and param.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is to bf16; this parameter is {param.dtype}")
    flat_param, flat_grad = param.view(-1), grad.view(-1)
    for start in range(0, param.numel(), LAUNCH_ELEMENTS):  # a multiple of BLOCKSIZE: whole blocks
        end = min(start + LAUNCH_ELEMENTS, param.numel())
        elements, blocks = slice(start, end), slice(start // BLOCKSIZE, triton.cdiv(end, BLOCKSIZE))
        n = end - start
        n_blocks = triton.cdiv(n, BLOCKSIZE)
        chunk_noise = flat_param if noise is None else noise(n)  # unused when rounding to nearest
        grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
        _adamw_kernel[grid](
            flat_param[elements], flat_grad[elements], state["exp_avg"][elements], state["exp_avg_sq"][elements],
            exp_avg_absmax[blocks] if quantized else exp_avg_absmax[elements],
            exp_avg_sq_absmax[blocks] if quantized else exp_avg_sq_absmax[elements], *tables, chunk_noise,
            n, n_blocks, beta1, 1 - beta1, beta2, 1 - beta2, eps, decay, step_size, inverse_correction2,
            BLOCKSIZE=BLOCKSIZE, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, QUANTIZED=quantized,
            STOCHASTIC=noise is not None, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
