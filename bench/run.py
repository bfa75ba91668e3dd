"""nanolora beside its peers, on the GPU machine: one command, one table.

    python bench/run.py                                  # PEERS.md's 8B setup, every system
    python bench/run.py --configs nf4:2x2048 --systems nanolora,hf

For each (weights, batch x seq) config, each system runs in its own process
(bench/step_time.py: load, LoRA r=16 on all seven projections, gradient checkpointing,
3 warm-up + 8 timed steps), so that peak memory is its own. The random checkpoint is made
once (bench/make_checkpoint.py). Peers: HF transformers + PEFT (+ bitsandbytes for NF4) and
Unsloth, from a folder made by ../shared/tools/peer-site.sh and put on PYTHONPATH. A system
that fails is reported as such; the table still prints.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = {"nanolora": "nanolora", "hf": "HF transformers + PEFT (+ bnb)", "unsloth": "Unsloth"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default="/tmp/llama8b")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--configs", default="nf4:2x2048,bf16:2x2048,nf4:1x8192")
    parser.add_argument("--systems", default="nanolora,hf,unsloth")
    parser.add_argument("--jsonl", default=None, help="also append every result here")
    args = parser.parse_args()
    if not Path(args.checkpoint, "config.json").exists():
        subprocess.run([sys.executable, HERE / "make_checkpoint.py", args.checkpoint, "--shape", args.shape], check=True)

    results = []
    for config in args.configs.split(","):
        weights, shape = config.split(":")
        batch, seq = shape.split("x")
        for system in args.systems.split(","):
            cmd = [sys.executable, HERE / "step_time.py", system, args.checkpoint, "--batch", batch, "--seq", seq]
            cmd += ["--nf4"] if weights == "nf4" else []
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode or not lines:
                error = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{system} {config}: FAILED ({error})", file=sys.stderr)
                results.append(dict(system=system, weights=weights, batch=int(batch), seq=int(seq), error=error))
                continue
            results.append(json.loads(lines[-1]))
            print(f"{system} {config}: {results[-1]['tokens_per_s']:,.0f} tok/s, {results[-1]['peak_gib']:.2f} GiB",
                  file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(lines[-1] + "\n")

    print("\n| system | base weights | batch x seq | tokens/s | peak GiB | speed vs HF | speed vs Unsloth | memory vs HF | memory vs Unsloth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = {p["system"]: p for p in results
                if (p["weights"], p["batch"], p["seq"]) == (r["weights"], r["batch"], r["seq"]) and "error" not in p}
        row = f"| {NAMES[r['system']]} | {r['weights']} | {r['batch']} x {r['seq']} |"
        if "error" in r:
            print(row + f" failed: {r['error'][:60]} | | | | | |")
            continue
        ratios = []
        for key in ("tokens_per_s", "peak_gib"):
            for peer in ("hf", "unsloth"):
                ok = r["system"] == "nanolora" and peer in same
                ratios.append(f"{r[key] / same[peer][key]:.2f}x" if ok else "")
        print(row + f" {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
