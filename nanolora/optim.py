"""--optim: which optimizer train.py steps with.

    adamw       torch.optim.AdamW (fused on CUDA): fp32 moments, 8 bytes of state per parameter
    adamw_8bit  nanolora.adamw_8bit.AdamW8bit: blockwise 8-bit moments, 2.03 bytes per parameter
                (tensors under 4096 elements keep fp32 ones), bitsandbytes' AdamW8bit in-house
"""
import sys

import torch

from nanolora.adamw_8bit import AdamW8bit

OPTIMIZERS = ("adamw", "adamw_8bit")


def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device):
    """The optimizer ``name`` over ``params``; betas (0.9, 0.999) and eps 1e-8 for both."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if name == "adamw_8bit":
        params = list(params)
        if torch.distributed.is_available() and any(isinstance(p, _dtensor()) for p in params):
            # each rank would quantize its own shard in blocks that ignore the shard boundaries,
            # and the checkpoint's state gathering (torch.distributed.checkpoint) knows nothing of them
            raise ValueError("--optim adamw_8bit does not support --parallel fsdp (sharded parameters); "
                             "use --parallel ddp or --optim adamw")
        if any(p.dtype == torch.bfloat16 for p in params):  # --full true on a bf16 GPU
            print("warning: --optim adamw_8bit rounds bf16 weights to nearest (no stochastic rounding yet, unlike "
                  "--full true's adamw): updates below half a bf16 ulp of a weight are lost", file=sys.stderr)
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optim {name!r} is not one of {', '.join(OPTIMIZERS)}")


def _dtensor():
    from torch.distributed.tensor import DTensor  # FSDP2's parameters
    return DTensor
