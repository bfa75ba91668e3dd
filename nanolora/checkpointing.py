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
  start a copy to pinned host memory on a side stream that first waits for the compute
  stream, and keep no reference to the GPU tensor: once the forward moves on, its memory is
  free (record_stream keeps the allocator from reusing it before the copy is done);
- unpack (when the block is recomputed, in backward): wait on the device for this input's
  copy back, hand it over without keeping a reference (so it is freed after this block's
  backward), and start copying the previous block's input back on the side stream, so it
  arrives while this block is recomputed and differentiated.

No host-device synchronisation anywhere: the streams wait on each other on the device. On a
CPU there is nothing to offload to; `offload` then keeps the inputs where they are.
"""
import torch
from torch.autograd.graph import saved_tensors_hooks

MODES = (False, True, "offload")


class _OffloadedInput:
    """One block input: in pinned host memory, and on its way back to the GPU once prefetched."""

    def __init__(self, tensor, stream):
        self.stream, self.device = stream, tensor.device
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(stream)
        self.gpu = self.ready = None
        self.fetched = 0

    def prefetch(self):
        """Start the copy back on the side stream (unless one is on its way)."""
        if self.gpu is not None:
            return
        # the memory it lands in may have been freed by kernels still queued on the compute stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.gpu = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)

    def fetch(self):
        """The tensor on the GPU, usable on the compute stream. It is handed over, not kept:
        once the block's recompute and backward are done nothing holds it, so at most the
        block being differentiated and the one prefetched have their inputs on the GPU (kept
        here, every fetched input would be back by the end of the backward, and the peak
        with them)."""
        self.prefetch()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.ready)
        self.gpu.record_stream(compute)  # allocated on the side stream, used and freed on this one
        tensor, self.gpu = self.gpu, None
        self.fetched += 1
        return tensor


class BlockInputOffloader:
    """The offloaded inputs of one forward pass's checkpointed blocks, in forward order."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device)
        self.inputs = []

    def hooks(self, block_input):
        """Saved-tensor hooks for the checkpoint call of the block whose input is block_input."""
        # the hooks outlive the forward (autograd keeps unpack with the saved tensor), so they
        # must not hold block_input itself: that would keep it on the GPU
        input_ptr, input_shape = block_input.data_ptr(), block_input.shape

        def pack(tensor):
            if tensor.data_ptr() != input_ptr or tensor.shape != input_shape:
                return tensor
            offloaded = _OffloadedInput(tensor, self.stream)
            self.inputs.append(offloaded)
            return offloaded

        def unpack(packed):
            if not isinstance(packed, _OffloadedInput):
                return packed
            index = self.inputs.index(packed)
            tensor = packed.fetch()
            if index > 0:  # backward runs the blocks in reverse: the previous one is next
                self.inputs[index - 1].prefetch()
            return tensor

        return saved_tensors_hooks(pack, unpack)


def offloader_for(mode, device):
    """A fresh BlockInputOffloader for one forward pass when mode is "offload" on CUDA, else None."""
    if mode not in MODES:
        raise ValueError(f"grad_checkpointing must be one of false, true, offload; got {mode!r}")
    return BlockInputOffloader(device) if mode == "offload" and device.type == "cuda" else None
