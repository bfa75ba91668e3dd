"""NF4 -> fp16 / bf16 / fp32 (or e4m3, by row, for --fp8) dequantization in one Triton launch per weight.

The torch reference is ``nanolora.nf4.dequantize_nf4``; this kernel equals it bit for bit
(tests/test_nf4_kernel.py), because both do the same float32 operations in the same order
and round once at the end:

    scale[b] = nested_code[absmax_q[b]] * nested_absmax[b // 256]   then   + offset
                                                     (double quantization; else absmax[b])
    out[64 b + 2 j]     = (code[packed[32 b + j] >> 4]  * scale[b]).to(dtype)
    out[64 b + 2 j + 1] = (code[packed[32 b + j] & 15] * scale[b]).to(dtype)

Two details keep it exact. The scale is a multiply THEN an add, so the kernel is compiled
with ``enable_fp_fusion=False``: otherwise the compiler contracts them into one fused
multiply-add, rounded once instead of twice (measured on an H100: 47 % of the blocks of a
4096 x 14336 weight then differ from the reference in the last bit). And the cast is
round-to-nearest-even, as torch's ``.to()``.

No autograd Function: the quantized weight is frozen, nothing differentiates through it.
"""

import torch
import triton
import triton.language as tl


# Tuning (H100, memory-bound: 0.5 byte read per weight, 2 bytes written in bf16).
# Each program handles BLOCKS_PER_PROGRAM whole quantization blocks as a 2-D tile
# [blocks, blocksize/2] of packed bytes, so its scales are loaded once per block (a vector
# of BLOCKS_PER_PROGRAM, not one per element) and each thread reads contiguous bytes.
# 64 blocks of 64 = 4096 weights per program: 2 KiB in, 8 KiB out in bf16; with 4 warps
# that is one 16-byte load and four 16-byte stores per thread, and a 4096 x 14336 weight
# still gets 14336 programs (~100 per SM) to hide memory latency. Measured on an H100,
# 4096 x 14336 -> bf16, double-quantized: 64 blocks x 4 warps 56 us (2.6 TB/s, the speed of
# a plain copy of the same bytes; the torch reference takes 980 us); 32-128 blocks with
# 4 or 8 warps are within 5 % of it; 8-16 blocks, or 8 warps on small tiles, are 15-130 %
# slower (too little work per thread). 8192 x 28672: 208 us, copy 203 us.
BLOCKS_PER_PROGRAM = 64
NUM_WARPS = 4
# The transposed kernel's tile: 64 rows x one 64-value block, 64-byte runs of e4m3 per store
# (an untuned guess of the same 4096 values per program).
ROWS_PER_PROGRAM = 64


@triton.jit
def _dequant_blocks(block, in_range, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                    offset_ptr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr, N_BLOCKS: tl.constexpr):
    """The float32 values [N_BLOCKS, BLOCKSIZE] of the quantization blocks `block` [N_BLOCKS]
    (zeros where not in_range), as the module docstring computes them."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    if DOUBLE_QUANT:
        absmax_q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_q) * nested
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)

    byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [B, HALF]
    packed = tl.load(packed_ptr + byte, mask=in_range[:, None], other=0)
    first = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]  # high nibble
    second = tl.load(code_ptr + (packed & 0x0F).to(tl.int32)) * scale[:, None]  # low nibble
    # (first, second) pairs side by side: [B, HALF, 2] -> [B, BLOCKSIZE]. tl.join/tl.reshape
    # rather than tl.interleave: builtins only, no @triton.jit helpers from triton's own
    # library, so the tests can run an interpreted copy of this file in a process that
    # imported triton without TRITON_INTERPRET (see tests/test_nf4_kernel.py).
    return tl.reshape(tl.join(first, second), (N_BLOCKS, BLOCKSIZE))


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # uint8 [n_blocks * BLOCKSIZE / 2]
    absmax_ptr,  # uint8 [n_blocks] (double quant) or float32 [n_blocks]
    code_ptr,  # float32 [16]
    nested_absmax_ptr,  # float32 [ceil(n_blocks / NESTED_BLOCKSIZE)] (double quant only)
    nested_code_ptr,  # float32 [256] (double quant only)
    offset_ptr,  # float32 [] (double quant only)
    out_ptr,  # fp32 / fp16 / bf16 / fp8 e4m3 [n_blocks * BLOCKSIZE]
    row_inverse_ptr,  # float32 [rows]: each row's values are multiplied by it (ROW_SCALED only)
    n_blocks,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ROW_SCALED: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    in_range = block < n_blocks  # [B]
    values = _dequant_blocks(block, in_range, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                             nested_code_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                             BLOCKS_PER_PROGRAM)
    if ROW_SCALED:  # a block lies within one row: one more rounding (a multiply), then the cast
        inverse = tl.load(row_inverse_ptr + block // BLOCKS_PER_ROW, mask=in_range, other=0.0)
        values = values * inverse[:, None]
    values = values.to(out_ptr.dtype.element_ty)

    element = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + element, values, mask=in_range[:, None])


@triton.jit
def _nf4_dequant_transposed_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,  # as above
    out_ptr,  # [cols, rows]: the weight transposed
    row_inverse_ptr,  # float32 [rows]
    rows,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCKS_PER_ROW: tl.constexpr,
):
    """The ROW_SCALED values of _nf4_dequant_kernel, written transposed: program (i, j) takes
    block column j of ROWS_PER_PROGRAM rows, a [ROWS_PER_PROGRAM, BLOCKSIZE] tile, and stores it
    as [BLOCKSIZE, ROWS_PER_PROGRAM] runs of consecutive output (the compiler turns the tile around in
    shared memory so that the stores are coalesced)."""
    row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    in_range = row < rows
    column_block = tl.program_id(1).to(tl.int64)
    block = row * BLOCKS_PER_ROW + column_block
    values = _dequant_blocks(block, in_range, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                             nested_code_ptr, offset_ptr, BLOCKSIZE, NESTED_BLOCKSIZE, DOUBLE_QUANT,
                             ROWS_PER_PROGRAM)
    inverse = tl.load(row_inverse_ptr + row, mask=in_range, other=0.0)
    values = (values * inverse[:, None]).to(out_ptr.dtype.element_ty)
    column = column_block * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    tl.store(out_ptr + column[None, :] * rows + row[:, None], values, mask=in_range[:, None])


def dequantize_nf4_triton(q, dtype: torch.dtype | None = None, row_inverse=None, transposed=False) -> torch.Tensor:
    """``q`` (an NF4Weight of nanolora/nf4.py: packed, absmax, code, ...) as a dense tensor of
    its original shape in ``dtype`` (default: its original dtype); equal to
    ``nanolora.nf4.dequantize_nf4(q, dtype)`` bit for bit.

    row_inverse (float32 [rows], for a 2-D q whose blocks lie within rows): row i's values are
    multiplied by row_inverse[i] before the cast, as ``(dequantize_nf4(q, float32) *
    row_inverse[:, None]).to(dtype)``: with dtype float8_e4m3fn, the weight scaled into FP8
    in one pass from its 4-bit codes (--fp8, kernels/fp8_matmul.py). transposed (with
    row_inverse): the same values as a [cols, rows] tensor, W^T, written by the kernel."""
    dtype = q.dtype if dtype is None else dtype
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    allowed += (torch.float8_e4m3fn,) if row_inverse is not None else ()
    if dtype not in allowed:
        raise ValueError(f"dequantize_nf4_triton: dtype {dtype} is not supported "
                         f"(expected {', '.join(str(t).removeprefix('torch.') for t in allowed)})")
    if transposed and row_inverse is None:
        raise ValueError("dequantize_nf4_triton: transposed=True needs row_inverse")
    blocks_per_row = 1
    if row_inverse is not None:
        if len(q.shape) != 2 or q.shape[1] % q.blocksize or row_inverse.shape != (q.shape[0],):
            raise ValueError(f"dequantize_nf4_triton: row scales need a 2-D weight whose rows are whole blocks "
                             f"and one scale per row; got shape {list(q.shape)}, blocksize {q.blocksize}, "
                             f"{list(row_inverse.shape)} scales")
        blocks_per_row = q.shape[1] // q.blocksize
    shape = (q.shape[1], q.shape[0]) if transposed else q.shape
    out = torch.empty(shape, dtype=dtype, device=q.packed.device)
    n_blocks = q.absmax.numel()
    if q.double_quant:
        nested_absmax, nested_code, offset = q.nested_absmax, q.nested_code, q.offset
    else:  # unused by the kernel (DOUBLE_QUANT=False); any pointer will do
        nested_absmax = nested_code = offset = q.absmax
    if transposed:
        grid = (triton.cdiv(q.shape[0], ROWS_PER_PROGRAM), blocks_per_row)
        _nf4_dequant_transposed_kernel[grid](
            q.packed, q.absmax, q.code, nested_absmax, nested_code, offset, out, row_inverse, q.shape[0],
            BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
            DOUBLE_QUANT=q.double_quant, BLOCKS_PER_ROW=blocks_per_row,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
        return out
    grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
    _nf4_dequant_kernel[grid](
        q.packed, q.absmax, q.code, nested_absmax, nested_code, offset, out,
        q.absmax if row_inverse is None else row_inverse, n_blocks,  # any pointer when unused
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
        BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, DOUBLE_QUANT=q.double_quant,
        ROW_SCALED=row_inverse is not None, BLOCKS_PER_ROW=blocks_per_row,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return out
