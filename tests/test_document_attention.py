"""Packed rows' documents (nanolora/document_attention.py): found on the host from segment_ids,
padded with the rows, and attended within. On the CPU the reference runs (the boolean mask
built from the documents) and must give the loss and LoRA gradients of the segment mask; on
the GPU flash attention's variable-length kernel must agree with the reference within bf16's
noise."""
import pytest
import torch
import torch.nn.functional as F

from hf_fixtures import checkpoint_fixture, randomize_lora, save_checkpoint
from hf_fixtures import lora_loss_and_grads as loss_and_grads
from nanolora import cuda_graphs, document_attention, load_model
from nanolora.document_attention import Documents, attention, covers, find_documents
from nanolora.lora import attach_lora
from nanolora.model import build_attention_mask

CUDA = torch.cuda.is_available()
llama = checkpoint_fixture("llama")


def runs(row):
    """(start, length) of each run of equal values in a list, the plain way."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            out.append((start, i - start))
            start = i
    return out


def packed_segments(g, batch, seq, max_docs=5):
    """Random packed rows: 1..max_docs documents of random lengths, then maybe padding (0)."""
    segments = torch.zeros(batch, seq, dtype=torch.long)
    for r in range(batch):
        cuts = sorted((torch.randperm(seq - 1, generator=g)[:int(torch.randint(0, max_docs, (1,), generator=g))] + 1).tolist())
        end = seq - int(torch.randint(0, seq // 3 + 1, (1,), generator=g))
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, seq])):
            segments[r, a:min(b, end)] = i + 1
    return segments


@pytest.mark.parametrize("seed", range(6))
def test_find_documents_are_the_runs_of_each_row(seed):
    g = torch.Generator().manual_seed(seed)
    batch, seq = 1 + seed % 3, [1, 7, 64, 100, 513, 9][seed]
    segments = packed_segments(g, batch, seq)
    docs = find_documents(segments)
    expected = [r * seq + start for r in range(batch) for start, _ in runs(segments[r].tolist())]
    longest = max(length for r in range(batch) for _, length in runs(segments[r].tolist()))
    n = len(expected)
    assert docs.cu_seqlens.dtype == torch.int32 and docs.row_length == seq
    assert docs.cu_seqlens[:n].tolist() == expected
    assert docs.cu_seqlens[n:].tolist() == [batch * seq] * (len(docs.cu_seqlens) - n)  # empty ones, then the end
    count = len(docs.cu_seqlens) - 1
    assert count >= n and count & (count - 1) == 0 and count < 2 * n or n == 1
    assert docs.max_len >= longest and docs.max_len & (docs.max_len - 1) == 0 and docs.max_len < 2 * longest + 1


def test_hostile_layouts():
    one_token_docs = torch.arange(1, 9).view(1, 8)
    assert find_documents(one_token_docs).cu_seqlens.tolist() == list(range(9))
    # a query length of 1 sends FA2 with grouped heads down a path the empty documents break
    assert find_documents(one_token_docs).max_len == 2
    all_padding = torch.zeros(2, 5, dtype=torch.long)  # each row one document: rows never merge
    assert find_documents(all_padding).cu_seqlens.tolist() == [0, 5, 10]
    same_id_across_rows = torch.ones(3, 4, dtype=torch.long)
    assert find_documents(same_id_across_rows).cu_seqlens.tolist()[:4] == [0, 4, 8, 12]


@pytest.mark.parametrize("seed", range(4))
def test_mask_agrees_with_the_segment_mask_for_real_tokens(seed):
    """Documents.mask and model.build_attention_mask: the same rows for every real query,
    also after padding the rows (cuda_graphs.pad_to_bucket's case)."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = 3, 40
    segments = packed_segments(g, batch, seq)
    real = segments != 0
    reference = build_attention_mask(batch, seq, seq, "cpu", key_padding=real, segment_ids=segments)[:, 0]
    docs = find_documents(segments)
    for documents, length in [(docs, seq), (docs.padded(64), 64)]:
        mask = documents.mask(batch, length)[:, 0, :seq, :seq]
        assert torch.equal(mask[real], reference[real])
        assert documents.mask(batch, length).sum(-1).min() >= 1  # every query sees something
    padded = docs.padded(64)
    assert padded.key() == (len(padded.cu_seqlens), padded.max_len) and padded.cu_seqlens[-1] == batch * 64


def lora_model(path, dtype=torch.float32, device="cpu"):
    model, _ = load_model(path, device=device, dtype=dtype)
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    model.train()
    return model


def packed_batch(g, batch, seq, vocab):
    segments = packed_segments(g, batch, seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.masked_fill(segments == 0, -100)
    positions = torch.zeros_like(ids)
    for r in range(batch):
        for start, length in runs(segments[r].tolist()):
            positions[r, start:start + length] = torch.arange(length)
            labels[r, start] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": (segments != 0).long(),
            "position_ids": positions, "segment_ids": segments}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_documents_gives_the_segment_masks_loss_and_gradients(llama, checkpointing):
    """On the CPU (the reference path): bit-equal, since every real query sees the same keys and
    the padding's gradients are zero either way; padded to a bucket too."""
    model = lora_model(llama)
    model.grad_checkpointing = checkpointing
    g = torch.Generator().manual_seed(2)
    batch = packed_batch(g, 3, 37, model.config.vocab_size)
    loss, grads = loss_and_grads(model, batch)
    with_docs = {**batch, "documents": find_documents(batch["segment_ids"])}
    loss_d, grads_d = loss_and_grads(model, with_docs)
    assert torch.equal(loss, loss_d)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_d))
    padded = cuda_graphs.pad_to_bucket(with_docs, length=lambda seq: 48)
    assert padded["documents"].row_length == 48
    loss_p, grads_p = loss_and_grads(model, padded)
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=0)  # fp32: longer rows sum in another order
    for a, b in zip(grads_p, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_mixed_dtypes_fall_back_to_the_mask(monkeypatch):
    """fp32 weights under bf16 autocast rotate q and k in fp32 beside a bf16 v, which the
    variable-length kernel refuses: documents_or_mask gives such hidden states the boolean mask
    (once, for every layer), whose SDPA autocast casts; 16-bit ones keep the documents. The
    kernel's coverage is faked: on the CPU it does not exist."""
    from nanolora import ops
    monkeypatch.setattr(document_attention, "covers", lambda device, dtype, head_dim: True)
    g = torch.Generator().manual_seed(0)
    docs = find_documents(packed_segments(g, 2, 24))
    assert ops.documents_or_mask(docs, torch.zeros(2, 24, 32, dtype=torch.bfloat16), 8) is docs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = ops.documents_or_mask(docs, torch.zeros(2, 24, 32), 8)
        assert torch.equal(mask, docs.mask(2, 24))
        q, k = torch.randn(2, 4, 24, 8, generator=g), torch.randn(2, 2, 24, 8, generator=g)
        v = torch.randn(2, 2, 24, 8, generator=g).bfloat16()
        ops.attention(q, k, v, mask)  # runs: autocast casts q, k and v alike for SDPA


def test_ddp_and_fsdp_leave_documents_alone():
    """DDP and FSDP move the tensors they find in a forward's arguments, inside tuples too, and
    a CPU tensor with a blocking copy; Documents (a dataclass) keeps its host offsets where they are."""
    from torch.distributed.utils import _recursive_to
    docs = find_documents(torch.tensor([[1, 1, 2, 0]]))
    (moved,), = _recursive_to(({"documents": docs},), torch.device("meta"), False)
    assert moved["documents"] is docs


def test_train_to_device_finds_the_documents():
    from train import to_device
    segments = torch.tensor([[1, 1, 2, 2, 2, 0]])
    batch = {"input_ids": segments, "labels": segments, "attention_mask": (segments != 0).long(),
             "position_ids": segments, "segment_ids": segments}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["documents"].cu_seqlens.tolist() == [0, 2, 5, 6, 6]
    unpacked = to_device({**batch, "segment_ids": None}, torch.device("cpu"))
    assert "documents" not in unpacked


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (8, 2, 64), (12, 12, 128)])
def test_variable_length_kernel_against_the_mask_on_gpu(dtype, heads, kv_heads, dim):
    """Forward and backward against SDPA with the documents' mask (fp32, the math written out),
    within 16-bit rounding: 4 x 2^-8 (bf16) or 2^-11 (fp16) of each output's largest value."""
    g = torch.Generator().manual_seed(heads + dim)
    batch, seq = 2, 517
    docs = find_documents(packed_segments(g, batch, seq, max_docs=7)).to("cuda")
    make = lambda h: torch.randn(batch, seq, h, dim, generator=g).to("cuda", dtype).transpose(1, 2)  # noqa: E731
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    dout = torch.randn(batch, heads, seq, dim, generator=g).to("cuda", dtype)
    assert covers(q.device, q.dtype, dim)

    def run(fn, *tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = fn(*tensors)
        return (out, *torch.autograd.grad(out, tensors, dout.to(out.dtype)))
    fast = run(lambda q, k, v: attention(q, k, v, docs), q, k, v)
    mask = docs.mask(batch, seq)
    reference = run(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True), *(t.float() for t in (q, k, v)))
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    for a, b in zip(fast, reference):
        assert (a.float() - b).abs().max().item() <= 4 * unit * b.abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_with_documents_on_gpu(tmp_path, family):
    """bf16 with documents (the variable-length kernel) against fp32 with the segment mask: no
    further off than bf16 with the segment mask is (twice that, plus 1e-3)."""
    save_checkpoint(tmp_path, family, num_hidden_layers=2, hidden_size=256, intermediate_size=512)
    g = torch.Generator().manual_seed(3)
    batch = packed_batch(g, 2, 300, 512)
    on_gpu = lambda b: {k: v.to("cuda") for k, v in b.items()}  # noqa: E731
    results = {}
    for name, dtype, documents in [("documents", torch.bfloat16, True), ("mask", torch.bfloat16, False),
                                   ("fp32", torch.float32, False)]:
        model = lora_model(tmp_path, dtype, "cuda")
        b = {**batch, "documents": find_documents(batch["segment_ids"])} if documents else batch
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            results[name] = loss_and_grads(model, on_gpu(b))

    def worst(a, b):
        return max(((x.float() - y).abs().max() / y.abs().max()).item() for x, y in zip([a[0], *a[1]], [b[0], *b[1]]))
    error, noise = worst(results["documents"], results["fp32"]), worst(results["mask"], results["fp32"])
    print(f"{family}: documents vs fp32 {error:.3g}, segment mask vs fp32 {noise:.3g}")
    assert error <= 2 * noise + 1e-3
