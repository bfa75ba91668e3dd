"""AdamW with 8-bit optimizer state: the algorithm of bitsandbytes' ``AdamW8bit``, in-house.

AdamW keeps two moments per parameter, m (mean of gradients) and v (mean of squared
gradients). In fp32 that is 8 bytes per parameter, four times a bf16 model; here each moment
is one byte plus a float32 scale per block of 256 (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"):

    bytes of state per parameter = 2 * (1 + 4 / 256) = 2.03   (fp32 AdamW: 8; 75 % less)

Each moment tensor, flattened, is cut into blocks of BLOCKSIZE = 256 elements; block b stores
absmax[b] = max |value| (float32) and for each value the index of the nearest entry of a
256-value dynamic code (``nf4.dynamic_code``: a tiny float format, dense near 0, so small
moments keep their relative precision) to value / absmax[b]. m takes the signed code, v >= 0 the
unsigned one (twice as fine). The quantizer is the one NF4's double quantization already uses
(``nf4.quantize_dynamic_8bit``), which equals bitsandbytes' CPU ``quantize_blockwise``.

One step of one parameter p with gradient g (t = the parameter's step count, from 1), in
float32 throughout, every operation rounded on its own (no fused multiply-add), in this order:

    m = code_signed[m_q] * m_absmax[block]          dequantize (one multiply)
    v = code_unsigned[v_q] * v_absmax[block]
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p * (1 - lr * weight_decay)                 decoupled weight decay (AdamW), first
    p = p + (m / (sqrt(v) * (1 / c2) + eps)) * (-lr / c1)   c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
    m_q, m_absmax = quantize(m); v_q, v_absmax = quantize(v)   new absmax = max |new moment|

then p is cast back to its dtype: a bf16 parameter is rounded stochastically (below), any other
to nearest even. sqrt is the exactly rounded one; 1 / c2
is a float32 reciprocal of float32 c2 (torch computes ``x / scalar`` as ``x * (1 / scalar)``,
so that is what bitsandbytes' ``sqrt(v) / c2`` does on the CPU). This is torch.optim.AdamW's
update and bitsandbytes' CPU order. Its CUDA kernel differs in details: it decays p after the
update (a difference of lr^2 * weight_decay * update), divides by the new absmax with an
approximate division before searching the code, and moves a first-moment code whose sign
flipped in rounding to the next code of the right sign. We follow the CPU version, which the
tests compare against. The order is spelled out because kernels/adamw_8bit.py does the same
operations and matches this reference bit for bit.

bf16 parameters (``--full true`` on a GPU: no fp32 master copy) are rounded stochastically,
up with probability equal to the fraction of a bf16 ulp the float32 p lies above the bf16 below
it (nanolora/stochastic_rounding.py, the same rounding as full fine-tuning's AdamW): rounded to
nearest, every update below half an ulp of its weight (2^-9 of it; a fine-tuning lr of 1e-5 on
weights of ~0.02 is below that) is lost and training stalls (tests/test_adamw_8bit.py shows it).
The 16 random bits per element come from torch (``draw_noise``, one generator per parameter and
step), so the kernel adds the same bits as the reference; a resumed run draws the same noise.
fp16 parameters round to nearest: nanolora never steps fp16 weights (without bf16, full
fine-tuning keeps fp32 ones, and LoRA matrices are fp32).

Tensors with fewer than MIN_8BIT_SIZE (4096) elements (norm weights, biases) keep fp32 moments,
as bitsandbytes does: the blockwise overhead buys nothing there, and they are few.

The state of a parameter, saved in checkpoints as is (``state_dict``):
    step                 int, steps taken
    exp_avg, exp_avg_sq  uint8 [numel] codes (8-bit), or float32 [numel] moments (small tensors)
    exp_avg_absmax, exp_avg_sq_absmax   float32 [ceil(numel / 256)] (8-bit only)
"""
import math
from functools import lru_cache, partial

import torch

from nanolora import ops
from nanolora.stochastic_rounding import NOISE_CHUNK, draw_noise, round_with_noise, rounding_generator
from nanolora.nf4 import (DYNAMIC_CODE, DYNAMIC_CODE_UNSIGNED, dequantize_dynamic_8bit, grid_to_code_index,
                          quantize_dynamic_8bit)

BLOCKSIZE = 256  # bitsandbytes' block size for optimizer state
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' default min_8bit_size)
# The reference works on slices of this many elements (a multiple of BLOCKSIZE): its temporaries
# take ~70 bytes per element, so an embedding of 50M parameters does not cost 3.5 GB at once.
_CHUNK = NOISE_CHUNK  # 1 << 20; a multiple of NOISE_CHUNK, so the noise is drawn as the kernel draws it


@torch.no_grad()
def adamw_step_reference(param, grad, state, lr, beta1, beta2, eps, weight_decay, noise=None):
    """One AdamW step of one contiguous parameter, in place (param and state), with the
    state's ``step`` already counting this step. The order of operations is the module
    docstring's; kernels/adamw_8bit.py's ``adamw_step_triton`` takes the same arguments.
    ``noise``: for a stochastically rounded bf16 ``param``, a function n -> int32 [n], the next
    n elements' random low bits (``stochastic_rounding.draw_noise``), called in order."""
    t = state["step"]
    step_size, decay = -lr / (1 - beta1**t), 1 - lr * weight_decay  # rounded to float32 by the ops
    # torch computes `x / c2` as `x * (1 / c2)`, the reciprocal in float32: spelled out here
    inverse_correction2 = torch.tensor(math.sqrt(1 - beta2**t), dtype=torch.float32).reciprocal().item()
    quantized = "exp_avg_absmax" in state
    flat_param, flat_grad = param.view(-1), grad.reshape(-1)
    n = flat_param.numel()
    for start in range(0, n, _CHUNK):
        end = min(start + _CHUNK, n)
        elements, blocks = slice(start, end), slice(start // BLOCKSIZE, -(-end // BLOCKSIZE))
        g = flat_grad[elements].float()
        if quantized:
            m = dequantize_dynamic_8bit(state["exp_avg"][elements], state["exp_avg_absmax"][blocks], BLOCKSIZE)
            v = dequantize_dynamic_8bit(state["exp_avg_sq"][elements], state["exp_avg_sq_absmax"][blocks],
                                        BLOCKSIZE, signed=False)
        else:
            m, v = state["exp_avg"][elements], state["exp_avg_sq"][elements]
        m = m * beta1 + g * (1 - beta1)
        v = v * beta2 + (g * g) * (1 - beta2)
        p = flat_param[elements].float() * decay
        # sqrt in float64, rounded once to float32: the exact float32 square root (53 >= 2 * 24 + 2
        # bits, so the double rounding is harmless). torch's float32 sqrt on the CPU is not: on
        # large tensors (MKL) one result in ~140 is one ulp off, measured here.
        p = p + (m / (v.double().sqrt().float() * inverse_correction2 + eps)) * step_size
        flat_param[elements] = p if noise is None else round_with_noise(p, noise(end - start))
        if quantized:
            state["exp_avg"][elements], state["exp_avg_absmax"][blocks] = quantize_dynamic_8bit(m, BLOCKSIZE)
            state["exp_avg_sq"][elements], state["exp_avg_sq_absmax"][blocks] = quantize_dynamic_8bit(
                v, BLOCKSIZE, signed=False)
        else:
            state["exp_avg"][elements], state["exp_avg_sq"][elements] = m, v


@lru_cache(maxsize=8)
def code_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    """What the kernel looks codes up in, on ``device``: the signed and unsigned codes (float32
    [256]) and, for quantizing, their grid -> nearest-code tables (uint8 [65536])."""
    return (DYNAMIC_CODE.to(device), DYNAMIC_CODE_UNSIGNED.to(device),
            grid_to_code_index(device, True), grid_to_code_index(device, False))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored in 8 bits, blockwise (see the module docstring).

    Same hyperparameters as torch.optim.AdamW (and bitsandbytes' AdamW8bit); on CUDA the update
    of each parameter is one Triton launch (kernels/adamw_8bit.py), elsewhere (or with
    NANOLORA_KERNELS=0) the torch reference runs. ``min_8bit_size``: parameters with fewer
    elements keep fp32 moments. bf16 parameters are rounded stochastically (module docstring)
    unless ``stochastic_rounding`` is False; the noise of parameter i of group j at step t comes
    from a generator seeded with (seed, j, i, t), so resumed runs and DDP replicas draw the same.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 min_8bit_size=MIN_8BIT_SIZE, seed=0, stochastic_rounding=True):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and min_8bit_size >= 0):
            raise ValueError(f"AdamW8bit: lr, eps, weight_decay and min_8bit_size must be >= 0, got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, min_8bit_size={min_8bit_size}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise ValueError(f"AdamW8bit: betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size, self.seed, self.stochastic_rounding = min_8bit_size, seed, stochastic_rounding

    def _new_state(self, p) -> dict:
        n = p.numel()
        if n < self.min_8bit_size:
            return dict(step=0, exp_avg=torch.zeros(n, device=p.device), exp_avg_sq=torch.zeros(n, device=p.device))
        n_blocks = -(-n // BLOCKSIZE)
        # all-zero codes and scales read back as zero moments
        return dict(step=0,
                    exp_avg=torch.zeros(n, dtype=torch.uint8, device=p.device),
                    exp_avg_absmax=torch.zeros(n_blocks, device=p.device),
                    exp_avg_sq=torch.zeros(n, dtype=torch.uint8, device=p.device),
                    exp_avg_sq_absmax=torch.zeros(n_blocks, device=p.device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                # the update reads and writes a flat view: a non-contiguous parameter goes through a copy
                target = p if p.is_contiguous() else p.contiguous()
                noise = None
                if self.stochastic_rounding and p.dtype == torch.bfloat16:
                    generator = rounding_generator(self.seed, group_index, index, state["step"], p.device)
                    noise = partial(draw_noise, generator, device=p.device)  # n -> the next n elements' bits
                args = (target, p.grad.contiguous(), state, group["lr"], beta1, beta2, group["eps"],
                        group["weight_decay"])
                if ops.kernels_enabled() and p.is_cuda:
                    from nanolora.kernels.adamw_8bit import adamw_step_triton
                    adamw_step_triton(*args, tables=code_tables(p.device), noise=noise)
                else:
                    adamw_step_reference(*args, noise=noise)
                if target is not p:
                    p.copy_(target)
        return loss

    def load_state_dict(self, state_dict):
        """torch's load, which casts every floating state tensor (and our uint8 codes) to its
        parameter's dtype; the moments and scales are put back as saved, after checking that they
        belong to these parameters, so a bf16 parameter's state loads unchanged."""
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
        saved = [(index, p, state_dict["state"][i]) for index, (i, p) in enumerate(zip(saved_ids, params))
                 if i in state_dict.get("state", {})]
        for index, p, state in saved:
            _check_state(state, p, index)
        super().load_state_dict(state_dict)  # checks the groups
        for _, p, state in saved:
            self.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in state.items()}


def _check_state(state, p, index):
    """Refuse, in one line, a saved state that is not this optimizer's for parameter ``p``."""
    problem = _state_problem(state, p.numel())
    if problem:
        raise ValueError(f"optimizer state of parameter {index} (shape {list(p.shape)}): {problem}; not the "
                         "state of nanolora's AdamW8bit for this parameter (saved with another --optim?)")


def _state_problem(state, n: int) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, expected a dict"
    quantized = "exp_avg_absmax" in state
    moments = (torch.uint8, n) if quantized else (torch.float32, n)
    expected = {"exp_avg": moments, "exp_avg_sq": moments}
    if quantized:
        expected.update(exp_avg_absmax=(torch.float32, -(-n // BLOCKSIZE)),
                        exp_avg_sq_absmax=(torch.float32, -(-n // BLOCKSIZE)))
    if set(state) != {"step", *expected}:
        return f"keys {sorted(map(str, state))}, expected {sorted(['step', *expected])}"
    if type(state["step"]) is not int or state["step"] < 0:
        return f"step {state['step']!r} is not a count of steps"
    for key, (dtype, numel) in expected.items():
        value = state[key]
        if not torch.is_tensor(value) or value.dtype != dtype or value.numel() != numel:
            got = f"{value.dtype} {list(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            return f"{key} is {got}, expected {dtype} [{numel}]"
    return None
