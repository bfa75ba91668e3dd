"""Where a DDP step's time goes: the same 8B NF4 LoRA step in one process or under torchrun.

    python bench/ddp_step.py /tmp/llama8b none                               # one process
    torchrun --standalone --nproc_per_node 2 -- bench/ddp_step.py /tmp/llama8b ddp     # nanolora's DDP
    torchrun --standalone --nproc_per_node 2 -- bench/ddp_step.py /tmp/llama8b ddp25   # DDP's default buckets

Prints the mean step time over 6 steps after 3 warm-ups (each rank, on stderr, with its GPU),
then rank 0's kernel table of 2 profiled steps and the time its NCCL kernels ran (which
includes the time they spent waiting for the other rank). Run it with CUDA_VISIBLE_DEVICES=0
and =1 side by side to see whether the GPUs themselves differ.
"""
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanolora import distributed, load_model  # noqa: E402
from nanolora.lora import attach_lora, lora_parameters  # noqa: E402
from train import accumulate_gradients, count_labels  # noqa: E402

BATCH, SEQ = 2, int(os.environ.get("SEQ", 2048))


def main(path, mode):
    device = distributed.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(path, device=device, dtype=torch.bfloat16, load_in_4bit=True)
    attach_lora(model, "all", r=16, alpha=16)
    model.grad_checkpointing = True
    model.train()
    if mode == "ddp25":
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device], broadcast_buffers=False)
    else:
        train_model = distributed.parallelize(model, "ddp") if mode == "ddp" else model
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    no_scaling = torch.amp.GradScaler(device.type, enabled=False)
    gen = torch.Generator().manual_seed(distributed.rank())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
        mb = {"input_ids": ids, "labels": ids, "attention_mask": None, "position_ids": None, "segment_ids": None}
        # every rank's micro-batch has the same label count, so the window's is world x ours
        accumulate_gradients(train_model, [mb], count_labels([mb]) * distributed.world_size(), device, autocast,
                             no_scaling)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    t0 = time.time()
    for _ in range(6):
        step()
    sync()
    dt = (time.time() - t0) / 6
    print(f"[{mode} rank {distributed.rank()} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}] "
          f"step {dt * 1e3:.1f} ms, {BATCH * SEQ / dt:,.0f} tok/s per GPU", file=sys.stderr, flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        sync()
    if distributed.is_main():
        kernels = sorted((k for k in prof.key_averages() if k.self_device_time_total > 0),
                         key=lambda k: -k.self_device_time_total)
        for k in kernels[:22]:
            print(f"{k.self_device_time_total / 2e3:8.2f} ms {k.count // 2:6d}x  {k.key[:110]}")
        nccl = sum(k.self_device_time_total for k in kernels if "nccl" in k.key.lower())
        print(f"NCCL kernels per step {nccl / 2e3:.1f} ms")
    distributed.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
