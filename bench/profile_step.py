"""Where a nanolora LoRA step spends its GPU time, by kernel and by op.

    python bench/make_checkpoint.py /tmp/llama8b-4l --layers 4
    python bench/profile_step.py /tmp/llama8b-4l [--nf4] [--batch 2 --seq 2048]

Same setup as bench/step_time.py (r=16 on all seven projections, gradient checkpointing,
AdamW); prints torch.profiler's table of the heaviest CUDA kernels over 3 profiled steps.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanolora import load_model  # noqa: E402
from nanolora.lora import attach_lora, lora_parameters  # noqa: E402
from train import accumulate_gradients, count_labels  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--nf4", action="store_true")
parser.add_argument("--batch", type=int, default=2)
parser.add_argument("--seq", type=int, default=2048)
parser.add_argument("--rows", type=int, default=25)
parser.add_argument("--python", action="store_true", help="profile the Python (CPU) side with cProfile instead")
args = parser.parse_args()

model, _ = load_model(args.checkpoint, device="cuda", dtype=torch.bfloat16, load_in_4bit=args.nf4)
attach_lora(model, "all", r=16, alpha=16)
model.grad_checkpointing = True
model.train()
optimizer = torch.optim.AdamW(lora_parameters(model), lr=2e-4, fused=True)
autocast = torch.autocast("cuda", dtype=torch.bfloat16)
no_scaling = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda")
batch = {"input_ids": ids, "labels": ids, "attention_mask": None, "position_ids": None, "segment_ids": None}


def step():
    accumulate_gradients(model, [batch], count_labels([batch]), torch.device("cuda"), autocast, no_scaling)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
if args.python:  # where the host's time goes: for small models the GPU waits on it
    import cProfile
    import pstats
    with cProfile.Profile() as python_profile:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    pstats.Stats(python_profile).sort_stats("tottime").print_stats(args.rows)
    sys.exit()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
