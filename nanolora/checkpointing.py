"""Activation checkpointing per block, optionally with each block's input offloaded to CPU memory.

With checkpointing, a block keeps nothing for its backward but its input: the backward
recomputes the block from it (torch.utils.checkpoint, non-reentrant). Those inputs are what
is left of the activations, [batch, seq, hidden] per block: 1 GiB for a 32-block 8B model at
2 x 2048 tokens, 8 GiB at 1 x 32768. `offload` moves each one to pinned CPU memory while the
step runs forward and brings it back just before its block is recomputed.

How: torch.utils.checkpoint keeps a block's inputs as saved tensors, so they pass through the
saved-tensor hooks active around the checkpoint call (inside the block, checkpoint's own hooks
take over). Around each block's call we install hooks that

- pack: for the block's input only (cos/sin and the mask are shared by all blocks and stay),
  copy it on a side stream, once the compute stream has made it, into a pinned host buffer
  kept for that block from step to step. The GPU tensor is let go at the next block's pack,
  after the compute stream waits for the copy (it had a whole block's forward to finish);
- unpack (when the block is recomputed, in backward): copy the input back into memory taken
  from the compute stream's pool (where the inputs it gave up went), wait on the device for
  it, hand it over without keeping a reference (it is freed after this block's backward), and
  start bringing the previous block's input back, so it arrives while this block is
  recomputed and differentiated.

So at most three block inputs are on the GPU at a time. No host-device synchronisation: the
streams wait on each other on the device, and nothing waits on a host-side event. That, the
buffers kept from step to step and no record_stream (the allocator defers frees of recorded
blocks while a CUDA graph is captured, which would keep every input) is also what lets a step
with offloading be captured in a CUDA graph (nanolora/cuda_graphs.py). On a CPU there is
nothing to offload to; `offload` then keeps the inputs where they are.
"""
import math

import torch
from torch.autograd.graph import saved_tensors_hooks

MODES = (False, True, "offload")


class _HostSlot:
    """A block's pinned host buffer and the events of its copies, kept from step to step.

    The buffer grows to the largest input seen; inputs use a prefix of it. The old buffer is
    freed when it grows, unless a CUDA graph captured copies to and from it: that graph's
    replays still use it, so it is kept (a graph per bucketed shape, cuda_graphs.py). Keyed on
    shapes instead, unpacked batches of ever new lengths would pin host memory without end.
    """

    def __init__(self):
        self.buffer, self.captured, self.kept = None, False, []
        self.copied, self.ready = torch.cuda.Event(), torch.cuda.Event()

    def host(self, shape, dtype):
        numel = math.prod(shape)
        if self.buffer is None or self.buffer.numel() < numel or self.buffer.dtype != dtype:
            if self.captured:
                self.kept.append(self.buffer)
            self.buffer, self.captured = torch.empty(numel, dtype=dtype, pin_memory=True), False
        self.captured = self.captured or _capturing()
        return self.buffer[:numel].view(shape)


def _capturing():
    return torch.cuda.is_current_stream_capturing()


_slots = {}  # (device, block index) -> _HostSlot
_streams = {}  # device -> the side stream the copies run on


class _OffloadedInput:
    """One block input, in its slot's host buffer (`host`); `gpu` holds it while on its way back."""

    def __init__(self, slot, host):
        self.slot, self.host, self.gpu, self.fetched = slot, host, None, 0


class BlockInputOffloader:
    """The offloaded inputs of one forward pass's checkpointed blocks, in forward order."""

    def __init__(self, device):
        self.device = device
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        self.stream = _streams[device]
        self.inputs = []
        self.leaving = None  # the last input packed, kept until the compute stream has waited for its copy

    def _let_go(self, compute):
        if self.leaving is not None:
            compute.wait_event(self.leaving[1])
            self.leaving = None

    def _pack(self, tensor):
        compute = torch.cuda.current_stream(self.device)
        self._let_go(compute)
        key = (self.device, len(self.inputs))
        if key not in _slots:
            _slots[key] = _HostSlot()
        slot = _slots[key]
        host = slot.host(tensor.shape, tensor.dtype)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(tensor.detach(), non_blocking=True)
            slot.copied.record(self.stream)
        self.leaving = (tensor, slot.copied)
        offloaded = _OffloadedInput(slot, host)
        self.inputs.append(offloaded)
        return offloaded

    def _prefetch(self, offloaded, compute):
        """Start copying an input back (once), into memory of the compute stream's pool."""
        if offloaded.gpu is not None:
            return
        host = offloaded.host
        offloaded.gpu = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.stream.wait_stream(compute)  # that memory may still be read by queued kernels
        with torch.cuda.stream(self.stream):
            offloaded.gpu.copy_(host, non_blocking=True)
            offloaded.slot.ready.record(self.stream)

    def _unpack(self, offloaded):
        compute = torch.cuda.current_stream(self.device)
        self._let_go(compute)
        self._prefetch(offloaded, compute)
        compute.wait_event(offloaded.slot.ready)
        # handed over, not kept: kept, every input would be back by the end of the backward
        tensor, offloaded.gpu = offloaded.gpu, None
        offloaded.fetched += 1
        index = self.inputs.index(offloaded)
        if index > 0:  # backward runs the blocks in reverse: the previous one is next
            self._prefetch(self.inputs[index - 1], compute)
        return tensor

    def hooks(self, block_input):
        """Saved-tensor hooks for the checkpoint call of the block whose input is block_input."""
        # the hooks outlive the forward (autograd keeps unpack with the saved tensor), so they
        # must not hold block_input itself: that would keep it on the GPU
        input_ptr, input_shape = block_input.data_ptr(), block_input.shape

        def pack(tensor):
            if tensor.data_ptr() != input_ptr or tensor.shape != input_shape:
                return tensor
            return self._pack(tensor)

        def unpack(packed):
            return self._unpack(packed) if isinstance(packed, _OffloadedInput) else packed

        return saved_tensors_hooks(pack, unpack)


def offloader_for(mode, device):
    """A fresh BlockInputOffloader for one forward pass when mode is "offload" on CUDA, else None."""
    if mode not in MODES:
        raise ValueError(f"grad_checkpointing must be one of false, true, offload; got {mode!r}")
    return BlockInputOffloader(device) if mode == "offload" and device.type == "cuda" else None
