"""GGUF K-quant export: nanolora's export.py against llama.cpp's llama_model_quantize, same f16 file in.

    python bench/gguf_export.py /tmp/gguf_bench                          # 253M Llama, q4_k_m, all threads
    python bench/gguf_export.py /tmp/gguf_bench --quant q4_k_m q6_k q8_0 --repeat 2
    python bench/gguf_export.py /tmp/gguf_8b --shape llama3-8b --prepare_only   # the GPU machine: make the 8B
    python bench/gguf_export.py /tmp/gguf_8b --shape llama3-8b                  # files once, then time them

Made once in the folder, kept for reruns: a random-weight checkpoint of the shape
(bench/make_checkpoint.py) with a byte-level BPE tokenizer, its f16 GGUF (nanolora's writer),
and a LoRA adapter on every projection whose B is zero, so that the merged weights are the
f16 values exactly and the two outputs must be equal byte for byte. Then, each in a fresh
process, with the same number of threads:

    nanolora   export.py --base f16.gguf --adapter adapter --format gguf --quant Q [--device D]
               (read the f16 file, attach and merge the adapter, quantize, write)
    llama.cpp  llama_model_quantize(f16.gguf, ftype, nthread, pure for the single types) through llama-cpp-python
               (read, quantize, write)

and prints one row per quant: the wall seconds of each (best of --repeat), their ratio, and
how many tensors of nanolora's file equal llama.cpp's byte for byte. `uptime`'s load is
printed too: on a shared machine, numbers taken under load are not comparable.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTYPES = {"q4_k_m": 15, "q4_k": 14, "q6_k": 18, "q8_0": 7, "q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
LLAMA_CPP = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread, params.pure = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "pure"
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) == 0
"""


def prepare(folder: Path, shape: str):
    """The checkpoint, f16 GGUF and zero adapter of the module docstring (skipped if there)."""
    hf, f16, adapter = folder / "hf", folder / "f16.gguf", folder / "adapter"
    if not (hf / "config.json").exists():
        subprocess.run([sys.executable, ROOT / "bench/make_checkpoint.py", hf, "--shape", shape], check=True)
        write_bpe_tokenizer(hf)
    if not f16.exists() or not (adapter / "adapter_config.json").exists():
        sys.path.insert(0, str(ROOT))
        import torch
        from nanolora import load_model
        from nanolora.gguf_write import write_gguf_model
        from nanolora.lora import attach_lora
        from nanolora.peft import save_adapter
        model, tokenizer = load_model(hf, device="cpu", dtype=torch.bfloat16)
        write_gguf_model(model, tokenizer, f16, "f16", source=hf, device="cpu")
        attach_lora(model, "all", r=16, alpha=32)  # B = 0: the merge adds exactly zero
        save_adapter(model, adapter, base_model_name_or_path=str(hf))
    return f16, adapter


def write_bpe_tokenizer(folder: Path):
    """A small byte-level BPE (GPT-2's pre-tokenizer) in place of make_checkpoint's WordLevel,
    which GGUF has no tokenizer model for; embedding rows past it become [PAD] tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog; export is the last step of a run."] * 8
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))


def timed(command, env=None):
    """(wall seconds, CPU seconds) of running `command`: on a shared machine the CPU time (user
    + system, all threads) says what the work cost when the wall time says mostly the load."""
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    end = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime


def same_tensors(ours: Path, theirs: Path):
    """(tensors of `ours` whose type and bytes equal `theirs`', tensors) -- gguf-py reads both."""
    import gguf
    import numpy as np
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = total = 0
    for t in gguf.GGUFReader(ours).tensors:
        total += 1
        other = ref.get(t.name)
        same += bool(other is not None and other.tensor_type == t.tensor_type
                     and np.array_equal(np.asarray(t.data), np.asarray(other.data)))
    return same, total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", default="llama-250m", help="a bench/make_checkpoint.py shape")
    parser.add_argument("--quant", nargs="+", default=["q4_k_m"], choices=FTYPES)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for both (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="export.py --device (default: its own)")
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs each")
    parser.add_argument("--no_llama_cpp", action="store_true", help="time export.py alone")
    parser.add_argument("--prepare_only", action="store_true", help="make the checkpoint, f16 GGUF and adapter, then stop")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    f16, adapter = prepare(args.folder, args.shape)
    if args.prepare_only:
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torch's thread count
    rows = []
    for quant in args.quant:
        ours, theirs = args.folder / f"nanolora-{quant}.gguf", args.folder / f"llama.cpp-{quant}.gguf"
        export = [sys.executable, ROOT / "export.py", "--base", f16, "--adapter", adapter, "--format", "gguf",
                  "--quant", quant, "--out", ours, "--force"] + (["--device", args.device] if args.device else [])
        row = dict(quant=quant, nanolora=min(timed(export, env) for _ in range(args.repeat)))
        if not args.no_llama_cpp:
            # nanolora's single types put every 2-D weight in that type, as llama.cpp's "pure" mode
            # does (without it, llama.cpp's q4_0 stores output.weight in Q6_K); q4_k_m is the mix
            command = [sys.executable, "-c", LLAMA_CPP, f16, theirs, str(FTYPES[quant]), str(args.threads),
                       "mix" if quant == "q4_k_m" else "pure"]
            row["llama_cpp"] = min(timed(command) for _ in range(args.repeat))
            row["identical"] = "%d/%d" % same_tensors(ours, theirs)
        rows.append(row)
    device = args.device or ("cuda" if "cuda" in subprocess.run(
        [sys.executable, "-c", "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"],
        capture_output=True, text=True).stdout else "cpu")
    print(f"\n{args.shape}, {f16.stat().st_size / 1e9:.2f} GB f16 GGUF; {args.threads} threads; export.py on "
          f"{device}; load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    print("| quant | export.py wall s (CPU s) | llama_model_quantize wall s (CPU s) | ratio wall (CPU) | "
          "identical tensors |")
    print("|---|---|---|---|---|")
    nan = (float("nan"), float("nan"))
    for r in rows:
        (ours, ours_cpu), (theirs, theirs_cpu) = r["nanolora"], r.get("llama_cpp", nan)
        print(f"| {r['quant']} | {ours:.2f} ({ours_cpu:.1f}) | {theirs:.2f} ({theirs_cpu:.1f}) | "
              f"{ours / theirs:.2f} ({ours_cpu / theirs_cpu:.2f}) | {r.get('identical', '-')} |")


if __name__ == "__main__":
    main()
