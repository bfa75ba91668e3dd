"""nanolora beside its peers, on the GPU machine: one command, one table.

    python bench/run.py                                  # the five rows of PEERS.md, every system
    python bench/run.py --configs 8b:nf4:2x2048 --systems nanolora,nanolora-ref,unsloth
    python bench/run.py --slope                          # long context: 8B NF4 at 16k, 32k, 64k tokens
    python bench/run.py --configs 70b:nf4:1x2048 --systems nanolora,unsloth

A config is model:weights:batchxseq (model 8b = Llama-3-8B shapes, 1b = Llama-3.2-1B shapes,
70b = Llama-3-70B shapes, NF4 only: its checkpoint is written pre-quantized, ~37 GiB, by
make_checkpoint.py --nf4, and every system loads that same file as it is stored).
--slope runs the three long contexts (for nanolora and Unsloth unless --systems says
otherwise; 1 warm-up + 2 timed steps unless --warmup / --steps say otherwise, since peak
memory is what it measures) and adds a table of each system's GiB per 1,000 tokens and the
longest context that puts within 80 GB and 139 GiB (bench/long_context.py).
System `nanolora` runs train.py's defaults for fixed shapes: the micro-step replayed as a CUDA
graph, the checkpointed block inputs offloaded to CPU memory. `nanolora-keep` keeps those
inputs on the GPU (--grad_checkpointing true); `nanolora-eager` launches every kernel from
Python (--cuda_graphs false, inputs kept); `nanolora-ref` is eager with NANOLORA_KERNELS=0 (the
torch references, no fused kernels), so one table shows what each part buys. `nanolora-fp8`
is the default with the base's GEMMs in FP8 (--fp8 true, an opt-in of train.py; on a
GPU without FP8 matmuls its rows say so).
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

from long_context import SLOPE_CONFIGS, print_slope_table

HERE = Path(__file__).resolve().parent
NAMES = {"nanolora": "nanolora", "nanolora-ref": "nanolora, NANOLORA_KERNELS=0",
         "nanolora-keep": "nanolora, --grad_checkpointing true",
         "nanolora-eager": "nanolora, --cuda_graphs false", "nanolora-fp8": "nanolora, --fp8 true",
         "hf": "HF transformers + PEFT (+ bnb)", "unsloth": "Unsloth"}
CHECKPOINTS = {"8b": ("/tmp/llama8b", "llama3-8b"), "1b": ("/tmp/llama1b", "llama3.2-1b"),
               "70b": ("/tmp/llama70b-nf4", "llama3-70b")}
PREQUANTIZED = {"70b"}  # written as NF4 (bf16 would be 140 GB): nf4 rows only
DEFAULT_CONFIGS = "8b:nf4:2x2048,8b:bf16:2x2048,8b:nf4:1x8192,1b:nf4:4x2048,8b:nf4:1x32768"
DEFAULT_SYSTEMS = "nanolora,nanolora-keep,nanolora-eager,nanolora-ref,nanolora-fp8,hf,unsloth"
SLOPE_SYSTEMS = "nanolora,unsloth"


def parse_config(config):
    """"8b:nf4:2x2048" -> ("8b", "nf4", "2", "2048"), or a ValueError saying what is wrong."""
    parts = config.split(":")
    shape = parts[2].split("x") if len(parts) == 3 else []
    if len(shape) != 2 or not all(n.isdigit() and int(n) > 0 for n in shape):
        raise ValueError(f"config {config!r}: expected model:weights:BATCHxSEQ, e.g. 8b:nf4:2x2048")
    model, weights = parts[:2]
    if model not in CHECKPOINTS:
        raise ValueError(f"config {config!r}: model {model!r} is not one of {', '.join(CHECKPOINTS)}")
    if weights not in ("nf4", "bf16") or (model in PREQUANTIZED and weights != "nf4"):
        allowed = "nf4" if model in PREQUANTIZED else "nf4 or bf16"
        raise ValueError(f"config {config!r}: weights {weights!r} of model {model} must be {allowed}")
    return model, weights, *shape


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=None, help=f"default: {DEFAULT_CONFIGS}")
    parser.add_argument("--systems", default=None, help=f"default: {DEFAULT_SYSTEMS} ({SLOPE_SYSTEMS} with --slope)")
    parser.add_argument("--slope", action="store_true", help=f"the long-context configs {SLOPE_CONFIGS} and their slope")
    parser.add_argument("--warmup", type=int, default=None, help="step_time.py's --warmup (default 3; 1 with --slope)")
    parser.add_argument("--steps", type=int, default=None, help="step_time.py's --steps (default 8; 2 with --slope)")
    parser.add_argument("--jsonl", default=None, help="also append every result here")
    parser.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of results saved by --jsonl")
    args = parser.parse_args()
    if args.slope and args.configs:
        parser.error("--slope runs its own configs; give --configs or --slope, not both")
    configs = (SLOPE_CONFIGS if args.slope else args.configs or DEFAULT_CONFIGS).split(",")
    systems = (args.systems or (SLOPE_SYSTEMS if args.slope else DEFAULT_SYSTEMS)).split(",")
    for system in systems:
        if system not in NAMES:
            parser.error(f"--systems: {system!r} is not one of {', '.join(NAMES)}")
    try:
        configs = [(config, *parse_config(config)) for config in configs]
    except ValueError as e:
        parser.error(f"--configs: {e}")
    warmup = args.warmup if args.warmup is not None else 1 if args.slope else 3
    steps = args.steps if args.steps is not None else 2 if args.slope else 8
    if warmup < 0 or steps < 1:
        parser.error(f"--warmup must be at least 0 and --steps at least 1, got {warmup} and {steps}")

    results = [json.loads(line) for path in args.table or [] for line in open(path) if line.strip()]
    for config, model, weights, batch, seq in [] if args.table else configs:
        checkpoint, model_shape = CHECKPOINTS[model]
        if not Path(checkpoint, "config.json").exists():
            make = [sys.executable, HERE / "make_checkpoint.py", checkpoint, "--shape", model_shape]
            if subprocess.run(make + (["--nf4"] if model in PREQUANTIZED else [])).returncode:
                sys.exit(f"run.py: could not write {checkpoint} for {config} (make_checkpoint.py said why, above)")
        for system in systems:
            if system == "hf" and int(batch) * int(seq) >= 32768:
                continue
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOLORA_KERNELS": "0" if system == "nanolora-ref" else "1"}
            cmd = [sys.executable, HERE / "step_time.py", system.split("-")[0], checkpoint, "--batch", batch, "--seq", seq]
            cmd += (["--nf4"] if weights == "nf4" else []) + ["--warmup", str(warmup), "--steps", str(steps)]
            if system.startswith("nanolora"):
                cmd += ["--checkpointing", "true"] if system == "nanolora-keep" else []
                cmd += ["--graphs", "false"] if system in ("nanolora-eager", "nanolora-ref") else []
                cmd += ["--fp8"] if system == "nanolora-fp8" else []
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode or not lines:
                error = (run.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{system} {config}: FAILED ({error})", file=sys.stderr)
                results.append(dict(system=system, model=model, weights=weights, batch=int(batch), seq=int(seq),
                                    error=error))
                continue
            results.append({**json.loads(lines[-1]), "system": system, "model": model})
            if "error" in results[-1]:  # step_time.py reports running out of memory as a result
                print(f"{system} {config}: {results[-1]['error']}", file=sys.stderr, flush=True)
            else:
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
    print_slope_table(results, NAMES)


if __name__ == "__main__":
    main()
