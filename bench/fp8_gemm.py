"""Would an FP8 path for the frozen base's matmuls pay? The GEMMs of one Llama-3-8B block, bf16
against FP8 (torch._scaled_mm, e4m3, one scale per row of each operand), with what FP8 adds.

    python bench/fp8_gemm.py                 # H200: 2 x 2048 tokens, the 8B shapes
    python bench/fp8_gemm.py --tokens 8192

issue 8 offers `--fp8 true` as an opt-in extra. Before building it this measures, per
projection of the 8B block (x [T, in], W [out, in]):

    bf16 fwd     y = x W^T                                 what every step does today
    fp8 fwd      y = (x8 W8^T) * sx * sw                   x8, W8 e4m3; sx [T, 1], sw [1, out]
    quant x      x8 = x * 448 / max|row|, sx its inverse    fp8_matmul.quantize_rows: one kernel
    bf16 bwd     dx = dy W
    fp8 bwd      dx = (dy8 W8t^T) * sdy * swt              needs W^T in e4m3 too (W8t [in, out])
    quant dy     as quant x, for dy [T, out]
    fp8 dx       --fp8's dy W on an NF4 base: W^T into e4m3 by the transposed NF4 kernel, dy times W's
                 row scales quantized by row, the GEMM (and on a 16-bit base, W^T by quantize_rows_transposed)
    nf4 -> bf16  the dequantization an NF4 base pays per use today (kernels/nf4_dequant.py)
    nf4 -> e4m3  --fp8's: the NF4 weight scaled by row into e4m3 in one pass (the same kernel)
    quant W      a 16-bit weight's, the same way (--fp8 over a bf16 base, every use)

then the block's totals and the FP8 block's speed over bf16's, with and without the quant
passes (which a fused kernel could hide inside RMSNorm or the activation), and each FP8
output's error relative to the fp32 product. Times are CUDA-event medians of a CUDA graph's
replay (the GPU's time, as train.py's graphed steps pay it). On a machine without CUDA it
runs tiny shapes on the CPU: a check that it runs, not a measurement.

q/k/v and gate/up are timed as one stacked weight each. That is how their forwards run, but
in the backward --fp8 makes one fp8_input_grad per projection and adds each after the first
into dx in a pass (lora_projections.input_grad), so the per-block backward here is a lower
bound; bench/run.py's tokens/s are what a step pays.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanolora.kernels.fp8_matmul import fp8_input_grad, fp8_matmul, quantize_rows, quantize_rows_transposed  # noqa: E402

SHAPES_8B = [("q_proj+k_proj+v_proj", 4096, 6144), ("o_proj", 4096, 4096),
             ("gate_proj+up_proj", 4096, 28672), ("down_proj", 14336, 4096)]  # (name, in, out)


def timed(fn, repeat):
    """Median milliseconds of fn(): on CUDA, of a CUDA graph of it replayed (the GPU's time, as
    train.py's graphed steps pay it, without Python's launch gaps); wall clock on the CPU."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, cuBLAS picks) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(got, a, b_rows):
    exact = a.float() @ b_rows.float().T
    return ((got.float() - exact).norm() / exact.norm()).item()


def measure(name, tokens, d_in, d_out, device, repeat):
    from nanolora.nf4 import quantize_nf4
    from nanolora.ops import dequantize_nf4
    x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16)
    w = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16) * d_in ** -0.5
    dy = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
    w8, sw = quantize_rows(w)
    wt8, swt = quantize_rows(w.T.contiguous())
    x8, sx = quantize_rows(x)
    dy8, sdy = quantize_rows(dy)
    nf4 = quantize_nf4(w)
    from nanolora.kernels.lora_projections import fp8_weight
    row = dict(name=name, shape=f"{tokens}x{d_in} -> {d_out}",
               bf16_fwd=timed(lambda: x @ w.T, repeat), fp8_fwd=timed(lambda: fp8_matmul(x8, sx, w8, sw), repeat),
               quant_x=timed(lambda: quantize_rows(x), repeat),
               bf16_bwd=timed(lambda: dy @ w, repeat), fp8_bwd=timed(lambda: fp8_matmul(dy8, sdy, wt8, swt), repeat),
               quant_dy=timed(lambda: quantize_rows(dy), repeat),
               fp8_dx=timed(lambda: fp8_input_grad(dy, *fp8_weight(nf4, torch.bfloat16, transposed=True)), repeat)
               if x.is_cuda else float("nan"),
               fp8_dx_16=timed(lambda: fp8_input_grad(dy, *quantize_rows_transposed(w)), repeat),
               nf4=timed(lambda: dequantize_nf4(nf4, torch.bfloat16), repeat),
               # (a Triton kernel: on the CPU only in the interpreter, TRITON_INTERPRET=1)
               nf4_e4m3=timed(lambda: fp8_weight(nf4, torch.bfloat16), repeat) if x.is_cuda else float("nan"),
               quant_w=timed(lambda: quantize_rows(w), repeat),
               err_fwd=relative_error(fp8_matmul(x8, sx, w8, sw), x, w),
               err_bwd=relative_error(fp8_matmul(dy8, sdy, wt8, swt), dy, w.T))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (2 x 2048 by default)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if torch.cuda.is_available():
        if torch.cuda.get_device_capability() < (8, 9):
            sys.exit(f"{torch.cuda.get_device_name()}: FP8 matmuls need compute capability 8.9 or later (Ada, Hopper)")
        device, shapes, tokens = "cuda", SHAPES_8B, args.tokens
    else:  # a check that the script runs: tiny shapes, not a measurement
        device, tokens = "cpu", 32
        shapes = [(name, d_in // 64, d_out // 64) for name, d_in, d_out in SHAPES_8B]
        args.repeat = 2
    rows = [measure(name, tokens, d_in, d_out, device, args.repeat) for name, d_in, d_out in shapes]
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (tiny shapes: not a measurement)'}, "
          f"{tokens} tokens, median of {args.repeat}, ms")
    print("| projection | shape | bf16 fwd | fp8 fwd | quant x | bf16 bwd | fp8 bwd | quant dy | nf4 -> bf16 "
          "| nf4 -> e4m3 | quant W (bf16) | fp8 error fwd / bwd |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['shape']} | {r['bf16_fwd']:.3f} | {r['fp8_fwd']:.3f} | {r['quant_x']:.3f} | "
              f"{r['bf16_bwd']:.3f} | {r['fp8_bwd']:.3f} | {r['quant_dy']:.3f} | {r['nf4']:.3f} | "
              f"{r['nf4_e4m3']:.3f} | {r['quant_w']:.3f} | {r['err_fwd']:.4f} / {r['err_bwd']:.4f} |")
    total = {k: sum(r[k] for r in rows) for k in rows[0] if k not in ("name", "shape")}
    # a step runs each base GEMM forward twice (forward, checkpoint recompute) and backward once
    bf16 = 2 * total["bf16_fwd"] + total["bf16_bwd"]
    fp8_gemms = 2 * total["fp8_fwd"] + total["fp8_bwd"]
    fp8_all = fp8_gemms + 2 * total["quant_x"] + total["quant_dy"]
    fp8_fwd_only = 2 * (total["fp8_fwd"] + total["quant_x"]) + total["bf16_bwd"]
    print(f"\nper block and step (2 forwards + 1 backward): bf16 {bf16:.3f} ms; fp8 GEMMs alone {fp8_gemms:.3f} "
          f"({bf16 / fp8_gemms:.2f}x); fp8 with its quant passes {fp8_all:.3f} ({bf16 / fp8_all:.2f}x); "
          f"fp8 forwards only, bf16 backward {fp8_fwd_only:.3f} ({bf16 / fp8_fwd_only:.2f}x)")
    # what --fp8 does on an NF4 base: each forward dequantizes to e4m3 and quantizes x; the
    # backward dequantizes to e4m3 again and runs fp8_input_grad (dy scaled and quantized, W's
    # bytes transposed, the GEMM); "forwards only" is the backward as without FP8
    nf4_bf16 = 2 * (total["nf4"] + total["bf16_fwd"]) + total["nf4"] + total["bf16_bwd"]
    nf4_fp8_forward = 2 * (total["nf4_e4m3"] + total["quant_x"] + total["fp8_fwd"])
    nf4_fp8 = nf4_fp8_forward + total["fp8_dx"]  # (fp8_dx includes its transposed dequant)
    nf4_fwd_only = nf4_fp8_forward + total["nf4"] + total["bf16_bwd"]
    print(f"NF4 base, as --fp8 runs it: bf16 {nf4_bf16:.3f} ms, --fp8 {nf4_fp8:.3f} ({nf4_bf16 / nf4_fp8:.2f}x); "
          f"FP8 forwards only {nf4_fwd_only:.3f} ({nf4_bf16 / nf4_fwd_only:.2f}x); fp8_input_grad per block "
          f"{total['fp8_dx']:.3f} against bf16's dequant and dy W {total['nf4'] + total['bf16_bwd']:.3f}")

    # a 16-bit base: each forward quantizes W and x; the backward quantize_rows_transposed(W) and the rest
    bf16_fp8 = 2 * (total["quant_w"] + total["quant_x"] + total["fp8_fwd"]) + total["fp8_dx_16"]
    print(f"bf16 base, as --fp8 runs it: bf16 {bf16:.3f} ms, --fp8 {bf16_fp8:.3f} ({bf16 / bf16_fp8:.2f}x); "
          f"fp8_input_grad per block {total['fp8_dx_16']:.3f} against bf16's dy W {total['bf16_bwd']:.3f}")

if __name__ == "__main__":
    main()
