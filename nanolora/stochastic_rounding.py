"""Stochastic rounding of float32 to bf16: what both optimizers that step bf16 weights use
(full_finetune.AdamW, adamw_8bit.AdamW8bit, and kernels/adamw_8bit.py's integer ops).

A bf16 is the top 16 bits of a float32. Adding 16 uniformly random bits r in [0, 2^16) to the
low half of x's bit pattern and then zeroing that half rounds x up to the next bf16 exactly when
r >= 2^16 - low(x), that is with probability low(x) / 2^16 = (x - down) / (up - down), where
down and up are the bf16 values either side of x: E[result] = x, so updates far below a bf16
ulp survive in expectation instead of rounding away. The pattern is sign and magnitude, so it
works for negative x too (up means away from zero there), and a carry out of the mantissa moves
to the next binade, as it should.

The noise is drawn by torch, not inside a kernel, so the Triton kernel and the torch reference
add the same bits and agree bit for bit. It is drawn NOISE_CHUNK elements at a time, in order,
from one generator per (seed, parameter group, parameter index, step): a caller that takes it in
pieces of any multiple of NOISE_CHUNK sees the same stream, a resumed run draws the same noise
as an uninterrupted one, and DDP's replicas (same weights, same averaged gradients) stay
identical without communicating.
"""
import torch

NOISE_CHUNK = 1 << 20  # 4 MiB of int32 noise per draw


def rounding_generator(seed: int, group_index: int, param_index: int, step: int, device) -> torch.Generator:
    """The generator of one parameter's rounding noise at one step (hash of a tuple of ints:
    the same in every process, unlike a str's)."""
    return torch.Generator(device).manual_seed(hash((seed, group_index, param_index, step)) & (2**63 - 1))


def draw_noise(generator: torch.Generator, n: int, device) -> torch.Tensor:
    """The next n int32 values in [0, 2^16) of `generator`'s stream, drawn NOISE_CHUNK at a time."""
    noise = torch.empty(n, dtype=torch.int32, device=device)
    for piece in noise.split(NOISE_CHUNK):
        piece.random_(0, 2**16, generator=generator)
    return noise


def round_with_noise(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """float32 `x` -> bf16, with `noise` (int32 in [0, 2^16), x's shape) as the random low bits."""
    return ((x.view(torch.int32) + noise) & -(2**16)).view(torch.float32).to(torch.bfloat16)


def round_stochastically(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 `x` -> bf16, rounded up with probability (x - down) / (up - down)."""
    return round_with_noise(x, draw_noise(generator, x.numel(), x.device).view(x.shape))
