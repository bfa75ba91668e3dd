"""The frozen base's GEMM in FP8 (opt-in: train.py --fp8 true, Ada/Hopper GPUs).

    y = x W^T  ~  (x8 W8^T) * sx * sw^T        x [T, in], W [out, in], y [T, out]

x and W are each rounded to float8 e4m3 (3 mantissa bits, largest 448) after a scale per row:

    sx[t] = max_i |x[t, i]| / 448,   x8[t, i] = e4m3(x[t, i] / sx[t])      (W likewise, per output row)

and torch._scaled_mm multiplies the e4m3 operands on the tensor cores at twice bf16's rate,
accumulates in fp32, applies sx [T, 1] and sw [1, out] to each output and rounds once to bf16.
A scale per row (not per tensor) keeps each token's and each output channel's own range:
one outlier row does not flush the others' small values to zero.

The base's three GEMMs of a step use it: the forward, the checkpoint recompute, and the
input gradient dL/dx = dL/dy W (fp8_input_grad, below: W's row scales are folded into dy's
columns, so W is rounded as in the forward, its e4m3 rows made again for the backward and
written transposed: an NF4 weight's straight from its 4-bit codes by kernels/nf4_dequant.py,
a 16-bit one's by quantize_rows_transposed). A frozen weight has no weight gradient to
compute. LoRA stays in the compute dtype. W is quantized where it is used, as NF4 is
dequantized (into 1 byte a value where the bf16 dequant takes 2), x once per group of
projections that read it: nothing is kept between steps. The transients are the e4m3 copies
(x or dy: 1 byte a value; W), and _scaled_mm's bf16 output where it cannot be written into
an existing buffer: in the backward, each input-gradient term after a group's first
(lora_projections.input_grad). The torch path adds a chunk's fp32 quotient (CHUNK_VALUES).

fp8_matmul's output is bf16 whatever the compute dtype: under fp16 compute (reachable from
Python only; train.py computes in bf16 on every GPU with FP8) the base product is rounded to
bf16 first.

Each row is scaled by multiplying by its inverse scale 448 / max|row| (a multiply rounds
the same in torch and in any kernel, where a kernel's division may not), and the scale handed
to _scaled_mm is that inverse's reciprocal: the NF4 path (kernels/nf4_dequant.py's row
scales) does the same.

The reference is quantize_rows_reference (torch) for the rounding into e4m3, and
fp8_matmul_reference / fp8_input_grad_reference for the products: the same roundings with the
product in fp32.
"""
import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
ALIGN = 16  # _scaled_mm's requirement on the inner and output sizes; other shapes stay in bf16
CHUNK_VALUES = 1 << 24  # the reference's fp32 temporary: at most 64 MB (h at 32k tokens would be 1.9 GB)
BLOCK = 1024  # values per step of the row kernel: memory-bound, 4 warps x 32 threads x 8


@triton.jit
def _larger(a, b):
    # tl.reduce's combine (tl.max is a @triton.jit helper of triton's library, which the tests'
    # interpreted copy of this file cannot call in a process that imported triton compiled)
    return tl.maximum(a, b)


@triton.jit
def _load_scaled(t_row, column_scale_ptr, offsets, cols, COLUMN_SCALED: tl.constexpr):
    # a step of a row in fp32, times its columns' factors if COLUMN_SCALED (both of the kernel's passes)
    t = tl.load(t_row + offsets, mask=offsets < cols, other=0.0).to(tl.float32)
    if COLUMN_SCALED:
        t = t * tl.load(column_scale_ptr + offsets, mask=offsets < cols, other=0.0)
    return t


@triton.jit
def _quantize_rows_kernel(t_ptr, column_scale_ptr, out_ptr, scale_ptr, cols,
                          COLUMN_SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: its largest |value| over BLOCK-wide steps, then the row again (from
    cache: 8-28 KB for an 8B model's rows) times 448 / that, cast to out's dtype; the scale
    stored is the inverse's reciprocal. The inverse is row_inverses' 448 * (1 / max), and each
    reciprocal rounds to nearest (div_rn) as torch's does: Triton's plain `/` on fp32 is
    approximate. A NaN anywhere in the row makes its max NaN, as torch's does (Triton's max
    reductions pass over NaNs): the whole row and its scale come out NaN. COLUMN_SCALED: each
    value is first multiplied by its column's factor, in fp32."""
    row = tl.program_id(0).to(tl.int64)
    t_row, out_row = t_ptr + row * cols, out_ptr + row * cols
    largest = tl.full([BLOCK], 0.0, tl.float32)
    nan = tl.full([BLOCK], 0.0, tl.float32)  # 1 where a NaN was seen
    for start in range(0, cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        t = _load_scaled(t_row, column_scale_ptr, offsets, cols, COLUMN_SCALED)
        largest = tl.maximum(largest, tl.abs(t))
        nan = tl.maximum(nan, tl.where(t != t, 1.0, 0.0))
    row_max = tl.where(tl.reduce(nan, 0, _larger) > 0.0, float("nan"), tl.reduce(largest, 0, _larger))
    inverse = tl.math.div_rn(1.0, tl.maximum(row_max, 1e-30, propagate_nan=tl.PropagateNan.ALL)) * 448.0
    for start in range(0, cols, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        t = _load_scaled(t_row, column_scale_ptr, offsets, cols, COLUMN_SCALED)
        tl.store(out_row + offsets, (t * inverse).to(out_ptr.dtype.element_ty), mask=offsets < cols)
    tl.store(scale_ptr + row, tl.math.div_rn(1.0, inverse))


def inverse_scales(largest):
    """448 / largest (fp32), the factor that puts a row whose largest |value| is `largest` at
    e4m3's 448, rounded as 448 * (1 / largest) (what torch's scalar / tensor computes, and the
    kernels too); a row of zeros gets 448 / 1e-30, and its values stay zero."""
    return largest.float().clamp(min=1e-30).reciprocal().mul_(E4M3_MAX)


def row_inverses(t):
    """fp32 [rows, 1]: inverse_scales of each row's max |value|. The inf-norm is max |t| in one
    reduction, without abs()'s temporary."""
    return inverse_scales(torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True))


def quantize_rows_reference(t, column_scale=None):
    """quantize_rows in torch, a chunk of rows at a time (not t's size in fp32 at once): the
    chunk times column_scale if given (in fp32), its row inverses, the product cast into e4m3."""
    t8 = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    scale = torch.empty(t.shape[0], 1, dtype=torch.float32, device=t.device)
    rows = max(1, CHUNK_VALUES // max(t.shape[1], 1))
    for start in range(0, t.shape[0], rows):
        chunk = t[start:start + rows] if column_scale is None else t[start:start + rows].float() * column_scale
        inverse = row_inverses(chunk)
        t8[start:start + rows] = chunk * inverse  # a 16-bit chunk promotes to fp32 inside the multiply
        scale[start:start + rows] = inverse.reciprocal()
    return t8, scale


def quantize_rows_triton(t, column_scale=None, dtype=torch.float8_e4m3fn):
    """quantize_rows' kernel for a contiguous t [rows, cols]: one launch, t read twice (the
    second time from cache), the output written once. dtype other than e4m3 is for the tests:
    Triton's interpreter casts into e4m3 (and bf16) wrongly."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    scale = torch.empty(t.shape[0], 1, dtype=torch.float32, device=t.device)
    if t.shape[0]:  # (zero columns: each row's max is 0 -> scale 1e-30 / 448; fits() keeps them away)
        # without column factors, any pointer stands in for column_scale: COLUMN_SCALED=False never reads it
        _quantize_rows_kernel[(t.shape[0],)](t, column_scale if column_scale is not None else scale, out, scale,
                                             t.shape[1], COLUMN_SCALED=column_scale is not None, BLOCK=BLOCK)
    return out, scale


@triton.jit
def _scale_rows_transposed_kernel(t_ptr, inverse_ptr, out_ptr, rows, cols, TILE: tl.constexpr):
    """out[c, r] = t[r, c] * inverse[r] in fp32, cast: a [TILE, TILE] tile a program, stored
    transposed (the compiler turns it around in shared memory for coalesced stores)."""
    row = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    col = tl.program_id(1).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    t = tl.load(t_ptr + row[:, None] * cols + col[None, :], mask=mask, other=0.0).to(tl.float32)
    inverse = tl.load(inverse_ptr + row, mask=row < rows, other=0.0)
    tl.store(out_ptr + col[None, :] * rows + row[:, None], (t * inverse[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask)


TILE = 64  # the transposed kernel's tile side (an untuned guess)


def quantize_rows_transposed_triton(t, dtype=torch.float8_e4m3fn):
    """quantize_rows(t) with t8 written transposed, (t8^T [cols, rows], scale [rows, 1]), for a
    contiguous t: the row maxima (row_inverses), then one kernel that scales, casts and
    transposes. dtype other than e4m3 is for the tests, as in quantize_rows_triton."""
    inverse = row_inverses(t)
    out = torch.empty(t.shape[1], t.shape[0], dtype=dtype, device=t.device)
    if t.numel():
        grid = (triton.cdiv(t.shape[0], TILE), triton.cdiv(t.shape[1], TILE))
        _scale_rows_transposed_kernel[grid](t, inverse, out, t.shape[0], t.shape[1], TILE=TILE)
    return out, inverse.reciprocal()


def quantize_rows_transposed(t):
    """quantize_rows(t) as (t8^T [cols, rows], scale [rows, 1]): a 16-bit weight the way
    fp8_input_grad takes it. On CUDA the kernel above; elsewhere the reference's bytes transposed."""
    if not t.is_cuda:
        t8, scale = quantize_rows_reference(t)
        return transposed_e4m3(t8), scale
    return quantize_rows_transposed_triton(t.contiguous())


def transposed_e4m3(t8):
    """t8^T, contiguous, through its bytes (not every torch build copies float8 on the CPU)."""
    return t8.view(torch.uint8).T.contiguous().view(t8.dtype)


def quantize_rows(t, column_scale=None):
    """(t8 float8_e4m3fn [rows, cols], scale fp32 [rows, 1]) with t * column_scale ~= t8 * scale:
    each row's largest |value| becomes 448 exactly. column_scale: fp32 [cols], or None for
    ones. On CUDA one kernel (3 bytes moved per 16-bit value beyond a cached re-read; a strided
    t is copied first); elsewhere the reference."""
    if not t.is_cuda:
        return quantize_rows_reference(t, column_scale)
    return quantize_rows_triton(t.contiguous(), None if column_scale is None else column_scale.contiguous())


def fp8_matmul(x8, x_scale, w8, w_scale):
    """(x8 w8^T) * x_scale * w_scale^T in bf16: x8 [T, in], w8 [out, in] e4m3 with their
    quantize_rows scales."""
    return torch._scaled_mm(x8, w8.T, scale_a=x_scale, scale_b=w_scale.T, out_dtype=torch.bfloat16)


def fp8_matmul_reference(x, w):
    """x W^T with x and W rounded as fp8_matmul rounds them, multiplied in fp32, rounded to bf16."""
    (x8, sx), (w8, sw) = quantize_rows_reference(x), quantize_rows_reference(w)
    return ((x8.float() * sx) @ (w8.float() * sw).T).to(torch.bfloat16)


def fp8_input_grad(dy, w8t, w_scale):
    """dy W in bf16 for dy [T, out] and the weight W ~= diag(w_scale) w8 [out, in] (scaled by
    row, as in the forward), given as w8t = w8^T [in, out]: the layout _scaled_mm takes (the
    inner dimension contiguous in both operands, as Hopper's FP8 GEMMs require). The
    contraction runs over W's rows, so their scales fold into dy's columns before dy is
    rounded by row:

        dy W = (dy diag(w_scale)) w8 ~= diag(s) q w8,    (q, s) = quantize_rows(dy * w_scale^T)
    """
    dy8, dy_scale = quantize_rows(dy, w_scale.reshape(-1))
    return fp8_matmul(dy8, dy_scale, w8t, torch.ones(w8t.shape[0], 1, dtype=torch.float32, device=dy.device))


def fp8_input_grad_reference(dy, w8t, w_scale):
    """fp8_input_grad with dy rounded as it rounds it, multiplied in fp32, rounded to bf16."""
    dy8, dy_scale = quantize_rows_reference(dy, w_scale.reshape(-1))
    return ((dy8.float() * dy_scale) @ w8t.float().T).to(torch.bfloat16)


def fits(w) -> bool:
    """Whether _scaled_mm takes a weight of this shape [out, in] (both sizes positive multiples
    of ALIGN; in is also the inner size of x W^T)."""
    return all(size > 0 and size % ALIGN == 0 for size in w.shape)
