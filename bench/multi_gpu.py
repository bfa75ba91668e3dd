"""train.py under torchrun against one process, on a machine with two GPUs (or more).

    python bench/make_checkpoint.py /tmp/llama8b --shape llama3-8b
    python bench/multi_gpu.py /tmp/llama8b --out /tmp/multi_gpu

Each run is `python train.py` (one GPU) or `torchrun --nproc_per_node 2 -- train.py` on the same
checkpoint and the same data, with the same global batch: one GPU takes `--grad_accum 2` of
`--batch` rows, two ranks one micro-batch each, so the examples of every step are the same
(train.py draws the global window and deals it out). Reported per run, from rank 0's
metrics.jsonl (log_every 1): the median tokens/s of all ranks together after `--warmup` steps,
the peak GPU memory of rank 0, and the largest per-step loss difference from the one-GPU run
of the same base. The one-GPU runs go side by side on different GPUs; the torchrun runs one
after another.

The data is random "arithmetic" rows of the WordLevel vocabulary that make_checkpoint.py
writes (t{i} is token i): each row steps through 1,000 token ids with a stride of its own,
longer than --seq, so every row is truncated to exactly --seq tokens (no padding) and there is
something for LoRA to learn in 20 steps.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# NVLink multicast stays off (the GPU machines' KINDS.md: it can take the host's GPUs down)
SAFE_NCCL = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def write_data(path: Path, seq: int, rows: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            start, stride = rng.randrange(1000), rng.randrange(1, 50)
            ids = [3 + (start + k * stride) % 1000 for k in range(seq + 64)]
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")


def run(name, model, data, out, args, *, gpus, parallel=None, nf4=False, accum=1):
    """One training run; returns its metrics records (rank 0's)."""
    flags = ["--model", model, "--data", str(data), "--out", str(out / name), "--overwrite", "true",
             "--load_in_4bit", str(nf4).lower(), "--seq_len", str(args.seq), "--batch_size", str(args.batch),
             "--grad_accum", str(accum), "--max_steps", str(args.steps), "--log_every", "1", "--save_every", "0",
             "--eval_size", "0", "--samples", "0", "--lr", "2e-4", "--alpha", "16", "--warmup_steps", "2",
             "--group_by_length", "false", "--grad_checkpointing", "true"]
    if parallel:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}", "--",
                   str(ROOT / "train.py"), "--parallel", parallel] + flags
    else:
        command = [sys.executable, str(ROOT / "train.py")] + flags
    env = {**os.environ, **SAFE_NCCL, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def records(out, name):
    path = out / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--out", default="/tmp/multi_gpu")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="rows per micro-batch (per rank)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the tokens/s median")
    parser.add_argument("--runs", default="nf4-1gpu+bf16-1gpu,nf4-ddp,bf16-ddp,bf16-fsdp,nf4-fsdp",
                        help="comma-separated phases; runs joined by + go side by side")
    parser.add_argument("--tolerance", type=float, default=0.01, help="largest relative per-step loss difference")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.jsonl"
    write_data(data, args.seq, rows=args.batch * 2 * args.steps + 16)

    def start(name, gpus):
        base, mode = name.split("-")
        nf4 = base == "nf4"
        if mode == "1gpu":
            return run(name, args.model, data, out, args, gpus=gpus[:1], nf4=nf4, accum=2)
        return run(name, args.model, data, out, args, gpus=gpus[:2], parallel=mode, nf4=nf4)

    for phase in args.runs.split(","):
        names = phase.split("+")
        t0 = time.time()
        # side by side: the i-th run of a phase on GPU i (one-GPU runs), else all on GPUs 0 and 1
        procs = [start(n, [i] if n.endswith("1gpu") else [0, 1]) for i, n in enumerate(names)]
        for name, p in zip(names, procs):
            rc = p.wait()
            print(f"{name}: exit {rc} after {time.time() - t0:.0f}s" + ("" if rc == 0 else f" (see {out / name}.log)"),
                  flush=True)
            if rc:  # the ranks' exceptions, not torchrun's summary after them
                errors = [line for line in open(out / f"{name}.log") if "Error" in line or "error:" in line]
                print("".join(errors[-12:]), flush=True)

    print(f"\n| run | GPUs | tok/s (all ranks) | vs 1 GPU | peak GiB (rank 0) | max |loss - 1 GPU| / loss | "
          f"losses at steps 1, 10, {args.steps} |")
    print("|---|---|---|---|---|---|---|")
    for phase in args.runs.split(","):
        for name in phase.split("+"):
            r = records(out, name)
            if not r:
                print(f"| {name} | | no metrics | | | | |")
                continue
            base = name.split("-")[0]
            ref = {x["step"]: x["loss"] for x in records(out, f"{base}-1gpu")}
            speeds = [x["tokens_per_s"] for x in r if x["step"] > args.warmup]
            ref_speeds = [x["tokens_per_s"] for x in records(out, f"{base}-1gpu") if x["step"] > args.warmup]
            tok_s = statistics.median(speeds) if speeds else float("nan")
            ratio = tok_s / statistics.median(ref_speeds) if ref_speeds else float("nan")
            diffs = [abs(x["loss"] - ref[x["step"]]) / abs(ref[x["step"]]) for x in r if x["step"] in ref]
            worst = max(diffs) if diffs else float("nan")
            verdict = "" if name.endswith("1gpu") else (" ok" if worst <= args.tolerance else " OVER TOLERANCE")
            losses = {x["step"]: x["loss"] for x in r}
            shown = ", ".join(f"{losses[s]:.4f}" for s in (1, 10, args.steps) if s in losses)
            gpus = 1 if name.endswith("1gpu") else 2
            print(f"| {name} | {gpus} | {tok_s:,.0f} | {ratio:.2f}x | {r[-1]['peak_gib']:.2f} | {worst:.2e}{verdict} | "
                  f"{shown} |")


if __name__ == "__main__":
    main()
