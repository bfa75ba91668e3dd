"""What is live on the GPU at the peak of a nanolora LoRA step, and where the peak happens.

    python bench/make_checkpoint.py /tmp/llama8b-8l --layers 8
    python bench/memory_peak.py /tmp/llama8b-8l --nf4 [--batch 2 --seq 2048] [--checkpointing offload]

Same setup as bench/step_time.py (r=16 on all seven projections, gradient checkpointing,
AdamW). After two warm-up steps, one step runs under the CUDA allocator's history recorder;
its events are replayed (an allocation counts from `alloc` until `free_completed`, as
max_memory_allocated counts it) to find the moment of the peak, and the live allocations then
are printed grouped by size, the block inputs (batch x seq x hidden in bf16) named as such.
(Python stacks would say more, but recording them broke autograd.Function.apply on torch 2.11:
"returned NULL without setting an exception".)
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import nanolora_setup  # noqa: E402

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", choices=["true", "offload"], default="true")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    args.device, args.full, args.optim, args.lr, args.graphs = "cuda", False, "adamw", 2e-4, "false"  # replays allocate nothing
    args.docs, args.docs_masked = 1, False  # unpacked rows
    vocab, step, _ = nanolora_setup(args.checkpoint, args)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda")
    for _ in range(2):
        step(ids)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None)
    step(ids)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak = torch.cuda.max_memory_allocated()

    block_input = args.batch * args.seq * model_hidden(args.checkpoint) * 2
    events = snapshot["device_traces"][0]
    # requested: freed by their tensor but not yet by the allocator, which waits for the
    # streams the block was used on (record_stream) before it may count it free
    live, requested, total, best, best_live, best_requested, best_at = {}, set(), start, start, {}, 0, 0
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
            if total > best:
                best, best_live, best_at = total, dict(live), i
                best_requested = sum(live[a] for a in requested if a in live)
        elif event["action"] == "free_requested":
            requested.add(event["addr"])
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])
            requested.discard(event["addr"])
    print(f"{args.checkpoint} nf4={args.nf4} {args.batch}x{args.seq} checkpointing={args.checkpointing}")
    print(f"allocated before the step {start / 2**30:.3f} GiB; max_memory_allocated {peak / 2**30:.3f} GiB; "
          f"replayed peak {best / 2**30:.3f} GiB at event {best_at} of {len(events)}")
    groups = defaultdict(lambda: [0, 0])
    for size in best_live.values():
        site = f"{size / 2**20:.2f} MiB" + (" (a block input's size)" if size == block_input else "")
        groups[site][0] += size
        groups[site][1] += 1
    print(f"allocated during the step and live at the peak ({(best - start) / 2**30:.3f} GiB; "
          f"{best_requested / 2**20:.1f} MiB of it freed but waiting on another stream):")
    for site, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.rows]:
        print(f"  {size / 2**20:10.1f} MiB  {count:4d} x  {site}")


def model_hidden(checkpoint):
    import json
    return json.loads(Path(checkpoint, "config.json").read_text())["hidden_size"]


if __name__ == "__main__":
    main()
