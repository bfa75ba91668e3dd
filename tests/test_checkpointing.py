"""Gradient checkpointing (nanolora/checkpointing.py): `true` and `offload` give the gradients of
no checkpointing. Checkpointing only changes where tensors wait and what is recomputed, so on
the CPU (offload keeps the inputs where they are) the gradients are bit-equal; on the GPU,
`offload` is bit-equal to `true` (the same kernels on the same bytes) and needs less memory."""
import gc
import weakref

import pytest
import torch

from hf_fixtures import save_checkpoint
from nanolora import load_model
from nanolora.checkpointing import offloader_for
from nanolora.lora import attach_lora, lora_parameters

CUDA = torch.cuda.is_available()


def lora_grads(model, ids, labels, mode, mask=None, segment_ids=None, position_ids=None):
    model.grad_checkpointing = mode
    for p in lora_parameters(model):
        p.grad = None
    loss = model(ids, mask, position_ids, segment_ids, labels=labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(path, "qwen3")
    model, _ = load_model(path, device="cpu", dtype=torch.float32)
    attach_lora(model, "all", r=4, alpha=8, dropout=0.1)  # dropout: the recompute must replay the RNG
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    ids = torch.randint(0, 512, (2, 12), generator=g)
    labels = ids.clone()
    labels[1, :4] = -100
    return model, ids, labels


@pytest.mark.parametrize("mode", [True, "offload"])
def test_checkpointing_gives_the_gradients_of_no_checkpointing(model_and_batch, mode):
    model, ids, labels = model_and_batch
    torch.manual_seed(1)
    loss_plain, grads_plain = lora_grads(model, ids, labels, False)
    torch.manual_seed(1)
    loss, grads = lora_grads(model, ids, labels, mode)
    assert torch.equal(loss, loss_plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_plain))


def test_checkpointing_with_padding_and_packing(model_and_batch):
    """The same with a padding mask and packed segments (positions restarting per example)."""
    model, ids, labels = model_and_batch
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12).clone()
    positions[1] = torch.arange(12)
    torch.manual_seed(2)
    plain = lora_grads(model, ids, labels, False, mask, segments, positions)
    torch.manual_seed(2)
    offload = lora_grads(model, ids, labels, "offload", mask, segments, positions)
    assert torch.equal(plain[0], offload[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], offload[1]))


def test_offload_degrades_on_cpu_and_rejects_unknown_modes():
    assert offloader_for("offload", torch.device("cpu")) is None
    assert offloader_for(True, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="grad_checkpointing must be one of"):
        offloader_for("sometimes", torch.device("cpu"))


@pytest.fixture
def cuda_streams_stubbed(monkeypatch):
    """CUDA's stream and event API stubbed out, so the offloader runs on the CPU (its copies
    then happen at once); the offloader's host slots are fresh for the test."""
    import contextlib

    from nanolora import checkpointing

    class Stream:
        def wait_stream(self, other): pass
        def wait_event(self, event): pass

    class Event:
        def record(self, stream): pass

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(checkpointing, "_capturing", lambda: False)
    monkeypatch.setattr(checkpointing, "_slots", {})
    monkeypatch.setattr(checkpointing, "_streams", {})
    return checkpointing


def test_offload_hooks_on_cpu_with_streams_stubbed(model_and_batch, monkeypatch, cuda_streams_stubbed):
    """The offloader's logic, run on the CPU with CUDA's stream API stubbed out: every block
    input, and every block's attention output and log-sum-exp, goes to host memory and comes
    back once; the recompute runs no attention forward; the gradients are those of no
    checkpointing (bit-equal: the same CPU flash kernels, and LoRA dropout replayed)."""
    checkpointing = cuda_streams_stubbed
    from nanolora import kept_attention
    offloaders, block_inputs = [], []

    def offloader_for(mode, device):
        offloaders.append(checkpointing.BlockOffloader(device))
        return offloaders[-1]
    monkeypatch.setattr(checkpointing, "offloader_for", offloader_for)
    real_block = checkpointing.BlockOffloader.block

    def block(self, block_input):
        block_inputs.append(weakref.ref(block_input))
        return real_block(self, block_input)
    monkeypatch.setattr(checkpointing.BlockOffloader, "block", block)
    monkeypatch.setattr(kept_attention, "MIN_LENGTH", 0)  # the path is for long sequences
    forwards = []
    real_forward = kept_attention.attention_forward
    monkeypatch.setattr(kept_attention, "attention_forward", lambda *a: forwards.append(1) or real_forward(*a))
    model, ids, labels = model_and_batch
    n_blocks = len(model.layers)
    torch.manual_seed(3)
    plain = lora_grads(model, ids, labels, False)
    torch.manual_seed(3)
    model.grad_checkpointing = "offload"
    loss = model(ids, None, None, None, labels=labels)
    gc.collect()
    # the point of offloading: after the forward nothing holds a block's input any more, but the
    # offloader the last block's tensors, until the compute stream has waited for their copies
    assert len(block_inputs) == n_blocks
    assert not any(ref() is not None for ref in block_inputs[:-1])
    leaving, last = offloaders[-1].leaving, offloaders[-1].blocks[-1]
    assert [offloaded for offloaded, _ in leaving] == [last.input, *last.kept]
    # and the forward's end handed them to the last block's recompute, which comes first
    assert all(o.gpu is o.dense is not None for o in [last.input, *last.kept])
    del loss, leaving, last
    offloaders.clear()
    forwards.clear()
    torch.manual_seed(3)
    offload = lora_grads(model, ids, labels, "offload")
    assert len(forwards) == n_blocks  # the forward pass's; the recompute took them back instead
    assert len(offloaders) == 1 and len(offloaders[0].blocks) == n_blocks
    offloaded = [o for b in offloaders[0].blocks for o in [b.input, *b.kept]]
    assert len(offloaded) == 3 * n_blocks  # input, attention output, log-sum-exp
    assert all(o.fetched == 1 for o in offloaded)  # each brought back once
    assert all(o.gpu is None for o in offloaded)  # and not kept: autograd had the only reference
    assert torch.equal(plain[0], offload[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], offload[1]))


def test_offload_host_buffers_grow_to_the_longest_input(model_and_batch, monkeypatch, cuda_streams_stubbed):
    """One pinned buffer per block, grown to the longest input: batches of ever new lengths do
    not pin ever more host memory. A buffer a CUDA graph captured is kept when it is outgrown
    (the graph's replays still copy to it); one no graph captured is freed."""
    checkpointing = cuda_streams_stubbed
    monkeypatch.setattr(checkpointing, "offloader_for",
                        lambda mode, device: checkpointing.BlockOffloader(device) if mode == "offload" else None)
    model, ids, labels = model_and_batch
    hidden, n_blocks = model.config.hidden_size, len(model.layers)

    def step(ids, labels):
        lora_grads(model, ids, labels, "offload")
        assert len(checkpointing._slots) == n_blocks  # the inputs (attention is recomputed at these lengths)
        return [checkpointing._slots[(torch.device("cpu"), i, 0)] for i in range(n_blocks)]

    for length in [5, 9, 7, 12, 3, 11]:
        slots = step(ids[:, :length], labels[:, :length])
    assert all(s.buffer.numel() == 2 * 12 * hidden and not s.kept for s in slots)  # freed as they grew
    monkeypatch.setattr(checkpointing, "_capturing", lambda: True)  # as if a graph captured this step
    step(ids[:, :8], labels[:, :8])
    monkeypatch.setattr(checkpointing, "_capturing", lambda: False)
    captured = [s.buffer for s in slots]
    step(ids, labels)  # fits: nothing grows
    assert all(s.buffer is b and not s.kept for s, b in zip(slots, captured))
    step(torch.cat([ids, ids[:1]]), torch.cat([labels, labels[:1]]))  # one row more: grows
    assert all(s.kept == [b] and s.buffer.numel() == 3 * 12 * hidden for s, b in zip(slots, captured))
    # the new buffer was not captured: outgrowing it frees it (only the captured one stays kept)
    step(torch.cat([ids, ids]), torch.cat([labels, labels]))
    assert all(s.kept == [b] and not s.captured and s.buffer.numel() == 4 * 12 * hidden
               for s, b in zip(slots, captured))


@pytest.mark.gpu
@pytest.mark.parametrize("nf4,kept", [(False, False), (True, False), (True, True)], ids=["bf16", "nf4", "nf4-kept"])
def test_offload_equals_true_on_gpu_and_saves_memory(tmp_path, monkeypatch, nf4, kept):
    """The same gradients (same kernels, same bytes); the peak drops by most of the block inputs.
    kept: the attention outputs offloaded too, and taken back by the recompute (kept_attention,
    made to run at this length)."""
    from nanolora import kept_attention
    monkeypatch.setattr(kept_attention, "MIN_LENGTH", 0 if kept else 10 ** 9)
    forwards = []
    real_forward = kept_attention.attention_forward
    monkeypatch.setattr(kept_attention, "attention_forward", lambda *a: forwards.append(1) or real_forward(*a))
    save_checkpoint(tmp_path, "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    model, _ = load_model(tmp_path, device="cuda", dtype=torch.bfloat16, load_in_4bit=nf4)
    attach_lora(model, "all", r=8, alpha=16)
    model.train()
    ids = torch.randint(0, 512, (4, 2048), device="cuda")
    results = []
    for mode in (True, "offload", True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = lora_grads(model, ids, ids, mode)
        torch.cuda.synchronize()
        results.append((loss, grads, torch.cuda.max_memory_allocated() - base))
    # the second `true` run's peak: the first one's includes one-time workspaces
    (loss_t2, grads_t2, _), (loss_o, grads_o, peak_o), (loss_t, grads_t, peak_t) = results
    assert len(forwards) == (8 if kept else 0)  # offload's forward pass kept them; its recompute ran none

    def worst(a, b):  # relative to each tensor's largest gradient
        # (LoRA A's gradient is exactly zero while B is: 0 / 0 must read 0, not NaN)
        return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-30)).item()
                   for x, y in zip(a, b))
    # bit-equal when the GPU's kernels are deterministic; otherwise within the noise between two
    # runs (cuDNN's attention backward may accumulate in a varying order: one H200 run read 0
    # between two `true` runs and 2 in absolute terms against offload, so a floor of 1% of the
    # largest gradient; wrong or stale inputs move the gradients by their own size)
    noise = worst(grads_t, grads_t2)
    print(f"offload vs true: loss {loss_o.item()} vs {loss_t.item()}, grads {worst(grads_o, grads_t):.3g} "
          f"(true vs true {noise:.3g}); peak {peak_o / 2**20:.1f} vs {peak_t / 2**20:.1f} MiB")
    assert abs(loss_t.item() - loss_o.item()) <= abs(loss_t.item() - loss_t2.item()) + 1e-6 * abs(loss_t.item())
    assert worst(grads_o, grads_t) <= 2 * noise + 1e-2
    # 8 blocks' inputs in bf16; offload keeps at most two on the GPU (the block differentiated,
    # the one prefetched). Before fetched inputs were handed over instead of kept, the peak was
    # no lower (NF4 94.9 vs 95.7 MiB): they were all back on the GPU by the end of the backward
    inputs = 8 * ids.numel() * 256 * 2
    assert peak_o <= peak_t - 0.5 * inputs
