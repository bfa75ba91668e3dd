"""GGUF block quantizers' throughput on the CPU, M values/s: nanolora's native (C) and torch paths
against llama.cpp's own (ggml_quantize_chunk from llama-cpp-python's libggml-base, one thread).

    python bench/gguf_quantize.py                 # torch's thread count (OMP_NUM_THREADS)
    python bench/gguf_quantize.py --threads 2 --shape 2816 1024

Columns: quantize() as export.py calls it (native, shared over the threads); one native call on
one thread (the C alone, no Python around it); quantize() on the torch path (NANOLORA_NATIVE=0);
llama.cpp on one thread (llama_model_quantize shares rows out to its threads the same way, so
times the thread count is its best case). Values: normal, 0.02 scale (weight-like).
"""
import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from nanolora import gguf_native  # noqa: E402
from nanolora.gguf_quantize import quantize  # noqa: E402


def best_rate(function, values: int, repeat: int) -> float:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return values / min(seconds) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", type=int, nargs=2, default=(2816, 1024), help="rows cols of the tensor")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    flat = x.numpy()
    ggml_quantize = None  # llama.cpp's own, through llama-cpp-python (a test-only reference), if installed
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        from test_gguf_quants import ggml_quantize
    lib = gguf_native.library()
    print(f"{args.threads} threads, tensor {tuple(x.shape)}, load average {os.getloadavg()[0]:.2f}; M values/s")
    print("| type | native quantize() | native, 1 call, 1 thread | torch quantize() | llama.cpp, 1 thread |")
    print("|---|---|---|---|---|")
    for type_name in gguf_native.TYPES:
        row = [type_name]
        os.environ.pop("NANOLORA_NATIVE", None)
        if lib is not None:
            function = getattr(lib, f"nanolora_quantize_{type_name.lower()}")
            out = np.empty(x.numel() * 2, np.uint8)
            n_blocks = x.numel() // (256 if type_name.endswith("_K") else 32)
            row += [best_rate(lambda: quantize(x, type_name), x.numel(), args.repeat),
                    best_rate(lambda: function(flat.ctypes.data, 0, n_blocks, out.ctypes.data), x.numel(), args.repeat)]
        else:
            row += [float("nan")] * 2
        os.environ["NANOLORA_NATIVE"] = "0"
        row.append(best_rate(lambda: quantize(x, type_name), x.numel(), 1))
        row.append(best_rate(lambda: ggml_quantize(flat, type_name), x.numel(), args.repeat)
                   if ggml_quantize else float("nan"))
        print("| " + " | ".join([row[0]] + [f"{v:.0f}" for v in row[1:]]) + " |")


if __name__ == "__main__":
    main()
