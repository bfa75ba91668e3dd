"""--optim: which optimizer train.py steps with.

    adamw       torch.optim.AdamW (fused on CUDA): fp32 moments, 8 bytes of state per parameter
    adamw_8bit  nanolora.adamw_8bit.AdamW8bit: blockwise 8-bit moments, 2.03 bytes per parameter
                (tensors under 4096 elements keep fp32 ones), bitsandbytes' AdamW8bit in-house;
                bf16 weights (--full true on a GPU) are rounded stochastically, as full_finetune.AdamW does
"""
import torch

from nanolora.adamw_8bit import AdamW8bit

OPTIMIZERS = ("adamw", "adamw_8bit")


def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device, seed: int = 0,
                   full: bool = False):
    """The optimizer ``name`` over ``params``; betas (0.9, 0.999) and eps 1e-8 for both.
    ``seed``: of the stochastic rounding noise (adamw_8bit's, full fine-tuning's).
    ``full``: every weight trains (train.py --full true). `adamw` is then full_finetune.AdamW:
    16-bit weights with fp32 moments, each update rounded stochastically, as torch's AdamW on a
    bf16 weight would lose every update below its resolution."""
    if name == "adamw" and full:
        from nanolora.full_finetune import AdamW
        return AdamW(params, lr=lr, weight_decay=weight_decay, seed=seed)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if name == "adamw_8bit":
        params = list(params)
        if torch.distributed.is_available() and any(isinstance(p, _dtensor()) for p in params):
            # each rank would quantize its own shard in blocks that ignore the shard boundaries,
            # and the checkpoint's state gathering (torch.distributed.checkpoint) knows nothing of them
            raise ValueError("--optim adamw_8bit does not support --parallel fsdp (sharded parameters); "
                             "use --parallel ddp or --optim adamw")
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay, seed=seed)
    raise ValueError(f"--optim {name!r} is not one of {', '.join(OPTIMIZERS)}")


def _dtensor():
    from torch.distributed.tensor import DTensor  # FSDP2's parameters
    return DTensor
