"""One LoRA micro-step (forward, loss, backward) captured as a CUDA graph and replayed.

Why: a step launches ~30 kernels per block for the forward, again for the checkpoint
recompute, and ~40 for the backward, each prepared by Python (autograd, the checkpoint hooks,
Triton's launcher), and on an H200 that host work outruns the GPU's: at Llama-3.2-1B shapes
the GPU was busy 115 of a step's 165 ms (bench/profile_step.py). A replayed graph launches
all of it at once. Measured (bench/run.py, H200, NF4): 1B 4 x 2048 61,169 -> 66,092 tok/s,
8B 2 x 2048 10,357 -> 11,919-12,236.

How, per micro-batch shape:
1. the first micro-batch of a shape runs eagerly (on the side stream the capture will use, as
   torch asks, so that lazily made workspaces exist), accumulating its gradients as usual;
2. the same step is then captured: nothing runs, the kernels are recorded, reading the
   inputs from static buffers and adding into the very `.grad` tensors that exist now;
3. later micro-batches of that shape are copied into the static buffers and the graph
   replays. Gradients accumulate in place, so gradient accumulation stays exact.
All graphs share one memory pool: they run one at a time, and nothing allocated inside a
graph outlives its replay but the loss, which is read right after.

What the capture needs, and why each holds:
- every shape a graph, so lengths are padded on the right to a few bucket lengths (a quarter
  octave apart: at most 25% more tokens, ~4 shapes per doubling of length). That is exact:
  padded positions carry no label (their loss and its gradient are zero) and, with causal
  attention, no real token attends to a later, padded one. Packed rows (--pack true) are
  nearly full already, which is why train.py turns graphs on by itself only when packing.
  Their documents (nanolora/document_attention.py) are part of the shape too: their count
  and longest length, each rounded up to a power of two (a few values in a run);
- no host-device sync and no host-side state that changes between replays. The LoRA casts
  (ops.lora_weights_cast) are cached in Python between optimizer steps, so they are dropped
  before each capture (the graph recomputes them from the fp32 masters at every replay) and
  after it (eager code must not reuse tensors that live in the graph's pool);
- no RNG: LoRA dropout 0, and checkpointing told not to save RNG states (torch cannot read
  them while capturing);
- one process (DDP's all-reduce is not captured), LoRA not full fine-tuning (the graph would
  hold every weight's gradient), and the fused kernels on (the references sync nowhere
  either, but are not what this is for).
"""
import sys

import torch
import torch.nn.functional as F

from nanolora import ops
from nanolora.data import IGNORE
from nanolora.document_attention import Documents

# the value padding gets in each batch field
PAD_VALUES = {"input_ids": 0, "labels": IGNORE, "attention_mask": 0, "position_ids": 0, "segment_ids": 0}
MAX_GRAPHS = 48  # past this many shapes, new ones run eagerly (each graph costs a capture)


def bucket_length(seq: int) -> int:
    """seq rounded up to a multiple of 64, or of a quarter of the power of two below it when
    that is larger: 300 -> 320, 1000 -> 1024, 2048 -> 2048, 2049 -> 2560."""
    step = max(64, 2 ** (seq.bit_length() - 3))
    return -(-seq // step) * step


def why_not(model, device, *, world_size=1, full=False) -> str | None:
    """None when the micro-step can be graphed, else the reason in a few words."""
    if device.type != "cuda":
        return "not on CUDA"
    if world_size > 1:
        return "under torchrun"
    if full:
        return "full fine-tuning"
    if not ops.kernels_enabled():
        return "NANOLORA_KERNELS=0"
    if any(getattr(m, "p", 0.0) > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        return "LoRA dropout > 0"
    return None


def pad_to_bucket(batch: dict, length=bucket_length) -> dict:
    """The batch's [batch, seq] fields padded on the right to length(seq) tokens (a field that
    is None stays None: no mask means causal attention, and padding then needs none); packed
    rows' documents gain each row's padding as a document."""
    seq = batch["input_ids"].shape[1]
    extra = length(seq) - seq
    if not extra:
        return batch
    return {k: None if v is None else v.padded(seq + extra) if k == "documents" else
            F.pad(v, (0, extra), value=PAD_VALUES[k]) for k, v in batch.items()}


def _shape(value):
    """What a graph is captured for: a tensor's shape, or documents' count and longest length."""
    return None if value is None else value.key() if isinstance(value, Documents) else tuple(value.shape)


class GraphedMicroSteps:
    """Call with a micro-batch (a dict of train.py's batch fields, any device) and the factor
    its summed loss is multiplied by before backward; returns that summed loss (detached).
    Gradients accumulate into the parameters' `.grad` as `loss.backward()` would."""

    def __init__(self, model, params, autocast_dtype, scaler):
        self.model, self.params, self.scaler = model, list(params), scaler
        self.device = next(iter(self.params)).device
        self.dtype = autocast_dtype
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.loss_factor = torch.zeros((), device=self.device)
        self.graphs = {}  # shape key -> (graph, static inputs, static loss)
        self.grads = None  # the .grad tensors the graphs add into
        self.eager_shapes = 0

    def _micro_step(self, inputs):
        with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
            loss = self.model(**inputs)
        self.scaler.scale(loss * self.loss_factor).backward()
        return loss.detach()

    def _same_grads(self):
        """Put back the .grad tensors the graphs add into: zeroed where the optimizer set them
        to None, holding the values where something else replaced them."""
        to_zero = []
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                to_zero.append(g)
            elif p.grad is not g:
                g.copy_(p.grad)
            p.grad = g
        if to_zero:
            torch._foreach_zero_(to_zero)

    def __call__(self, batch: dict, loss_factor: float) -> torch.Tensor:
        with torch.cuda.device(self.device):  # streams, capture and replay on the model's GPU
            return self._call(batch, loss_factor)

    def _call(self, batch, loss_factor):
        batch = pad_to_bucket(batch)
        key = tuple((k, _shape(v)) for k, v in sorted(batch.items()))
        if self.grads is not None:
            self._same_grads()
        self.loss_factor.fill_(loss_factor)
        if key in self.graphs:
            graph, static, loss = self.graphs[key]
            for k, v in batch.items():
                if v is not None:
                    static[k].copy_(v, non_blocking=True)
            graph.replay()
            return loss.clone()
        inputs = {k: None if v is None else v.to(self.device) for k, v in batch.items()}
        if len(self.graphs) >= MAX_GRAPHS:
            if not self.eager_shapes:
                print(f"CUDA graphs: {MAX_GRAPHS} batch shapes captured; new ones run eagerly "
                      "(--pack true makes rows one length; each new power of two of a batch's documents, or of its "
                      "longest one, is a shape too)", file=sys.stderr)
            self.eager_shapes += 1
            return self._micro_step(inputs)
        return self._capture(key, inputs)

    def _capture(self, key, inputs):
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            loss = self._micro_step(inputs)  # this micro-batch's real work, eagerly
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        if self.grads is None:  # a parameter the step did not reach gets zeros, so the graph adds into it too
            self.grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, g in zip(self.params, self.grads):
                p.grad = g
        static = {k: v.clone() for k, v in inputs.items() if v is not None}
        static_inputs = {k: static.get(k) for k in inputs}
        graph = torch.cuda.CUDAGraph()
        preserve = self.model.preserve_rng_state
        self.model.preserve_rng_state = False
        ops.forget_lora_casts(self.model)
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                static_loss = self._micro_step(static_inputs)
        except RuntimeError as error:  # an op that syncs with the host, e.g. in a fork's model.py
            raise RuntimeError(f"capturing the micro-step as a CUDA graph failed ({str(error).splitlines()[0]}); "
                               "--cuda_graphs false runs it eagerly") from error
        finally:
            ops.forget_lora_casts(self.model)
            self.model.preserve_rng_state = preserve
        self.graphs[key] = (graph, static, static_loss)
        torch.cuda.empty_cache()  # the eager step's cached blocks: the graph has its own pool
        return loss
