"""What is live on the GPU at the peak of a nanolora LoRA step, and where the peak happens.

    python bench/make_checkpoint.py /tmp/llama8b-8l --layers 8
    python bench/memory_peak.py /tmp/llama8b-8l --nf4 [--batch 2 --seq 2048] [--checkpointing offload]

Same setup as bench/step_time.py (r=16 on all seven projections, gradient checkpointing,
AdamW). After two warm-up steps, one step runs under the CUDA allocator's history recorder;
its events are replayed (an allocation counts from `alloc` until `free_completed`, as
max_memory_allocated counts it) to find the moment of the peak, and the live allocations then
are printed grouped by the innermost nanolora / train.py / kernels frame that made them.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import nanolora_setup  # noqa: E402

OURS = ("nanolora/", "train.py", "kernels/")


def where(frames):
    """The innermost frame in our code, and the torch op just below it."""
    for i, f in enumerate(frames):
        if any(part in f["filename"] for part in OURS):
            below = frames[i - 1]["name"] if i else "?"
            return f"{Path(f['filename']).name}:{f['line']} {f['name']} ({below})"
    return "elsewhere: " + (frames[0]["name"] if frames else "?")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", choices=["true", "offload"], default="true")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    args.device, args.full, args.optim, args.lr = "cuda", False, "adamw", 2e-4
    vocab, step, _ = nanolora_setup(args.checkpoint, args)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
    for _ in range(2):
        step(ids)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    step(ids)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()

    live, total, best, best_live, best_event = {}, start, start, {}, None
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event["frames"]))
            total += event["size"]
            if total > best:
                best, best_live, best_event = total, dict(live), live[event["addr"]][1]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    print(f"{args.checkpoint} nf4={args.nf4} {args.batch}x{args.seq} checkpointing={args.checkpointing}")
    print(f"allocated before the step {start / 2**30:.3f} GiB; max_memory_allocated {peak / 2**30:.3f} GiB; "
          f"replayed peak {best / 2**30:.3f} GiB, reached at an allocation by {best_event}")
    groups = defaultdict(lambda: [0, 0])
    for size, site in best_live.values():
        groups[site][0] += size
        groups[site][1] += 1
    print(f"allocated during the step and live at the peak ({(best - start) / 2**30:.3f} GiB):")
    for site, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.rows]:
        print(f"  {size / 2**20:10.1f} MiB  {count:4d} x  {site}")


if __name__ == "__main__":
    main()
