"""Activation checkpointing per block, optionally with each block's input offloaded to CPU memory.

With checkpointing, a block keeps nothing for its backward but its input: the backward
recomputes the block from it (torch.utils.checkpoint, non-reentrant). Those inputs are what
is left of the activations, [batch, seq, hidden] per block: 1 GiB for a 32-block 8B model at
2 x 2048 tokens, 8 GiB at 1 x 32768. `offload` moves each one to pinned CPU memory once its
block's forward is done and brings it back just before that block is recomputed:

- after block i's forward: a side stream waits for the compute stream, copies x_i to pinned
  host memory, and x_i's GPU storage is released (record_stream keeps the allocator from
  reusing it until the copy is done). The tensor object stays, only its bytes leave, so the
  recompute closure that holds x_i needs no change.
- when block i's recompute starts (in backward): x_i's storage was already reallocated and
  filled on the side stream (prefetched when block i+1's recompute started); the compute
  stream waits for that copy's event, and block i-1's input starts coming back, overlapped
  with block i's recompute and backward.

No host-device synchronisation anywhere: the streams wait on each other on the device. On a
CPU there is nothing to offload to; `offload` then keeps the inputs where they are.
"""
from contextlib import contextmanager, nullcontext

import torch

from nanolora import ops

MODES = (False, True, "offload")


class BlockInputOffloader:
    """The offloaded inputs of one forward pass's checkpointed blocks, by block index."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device)
        self.on_host = {}  # block index -> (GPU tensor with its storage released, pinned copy)
        self.ready = {}  # block index -> event: the tensor's bytes are back on the GPU

    @contextmanager
    def offload_after_forward(self, index, x):
        yield
        compute = torch.cuda.current_stream(x.device)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)
        x.untyped_storage().resize_(0)
        self.on_host[index] = (x, host)

    def prefetch(self, index):
        """Start bringing block `index`'s input back on the side stream (once)."""
        if index not in self.on_host:
            return
        x, host = self.on_host.pop(index)
        compute = torch.cuda.current_stream(x.device)
        x.untyped_storage().resize_(host.numel() * host.element_size())  # allocated for the compute stream
        self.stream.wait_stream(compute)  # the reused memory may still be read by queued kernels
        with torch.cuda.stream(self.stream), torch.no_grad():
            x.detach().copy_(host, non_blocking=True)  # detached: no autograd record of the refill
            self.ready[index] = torch.cuda.Event()
            self.ready[index].record(self.stream)
        x.record_stream(self.stream)

    @contextmanager
    def restore_before_recompute(self, index, x):
        self.prefetch(index)
        event = self.ready.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(x.device).wait_event(event)
        self.prefetch(index - 1)
        with ops.recomputing():
            yield


def checkpoint_contexts(offloader, index, x):
    """torch.utils.checkpoint's context_fn for block `index` with input x: what runs around
    its forward and around its recompute."""
    if offloader is None:
        return nullcontext(), ops.recomputing()
    return offloader.offload_after_forward(index, x), offloader.restore_before_recompute(index, x)


def offloader_for(mode, device):
    """A fresh BlockInputOffloader for one forward pass when mode is "offload" on CUDA, else None."""
    if mode not in MODES:
        raise ValueError(f"grad_checkpointing must be one of false, true, offload; got {mode!r}")
    return BlockInputOffloader(device) if mode == "offload" and device.type == "cuda" else None
