"""Attention within the documents of packed rows, through flash attention's variable-length kernel.

train.py --pack puts several examples (documents) in a row, told apart by segment_ids, and a
token attends only to the earlier tokens of its own document. Written as a mask, that is a
boolean [batch, 1, seq, seq] (model.build_attention_mask), and SDPA serves a mask with a
kernel that reads it and computes every block of scores, between documents too. Flash
attention's variable-length kernel takes the documents instead as offsets into the batch's
tokens laid end to end (cu_seqlens) and never computes scores between them. Measured on an
H200, 8B NF4, graphed, four documents per row (bench/step_time.py --docs 4): 10,749 ->
12,221 tok/s at 2 x 2048 tokens, 7,364 -> 11,903 at 1 x 8192.

The documents are found on the host, from the collated segment_ids before they go to the GPU
(find_documents), so the step never waits for the device. The reference is the boolean mask,
built from the same documents (Documents.mask), and SDPA.

Padding (segment 0 at the end of a row) is a document of its own: its queries must see at
least one key (else SDPA's softmax is 0/0), and no real token sees them either way. So
padded queries attend to the padding before them instead of to themselves alone; their
outputs differ from the segment mask's, but carry no label and reach no real token, so the
loss and gradients do not change.
"""
import dataclasses

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# A dataclass, not a NamedTuple: DDP and FSDP move the tensors inside tuples they are given
# (with a blocking copy for CPU ones); they pass other objects through.
@dataclasses.dataclass(frozen=True, eq=False)  # eq: comparing tensors field by field would sync
class Documents:
    """The documents of a batch of packed rows, laid end to end: document i is tokens
    cu_seqlens[i] .. cu_seqlens[i + 1] - 1 of the rows flattened (row r, position t is token
    r * row_length + t). The count is rounded up to a power of two with empty documents at the
    end, and max_len (at least the longest document's length) too: a CUDA graph is captured per
    (count, max_len), so they should take few values. As a graph's static input it is cloned and
    copied into like a tensor (clone, copy_)."""
    cu_seqlens: torch.Tensor  # int32 [count + 1], on the device the batch is on
    max_len: int
    row_length: int
    host_cu_seqlens: torch.Tensor  # the same on the CPU: padding the rows (cuda_graphs) recomputes from it

    def to(self, device, non_blocking=False):
        return dataclasses.replace(self, cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking))

    def clone(self):
        return dataclasses.replace(self, cu_seqlens=self.cu_seqlens.clone())

    def copy_(self, other, non_blocking=False):
        """Other's offsets into these (a graph's static documents; the same count and max_len)."""
        self.cu_seqlens.copy_(other.cu_seqlens, non_blocking=non_blocking)

    def key(self):
        return len(self.cu_seqlens), self.max_len

    def padded(self, row_length: int) -> "Documents":
        """The documents once every row is right-padded to row_length tokens (the padding of a
        row is a document of its own)."""
        rows = int(self.host_cu_seqlens[-1]) // self.row_length
        ids = self.token_documents(self.host_cu_seqlens, rows * self.row_length).view(rows, self.row_length)
        documents = find_documents(F.pad(ids, (0, row_length - self.row_length), value=-1))
        return documents.to(self.cu_seqlens.device, non_blocking=True)  # from a fresh CPU tensor: no sync

    @staticmethod
    def token_documents(cu_seqlens, n_tokens):
        """[n_tokens]: the index of the document each token is in."""
        tokens = torch.arange(n_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        return torch.searchsorted(cu_seqlens[1:], tokens, right=True)

    def mask(self, batch: int, seq: int):
        """The reference: a boolean [batch, 1, seq, seq], True where a query may look (an earlier
        or the same token of its document)."""
        doc = self.token_documents(self.cu_seqlens, batch * seq).view(batch, seq)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=doc.device).tril()
        return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def find_documents(segment_ids: torch.Tensor) -> Documents:
    """The runs of equal id in each row of segment_ids [batch, seq] (on the CPU), in order.

    A run is a document, so an id that comes back later in a row starts a new one (data.py
    numbers a row's examples 1, 2, ... and its padding 0, so it never does; the segment mask,
    model.build_attention_mask, would join the two)."""
    batch, seq = segment_ids.shape
    starts = torch.ones(batch, seq, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = starts.flatten().nonzero().flatten()
    total = batch * seq
    lengths = torch.diff(starts, append=torch.tensor([total]))
    cu_seqlens = torch.full((_power_of_two_at_least(len(starts)) + 1,), total, dtype=torch.int32)
    cu_seqlens[:len(starts)] = starts
    # max_len 2 at least: FA2 runs a query length of 1 with grouped heads as one batch row per
    # document, which the empty documents at the end do not fit
    return Documents(cu_seqlens, max(2, _power_of_two_at_least(int(lengths.max()))), seq, cu_seqlens)


def covers(device, dtype, head_dim) -> bool:
    """Whether flash attention's variable-length kernel takes such q/k/v: CUDA, 16-bit, an
    Ampere or later GPU, head sizes a multiple of 8 up to 256, SDPA's flash backend not off."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(device) >= (8, 0))


class _VariableLengthAttention(torch.autograd.Function):
    """Causal attention within documents; q [tokens, heads, dim], k/v [tokens, kv_heads, dim]."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len, scale):
        # dropout is 0: the philox state the kernel returns is never read, but handed back to
        # its backward as it came (as torch's own autograd does)
        out, lse, philox_seed, philox_offset, _ = aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, philox_seed, philox_offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, philox_seed, philox_offset = ctx.saved_tensors
        dq, dk, dv = aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0, True,
            philox_seed, philox_offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def _as_tokens(t):
    """[batch, heads, seq, dim] (a view of [batch, seq, heads, dim]) -> [batch * seq, heads, dim], no copy."""
    batch, heads, seq, dim = t.shape
    return t.transpose(1, 2).reshape(batch * seq, heads, dim)


def attention(q, k, v, documents: Documents, scale=None):
    """Causal attention within documents; q [batch, heads, seq, dim], k/v [batch, kv_heads,
    seq, dim] (model.py's views of [batch, seq, heads, dim] projections: flattening them to
    the kernel's [tokens, heads, dim] copies nothing)."""
    batch, heads, seq, dim = q.shape
    out = _VariableLengthAttention.apply(_as_tokens(q), _as_tokens(k), _as_tokens(v), documents.cu_seqlens,
                                         documents.max_len, scale)
    return out.view(batch, seq, heads, dim).transpose(1, 2)
