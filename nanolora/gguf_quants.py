"""GGML's block formats: llama.cpp's reference quantizers, vectorised in numpy, and the
dequantizers the GGUF reader uses.

A weight [rows, cols] is stored row by row; each row is cut into blocks of consecutive
values (32, or 256 for the K-quants), and a row must hold a whole number of blocks.
Layouts (ggml/src/ggml-common.h), all little-endian:

    Q8_0   34 bytes / 32: f16 d | 32 x int8 q                   x = d * q
    Q4_0   18 bytes / 32: f16 d | 16 bytes                      x = d * (q - 8)
    Q4_1   20 bytes / 32: f16 d | f16 m | 16 bytes              x = d * q + m
    Q5_0   22 bytes / 32: f16 d | u32 high bits | 16 bytes      x = d * (q - 16)
    Q5_1   24 bytes / 32: f16 d | f16 m | u32 high bits | 16    x = d * q + m
    Q4_K  144 bytes / 256: f16 d | f16 dmin | 12 bytes scales | 128 bytes
           8 sub-blocks of 32, each with a 6-bit scale sc and min m:  x = d*sc * q - dmin*m
    Q5_K  176 bytes / 256: as Q4_K, plus 32 bytes of fifth bits before the 128
    Q6_K  210 bytes / 256: 128 bytes low 4 bits | 64 bytes high 2 bits | 16 x int8 scales | f16 d
           16 sub-blocks of 16:                                        x = d*sc * (q - 32)

In Q4_0/Q4_1/Q5_0/Q5_1, byte j holds value j in its low nibble and value j + 16 in its
high one (the fifth bits: bit i of the u32 belongs to value i). The K-quant packings are
spelled out where they are built and read.

The quantizers follow ggml-quants.c's `quantize_row_*_ref` (what llama.cpp's
llama_model_quantize runs without an importance matrix) operation by operation in float32:
C's float arithmetic is IEEE single precision, numpy's float32 is too, and sums are taken
left to right (np.cumsum) as the C loops take them, so the bytes usually come out equal.
`nearest_int` (add 1.5 * 2^23, keep the low bits) rounds half to even: np.rint.
"""
import numpy as np
import torch

# ggml type id -> (name, values per block, bytes per block)   (gguf-py constants.py)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34),
              2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
              12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
READABLE = tuple(name for name, _, _ in GGML_TYPES.values())  # what `dequantize` (so the reader) reads: all
f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)  # ggml-quants.c: a group whose largest |x| is below this is all zero


def row_bytes(type_name: str, n_cols: int) -> int:
    _, block_values, block_bytes = GGML_TYPES[TYPE_IDS[type_name]]
    return n_cols // block_values * block_bytes


# ------------------------------------------------------------------------------ reading

def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """The bytes of one tensor -> its values, flat fp32 (a fresh, writable array), for the
    READABLE types. BF16 is the top half of an fp32, so shifting it up 16 bits is exact.
    Block types multiply in the order ggml's dequantize_row_* does (d * sc first, then
    times q, minus dmin * m), so the fp32 results equal gguf-py's bit for bit."""
    name, _, block_bytes = GGML_TYPES[ggml_type]
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return _DEQUANTIZERS[name](raw.reshape(-1, block_bytes)).reshape(-1)


def _f16_at(blocks, offset):
    """The f16 at byte `offset` of each block, as fp32 [n_blocks, 1]."""
    return blocks[:, offset:offset + 2].view("<f2").astype(np.float32)


def _nibbles(packed):
    """[n, 16] bytes -> [n, 32] values in 0..15: byte j's low nibble is value j, its high one value j + 16."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _fifth_bits(packed_u32):
    """[n, 4] bytes of a little-endian u32 -> [n, 32] in {0, 16}: bit i is value i's fifth bit."""
    return np.unpackbits(packed_u32, axis=1, bitorder="little") << 4


def _dequantize_q8_0(blocks):  # f16 d | 32 x int8
    return _f16_at(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dequantize_q4_0(blocks):  # f16 d | 16 bytes
    return _f16_at(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.int8) - 8).astype(np.float32)


def _dequantize_q4_1(blocks):  # f16 d | f16 m | 16 bytes
    return _f16_at(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16_at(blocks, 2)


def _dequantize_q5_0(blocks):  # f16 d | u32 fifth bits | 16 bytes
    q = _nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])
    return _f16_at(blocks, 0) * (q.astype(np.int8) - 16).astype(np.float32)


def _dequantize_q5_1(blocks):  # f16 d | f16 m | u32 fifth bits | 16 bytes
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])
    return _f16_at(blocks, 0) * q.astype(np.float32) + _f16_at(blocks, 2)


def _k_scales_and_mins(packed):
    """Q4_K / Q5_K's 12 scale bytes [n, 12] -> 6-bit scales and mins of the 8 sub-blocks, [n, 8] each.

        bytes 0..3   scale of sub-blocks 0..3 in bits 0-5; bits 6-7: top 2 bits of sub-block 4..7's scale
        bytes 4..7   min   of sub-blocks 0..3 in bits 0-5; bits 6-7: top 2 bits of sub-block 4..7's min
        bytes 8..11  sub-blocks 4..7: low 4 bits of the scale (low nibble) and of the min (high nibble)
    """
    scale_low, min_low, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([scale_low & 0x3F, (high & 0x0F) | ((scale_low >> 6) << 4)], axis=1)
    mins = np.concatenate([min_low & 0x3F, (high >> 4) | ((min_low >> 6) << 4)], axis=1)
    return scales, mins


def _dequantize_k_with_mins(blocks, q):
    """x = (d * sc) * q - dmin * m per sub-block of 32; q [n, 8, 32]. Bytes 0..15: f16 d, f16 dmin, scales."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    sub_d = (_f16_at(blocks, 0) * scales.astype(np.float32))[:, :, None]  # [n, 8, 1]
    sub_m = (_f16_at(blocks, 2) * mins.astype(np.float32))[:, :, None]
    return sub_d * q.astype(np.float32) - sub_m


def _k_low_nibbles(qs):
    """Q4_K / Q5_K's 128 value bytes [n, 128] -> [n, 8, 32]: in each group g of 32 bytes, byte l
    holds value l of sub-block 2g (low nibble) and of sub-block 2g + 1 (high nibble)."""
    groups = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=2).reshape(len(qs), 8, 32)


def _dequantize_q4_k(blocks):
    """Q4_K, 144 bytes / 256: f16 d @0 | f16 dmin @2 | 12 scale bytes @4 | 128 value bytes @16."""
    return _dequantize_k_with_mins(blocks, _k_low_nibbles(blocks[:, 16:]))


def _dequantize_q5_k(blocks):
    """Q5_K, 176 bytes / 256: f16 d @0 | f16 dmin @2 | 12 scale bytes @4 | qh[32] @16 | qs[128] @48.
    qs as Q4_K's values; bit s of qh[l] is the fifth bit of sub-block s's value l."""
    fifth = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _dequantize_k_with_mins(blocks, _k_low_nibbles(blocks[:, 48:]) | (fifth << 4))


def _dequantize_q6_k(blocks):
    """Q6_K, 210 bytes / 256: ql[128] @0 | qh[64] @128 | 16 x int8 scales @192 | f16 d @208.

    x = (d * sc) * (q - 32) per sub-block of 16, q in 0..63. Each half h of 128 values is 4
    groups of 32: byte l of ql[64h:64h+32] holds group 0's value l (low nibble) and group 2's
    (high), ql[64h+32:64h+64] groups 1 and 3; qh[32h + l] the top 2 bits of groups 0..3 at
    bits 0-1, 2-3, 4-5, 6-7.
    """
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 1, 2, 32)  # [n, half, nibble, group & 1, 32]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16)
    sub_d = _f16_at(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return sub_d[:, :, None] * q.astype(np.float32)


_DEQUANTIZERS = {"Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0, "Q4_1": _dequantize_q4_1,
                 "Q5_0": _dequantize_q5_0, "Q5_1": _dequantize_q5_1, "Q4_K": _dequantize_q4_k,
                 "Q5_K": _dequantize_q5_k, "Q6_K": _dequantize_q6_k}


# ------------------------------------------------------------------------------ writing

def quantize(values: np.ndarray, type_name: str, chunk_values: int = 1 << 22) -> np.ndarray:
    """values [rows, cols] (any float dtype, cols a multiple of the block size) -> uint8
    [rows, row_bytes] in `type_name`. Worked through in chunks of rows, so the float32
    temporaries of the K-quant searches stay near `chunk_values` values."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, cols = values.shape
    _, block_values, _ = GGML_TYPES[TYPE_IDS[type_name]]
    if cols % block_values:
        raise ValueError(f"{type_name} needs rows of a multiple of {block_values} values, got {cols}")
    out = np.empty((rows, row_bytes(type_name, cols)), np.uint8)
    step = max(1, chunk_values // max(cols, 1))
    for start in range(0, rows, step):
        part = values[start:start + step]
        out[start:start + step] = _QUANTIZERS[type_name](part.reshape(-1, block_values)).reshape(len(part), -1)
    return out


def _f16_bytes(x):
    """float32 [n] -> its f16 (round to nearest even, as GGML_FP32_TO_FP16) bytes [n, 2]."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _colsum(a):
    """Sum over axis 0 of a [group, n] array, left to right in float32, as a C `for` loop
    adds (one contiguous vector add per element of the group: fast, and in C's order)."""
    total = a[0].copy()
    for row in a[1:]:
        total += row
    return total


def _round_half_away(x):
    """C's roundf: halves away from zero (|x| + 0.5 in float64 is exact, so floor is too)."""
    return np.copysign(np.floor(np.abs(x).astype(np.float64) + 0.5), x)


def _plain(dtype):
    return lambda blocks: blocks.astype(dtype).view(np.uint8)


def _bf16(blocks):
    # round to nearest even, as ggml's fp32 -> bf16 (NaN stays NaN)
    return torch.from_numpy(blocks).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)


def _q8_0(x):
    """quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d)."""
    d = np.abs(x).max(axis=1) / f32(127)
    inv_d = np.divide(f32(1), d, out=np.zeros_like(d), where=d != 0)
    q = _round_half_away(x * inv_d[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


def _signed_max(x, axis=1):
    """The value of largest magnitude along `axis` (the first one, on ties; +0.0 for all
    zeros, as the C loops that start from max = 0 and only replace it by a larger |x|)."""
    index = np.expand_dims(np.abs(x).argmax(axis=axis), axis)
    big = np.take_along_axis(x, index, axis=axis).squeeze(axis)
    return np.where(big != 0, big, f32(0))


def _q4_0_or_q5_0(x, n_levels):
    """quantize_row_q4_0_ref / q5_0_ref: d = -(value of largest |x|) / (n_levels/2), so that
    value maps to q = 0 exactly; q = min(n_levels - 1, trunc(x / d + n_levels/2 + 0.5))."""
    half = n_levels // 2
    d = _signed_max(x) / f32(-half)
    inv_d = np.divide(f32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(np.trunc(x * inv_d[:, None] + f32(half + 0.5)), n_levels - 1).astype(np.uint8)
    nibbles = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    if n_levels == 16:
        return np.concatenate([_f16_bytes(d), nibbles], axis=1)
    high_bits = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # [n, 4]: the u32, bit i = value i
    return np.concatenate([_f16_bytes(d), high_bits, nibbles], axis=1)


def _q5_1(x):
    """quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5)."""
    xmin, xmax = x.min(axis=1), x.max(axis=1)
    d = (xmax - xmin) / f32(31)
    inv_d = np.divide(f32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.trunc((x - xmin[:, None]) * inv_d[:, None] + f32(0.5)).astype(np.uint8)
    nibbles = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    high_bits = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    return np.concatenate([_f16_bytes(d), _f16_bytes(xmin), high_bits, nibbles], axis=1)


def _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """ggml-quants.c make_qkx2_quants on each column of x [group, n] (groups down the
    columns: see _colsum): x ~= scale * L - the_min with L in 0..nmax, minimising the
    weighted squared error. Start from L spread over [min, max] (min clamped to <= 0), then
    for nstep + 1 trial grids (nmax + rmin + rdelta*i levels over the range) round x to L,
    fit scale and min by weighted least squares, and keep the fit whenever its error is
    lower; as in the C code, each trial grid starts from the min of the best fit so far.
    Returns (scale [n], the_min [n], L [group, n] uint8)."""
    xmax = x.max(axis=0)
    xmin = np.minimum(x.min(axis=0), f32(0))
    sum_w, sum_x = _colsum(weights), _colsum(weights * x)
    flat = xmax == xmin
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / (xmax - xmin)
        scale = f32(1) / iscale
        L = np.clip(np.rint(iscale * (x - xmin)), 0, nmax).astype(np.float32)
        diff = scale * L + xmin - x
        best_error = _colsum(weights * (diff * diff))
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (xmax - xmin)
            trial = np.clip(np.rint(iscale * (x - xmin)), 0, nmax).astype(np.float32)
            wl = weights * trial
            sum_l, sum_l2, sum_xl = _colsum(wl), _colsum(wl * trial), _colsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive_min = this_min > 0  # a min above zero is not allowed: refit the scale alone
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive_min, f32(0), this_min)
            diff = this_scale * trial + this_min - x
            error = _colsum(weights * (diff * diff))
            better = (D > 0) & (error < best_error) & ~flat
            L = np.where(better, trial, L)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale)
            xmin = np.where(better, this_min, xmin)
    L = np.where(flat, f32(0), L)
    scale = np.where(flat, f32(0), scale)
    return scale, -xmin, L.astype(np.uint8)


def _k_quant_with_mins(x, nmax, rmin, nstep):
    """What quantize_row_q4_K_ref and q5_K_ref share, on blocks x [n, 256].

    Each sub-block of 32 gets make_qkx2_quants(nmax, rmin, rdelta=0.1, nstep) with weights
    av_x + |x| (av_x = rms of the sub-block). The 8 scales and 8 mins are then stored as 6-bit
    multiples of d = max(scale)/63 and dmin = max(min)/63, and every value is rounded again
    against the stored scale and min. Scale bytes: sc/m of sub-blocks 0..3 in the low 6 bits
    of bytes 0..3 / 4..7; of sub-blocks 4..7, low 4 bits in bytes 8..11 (sc low nibble, m high
    nibble) and the top 2 bits in bits 6..7 of bytes 0..3 / 4..7.
    Returns (the first 16 bytes: d, dmin, scales [n, 16], L [n, 8, 32] uint8 in 0..nmax).
    """
    n = len(x)
    sub = np.ascontiguousarray(x.reshape(n * 8, 32).T)  # [32, sub-blocks]
    av_x = np.sqrt(_colsum(sub * sub) / f32(32))
    weights = av_x + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.divide(f32(63), max_scale, out=np.zeros_like(max_scale), where=max_scale > 0)
    inv_min = np.divide(f32(63), max_min, out=np.zeros_like(max_min), where=max_min > 0)
    # C: uint8_t ls = nearest_int(...) (wraps modulo 256), then MIN(63, ls)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d, dmin = (max_scale / f32(63)).astype(np.float16), (max_min / f32(63)).astype(np.float16)
    sub_d = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [n, 8]
    sub_m = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((x.reshape(n, 8, 32) + sub_m[:, :, None]) / sub_d[:, :, None]), 0, nmax)
    L = np.where(sub_d[:, :, None] != 0, requant, L).astype(np.uint8)  # C: `if (!d) continue;`
    packed_scales = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                                    lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                                    (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], axis=1)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed_scales], axis=1), L


def _q4_k(x):
    """quantize_row_q4_K_ref (see _k_quant_with_mins: nmax 15, rmin -1, 21 trial grids).
    Values: in each of 4 groups of 32 bytes, byte l holds value l of sub-block 2g (low
    nibble) and of sub-block 2g+1 (high nibble)."""
    head, L = _k_quant_with_mins(x, 15, -1.0, 20)
    pairs = L.reshape(len(x), 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(len(x), 128)
    return np.concatenate([head, qs], axis=1)


def _q5_k(x):
    """quantize_row_q5_K_ref (see _k_quant_with_mins: nmax 31, rmin -0.5, 16 trial grids).
    176 bytes: the 16 of Q4_K's head | qh[32] | qs[128]. The low 4 bits are packed as in
    Q4_K; bit 2g of qh[l] is the fifth bit of sub-block 2g's value l, bit 2g+1 sub-block
    2g+1's."""
    head, L = _k_quant_with_mins(x, 31, -0.5, 15)
    pairs = L.reshape(len(x), 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(len(x), 128)
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, :, None]
    qh = (((pairs[:, :, 0] >> 4) << shifts) | ((pairs[:, :, 1] >> 4) << (shifts + 1))).sum(axis=1, dtype=np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def _make_qx_quants(x, nmax):
    """ggml-quants.c make_qx_quants(rmse_type=1, no importance weights) on each column of
    x [group, n]: x ~= scale * (L - nmax) with L - nmax in -nmax..nmax-1. The value of
    largest magnitude maps to -nmax; then 18 nearby grids (nmax + 0.1*i, i = -9..9) are
    tried, each rounded and least-squares refitted with weights x^2, keeping the best.
    Returns (scale [n], L [group, n] int64 in 0..2*nmax-1)."""
    big = _signed_max(x, axis=0)
    zero = np.abs(big) < GROUP_MAX_EPS
    weights = x * x

    def fit(iscale):
        levels = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        return levels, _colsum(weights * x * levels), _colsum(weights * levels * levels)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        levels, sumlx, suml2 = fit(f32(-nmax) / big)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            trial, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(i)) / big)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            levels = np.where(better, trial, levels)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    levels = np.where(zero, -nmax, levels)  # C: L = 0 (stored offset by nmax)
    return np.where(zero, f32(0), scale), levels.astype(np.int64) + nmax


def _q6_k(x):
    """quantize_row_q6_K_ref on blocks x [n, 256].

    Each sub-block of 16 gets make_qx_quants(nmax=32); the 16 scales are stored as int8
    multiples of d = -(scale of largest magnitude)/128, and the values are rounded again
    against the stored scale to q in 0..63 (x = d*sc*(q - 32)). Packing, per half h of 128
    values (4 groups of 32): byte l of ql[64h:64h+32] holds group 0's value l (low nibble)
    and group 2's (high); ql[64h+32:64h+64] groups 1 and 3; qh[32h + l] the top 2 bits of
    groups 0, 1, 2, 3 in bits 0-1, 2-3, 4-5, 6-7.
    """
    n = len(x)
    scales, L = _make_qx_quants(np.ascontiguousarray(x.reshape(n * 16, 16).T), 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _signed_max(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, f32(0), f32(-128) / max_scale)
        d = np.where(zero, f32(0), f32(1) / iscale).astype(np.float16)
        sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
        sub_d = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [n, 16]
        requant = np.clip(np.rint(x.reshape(n, 16, 16) / sub_d[:, :, None]), -32, 31) + 32
    L = np.where(sub_d[:, :, None] != 0, requant, L).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = np.stack([(L[:, :, 0] & 0x0F) | ((L[:, :, 2] & 0x0F) << 4),
                   (L[:, :, 1] & 0x0F) | ((L[:, :, 3] & 0x0F) << 4)], axis=2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
    block = np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=1)
    block[zero] = 0  # C: memset(&y[i], 0, ...)
    return block


_QUANTIZERS = {"F32": _plain("<f4"), "F16": _plain("<f2"), "BF16": _bf16, "Q8_0": _q8_0,
               "Q4_0": lambda x: _q4_0_or_q5_0(x, 16), "Q5_0": lambda x: _q4_0_or_q5_0(x, 32),
               "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
