"""The frozen base's GEMM in FP8 (opt-in: train.py --fp8 true, Ada/Hopper GPUs).

    y = x W^T  ~  (x8 W8^T) * sx * sw^T        x [T, in], W [out, in], y [T, out]

x and W are each rounded to float8 e4m3 (3 mantissa bits, largest 448) after a scale per row:

    sx[t] = max_i |x[t, i]| / 448,   x8[t, i] = e4m3(x[t, i] / sx[t])      (W likewise, per output row)

and torch._scaled_mm multiplies the e4m3 operands on the tensor cores at twice bf16's rate,
accumulates in fp32, applies sx [T, 1] and sw [1, out] to each output and rounds once to bf16.
A scale per row (not per tensor) keeps each token's and each output channel's own range:
one outlier row does not flush the others' small values to zero.

Only the base's forward GEMMs use it (the forward, and the checkpoint recompute). LoRA stays in
the compute dtype, and so does the backward: dL/dx = dL/dy W uses W in the compute dtype, the
usual straight-through choice for a frozen weight (the gradient of the bf16 model at the FP8
forward's activations). W is quantized where it is used, as NF4 is dequantized (into 1 byte
a value where the bf16 dequant takes 2), x once per group of projections that read it:
nothing is kept between steps, and the transients are at most a chunk's fp32 quotient
(CHUNK_VALUES) beyond the e4m3 copies.

fp8_matmul's output is bf16 whatever the compute dtype: under fp16 compute (reachable from
Python only; train.py computes in bf16 on every GPU with FP8) the base product is rounded to
bf16 first.

The reference is fp8_matmul_reference: the same roundings with the product in fp32.
"""
import torch

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
ALIGN = 16  # _scaled_mm's requirement on the inner and output sizes; other shapes stay in bf16
CHUNK_VALUES = 1 << 24  # quantize_rows' fp32 temporary: at most 64 MB (h at 32k tokens would be 1.9 GB)


def quantize_rows(t):
    """(t8 float8_e4m3fn [rows, cols], scale fp32 [rows, 1]) with t ~= t8 * scale: each row's
    largest |value| becomes 448 exactly. A row of zeros gets the scale of a tiny one (its
    values stay zero; no division by zero).
    Three passes over t in torch (the row maxima, t / scale in fp32, the cast into e4m3): for a
    16-bit weight as many bytes moved as the GEMM saves, which is why an NF4 weight takes the
    dequant kernel's one pass instead (lora_projections.fp8_weight); bench/fp8_gemm.py times both."""
    # the inf-norm is max |t| in one reduction, without abs()'s temporary; t / scale promotes
    # to fp32 inside the division (the same floats as t.float() / scale, one pass fewer)
    scale = torch.linalg.vector_norm(t, float("inf"), dim=1, keepdim=True).float().clamp(min=1e-30) / E4M3_MAX
    t8 = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    rows = max(1, CHUNK_VALUES // max(t.shape[1], 1))
    for start in range(0, t.shape[0], rows):  # the fp32 quotient a chunk at a time, not t's size in fp32
        t8[start:start + rows] = t[start:start + rows] / scale[start:start + rows]
    return t8, scale


def fp8_matmul(x8, x_scale, w8, w_scale):
    """(x8 w8^T) * x_scale * w_scale^T in bf16: x8 [T, in], w8 [out, in] e4m3 with their
    quantize_rows scales."""
    return torch._scaled_mm(x8, w8.T, scale_a=x_scale, scale_b=w_scale.T, out_dtype=torch.bfloat16)


def fp8_matmul_reference(x, w):
    """x W^T with x and W rounded as fp8_matmul rounds them, multiplied in fp32, rounded to bf16."""
    (x8, sx), (w8, sw) = quantize_rows(x), quantize_rows(w)
    return ((x8.float() * sx) @ (w8.float() * sw).T).to(torch.bfloat16)


def fits(x, w) -> bool:
    """Whether _scaled_mm takes these shapes (inner and output sizes multiples of ALIGN)."""
    return x.shape[-1] % ALIGN == 0 and w.shape[0] % ALIGN == 0
