"""nanolora beside its peers, on the GPU machine: one command, one table.

    python bench/run.py                                  # the five rows of PEERS.md, every system
    python bench/run.py --configs 8b:nf4:2x2048 --systems nanolora,nanolora-ref,unsloth

A config is model:weights:batchxseq (model 8b = Llama-3-8B shapes, 1b = Llama-3.2-1B shapes).
System `nanolora` runs train.py's defaults for fixed shapes: the micro-step replayed as a CUDA
graph, the checkpointed block inputs offloaded to CPU memory. `nanolora-keep` keeps those
inputs on the GPU (--grad_checkpointing true); `nanolora-eager` launches every kernel from
Python (--cuda_graphs false, inputs kept); `nanolora-ref` is eager with NANOLORA_KERNELS=0 (the
torch references, no fused kernels), so one table shows what each part buys.
HF is skipped from 32k tokens on (it needs ~61 GiB and minutes per step there; PEERS.md has
its number).

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
NAMES = {"nanolora": "nanolora", "nanolora-ref": "nanolora, NANOLORA_KERNELS=0",
         "nanolora-keep": "nanolora, --grad_checkpointing true",
         "nanolora-eager": "nanolora, --cuda_graphs false",
         "hf": "HF transformers + PEFT (+ bnb)", "unsloth": "Unsloth"}
CHECKPOINTS = {"8b": ("/tmp/llama8b", "llama3-8b"), "1b": ("/tmp/llama1b", "llama3.2-1b")}
DEFAULT_CONFIGS = "8b:nf4:2x2048,8b:bf16:2x2048,8b:nf4:1x8192,1b:nf4:4x2048,8b:nf4:1x32768"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--systems", default="nanolora,nanolora-keep,nanolora-eager,nanolora-ref,hf,unsloth")
    parser.add_argument("--jsonl", default=None, help="also append every result here")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of results saved by --jsonl")
    args = parser.parse_args()

    results = [json.loads(line) for path in args.table or [] for line in open(path) if line.strip()]
    for config in [] if args.table else args.configs.split(","):
        model, weights, shape = config.split(":")
        batch, seq = shape.split("x")
        checkpoint, model_shape = CHECKPOINTS[model]
        if not Path(checkpoint, "config.json").exists():
            subprocess.run([sys.executable, HERE / "make_checkpoint.py", checkpoint, "--shape", model_shape], check=True)
        for system in args.systems.split(","):
            if system == "hf" and int(batch) * int(seq) >= 32768:
                continue
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOLORA_KERNELS": "0" if system == "nanolora-ref" else "1"}
            cmd = [sys.executable, HERE / "step_time.py", system.split("-")[0], checkpoint, "--batch", batch, "--seq", seq]
            cmd += ["--nf4"] if weights == "nf4" else []
            if system.startswith("nanolora"):
                cmd += ["--checkpointing", "true"] if system == "nanolora-keep" else []
                cmd += ["--graphs", "false"] if system in ("nanolora-eager", "nanolora-ref") else []
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode or not lines:
                error = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{system} {config}: FAILED ({error})", file=sys.stderr)
                results.append(dict(system=system, model=model, weights=weights, batch=int(batch), seq=int(seq),
                                    error=error))
                continue
            results.append({**json.loads(lines[-1]), "system": system, "model": model})
            print(f"{system} {config}: {results[-1]['tokens_per_s']:,.0f} tok/s, {results[-1]['peak_gib']:.2f} GiB",
                  file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")

    print("\n| system | model | base weights | batch x seq | tokens/s | peak GiB | reserved GiB | speed vs HF | speed vs Unsloth | memory vs HF | memory vs Unsloth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        same = {p["system"]: p for p in results
                if (p["model"], p["weights"], p["batch"], p["seq"]) == (r["model"], r["weights"], r["batch"], r["seq"])
                and "error" not in p}
        row = f"| {NAMES[r['system']]} | {r['model']} | {r['weights']} | {r['batch']} x {r['seq']} |"
        if "error" in r:
            print(row + f" failed: {r['error'][:60]} | | | | | | |")
            continue
        ratios = []
        for key in ("tokens_per_s", "peak_gib"):
            for peer in ("hf", "unsloth"):
                ok = r["system"].startswith("nanolora") and peer in same
                ratios.append(f"{r[key] / same[peer][key]:.2f}x" if ok else "")
        reserved = r.get("peak_reserved_gib")
        print(row + f" {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {'' if reserved is None else f'{reserved:.2f}'} | "
              + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
