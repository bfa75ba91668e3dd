"""torchrun: DDP or FSDP2 around a finished model, applied from outside (model.py never imports
torch.distributed). One process (no torchrun) goes through here untouched.

    torchrun --nproc_per_node 2 -- train.py --parallel ddp    # replicate the frozen base (default)
    torchrun --nproc_per_node 2 -- train.py --parallel fsdp   # shard it: FSDP2, one group per block, then the root

The arithmetic that makes N ranks train like one process (train.accumulate_gradients): every
rank draws the whole global window of micro-batches from the same seeded stream and keeps
every N-th one, so the examples of a step are those one process with N times the
accumulation would take. Holding the whole window, each rank counts its label tokens on the
host before the first backward, with no communication; each rank's summed loss is divided by
that global count and multiplied by N, because DDP and FSDP2 average the ranks' gradients:

    (1/N) sum_ranks N * loss_rank / n_global = d(sum of all label-token losses) / n_global

Gradients are reduced only in the last micro-batch's backward (DDP's no_sync, FSDP2's
set_requires_gradient_sync). NF4 weights are frozen uint8/fp32 parameters (nanolora/nf4.py),
so FSDP2 shards them like the rest; it all-gathers a block's mixed dtypes as bytes.
"""
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def setup(device: torch.device) -> torch.device:
    """Under torchrun (which sets WORLD_SIZE), join its process group (NCCL on GPUs, gloo on the
    CPU) and return this rank's device (cuda:LOCAL_RANK); `torchrun --nproc_per_node 1` too, so
    one GPU can check the DDP/FSDP2 paths. Ranks other than 0 print nothing: their stdout goes
    to /dev/null (errors still reach stderr). A plain `python train.py` is left as it is."""
    if "WORLD_SIZE" not in os.environ:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launch() -> str:
    """How this run was started, as --resume compares it."""
    return f"torchrun with {world_size()} process(es)" if dist.is_initialized() else "one process"


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first():
    """Rank 0 runs the block first (a download, a conversion into a cache), the others after it."""
    if world_size() > 1 and not is_main():
        dist.barrier()
    yield
    if world_size() > 1 and is_main():
        dist.barrier()


def load_device(device: torch.device, mode: str, load_in_4bit: bool) -> torch.device:
    """Where a rank loads the model. FSDP2 of a 16-bit base: the CPU, and fully_shard moves each
    block's shard to the GPU as it shards it, so no rank holds the whole model on its GPU (an
    8B bf16 model loaded whole first set the peak, 16 GiB per GPU, at 8 GiB of shards).
    NF4 quantizes on the GPU (minutes on a CPU for 8B) and is a quarter of the size."""
    if dist.is_initialized() and mode == "fsdp" and device.type == "cuda" and not load_in_4bit:
        return torch.device("cpu")
    return device


# Before torch 2.12, FSDP2 made every shard a Parameter that requires grad, which an integer
# tensor cannot be; NF4's uint8 codes then stay whole on every rank, as under DDP.
FSDP2_SHARDS_INTEGERS = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12)


def parallelize(model, mode: str):
    """The model the loop trains through: DDP around `model`, or `model` itself sharded in place
    by FSDP2 (fully_shard per block, then the root: each block's weights are all-gathered for
    its forward and backward and freed after). Unchanged in one process."""
    if not dist.is_initialized():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device = model.embed_tokens.weight.device
        # LoRA's gradients are small (168 MB for an 8B model at r=16: 0.6 ms to all-reduce over
        # NVLink), so all of them go in one bucket, reduced once the backward is done. DDP's
        # default 25 MB buckets overlap eight all-reduces with the backward, each one a sync
        # with the other rank that holds SMs while it waits (measured on 2 H200s, 8B NF4:
        # 393 ms a step with one bucket, 446 ms with eight). Gradients of GiBs keep the overlap.
        trainable_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
        bucket_mb = trainable_mb + 1 if trainable_mb <= 512 else 25
        # every rank loaded the same weights and seed; DDP still broadcasts rank 0's once
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       broadcast_buffers=False, bucket_cap_mb=bucket_mb)
    from torch.distributed.fsdp import fully_shard
    whole = None if FSDP2_SHARDS_INTEGERS else {p for p in model.parameters() if not p.is_floating_point()}
    if whole:
        print(f"FSDP2 in torch {torch.__version__} cannot shard NF4's uint8 codes: they stay whole on every "
              "GPU, so --parallel ddp is faster at about the same memory here (torch >= 2.12 shards them)")
    for block in model.layers:
        fully_shard(block, ignored_params=whole)
    return fully_shard(model, ignored_params=whole)


def gradient_sync(model, enabled: bool):
    """A context for one micro-batch's forward and backward: gradients are reduced across ranks
    only when `enabled` (the window's last micro-batch); before that they accumulate locally."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def sum_over_ranks(value, device):
    """`value` (a number or a tensor) summed over all ranks, as a tensor on `device`; `value`
    itself in one process. An all-reduce without a host sync: the loop keeps it on the device."""
    if world_size() == 1:
        return value
    total = torch.as_tensor(value, device=device).clone()
    dist.all_reduce(total)
    return total


def my_share(items: list) -> list:
    """This rank's share of `items` (every N-th, from its rank on) as (item, counts) pairs. Every
    rank gets the same number of pairs, a short share padding with (items[0], False): under
    FSDP2 every rank has to run every forward, even one whose result it discards."""
    n_per_rank = -(-len(items) // world_size())
    mine = [(item, True) for item in items[rank()::world_size()]]
    return mine + [(items[0], False)] * (n_per_rank - len(mine))


def whole(tensor):
    """A DTensor (a parameter or gradient norm sharded by FSDP2) gathered whole on every rank:
    a collective, so every rank calls it. Other tensors as they are."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local(tensor):
    """This rank's part of a DTensor (its shard); other tensors as they are."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@contextmanager
def unsharded(model):
    """Inside, FSDP2's root parameters (embedding, final norm, head) are whole on every rank, so
    a method other than forward (generate) can run; the blocks gather themselves as they run.
    Every rank must enter, and run the same computation. Nothing to do without FSDP2."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state for a checkpoint. Across ranks, FSDP2's shards are gathered into
    one full state on rank 0 (torch.distributed.checkpoint's API; a collective)."""
    if not dist.is_initialized():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict):
    """optimizer_state's inverse; every rank passes the full state it read, and keeps its shard."""
    if not dist.is_initialized():
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
