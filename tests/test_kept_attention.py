"""nanolora/kept_attention.py: causal attention whose output is kept for the recompute gives
SDPA's output and gradients, whether the output was computed now or taken back from a keeper.
The block-level check (offloaded checkpointing, gradients bit-equal to no checkpointing) is in
tests/test_checkpointing.py."""
import pytest
import torch
import torch.nn.functional as F

from nanolora import kept_attention
from nanolora.ops import attention_reference

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def any_length(monkeypatch):
    """Short test sequences take the path too (it is for long ones, see MIN_LENGTH)."""
    monkeypatch.setattr(kept_attention, "MIN_LENGTH", 0)


class Keeper:
    """What checkpointing.BlockOffloads does, minus the offloading: keep, then take back."""

    def __init__(self):
        self.kept, self.takes = None, 0

    def keep(self, *tensors):
        self.kept = tensors

    def take(self):
        self.takes += 1
        return self.kept


def forward_and_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def kept_twice(q, k, v, dout, scale):
    """The forward pass keeps; a second call, as the recompute, takes back: its gradients."""
    keeper = Keeper()
    with torch.no_grad():
        first = kept_attention.KeptAttention.apply(q, k, v, scale, keeper, False)
    again = forward_and_grads(lambda *t: kept_attention.KeptAttention.apply(*t, scale, keeper, True), q, k, v, dout)
    assert keeper.takes == 1 and torch.equal(first, again[0])
    return again


def qkv(batch, heads, kv_heads, seq, dim, dtype, device):
    """q/k/v as model.py makes them: [batch, seq, heads, dim] projections viewed [batch, heads, seq, dim]."""
    g = torch.Generator(device).manual_seed(seq * heads + kv_heads)
    make = lambda h: torch.randn(batch, seq, h, dim, generator=g, device=device, dtype=dtype).transpose(1, 2)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    dout = torch.randn(batch, heads, seq, dim, generator=g, device=device, dtype=dtype)
    return q, k, v, dout


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_equals_sdpa_on_cpu(heads, kv_heads, scale):
    """On the CPU both run PyTorch's flash kernel: bit-equal, computed now or taken back."""
    q, k, v, dout = qkv(2, heads, kv_heads, 37, 16, torch.float32, "cpu")
    sdpa = forward_and_grads(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=heads != kv_heads), q, k, v, dout)
    now = forward_and_grads(lambda *t: kept_attention.KeptAttention.apply(*t, scale, Keeper(), False), q, k, v, dout)
    for a, b, c in zip(sdpa, now, kept_twice(q, k, v, dout, scale)):
        assert torch.equal(a, b) and torch.equal(a, c)
    # and SDPA is causal attention: the written-out reference agrees to fp32 rounding
    reference = forward_and_grads(lambda *t: attention_reference(*t, None, scale), q, k, v, dout)
    for a, b in zip(now, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_cases_fall_back(monkeypatch):
    q = torch.zeros(1, 2, 4, 8, device="meta")
    assert not kept_attention.supported(q, q, q)  # neither CPU nor CUDA
    q = torch.zeros(1, 2, 4, 8)
    assert kept_attention.supported(q, q, q)
    monkeypatch.setattr(kept_attention, "MIN_LENGTH", 5)
    assert not kept_attention.supported(q, q, q)  # too short to pay


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,heads,kv_heads,seq,dim", [(2, 32, 8, 2048, 128), (1, 8, 2, 123, 64),
                                                          (3, 12, 12, 517, 128), (1, 14, 2, 5, 64)])
def test_equals_sdpa_on_gpu(dtype, batch, heads, kv_heads, seq, dim):
    """cuDNN's kernels called directly, against SDPA's cuDNN path: the same output bits; the
    same gradients up to the order cuDNN's backward adds the grouped heads' dK/dV in (not fixed
    from run to run: a fp16 32/8-head case differed between two identical calls on an H200).
    Against the fp32 reference within what 16-bit inputs and outputs allow: 4 units in the last
    place (2^-8 bf16, 2^-11 fp16) of each output's largest value."""
    q, k, v, dout = qkv(batch, heads, kv_heads, seq, dim, dtype, "cuda")
    if not kept_attention.supported(q, k, v):
        pytest.skip("cuDNN attention does not cover this case on this GPU")
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11

    def close(a, b, units):
        return (a.float() - b.float()).abs().max().item() <= units * unit * b.float().abs().max().item()
    now = forward_and_grads(lambda *t: kept_attention.KeptAttention.apply(*t, None, Keeper(), False), q, k, v, dout)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        sdpa = forward_and_grads(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=heads != kv_heads), q, k, v, dout)
    for results in (kept_twice(q, k, v, dout, None), sdpa):
        assert torch.equal(now[0], results[0])
        assert all(close(a, b, 1) for a, b in zip(now[1:], results[1:]))
    reference = forward_and_grads(lambda *t: attention_reference(*t, None), *(t.float() for t in (q, k, v, dout)))
    assert all(close(a, b, 4) for a, b in zip(now, reference))
