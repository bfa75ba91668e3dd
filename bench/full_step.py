"""Full fine-tuning on the GPU machine: the memory of an 8B-shaped step with each optimizer, and
a 1B-shaped model's speed beside HF's Trainer-free loop. One command, one table.

    python bench/full_step.py          # H200: ~3-4 minutes once the checkpoints exist (+~2 the first time)
    python bench/full_step.py --tiny   # CPU, a tiny random Llama: checks that the bench runs (numbers meaningless)

Rows, each in its own process (bench/step_time.py --full: load in bf16, every weight trainable,
gradient checkpointing, random tokens with labels = inputs, bf16 autocast), so that peak memory
is its own:

    8b  nanolora --optim adamw        batch 1 x 2048: peak memory (bf16 weights and gradients,
    8b  nanolora --optim adamw_8bit   fp32 or 8-bit moments; 1 warm-up + 2 timed steps, so the peak
                                      includes a step with the optimizer state allocated)
    1b  nanolora --optim adamw        batch 4 x 2048: tokens/s (2 warm-up + 5 timed steps)
    1b  nanolora --optim adamw_8bit
    1b  HF transformers + torch.optim.AdamW(fused): its bf16 weights, bf16 moments, gradient
        checkpointing (the plain loop people write without Trainer; test-only reference)

A run that runs out of GPU memory is a row that says "does not fit". The random checkpoints are
made once (bench/make_checkpoint.py: /tmp/llama8b, /tmp/llama1b, as bench/run.py's).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import CHECKPOINTS  # noqa: E402

TINY = ("/tmp/llama-tiny", "llama-tiny")
# (model, system, optimizer, batch, seq, warm-up steps, timed steps)
ROWS = [("8b", "nanolora", "adamw", 1, 2048, 1, 2), ("8b", "nanolora", "adamw_8bit", 1, 2048, 1, 2),
        ("1b", "nanolora", "adamw", 4, 2048, 2, 5), ("1b", "nanolora", "adamw_8bit", 4, 2048, 2, 5),
        ("1b", "hf", "adamw", 4, 2048, 2, 5)]
NAMES = {"nanolora": "nanolora --full true", "hf": "HF transformers + torch AdamW (fused)"}


def run_row(model, system, optim, batch, seq, warmup, steps, tiny):
    checkpoint, shape = TINY if tiny else CHECKPOINTS[model]
    if tiny:
        batch, seq, warmup, steps = min(batch, 2), 64, 1, 1
    if not Path(checkpoint, "config.json").exists():
        subprocess.run([sys.executable, HERE / "make_checkpoint.py", checkpoint, "--shape", shape], check=True)
    cmd = [sys.executable, HERE / "step_time.py", system, checkpoint, "--full", "--optim", optim, "--batch", str(batch),
           "--seq", str(seq), "--warmup", str(warmup), "--steps", str(steps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        result = dict(error=(done.stderr.strip().splitlines() or ["no output"])[-1])
    else:
        result = json.loads(lines[-1])
    return {**result, "model": model, "system": system, "optim": optim, "batch": batch, "seq": seq}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the bench runs")
    parser.add_argument("--jsonl", default=None, help="also append every result here")
    args = parser.parse_args()
    results = []
    for row in ROWS:
        r = run_row(*row, tiny=args.tiny)
        results.append(r)
        print(f"{r['model']} {r['system']} {r['optim']}: " + (r["error"] if "error" in r else
              f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_gib']:.2f} GiB"), file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")

    print("\n| model | system | optimizer | batch x seq | peak GiB | optimizer state GiB | tokens/s | step s "
          "| speed vs HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        row = f"| {r['model']} | {NAMES[r['system']]} | {r['optim']} | {r['batch']} x {r['seq']} |"
        if "error" in r:
            print(row + f" {r['error'][:90]} | | | | |")
            continue
        hf = [p for p in results if p["system"] == "hf" and p["model"] == r["model"] and "error" not in p]
        ratio = f"{r['tokens_per_s'] / hf[0]['tokens_per_s']:.2f}x" if hf and r["system"] != "hf" else ""
        print(row + f" {r['peak_gib']:.2f} | {r['optimizer_state_gib']:.2f} | {r['tokens_per_s']:,.0f} "
              f"| {r['step_s']:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
