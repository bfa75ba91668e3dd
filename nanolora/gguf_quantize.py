"""llama.cpp's reference quantizers in torch, vectorised over every block of a tensor, on the
CPU's threads or on CUDA, with llama.cpp's bytes.

The block layouts are in nanolora/gguf_quants.py. Each function here follows ggml-quants.c's
`quantize_row_*_ref` (what llama_model_quantize runs without an importance matrix), written
for all blocks at once but doing, per block, the float32 operations the C code does in the
order it does them, so the results are the same floats:

- one torch op per C expression, and never two fused: `(w * l) * l` is two multiplications,
  each rounded (no addcmul: its CPU kernel may contract into an FMA);
- sums over a sub-block are taken left to right, as the C `for` loops take them: the
  sub-block's values lie down the first axis ([element, sub-block], see `_sum_down`), and
  element i's row is added to the running sum with one vector add across all sub-blocks.
  A reduction op (sum, cumsum) would be faster and add in another order;
- division is by a tensor on the device, never by a Python number: CUDA turns `t / 63.0`
  into `t * (1/63)`, which rounds differently;
- sqrtf is taken in double and rounded to float32 (torch's float32 sqrt is not always
  correctly rounded on the CPU);
- `nearest_int` (add 1.5 * 2^23, keep the low bits) rounds half to even: torch.round where
  the values are finite and small, _nearest_int's same bit trick where they may not be. C's
  `roundf` (Q8_0) rounds halves away from zero: trunc(x) + trunc(2 * (x - trunc(x))), exact.

On CUDA each op is its own IEEE float32 kernel, so the GPU gives the same bytes (tests/
test_gguf_quants.py checks CPU against llama.cpp, CUDA against the CPU).

On the CPU, quantize() runs the block types through nanolora/gguf_quantize.c instead (the same
operations in C, 16 sub-blocks at a time: 4-8x llama.cpp's speed on the K-quants, where the
functions here are 2-3x slower than llama.cpp) when gguf_native can compile it; these stay its
reference, the path without a compiler, and the CUDA path.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanolora import gguf_native
from nanolora.gguf_quants import GGML_TYPES, TYPE_IDS, row_bytes

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a group whose largest |x| is below this is all zero
# On CUDA, a Q4_K/Q5_K block whose values are all float32 subnormals (~1e-40) came out other
# than on the CPU and in llama.cpp (tests/test_gguf_quants.py, H200: some CUDA op flushes a
# subnormal intermediate). Blocks whose largest value is below 2^-100 (no real weight is) are
# quantized on the CPU instead, far enough above the subnormals for every scale and product.
TINY_BLOCK = 2.0 ** -100
# Likewise blocks with a value past 2^20: there a K-quant's f16 scale can overflow to inf
# (Q6_K's from ~2.1e6), and CUDA's kernels handled the infinities unlike the CPU and llama.cpp
# (H200, tests/test_gguf_quants.py's 1e9 and -1e8 rows). No trained weight comes near.
HUGE_BLOCK = 2.0 ** 20
# values per chunk. CPU: large, because the worker threads' Python and torch dispatch between
# ops hold the GIL, and on 2 threads they waited on each other more than they computed with
# cache-sized chunks (quantize() on 2 threads, 2^17 -> 2^20 values: Q4_K 9.2 -> 14.9, Q6_K
# 15.8 -> 24.7, Q8_0 290 -> 450 M values/s; a chunk's temporaries then live in L3, not L2).
# A tensor is cut into equal chunks, a multiple of the threads in number. CUDA: large, so that
# each kernel has millions of values to work on.
# Native (C) chunks: each call is one C loop over the tensor's own memory (it widens 16-bit values
# a cache-sized tile at a time) and releases the GIL; 2^18 values make a 10^7-value tensor ~40
# calls, few enough that Python between them costs nothing, enough that the threads end together,
# and a chunk of merged fp32 rows (1 MB, checkpoint.MergedRows) stays in L2 until quantized.
CHUNK_VALUES = {"cpu": 1 << 20, "cuda": 1 << 25, "native": 1 << 18}
_NATIVE_SOURCES = {getattr(torch, name): code for code, name in enumerate(gguf_native.SOURCES)}


def quantize(values, type_name: str, device=None) -> np.ndarray:
    """values [rows, cols] -> uint8 numpy [rows, row_bytes] in `type_name`, computed on `device`
    (default: where `values` is) a chunk of rows at a time. values: a tensor or numpy array (any
    float dtype; cols a multiple of the block size), or a source of rows made on demand
    (checkpoint.MergedRows: .shape, .device, .block_rows, .rows(start, stop)).

    On the CPU the chunks are shared out to torch.get_num_threads() Python threads whose ops
    run single-threaded, as llama.cpp shares rows out to its threads: one op on a chunk is too
    small to be worth splitting, and on a busy machine a split op waits at its barrier for
    the slowest thread (measured 50x slower on 2 loaded cores)."""
    source = values if hasattr(values, "rows") else _TensorRows(torch.as_tensor(values))
    device = torch.device(device) if device is not None else source.device
    rows, cols = source.shape
    _, block_values, block_bytes = GGML_TYPES[TYPE_IDS[type_name]]
    if cols % block_values:
        raise ValueError(f"{type_name} needs rows of a multiple of {block_values} values, got {cols}")
    out = torch.empty((rows, row_bytes(type_name, cols)), dtype=torch.uint8)
    if not rows * cols:
        return out.numpy()
    # the C code reads host memory: a CUDA source quantized "on the CPU" takes the torch path's copy
    native = device.type == "cpu" and source.device.type == "cpu" and type_name in gguf_native.TYPES \
        and gguf_native.library()
    chunk_values = CHUNK_VALUES["native"] if native else CHUNK_VALUES.get(device.type, CHUNK_VALUES["cpu"])

    def rows_per_chunk(n):  # rows, rounded up to the source's blocks
        return -(-max(1, n) // source.block_rows) * source.block_rows
    step = rows_per_chunk(chunk_values // cols)  # rows and cols > 0 past the early return
    threads = torch.get_num_threads()
    if device.type == "cpu":  # a multiple of `threads` equal chunks: no thread waits for the last
        chunks = -(-rows // step)
        step = rows_per_chunk(-(-rows // (-(-chunks // threads) * threads)))

    def run(start):
        part = source.rows(start, min(start + step, rows))
        if native:  # into `out` directly; the C code widens 16-bit values itself, and releases the GIL
            part = (part if part.dtype in _NATIVE_SOURCES else part.float()).contiguous()
            kernel = getattr(native, f"nanolora_quantize_{type_name.lower()}")
            kernel(part.data_ptr(), _NATIVE_SOURCES[part.dtype], part.numel() // block_values, out[start].data_ptr())
            return
        part = part.reshape(-1, block_values).to(device=device, dtype=torch.float32)
        result = _QUANTIZERS[type_name](part).cpu()
        if part.is_cuda:  # blocks of float32-subnormal or huge size go to the CPU (see TINY_BLOCK, HUGE_BLOCK)
            amax = part.abs().amax(dim=1)
            odd = (((amax > 0) & (amax < TINY_BLOCK)) | (amax >= HUGE_BLOCK)).nonzero().flatten().cpu()
            if len(odd):
                result[odd] = _QUANTIZERS[type_name](part[odd].cpu())
        out[start:start + step] = result.reshape(-1, out.shape[1])

    starts = range(0, rows, step)
    if device.type != "cpu" or len(starts) == 1 or threads == 1:
        for start in starts:
            run(start)
    else:
        torch.set_num_threads(1)  # read by each new thread's first op: the workers' ops stay in their thread
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, starts))
        finally:
            torch.set_num_threads(threads)
    return out.numpy()


class _TensorRows:
    """A tensor as a source of rows (see quantize)."""
    block_rows = 1

    def __init__(self, tensor):
        if tensor.dim() != 2:
            raise ValueError(f"quantize: expected values of shape [rows, cols], got {list(tensor.shape)}")
        self.tensor, self.shape, self.device = tensor, tuple(tensor.shape), tensor.device

    def rows(self, start, stop):
        return self.tensor[start:stop]


def _const(value, like):
    """A float32 constant on `like`'s device, for dividing by (see the module docstring); made
    there by a fill, so that CUDA does not wait on a copy from the host."""
    return torch.full((1,), value, dtype=torch.float32, device=like.device)


def _f16_bytes(x):
    """float32 [n] -> its f16 bytes [n, 2] (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _f16_round(x):
    """float32 -> the float32 value of its f16 (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)))."""
    return x.to(torch.float16).float()


def _reciprocal_or_zero(d):
    """C's `d ? 1.0f/d : 0.0f`."""
    return torch.where(d != 0, _const(1.0, d) / d, torch.zeros_like(d))


def _sum_down(a, out=None):
    """[..., group, n] -> [..., n] (into `out` if given): the sum over the group axis, left to
    right in float32 from the first element, as a C `for` loop over the group's elements adds.
    On the CPU, index_add_ with every index 0 adds the rows into the first one by one, in index
    order, in one call (10x faster than a Python loop of adds at these sizes); on CUDA it adds
    with atomics in no set order, so there the loop it is (one vector add over n per row)."""
    out = a[..., 0, :].clone() if out is None else out.copy_(a[..., 0, :])
    if a.device.type == "cpu":
        out.unsqueeze(-2).index_add_(-2, torch.zeros(a.shape[-2] - 1, dtype=torch.long), a[..., 1:, :])
    else:
        for i in range(1, a.shape[-2]):
            out += a[..., i, :]
    return out


def _signed_max(x, dim):
    """The value of largest magnitude along `dim` (finite x): the first on ties, +0.0 when all
    are zero (the C loops start from max = 0 and replace it only by a strictly larger |x|).

    In float arithmetic alone: on the CPU, argmax and comparisons that make bool tensors are
    not vectorised (argmax took 15% of Q6_K's time). Each value at the largest magnitude gets
    the key 4 * (size - index) + sign(value), the others 0; the largest key is the first such
    value, and its remainder mod 4 (1 or 3) its sign."""
    magnitude = x.abs()
    top = magnitude.amax(dim, keepdim=True)
    rank = torch.arange(4 * x.shape[dim], 0, -4, dtype=x.dtype, device=x.device)
    rank = rank.reshape([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
    at_top = magnitude.sub_(top).sign_().add_(1)  # 1 where |x| = top, else 0
    key = at_top.mul_(x.sign().add_(rank)).amax(dim)
    return top.squeeze(dim).mul_(key.remainder_(4).sub_(2).neg_())  # +0.0 when all are zero: key % 4 = 0


def _pack_nibbles(q):
    """[n, 32] values in 0..15 -> [n, 16] bytes: value j in byte j's low nibble, j + 16 in its high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_fifth_bits(q):
    """[n, 32] values in 0..31 -> [n, 4]: the little-endian u32 whose bit i is value i's fifth bit."""
    bits = ((q >> 4) & 1).reshape(-1, 4, 8).to(torch.int32) << torch.arange(8, device=q.device, dtype=torch.int32)
    return bits.sum(-1).to(torch.uint8)


# --------------------------------------------------------------- F32 / F16 / BF16, 32-blocks

def _plain(dtype):
    # .to(float16 / bfloat16) rounds to nearest even, as ggml (NaN stays NaN)
    return lambda blocks: blocks.to(dtype).contiguous().view(torch.uint8)


def _c_to_int(v):
    """C's float -> int8_t / uint8_t conversion as x86 does it: truncation (cvttss2si), except
    that NaN and +-inf give 0x80000000, whose low byte is 0. They come up where a block's
    scale is an fp32 subnormal and 1/d overflows; CUDA would saturate instead, so it is spelled
    out. Returns float32 integers."""
    return torch.where(torch.isfinite(v), torch.trunc(v), torch.zeros_like(v))


def _q8_0(x):
    """quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d)."""
    d = x.abs().amax(1) / _const(127.0, x)
    scaled = x * _reciprocal_or_zero(d)[:, None]
    # roundf in float32: the fraction x - trunc(x) is exact, and trunc(2 * fraction) is +-1
    # exactly where roundf rounds away from zero. An inf or NaN (a subnormal d) ends as NaN: 0.
    whole = scaled.trunc()
    q = scaled.sub_(whole).mul_(2).trunc_().add_(whole).nan_to_num_(0.0, 0.0, 0.0).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], 1)


def _q4_0_or_q5_0(x, n_levels):
    """quantize_row_q4_0_ref / q5_0_ref: d = -(value of largest |x|) / (n_levels/2), so that
    value maps to q = 0 exactly; q = min(n_levels - 1, trunc(x / d + n_levels/2 + 0.5))."""
    half = n_levels // 2
    d = _signed_max(x, 1) / _const(-half, x)
    q = _c_to_int(x * _reciprocal_or_zero(d)[:, None] + (half + 0.5)).clamp(max=n_levels - 1).to(torch.uint8)
    if n_levels == 16:
        return torch.cat([_f16_bytes(d), _pack_nibbles(q)], 1)
    return torch.cat([_f16_bytes(d), _pack_fifth_bits(q), _pack_nibbles(q)], 1)


def _q5_1(x):
    """quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5).
    min and max are the first of their value, as the C loop keeps them (the sign of a zero min
    is stored)."""
    xmin = x.gather(1, x.argmin(1, keepdim=True)).squeeze(1)
    xmax = x.gather(1, x.argmax(1, keepdim=True)).squeeze(1)
    d = (xmax - xmin) / _const(31.0, x)
    q = _c_to_int((x - xmin[:, None]) * _reciprocal_or_zero(d)[:, None] + 0.5).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(xmin), _pack_fifth_bits(q), _pack_nibbles(q)], 1)


# ------------------------------------------------------------------- K-quants, 256-blocks

def _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """ggml-quants.c make_qkx2_quants on each column of x [group, n] (a sub-block per column):
    x ~= scale * L - the_min with L in 0..nmax, minimising the weighted squared error. Start
    from L spread over [min, max] (min clamped to <= 0), then for nstep + 1 trial grids
    (nmax + rmin + rdelta*i levels over the range) round x to L, fit scale and min by weighted
    least squares, and keep the fit whenever its error is lower; as in the C code, each trial
    grid starts from the min of the best fit so far, so the trials run one after the other
    (they cannot be batched into one [nstep, ...] computation).

    The best L is not kept: it is the rounding of x on the best grid, redone at the end from
    that grid's iscale and min (the same float operations on the same floats), which saves a
    [group, n] copy per trial. Returns (scale [n], the_min [n], L [group, n] float32 of integers).

    Speed: a trial is 13 passes over [group, n] and ~20 small ops on [n]. A small op costs a
    few us of Python and dispatch whatever n is, so they are kept few: the five quantities a
    better fit replaces live in the rows of one `state` tensor, the trial's in the same rows
    of `trial`, and one `where` updates all five; the fit's sums and products are rows of
    tensors too. Every result goes into a buffer made here, views included (out=, in place):
    no allocation in the loop, and a working set of six [group, n] buffers (smaller chunks
    that fit the L2 cache lose more to the small ops than they gain: see CHUNK_VALUES).
    Measured on one core: 7.2 -> 8.3 M values/s against the one-op-per-quantity loop.
    """
    n = x.shape[1]
    make = lambda *shape: torch.empty(shape, dtype=x.dtype, device=x.device)
    xmax = x.amax(0)
    fit = make(5, n)  # sum_w, sum_x, sum_l, sum_l2, sum_xl
    _sum_down(torch.stack([weights, weights * x]), out=fit[:2])
    # D = sum_w*sum_l2 - sum_l*sum_l; scale = (sum_w*sum_xl - sum_x*sum_l)/D;
    # min = (sum_l2*sum_x - sum_l*sum_xl)/D: the factors of the six products are rows of `fit`
    factor_rows = torch.tensor([0, 2, 0, 1, 3, 2, 3, 2, 4, 2, 1, 4], device=x.device)
    factors, terms, D_and_numerators = make(12, n), make(6, n), make(3, n)
    state = make(5, n)
    best_error, scale, low, best_iscale, best_low = state  # low: the min the next grid starts from
    trial = make(5, n)
    error, this_scale, this_min, iscale, this_low = trial  # row by row the candidates for `state`
    levels = make(*x.shape)
    products = make(3, *x.shape)  # w*l, (w*l)*l, (w*l)*x; then diff (below) reuses the first
    diff = products[0]
    sum_l2, sum_xl = fit[3], fit[4]
    refit_scale, positive_min, D_positive, better = make(n), *torch.empty((3, n), dtype=torch.bool, device=x.device)
    grids = [np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)  # C float arithmetic
             for step in range(nstep + 1)]
    grids = torch.tensor([nmax] + grids, dtype=x.dtype, device=x.device)[:, None]  # [1 + trials, 1]

    def set_iscale(grid):
        # C: iscale = grid/(max - min). Where max - min is an fp32 subnormal (or 0, a flat
        # sub-block), iscale is inf and nearest_int's bit trick turns inf and NaN (inf * 0)
        # into a negative number: L = 0. An iscale of 0 gives the same, and no inf in the sums.
        torch.sub(xmax, low, out=iscale)
        torch.div(grid, iscale, out=iscale)
        return iscale.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def round_to_grid(iscale, low, out):
        # C: MAX(0, MIN(nmax, nearest_int(iscale * (x[i] - min))))
        torch.sub(x, low, out=out)
        return out.mul_(iscale).round_().clamp_(0, nmax)

    def weighted_error(scale, low, out):
        # C: diff = scale * L[i] + min - x[i]; error += w * (diff * diff)
        torch.mul(levels, scale, out=diff)
        diff.add_(low).sub_(x)
        diff.mul_(diff).mul_(weights)
        return _sum_down(diff, out=out)

    low.copy_(x.amin(0).clamp_(max=0))
    flat = xmax == low
    torch.div(_const(1.0, x), grids[0] / (xmax - low), out=scale)  # 1/inf = 0 where flat
    round_to_grid(set_iscale(grids[0]), low, levels)
    best_iscale.copy_(iscale)
    best_low.copy_(low)
    weighted_error(scale, low, best_error)
    best_error.masked_fill_(flat, -float("inf"))  # no trial beats it: a flat sub-block keeps L = 0
    for grid in grids[1:]:
        this_low.copy_(low)
        round_to_grid(set_iscale(grid), low, levels)
        torch.mul(weights, levels, out=products[0])
        torch.mul(products[0], levels, out=products[1])
        torch.mul(products[0], x, out=products[2])
        _sum_down(products, out=fit[2:])
        torch.index_select(fit, 0, factor_rows, out=factors)
        torch.mul(factors[:6], factors[6:], out=terms)
        torch.sub(terms[0::2], terms[1::2], out=D_and_numerators)  # D, scale numerator, min numerator
        torch.div(D_and_numerators[1:], D_and_numerators[:1], out=trial[1:3])  # this_scale, this_min
        torch.gt(this_min, 0, out=positive_min)  # a min above zero is not allowed: refit the scale alone
        torch.div(sum_xl, sum_l2, out=refit_scale)
        torch.where(positive_min, refit_scale, this_scale, out=this_scale)
        this_min.masked_fill_(positive_min, 0)
        weighted_error(this_scale, this_min, error)
        torch.gt(D_and_numerators[0], 0, out=D_positive)
        torch.lt(error, best_error, out=better)
        torch.where(better.logical_and_(D_positive), trial, state, out=state)
    best = round_to_grid(best_iscale, best_low, levels)
    best.masked_fill_(flat, 0)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -low, best


def _nearest_int(x):
    """ggml's nearest_int, bit for bit: add 1.5 * 2^23 and keep the low 23 bits, minus 2^22
    (int32). Rounds half to even in range; +-inf gives -2^22 and NaN 0 (torch.round would give
    inf and NaN, which a clamp turns into the top level). They come up where an f16 scale
    overflows to inf (values past ~4e6): x / inf, or (x + inf) / d."""
    bits = (x + _const(12582912.0, x)).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _nearest_uint8(x):
    """C's `uint8_t ls = nearest_int(x)`: _nearest_int, wrapped modulo 256."""
    return (_nearest_int(x) & 0xFF).to(torch.uint8)


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
    sub = x.reshape(n * 8, 32).T.contiguous()  # [32, sub-blocks]
    # sqrtf in double, rounded once to float32: the same float (sqrt of a float32 is never
    # close enough to a float32 tie for the double rounding to matter). torch's float32 sqrt on
    # the CPU is vectorised with SLEEF's 0.5001-ulp sqrt and is off by one ulp on ~0.7% of inputs.
    av_x = torch.sqrt((_sum_down(sub * sub) / _const(32.0, x)).double()).float()
    weights = av_x + sub.abs()
    scales, mins, L = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)
    # C: max = 0, then max = x only for x > max; so +0.0 where all are <= 0 (clamp would keep a -0.0)
    max_scale, max_min = torch.stack([scales.amax(1), mins.amax(1)])
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, _const(63.0, x) / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _const(63.0, x) / max_min, torch.zeros_like(max_min))
    ls = _nearest_uint8(inv_scale[:, None] * scales).clamp(max=63)
    lm = _nearest_uint8(inv_min[:, None] * mins).clamp(max=63)
    d, dmin = max_scale / _const(63.0, x), max_min / _const(63.0, x)
    sub_d = _f16_round(d)[:, None] * ls.float()  # [n, 8]
    sub_m = _f16_round(dmin)[:, None] * lm.float()
    requant = _nearest_int((x.reshape(n, 8, 32) + sub_m[:, :, None]) / sub_d[:, :, None]).clamp(0, nmax).float()
    L = torch.where(sub_d[:, :, None] != 0, requant, L).to(torch.uint8)  # C: `if (!d) continue;`
    packed_scales = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                               lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                               (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], 1)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), packed_scales], 1), L


def _q4_k(x):
    """quantize_row_q4_K_ref (see _k_quant_with_mins: nmax 15, rmin -1, 21 trial grids).
    Values: in each of 4 groups of 32 bytes, byte l holds value l of sub-block 2g (low
    nibble) and of sub-block 2g+1 (high nibble)."""
    head, L = _k_quant_with_mins(x, 15, -1.0, 20)
    pairs = L.reshape(len(x), 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(len(x), 128)
    return torch.cat([head, qs], 1)


def _q5_k(x):
    """quantize_row_q5_K_ref (see _k_quant_with_mins: nmax 31, rmin -0.5, 16 trial grids).
    176 bytes: the 16 of Q4_K's head | qh[32] | qs[128]. The low 4 bits are packed as in
    Q4_K; bit 2g of qh[l] is the fifth bit of sub-block 2g's value l, bit 2g+1 sub-block
    2g+1's."""
    head, L = _k_quant_with_mins(x, 31, -0.5, 15)
    pairs = L.reshape(len(x), 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)).reshape(len(x), 128)
    shifts = (2 * torch.arange(4, device=x.device, dtype=torch.uint8))[None, :, None]
    qh = (((pairs[:, :, 0] >> 4) << shifts) | ((pairs[:, :, 1] >> 4) << (shifts + 1))).sum(1, dtype=torch.uint8)
    return torch.cat([head, qh, qs], 1)


def _make_qx_quants(x, nmax):
    """ggml-quants.c make_qx_quants(rmse_type=1, no importance weights) on each column of
    x [group, n]: x ~= scale * (L - nmax) with L - nmax in -nmax..nmax-1. The value of
    largest magnitude maps to -nmax; then 18 nearby grids (nmax + 0.1*i, i = -9..9) are
    tried, each rounded and least-squares refitted with weights x^2, keeping the best (whose
    L is redone at the end from its iscale, as in _make_qkx2_quants).
    Returns (scale [n], L [group, n] float32 of integers in 0..2*nmax-1)."""
    big = _signed_max(x, 0)
    zero = big.abs() < GROUP_MAX_EPS
    weights = x * x
    # C: sumlx += w*x[i]*l  ((w * x) * l);  suml2 += w*l*l  ((w * l) * l)
    weighted = torch.stack([weights * x, weights])
    products = torch.empty((2, *x.shape), dtype=x.dtype, device=x.device)
    levels = torch.empty_like(x)

    def round_to_grid(iscale, out):
        torch.mul(x, iscale, out=out)
        return out.round_().clamp_(-nmax, nmax - 1)

    def fit(iscale):
        round_to_grid(iscale, levels)
        torch.mul(weighted, levels, out=products)
        products[1].mul_(levels)
        sumlx, suml2 = _sum_down(products)
        return sumlx, suml2

    best_iscale = _const(-nmax, x) / big
    sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        grid = np.float32(nmax) + np.float32(0.1) * np.float32(i)  # C: -(nmax + 0.1f*is) / max
        iscale = _const(-float(grid), x) / big
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    levels = round_to_grid(best_iscale, levels)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels)  # C: L = 0 (stored offset by nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), levels + nmax


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
    scales, L = _make_qx_quants(x.reshape(n * 16, 16).T.contiguous(), 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _signed_max(scales, 1)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = torch.where(zero, torch.zeros_like(max_scale), _const(-128.0, x) / max_scale)
    d = torch.where(zero, torch.zeros_like(iscale), _const(1.0, x) / iscale)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127).to(torch.int8)
    sub_d = _f16_round(d)[:, None] * sc.float()  # [n, 16]
    requant = (_nearest_int(x.reshape(n, 16, 16) / sub_d[:, :, None]).clamp(-32, 31) + 32).float()
    L = torch.where(sub_d[:, :, None] != 0, requant, L).to(torch.uint8).reshape(n, 2, 4, 32)
    ql = torch.stack([(L[:, :, 0] & 0x0F) | ((L[:, :, 2] & 0x0F) << 4),
                      (L[:, :, 1] & 0x0F) | ((L[:, :, 3] & 0x0F) << 4)], 2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
    block = torch.cat([ql, qh, sc.view(torch.uint8), _f16_bytes(d)], 1)
    block[zero] = 0  # C: memset(&y[i], 0, ...)
    return block


_QUANTIZERS = {"F32": _plain(torch.float32), "F16": _plain(torch.float16), "BF16": _plain(torch.bfloat16),
               "Q8_0": _q8_0, "Q4_0": lambda x: _q4_0_or_q5_0(x, 16), "Q5_0": lambda x: _q4_0_or_q5_0(x, 32),
               "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
