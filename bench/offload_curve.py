"""Offloaded checkpointing trains as kept-input checkpointing does: two 200-step loss curves.
With --variant fp8, what --fp8 true costs in loss against bf16 over the same curve.

    python bench/offload_curve.py                     # Llama-3.2-1B shapes, NF4, 4 x 1024, 200 steps
    python bench/offload_curve.py --steps 50 --shape llama-tiny --device cpu   # the CPU smoke run
    python bench/offload_curve.py --variant fp8       # bf16, --fp8 true, bf16 again (a GPU with FP8)

Runs `train.py` three times on one random-weight checkpoint (bench/make_checkpoint.py) and one
learnable synthetic dataset, logging every step: `--grad_checkpointing true`, then `offload`,
then `true` again. Both modes run the same kernels on the same bytes; offload only moves each
block's saved input to pinned host memory and back. So the offload curve should sit on the
`true` curve, as far from it as two `true` runs are from each other (the attention backward
of flash/cuDNN accumulates in no fixed order, so two runs of one mode can differ in the last
bits, and the difference grows over 200 steps of training). Prints the per-step differences
and exits 1 when offload's largest is more than twice the `true`-vs-`true` one plus 1e-3.

--variant fp8 runs train.py's defaults, then --fp8 true, then the defaults again. FP8 rounds
differently by design, so there is no bound to pass: it prints how far the FP8 curve is from
bf16's (per step, and the mean over the last tenth of the steps) beside two bf16 runs' noise.

The data: sequences that count up in a random step mod 1,000 (or a little under a smaller vocabulary) from a random start ("t17 t24
t31 ..."), tokens the WordLevel tokenizer of make_checkpoint.py knows. The rule is learnable,
so the curve falls rather than staying flat at log(vocabulary).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# --variant: (name of the baseline, its train.py flags), (name of the variant, its flags)
VARIANTS = {"offload": (("true", ["--grad_checkpointing", "true"]), ("offload", ["--grad_checkpointing", "offload"])),
            "fp8": (("bf16", []), ("fp8", ["--fp8", "true"]))}


def write_counting_data(path, n_rows, words, modulus, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_rows):
            start, stride = rng.randrange(modulus), rng.randrange(1, 50)
            f.write(json.dumps({"text": " ".join(f"t{(start + i * stride) % modulus}" for i in range(words))}) + "\n")


def losses(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: /tmp/<shape>, written if missing")
    parser.add_argument("--shape", default="llama3.2-1b", help="a bench/make_checkpoint.py shape")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--load_in_4bit", default="true")
    parser.add_argument("--lr", default="2e-4")
    parser.add_argument("--device", default="", help="train.py --device (default: its own)")
    parser.add_argument("--save", default=None, help="write the three curves here as JSON")
    parser.add_argument("--variant", choices=VARIANTS, default="offload")
    args = parser.parse_args()
    (base, base_flags), (variant, variant_flags) = VARIANTS[args.variant]
    again = f"{base} again"

    checkpoint = Path(args.checkpoint or f"/tmp/{args.shape}")
    if not checkpoint.exists():
        subprocess.run([sys.executable, HERE / "make_checkpoint.py", checkpoint, "--shape", args.shape], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "counting.jsonl"
        # enough rows that no example repeats within the run (packed: seq_len / words rows a sequence)
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        write_counting_data(data, args.steps * args.batch_size * (args.seq_len // 100 + 2), words=120,
                            modulus=min(1000, vocab - 16))
        curves = {}
        for name, flags in ((base, base_flags), (variant, variant_flags), (again, base_flags)):
            out = Path(tmp) / name.replace(" ", "_")
            cmd = [sys.executable, ROOT / "train.py", "--model", checkpoint, "--data", data, "--out", out,
                   "--load_in_4bit", args.load_in_4bit, *flags, "--pack", "true",
                   "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size),
                   "--max_steps", str(args.steps), "--lr", args.lr, "--warmup_steps", "10", "--log_every", "1",
                   "--save_every", "0", "--samples", "0", "--eval_size", "0"]
            if args.device:
                cmd += ["--device", args.device]
            print(f"{name}:", " ".join(map(str, cmd)), flush=True)
            result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            if result.returncode:
                sys.exit(f"train.py failed ({name}):\n{result.stdout[-2000:]}{result.stderr[-4000:]}")
            tail = [line for line in result.stdout.splitlines() if line.startswith("step ")][-1]
            print(f"  {tail}")
            curves[name] = losses(out)

    if args.save:
        Path(args.save).write_text(json.dumps(curves))
    steps = sorted(curves[base])

    def worst(a, b):
        return max(abs(curves[a][s] - curves[b][s]) for s in steps)

    def first_difference(a, b):
        return next((s for s in steps if curves[a][s] != curves[b][s]), None)
    strays, noise = worst(variant, base), worst(again, base)
    print(f"\nloss at step   1: {base} {curves[base][steps[0]]:.4f}, {variant} {curves[variant][steps[0]]:.4f}")
    for s in (10, 50, 100, 150, steps[-1]):
        if s in curves[base]:
            print(f"loss at step {s:3d}: {base} {curves[base][s]:.4f}, {variant} {curves[variant][s]:.4f}, "
                  f"{again} {curves[again][s]:.4f}")
    print(f"largest per-step loss difference over {len(steps)} steps: {variant} vs {base} {strays:.3g}, "
          f"{base} vs {base} {noise:.3g}")
    print(f"first step whose loss differs: {variant} vs {base} {first_difference(variant, base)}, "
          f"{base} vs {base} {first_difference(again, base)} (None: bit-equal throughout)")
    if args.variant == "fp8":  # a measurement, not a check: FP8 rounds differently by design
        last = steps[-max(1, len(steps) // 10):]
        mean = {name: sum(curves[name][s] for s in last) / len(last) for name in (base, variant, again)}
        print(f"mean loss over the last {len(last)} steps: {base} {mean[base]:.4f}, {variant} {mean[variant]:.4f} "
              f"({mean[variant] - mean[base]:+.4f}), {again} {mean[again]:.4f} ({mean[again] - mean[base]:+.4f})")
        return
    bound = 2 * noise + 1e-3
    print(f"{variant} follows {base}" if strays <= bound else f"{variant} strays from {base} (bound {bound:.3g})")
    sys.exit(0 if strays <= bound else 1)


if __name__ == "__main__":
    main()
