"""Activation checkpointing per block, optionally with each block's input offloaded to CPU memory.

With checkpointing, a block keeps nothing for its backward but its input: the backward
recomputes the block from it (torch.utils.checkpoint, non-reentrant). Those inputs are what
is left of the activations, [batch, seq, hidden] per block: 1 GiB for a 32-block 8B model at
2 x 2048 tokens, 8 GiB at 1 x 32768. `offload` moves each one to pinned CPU memory while the
step runs forward and brings it back just before its block is recomputed.

With `offload`, a block also keeps its attention output (and log-sum-exp) in CPU memory, so
that its recompute need not run the attention forward again (nanolora/kept_attention.py):
worth ~10% of an 8B step at 32k tokens, where the attention forward grows with the square of
the length, for one more [batch, seq, hidden] copy each way per block, and as much pinned CPU
memory again.

How: torch.utils.checkpoint keeps a block's inputs as saved tensors, so they pass through the
saved-tensor hooks active around the checkpoint call (inside the block, checkpoint's own hooks
take over). Around each block's call we install hooks that

- pack: for the block's input only (cos/sin and the mask are shared by all blocks and stay),
  copy it on a side stream, once the compute stream has made it, into a pinned host buffer
  kept for that block from step to step. The attention's keep() does the same with its
  tensors. The GPU tensors are let go at the next block's first copy, after the compute
  stream waits for theirs (they had the rest of a block's forward to finish);
- unpack (when the block is recomputed, in backward): copy the input back into memory taken
  from the compute stream's pool (where the inputs it gave up went), wait on the device for
  it, hand it over without keeping a reference (it is freed after this block's backward), and
  start bringing back this block's kept tensors and the previous block's input and kept
  tensors, so that they arrive while this block is recomputed and differentiated.

So at most two blocks' worth, and the block being differentiated, are on the GPU at a time.
No host-device synchronisation: the streams wait on each other on the device, and nothing
waits on a host-side event. That, the
buffers kept from step to step and no record_stream (the allocator defers frees of recorded
blocks while a CUDA graph is captured, which would keep every input) is also what lets a step
with offloading be captured in a CUDA graph (nanolora/cuda_graphs.py). On a CPU there is
nothing to offload to; `offload` then keeps the inputs where they are, and the attention is
recomputed.
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


_slots = {}  # (device, block index, position: 0 the input, then what the block keeps) -> _HostSlot
_streams = {}  # device -> the side stream the copies run on


class _Offloaded:
    """One tensor in its slot's host buffer (`host`); `gpu` holds it while on its way back.

    The host copy keeps the tensor's memory layout: `host` holds the tensor with its dimensions
    permuted (`order`) into the order they lie in memory, which makes it contiguous, and the
    tensor comes back permuted the other way, with the strides it left with. Kernels such as
    attention's backward read their saved tensors in the layout their forward wrote.
    """

    def __init__(self, slot, tensor):
        self.order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
        self.dense = tensor.detach().permute(self.order)  # the GPU original, until its copy is done
        self.slot, self.host = slot, slot.host(self.dense.shape, self.dense.dtype)
        self.gpu, self.fetched = None, 0

    def back_in_layout(self, dense):
        """dense, a copy of `host`, permuted back into the tensor's shape and strides."""
        return dense.permute([self.order.index(d) for d in range(dense.dim())])


class BlockOffloads:
    """What one checkpointed block keeps in CPU memory: its input, and the tensors its forward
    keeps for its recompute (ops.attention's output and log-sum-exp, nanolora/kept_attention.py)."""

    def __init__(self, offloader, index, block_input):
        self.offloader, self.index = offloader, index
        # the hooks outlive the forward (autograd keeps unpack with the saved tensor), so they
        # must not hold block_input itself: that would keep it on the GPU
        self.input_ptr, self.input_shape = block_input.data_ptr(), block_input.shape
        self.input = None  # the block input, once packed
        self.kept = []  # what keep() was given, in order
        self.taken = 0  # how many of `kept` the recompute took back

    def hooks(self):
        """Saved-tensor hooks for the block's checkpoint call: its input goes to CPU memory."""
        def pack(tensor):
            if tensor.data_ptr() != self.input_ptr or tensor.shape != self.input_shape:
                return tensor
            self.input = self.offloader.offload(tensor, self.index, 0)
            return self.input

        def unpack(packed):
            return self.offloader.bring_back(self) if isinstance(packed, _Offloaded) else packed

        return saved_tensors_hooks(pack, unpack)

    def keep(self, *tensors):
        """Called by the block's forward: these tensors go to CPU memory until its recompute."""
        for tensor in tensors:
            self.kept.append(self.offloader.offload(tensor, self.index, len(self.kept) + 1))

    def holds_kept(self) -> bool:
        """Whether keep() was given tensors the recompute has not taken back yet."""
        return self.taken < len(self.kept)

    def take(self):
        """Called by the block's recompute: what the matching keep() was given, back on the GPU."""
        start, self.taken = self.taken, len(self.kept)
        return tuple(self.offloader.arrived(o) for o in self.kept[start:])


class BlockOffloader:
    """The offloads of one forward pass's checkpointed blocks, in forward order."""

    def __init__(self, device):
        self.device = device
        if device not in _streams:
            _streams[device] = torch.cuda.Stream(device)
        self.stream = _streams[device]
        self.blocks = []
        # (_Offloaded, block index) whose GPU original is kept until the compute stream has
        # waited for its copy
        self.leaving = []

    def block(self, block_input):
        """The offloads of the next block, whose input is block_input."""
        self.blocks.append(BlockOffloads(self, len(self.blocks), block_input))
        return self.blocks[-1]

    def _let_go(self, compute, but_block=None):
        """Let go of the tensors being copied out, but block `but_block`'s: the compute stream
        waits (on the device) for their copies, then their memory may be reused."""
        for offloaded, block in self.leaving:
            if block != but_block:
                compute.wait_event(offloaded.slot.copied)
                offloaded.dense = None
        self.leaving = [(offloaded, block) for offloaded, block in self.leaving if block == but_block]

    def offload(self, tensor, block, position):
        """Start copying tensor, on the side stream, into the pinned buffer kept for the
        `position`-th tensor (0: the input) of block `block`."""
        compute = torch.cuda.current_stream(self.device)
        # the previous block's copies had this block's forward so far to finish; its own are fresh
        self._let_go(compute, but_block=block)
        key = (self.device, block, position)
        if key not in _slots:
            _slots[key] = _HostSlot()
        offloaded = _Offloaded(_slots[key], tensor)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            offloaded.host.copy_(offloaded.dense, non_blocking=True)
            offloaded.slot.copied.record(self.stream)
        self.leaving.append((offloaded, block))
        return offloaded

    def _prefetch(self, offloaded, compute):
        """Start copying a tensor back (once), into memory of the compute stream's pool."""
        if offloaded.gpu is not None:
            return
        host = offloaded.host
        offloaded.gpu = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.stream.wait_stream(compute)  # that memory may still be read by queued kernels
        with torch.cuda.stream(self.stream):
            offloaded.gpu.copy_(host, non_blocking=True)
            offloaded.slot.ready.record(self.stream)

    def arrived(self, offloaded):
        """The tensor back on the GPU, once the compute stream has waited for its copy."""
        compute = torch.cuda.current_stream(self.device)
        self._let_go(compute)
        self._prefetch(offloaded, compute)
        compute.wait_event(offloaded.slot.ready)
        # handed over, not kept: kept, every input would be back by the end of the backward
        dense, offloaded.gpu = offloaded.gpu, None
        offloaded.fetched += 1
        return offloaded.back_in_layout(dense)

    def forward_done(self):
        """The backward recomputes the last block first, right after the loss: hand it its
        tensors as they still are on the GPU, where they wait for their copies to finish,
        instead of copying them back then (it waited 0.6 ms a step for that at 8B, 2 x 2048)."""
        if self.blocks:
            compute = torch.cuda.current_stream(self.device)
            for offloaded in [self.blocks[-1].input, *self.blocks[-1].kept]:
                offloaded.gpu = offloaded.dense
                offloaded.slot.ready.record(compute)

    def bring_back(self, block):
        """Block's input, when the backward recomputes it; and start bringing back what comes
        next: this block's kept tensors, and the previous block's input and kept tensors (the
        backward runs the blocks in reverse), so they arrive while this one is recomputed."""
        compute = torch.cuda.current_stream(self.device)
        tensor = self.arrived(block.input)
        block.taken = 0
        for offloaded in block.kept:
            self._prefetch(offloaded, compute)
        if block.index > 0:
            previous = self.blocks[block.index - 1]
            for offloaded in [previous.input, *previous.kept]:
                self._prefetch(offloaded, compute)
        return tensor


def offloader_for(mode, device):
    """A fresh BlockOffloader for one forward pass when mode is "offload" on CUDA, else None."""
    if mode not in MODES:
        raise ValueError(f"grad_checkpointing must be one of false, true, offload; got {mode!r}")
    return BlockOffloader(device) if mode == "offload" and device.type == "cuda" else None
