"""Gradient checkpointing (nanolora/checkpointing.py): `true` and `offload` give the gradients of
no checkpointing. Checkpointing only changes where tensors wait and what is recomputed, so on
the CPU (offload keeps the inputs where they are) the gradients are bit-equal; on the GPU,
`offload` is bit-equal to `true` (the same kernels on the same bytes) and needs less memory."""
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


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "nf4"])
def test_offload_equals_true_on_gpu_and_saves_memory(tmp_path, nf4):
    """Bit-equal gradients (same kernels, same bytes); the peak drops by about the block inputs."""
    save_checkpoint(tmp_path, "llama", num_hidden_layers=8, hidden_size=256, intermediate_size=512)
    model, _ = load_model(tmp_path, device="cuda", dtype=torch.bfloat16, load_in_4bit=nf4)
    attach_lora(model, "all", r=8, alpha=16)
    model.train()
    ids = torch.randint(0, 512, (4, 2048), device="cuda")
    results = {}
    for mode in (True, "offload", True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = lora_grads(model, ids, ids, mode)
        torch.cuda.synchronize()
        results[mode] = (loss, grads, torch.cuda.max_memory_allocated() - base)
    (loss_t, grads_t, peak_t), (loss_o, grads_o, peak_o) = results[True], results["offload"]
    assert torch.equal(loss_t, loss_o)
    assert all(torch.equal(a, b) for a, b in zip(grads_t, grads_o))
    inputs = 8 * ids.numel() * 256 * 2  # 8 blocks' inputs in bf16
    assert peak_o < peak_t - 0.5 * inputs, (peak_t, peak_o, inputs)
