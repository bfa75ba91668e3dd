/* nanolora's GGUF block quantizers in C, with llama.cpp's bytes (loaded by nanolora/gguf_native.py).

Each type's function does, for every block, the float32 operations of llama.cpp's
quantize_row_*_ref in the same order, as nanolora/gguf_quantize.py (the torch reference this
file is tested against, and llama.cpp's) spells out; so the floats, and the bytes, are the same.
Entry points: nanolora_quantize_<type>(const void *x, int src, int64_t n_blocks, uint8_t *out),
x in float32 (src 0), f16 (1) or bf16 (2): a 16-bit source is widened to float32 (exact) a
tile at a time, in the call, so no float32 copy of a tensor is made to quantize it.

Lanes. The K-quants spend their time in a search per sub-block: 21 (Q4_K), 17 (Q5_K) or 19
(Q6_K) trial grids, each a few passes over the sub-block's 32 or 16 values. The scalar code
searches one sub-block at a time. Here LANES = 16 sub-blocks are searched side by side: their
values are transposed into v[i][lane], and every loop runs over i outside and the lanes inside.
A lane still does its sub-block's operations one by one in the scalar order (its sums add
element 0, 1, 2, ... left to right), and lanes never mix, so the compiler can run the inner
loop as SIMD instructions (AVX2: 8 lanes per instruction) without changing one result. The
scalar code's branches (`if (error < best) { keep }`) become selects.

Exactness rules (see also gguf_quantize.py's docstring):
- built with -ffp-contract=off and without -ffast-math: no fused multiply-adds, no reordering
  (-fno-trapping-math only says that no code reads the FP exception flags: truncf then
  vectorises, with the same values);
  one C expression per operation of the reference, parenthesised as it rounds;
- nearest_int is llama.cpp's: add 1.5 * 2^23 and keep the low mantissa bits, which rounds half
  to even, and gives a negative number (so a level of 0 once clamped) for inf and NaN;
- float -> integer conversions are x86's cvttss2si, which llama.cpp's builds do: truncation,
  and INT32_MIN (low byte 0) for NaN, inf and out-of-range (C leaves that undefined: c_to_int);
- f16 conversion rounds to nearest even (as F16C, which llama.cpp uses on x86); sqrtf is
  IEEE's correctly rounded square root; roundf rounds half away from zero. */
#ifdef __F16C__
#include <immintrin.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define GROUP_MAX_EPS 1e-15f /* a group whose largest |x| is below this is all zero */

static inline int32_t nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, 4);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int32_t c_to_int(float v) { /* the select first: then the conversion is in range, and vectorises */
    return (int32_t)(fabsf(v) < 2147483648.f ? v : -2147483648.f);
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

static uint16_t f16_bits(float f) {
    uint32_t x, a;
    memcpy(&x, &f, 4);
    uint16_t sign = (x >> 16) & 0x8000;
    a = x & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00 | ((a >> 13) & 0x3ff); /* NaN, made quiet */
    if (a >= 0x477ff000) return sign | 0x7c00;                       /* 65520 and up round to inf */
    if (a >= 0x38800000) {                                           /* normal in f16: rebias 127 -> 15 */
        a -= 0x38000000;
        return sign | ((a + 0xfff + ((a >> 13) & 1)) >> 13);          /* round the 13 dropped bits, ties to even */
    }
    /* an f16 subnormal (or zero): in 0.5f + f the last mantissa bit is worth 2^-24, f16's
       subnormal step, and the float addition rounds to nearest even */
    float s;
    memcpy(&s, &a, 4);
    s += 0.5f;
    memcpy(&a, &s, 4);
    return sign | (a - 0x3f000000);
}

static float f16_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
    if (e == 0) return sign ? -((float)m * 0x1p-24f) : (float)m * 0x1p-24f;
    x = sign | (e == 31 ? 0x7f800000 | m << 13 : (e + 112) << 23 | m << 13);
    float v;
    memcpy(&v, &x, 4);
    return v;
}

static void put_f16(uint8_t *out, float f) {
    uint16_t h = f16_bits(f);
    out[0] = h & 0xff;
    out[1] = h >> 8;
}

/* --------------------------------------------------------------- 32-blocks */

/* max |x| over a 32-block, from 0. A maximum is exact in any order, so it is taken in 8
   interleaved partial maxima that the compiler runs as one SIMD register. */
static float abs_max(const float *x) {
    float part[8] = {0};
    for (int j = 0; j < 32; j += 8) /* the inner loop is the SIMD register (part[j % 8] was not seen as one) */
        for (int k = 0; k < 8; k++) part[k] = fabsf(x[j + k]) > part[k] ? fabsf(x[j + k]) : part[k];
    float amax = 0.0f;
    for (int k = 0; k < 8; k++) amax = part[k] > amax ? part[k] : amax;
    return amax;
}

static void quantize_q8_0(const float *restrict x, int64_t n_blocks, uint8_t *restrict out) {
    for (int64_t b = 0; b < n_blocks; b++, x += 32, out += 34) {
        const float amax = abs_max(x);
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        put_f16(out, d);
        for (int j = 0; j < 32; j++) {
            float v = x[j] * id, whole = truncf(v);
            /* roundf: the fraction v - whole is exact, and trunc(2 * fraction) is +-1 just where
               roundf rounds away from zero */
            out[2 + j] = (uint8_t)c_to_int(whole + truncf((v - whole) * 2.0f));
        }
    }
}

/* The value of largest magnitude, the first of them on ties, +0.0 when all are zero (the C
   loop replaces its max, from 0, only by a strictly larger |x|): found after abs_max. */
static float signed_max(const float *x) {
    const float amax = abs_max(x);
    int j = 0;
    while (amax > 0 && fabsf(x[j]) != amax) j++;
    return amax > 0 ? x[j] : 0.0f;
}

/* The fifth bits of 32 values as the u32 of Q5_0 / Q5_1 (bit i: value i), little-endian. */
static void put_fifth_bits(uint8_t *out, const uint8_t *q) {
    for (int k = 0; k < 4; k++) {
        uint8_t byte = 0;
        for (int i = 0; i < 8; i++) byte |= ((q[8 * k + i] >> 4) & 1) << i;
        out[k] = byte;
    }
}

/* Q4_0 (levels 16) and Q5_0 (levels 32): d = -(signed max) / (levels/2), so that value gets
   q = 0; q = min(levels - 1, trunc(x / d + levels/2 + 0.5)) through an int8 (C's (int8_t)). */
static void q4_0_or_q5_0(const float *restrict x, int64_t n_blocks, uint8_t *restrict out, int levels) {
    const int block_bytes = levels == 16 ? 18 : 22, half = levels / 2;
    for (int64_t b = 0; b < n_blocks; b++, x += 32, out += block_bytes) {
        const float d = signed_max(x) / (float)-half, id = d ? 1.0f / d : 0.0f;
        uint8_t q[32];
        for (int j = 0; j < 32; j++) {
            int8_t l = (int8_t)c_to_int(x[j] * id + ((float)half + 0.5f));
            q[j] = (uint8_t)(l < levels - 1 ? l : levels - 1);
        }
        put_f16(out, d);
        uint8_t *qs = out + (levels == 16 ? 2 : 6);
        if (levels == 32) put_fifth_bits(out + 2, q);
        for (int j = 0; j < 16; j++) qs[j] = (q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4;
    }
}

static void quantize_q4_0(const float *x, int64_t n, uint8_t *out) { q4_0_or_q5_0(x, n, out, 16); }
static void quantize_q5_0(const float *x, int64_t n, uint8_t *out) { q4_0_or_q5_0(x, n, out, 32); }

/* Q5_1: d = (max - min) / 31, m = min, q = trunc((x - min) / d + 0.5) through a uint8. */
static void quantize_q5_1(const float *x, int64_t n_blocks, uint8_t *out) {
    for (int64_t b = 0; b < n_blocks; b++, x += 32, out += 24) {
        float min = x[0], max = x[0];
        for (int j = 1; j < 32; j++) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 31.0f, id = d ? 1.0f / d : 0.0f;
        uint8_t q[32];
        for (int j = 0; j < 32; j++) q[j] = (uint8_t)c_to_int((x[j] - min) * id + 0.5f);
        put_f16(out, d);
        put_f16(out + 2, min);
        put_fifth_bits(out + 4, q);
        for (int j = 0; j < 16; j++) out[8 + j] = (q[j] & 0x0f) | (q[j + 16] & 0x0f) << 4;
    }
}

/* ------------------------------------------------------------ K-quants, 256-blocks */

/* make_qkx2_quants on LANES sub-blocks of n values, x[i][lane] with weights w[i][lane]:
   x ~= scale * L - the_min, L in 0..nmax, minimising the weighted squared error. Start from L
   spread over [min(min, 0), max], then for nstep + 1 grids of rmin + 0.1 * step + nmax levels
   over [min, max] round x, fit scale and min by weighted least squares, and keep the fit when its
   error is lower; each grid starts from the min of the best fit so far. The best L is not kept:
   it is redone at the end from the best grid's iscale and min (the same operations on the same
   floats). A flat sub-block (max == min) gets L = 0, scale 0. */
static void qkx2_lanes(int n, float x[][LANES], float w[][LANES], int nmax, float rmin, int nstep,
                       float *scale_out, float *the_min_out, float L[][LANES]) {
    float min[LANES], max[LANES], sum_w[LANES], sum_x[LANES], scale[LANES], best_error[LANES];
    float iscale[LANES], best_iscale[LANES], best_low[LANES], low[LANES], flat[LANES];
    float sum_l[LANES], sum_l2[LANES], sum_xl[LANES], error[LANES], aux[32][LANES];
    const float top = (float)nmax;
    for (int s = 0; s < LANES; s++) min[s] = max[s] = x[0][s], sum_w[s] = w[0][s], sum_x[s] = w[0][s] * x[0][s];
    for (int i = 1; i < n; i++)
        for (int s = 0; s < LANES; s++) {
            min[s] = x[i][s] < min[s] ? x[i][s] : min[s];
            max[s] = x[i][s] > max[s] ? x[i][s] : max[s];
            sum_w[s] += w[i][s];
            sum_x[s] += w[i][s] * x[i][s];
        }
    for (int s = 0; s < LANES; s++) {
        min[s] = min[s] > 0 ? 0 : min[s];
        flat[s] = max[s] == min[s];
        iscale[s] = top / (max[s] - min[s]);
        scale[s] = 1.0f / iscale[s];
        best_iscale[s] = iscale[s], best_low[s] = min[s], best_error[s] = 0.0f;
    }
    for (int i = 0; i < n; i++)
        for (int s = 0; s < LANES; s++) {
            float l = clampf((float)nearest_int(iscale[s] * (x[i][s] - min[s])), 0.0f, top);
            float diff = scale[s] * l + min[s] - x[i][s];
            best_error[s] += w[i][s] * (diff * diff);
        }
    for (int s = 0; s < LANES; s++) best_error[s] = flat[s] ? -INFINITY : best_error[s]; /* no grid beats it */
    for (int step = 0; step <= nstep; step++) {
        const float grid = rmin + 0.1f * (float)step + top;
        for (int s = 0; s < LANES; s++) {
            low[s] = min[s];
            iscale[s] = grid / (max[s] - min[s]);
            sum_l[s] = sum_l2[s] = sum_xl[s] = error[s] = 0.0f;
        }
        for (int i = 0; i < n; i++)
            for (int s = 0; s < LANES; s++) {
                float l = clampf((float)nearest_int(iscale[s] * (x[i][s] - low[s])), 0.0f, top);
                float wl = w[i][s] * l;
                aux[i][s] = l;
                sum_l[s] += wl;
                sum_l2[s] += wl * l;
                sum_xl[s] += wl * x[i][s];
            }
        float this_scale[LANES], this_min[LANES], D[LANES];
        for (int s = 0; s < LANES; s++) {
            D[s] = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s];
            this_scale[s] = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D[s];
            this_min[s] = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D[s];
            int positive = this_min[s] > 0; /* a min above zero is not allowed: refit the scale alone */
            this_scale[s] = positive ? sum_xl[s] / sum_l2[s] : this_scale[s];
            this_min[s] = positive ? 0.0f : this_min[s];
        }
        for (int i = 0; i < n; i++)
            for (int s = 0; s < LANES; s++) {
                float diff = this_scale[s] * aux[i][s] + this_min[s] - x[i][s];
                error[s] += w[i][s] * (diff * diff);
            }
        for (int s = 0; s < LANES; s++) {
            int better = D[s] > 0 && error[s] < best_error[s];
            best_error[s] = better ? error[s] : best_error[s];
            scale[s] = better ? this_scale[s] : scale[s];
            min[s] = better ? this_min[s] : min[s];
            best_iscale[s] = better ? iscale[s] : best_iscale[s];
            best_low[s] = better ? low[s] : best_low[s];
        }
    }
    for (int i = 0; i < n; i++)
        for (int s = 0; s < LANES; s++) {
            float l = clampf((float)nearest_int(best_iscale[s] * (x[i][s] - best_low[s])), 0.0f, top);
            L[i][s] = flat[s] ? 0.0f : l;
        }
    for (int s = 0; s < LANES; s++) scale_out[s] = flat[s] ? 0.0f : scale[s], the_min_out[s] = -min[s];
}

/* What Q4_K and Q5_K share, on 2 blocks (16 sub-blocks of 32, one per lane): each sub-block
   gets make_qkx2_quants with weights av_x + |x| (av_x: the sub-block's rms); its scale and min
   are stored as 6-bit multiples of d = max(scales)/63 and dmin = max(mins)/63, and its values
   rounded again against the stored ones. Writes each block's first 16 bytes (d, dmin, the 12
   bytes of scales) to head[b] and its levels in 0..nmax to L[b]. */
static void k_quant_with_mins(const float *x, int nmax, float rmin, int nstep, uint8_t head[2][16],
                              uint8_t L[2][256]) {
    float xt[32][LANES], wt[32][LANES], Lt[32][LANES], sum_x2[LANES], scales[LANES], mins[LANES];
    for (int s = 0; s < LANES; s++) sum_x2[s] = 0.0f;
    for (int i = 0; i < 32; i++)
        for (int s = 0; s < LANES; s++) xt[i][s] = x[32 * s + i], sum_x2[s] += xt[i][s] * xt[i][s];
    for (int s = 0; s < LANES; s++) sum_x2[s] = sqrtf(sum_x2[s] / 32.0f); /* now av_x */
    for (int i = 0; i < 32; i++)
        for (int s = 0; s < LANES; s++) wt[i][s] = sum_x2[s] + fabsf(xt[i][s]);
    qkx2_lanes(32, xt, wt, nmax, rmin, nstep, scales, mins, Lt);
    for (int b = 0; b < 2; b++) {
        const float *sc = scales + 8 * b, *mn = mins + 8 * b, *xb = x + 256 * b;
        float max_scale = 0.0f, max_min = 0.0f;
        for (int j = 0; j < 8; j++) {
            if (sc[j] > max_scale) max_scale = sc[j];
            if (mn[j] > max_min) max_min = mn[j];
        }
        const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        uint8_t ls[8], lm[8]; /* C's uint8_t = nearest_int(...): wrapped modulo 256, then at most 63 */
        for (int j = 0; j < 8; j++) {
            ls[j] = (uint8_t)nearest_int(inv_scale * sc[j]), ls[j] = ls[j] < 63 ? ls[j] : 63;
            lm[j] = (uint8_t)nearest_int(inv_min * mn[j]), lm[j] = lm[j] < 63 ? lm[j] : 63;
        }
        put_f16(head[b], max_scale / 63.0f);
        put_f16(head[b] + 2, max_min / 63.0f);
        /* sub-blocks 0..3: 6 bits in bytes 0..3 (scale) and 4..7 (min); 4..7: the low 4 bits in
           bytes 8..11 (scale low nibble, min high), the top 2 in bits 6..7 of bytes 0..3 / 4..7 */
        for (int j = 0; j < 4; j++) {
            head[b][4 + j] = ls[j] | (ls[j + 4] >> 4) << 6;
            head[b][8 + j] = lm[j] | (lm[j + 4] >> 4) << 6;
            head[b][12 + j] = (ls[j + 4] & 0x0f) | (lm[j + 4] & 0x0f) << 4;
        }
        const float d = f16_value(head[b][0] | head[b][1] << 8), dmin = f16_value(head[b][2] | head[b][3] << 8);
        for (int j = 0; j < 8; j++) {
            const float dj = d * (float)ls[j], mj = dmin * (float)lm[j];
            for (int i = 0; i < 32; i++) /* where dj is 0, the search's levels stay */
                L[b][32 * j + i] = dj != 0 ? (uint8_t)clampf((float)nearest_int((xb[32 * j + i] + mj) / dj), 0.0f,
                                                             (float)nmax)
                                           : (uint8_t)Lt[i][8 * b + j];
        }
    }
}

/* Runs `one(two blocks)` over n_blocks, the last odd block padded with a zero block. */
static void in_pairs(const float *x, int64_t n_blocks, uint8_t *out, int block_bytes,
                     void (*pair)(const float *x, uint8_t *out)) {
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) pair(x + 256 * b, out + block_bytes * b);
    if (b < n_blocks) {
        float padded[512] = {0};
        uint8_t two[2 * 210];
        memcpy(padded, x + 256 * b, 256 * sizeof(float));
        pair(padded, two);
        memcpy(out + block_bytes * b, two, block_bytes);
    }
}

/* Q4_K: 144 bytes, the 16 of the head | qs[128]: in each of 4 groups of 32 bytes, byte i holds
   value i of sub-block 2g (low nibble) and of sub-block 2g + 1 (high nibble). */
static void q4_k_pair(const float *x, uint8_t *out) {
    uint8_t head[2][16], L[2][256];
    k_quant_with_mins(x, 15, -1.0f, 20, head, L);
    for (int b = 0; b < 2; b++, out += 144) {
        memcpy(out, head[b], 16);
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 32; i++) out[16 + 32 * g + i] = L[b][64 * g + i] | L[b][64 * g + 32 + i] << 4;
    }
}

/* Q5_K: 176 bytes, the head | qh[32] | qs[128]: the low 4 bits packed as Q4_K's; bit 2g of qh[i]
   is the fifth bit of sub-block 2g's value i, bit 2g + 1 that of sub-block 2g + 1's. */
static void q5_k_pair(const float *x, uint8_t *out) {
    uint8_t head[2][16], L[2][256];
    k_quant_with_mins(x, 31, -0.5f, 15, head, L);
    for (int b = 0; b < 2; b++, out += 176) {
        memcpy(out, head[b], 16);
        for (int i = 0; i < 32; i++) {
            uint8_t qh = 0;
            for (int g = 0; g < 4; g++) qh |= (L[b][64 * g + i] >> 4) << (2 * g) | (L[b][64 * g + 32 + i] >> 4) << (2 * g + 1);
            out[16 + i] = qh;
        }
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 32; i++)
                out[48 + 32 * g + i] = (L[b][64 * g + i] & 0x0f) | (L[b][64 * g + 32 + i] & 0x0f) << 4;
    }
}

static void quantize_q4_k(const float *x, int64_t n, uint8_t *out) { in_pairs(x, n, out, 144, q4_k_pair); }
static void quantize_q5_k(const float *x, int64_t n, uint8_t *out) { in_pairs(x, n, out, 176, q5_k_pair); }

/* make_qx_quants (rmse_type 1, no importance) on LANES sub-blocks of 16, x[i][lane]:
   x ~= scale * (L - nmax), L - nmax in -nmax..nmax-1. The value of largest magnitude maps to
   -nmax; then grids of nmax + 0.1 * k levels (k = -9..9) are tried, each rounded and refitted by
   least squares with weights x^2, keeping the best (whose L is redone at the end). A sub-block
   whose largest |x| is below GROUP_MAX_EPS gets L = 0, scale 0. */
static void qx_lanes(float x[16][LANES], int nmax, float *scale_out, uint8_t L[16][LANES]) {
    float amax[LANES], max[LANES], wx[16][LANES], w[16][LANES], sumlx[LANES], suml2[LANES];
    float iscale[LANES], scale[LANES], best[LANES], best_iscale[LANES];
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    for (int s = 0; s < LANES; s++) amax[s] = max[s] = 0.0f;
    for (int i = 0; i < 16; i++)
        for (int s = 0; s < LANES; s++) {
            float ax = fabsf(x[i][s]);
            max[s] = ax > amax[s] ? x[i][s] : max[s];
            amax[s] = ax > amax[s] ? ax : amax[s];
            w[i][s] = x[i][s] * x[i][s];
            wx[i][s] = w[i][s] * x[i][s];
        }
    float grids[19] = {(float)-nmax}; /* C's start, -nmax / max; then -(nmax + 0.1 k) / max, k = -9..9 but 0 */
    for (int k = -9, t = 1; k <= 9; k++)
        if (k) grids[t++] = -((float)nmax + 0.1f * (float)k);
    for (int t = 0; t < 19; t++) {
        for (int s = 0; s < LANES; s++) iscale[s] = grids[t] / max[s], sumlx[s] = suml2[s] = 0.0f;
        for (int i = 0; i < 16; i++)
            for (int s = 0; s < LANES; s++) {
                float l = clampf((float)nearest_int(iscale[s] * x[i][s]), lo, hi);
                sumlx[s] += wx[i][s] * l;
                suml2[s] += (w[i][s] * l) * l;
            }
        for (int s = 0; s < LANES; s++) {
            int better = t == 0 || (suml2[s] > 0 && sumlx[s] * sumlx[s] > best[s] * suml2[s]);
            float fit = t == 0 && suml2[s] == 0 ? 0.0f : sumlx[s] / suml2[s];
            scale[s] = better ? fit : scale[s];
            best[s] = better ? scale[s] * sumlx[s] : best[s];
            best_iscale[s] = better ? iscale[s] : best_iscale[s];
        }
    }
    for (int i = 0; i < 16; i++)
        for (int s = 0; s < LANES; s++) {
            float l = clampf((float)nearest_int(best_iscale[s] * x[i][s]), lo, hi) + (float)nmax;
            L[i][s] = amax[s] < GROUP_MAX_EPS ? 0 : (uint8_t)l;
        }
    for (int s = 0; s < LANES; s++) scale_out[s] = amax[s] < GROUP_MAX_EPS ? 0.0f : scale[s];
}

/* Q6_K, 210 bytes: ql[128] | qh[64] | int8 scales[16] | f16 d. Each sub-block of 16 gets
   make_qx_quants(nmax 32); the scales are stored as int8 multiples of d = -(signed max)/128, and
   the values rounded again against the stored scale to q in 0..63. Per half h of 128 values
   (groups of 32 g = 0..3): byte i of ql[64h..+32] holds group 0's value i (low nibble) and group
   2's (high), ql[64h+32..+32] groups 1 and 3; qh[32h + i] the top 2 bits of groups 0..3. */
static void quantize_q6_k(const float *x, int64_t n_blocks, uint8_t *out) {
    for (int64_t b = 0; b < n_blocks; b++, x += 256, out += 210) {
        float xt[16][LANES], scales[16], max_scale = 0.0f, max_abs = 0.0f;
        uint8_t Lt[16][LANES], L[256];
        for (int i = 0; i < 16; i++)
            for (int s = 0; s < LANES; s++) xt[i][s] = x[16 * s + i];
        qx_lanes(xt, 32, scales, Lt);
        for (int j = 0; j < 16; j++)
            if (fabsf(scales[j]) > max_abs) max_abs = fabsf(scales[j]), max_scale = scales[j];
        if (max_abs < GROUP_MAX_EPS) {
            memset(out, 0, 210);
            continue;
        }
        const float iscale = -128.0f / max_scale;
        int8_t sc[16];
        put_f16(out + 208, 1.0f / iscale);
        const float d = f16_value(out[208] | out[209] << 8);
        for (int j = 0; j < 16; j++) {
            int32_t l = nearest_int(iscale * scales[j]);
            sc[j] = (int8_t)(l < 127 ? l : 127);
            out[192 + j] = (uint8_t)sc[j];
            const float dj = d * (float)sc[j];
            for (int i = 0; i < 16; i++) /* where dj is 0, the search's levels stay */
                L[16 * j + i] = dj != 0 ? (uint8_t)(clampf((float)nearest_int(x[16 * j + i] / dj), -32.0f, 31.0f) + 32.0f)
                                        : Lt[i][j];
        }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 32; i++) {
                const uint8_t *q = L + 128 * h + i;
                out[64 * h + i] = (q[0] & 0x0f) | (q[64] & 0x0f) << 4;
                out[64 * h + 32 + i] = (q[32] & 0x0f) | (q[96] & 0x0f) << 4;
                out[128 + 32 * h + i] = q[0] >> 4 | (q[32] >> 4) << 2 | (q[64] >> 4) << 4 | (q[96] >> 4) << 6;
            }
    }
}

/* ------------------------------------------------------------------ entry points */

enum { SRC_F32 = 0, SRC_F16 = 1, SRC_BF16 = 2 };
/* values widened at a time: 16 KB of float32, in L1/L2 beside the kernel's own; a multiple of
   512, so that a K-quant tile holds whole pairs of blocks (in_pairs pads only the last) */
#define TILE 4096

static void widen(const uint16_t *x, int src, int64_t n, float *out) {
    if (src == SRC_BF16) { /* bf16 is the top half of a float32 */
        for (int64_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)x[i] << 16;
            memcpy(out + i, &bits, 4);
        }
        return;
    }
    int64_t i = 0;
#ifdef __F16C__ /* 8 at a time (compilers do not vectorise the scalar conversion below) */
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
#endif
    for (; i < n; i++) out[i] = f16_value(x[i]);
}

typedef void (*kernel_fn)(const float *x, int64_t n_blocks, uint8_t *out);

static void from_source(kernel_fn kernel, int block_values, int block_bytes, const void *x, int src,
                        int64_t n_blocks, uint8_t *out) {
    if (src == SRC_F32) {
        kernel((const float *)x, n_blocks, out);
        return;
    }
    float tile[TILE];
    const int64_t per_tile = TILE / block_values;
    for (int64_t b = 0; b < n_blocks; b += per_tile) {
        const int64_t n = n_blocks - b < per_tile ? n_blocks - b : per_tile;
        widen((const uint16_t *)x + b * block_values, src, n * block_values, tile);
        kernel(tile, n, out + b * block_bytes);
    }
}

#define ENTRY(type, values, bytes)                                                               \
    void nanolora_quantize_##type(const void *x, int src, int64_t n_blocks, uint8_t *out) {      \
        from_source(quantize_##type, values, bytes, x, src, n_blocks, out);                      \
    }
ENTRY(q8_0, 32, 34)
ENTRY(q4_0, 32, 18)
ENTRY(q5_0, 32, 22)
ENTRY(q5_1, 32, 24)
ENTRY(q4_k, 256, 144)
ENTRY(q5_k, 256, 176)
ENTRY(q6_k, 256, 210)
