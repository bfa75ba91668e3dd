"""GGML's block formats, and the dequantizers the GGUF reader uses (numpy). The quantizers
that write them are in nanolora/gguf_quantize.py (torch).

A weight [rows, cols] is stored row by row; each row is cut into blocks of consecutive
values (32, or 256 for the K-quants), and a row must hold a whole number of blocks.
Layouts (ggml/src/ggml-common.h), all little-endian:

    Q8_0   34 bytes / 32: f16 d | 32 x int8 q                   x = d * q
    Q4_0   18 bytes / 32: f16 d | 16 bytes                      x = d * (q - 8)
    Q4_1   20 bytes / 32: f16 d | f16 m | 16 bytes              x = d * q + m
    Q5_0   22 bytes / 32: f16 d | u32 high bits | 16 bytes      x = d * (q - 16)
    Q5_1   24 bytes / 32: f16 d | f16 m | u32 high bits | 16    x = d * q + m
    Q4_K  144 bytes / 256: f16 d | f16 dmin | 12 bytes scales | 128 bytes
           8 sub-blocks of 32, each with a 6-bit scale sc and min m:  x = d*sc * q - dmin*m
    Q5_K  176 bytes / 256: as Q4_K, plus 32 bytes of fifth bits before the 128
    Q6_K  210 bytes / 256: 128 bytes low 4 bits | 64 bytes high 2 bits | 16 x int8 scales | f16 d
           16 sub-blocks of 16:                                        x = d*sc * (q - 32)

In Q4_0/Q4_1/Q5_0/Q5_1, byte j holds value j in its low nibble and value j + 16 in its
high one (the fifth bits: bit i of the u32 belongs to value i). The K-quant packings are
spelled out where they are built and read.
"""
import numpy as np

# ggml type id -> (name, values per block, bytes per block)   (gguf-py constants.py)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34),
              2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
              12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
READABLE = tuple(name for name, _, _ in GGML_TYPES.values())  # what the reader reads (gguf.GGUFFile): all


def row_bytes(type_name: str, n_cols: int) -> int:
    _, block_values, block_bytes = GGML_TYPES[TYPE_IDS[type_name]]
    return n_cols // block_values * block_bytes


# ------------------------------------------------------------------------------ reading

def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """The bytes of one tensor of a block type -> its values, flat fp32 (a fresh, writable
    array); F32, F16 and BF16 tensors are read as stored (gguf.GGUFFile.tensor). Block types
    multiply in the order ggml's dequantize_row_* does (d * sc first, then times q, minus
    dmin * m), so the fp32 results equal gguf-py's bit for bit."""
    name, _, block_bytes = GGML_TYPES[ggml_type]
    return _DEQUANTIZERS[name](raw.reshape(-1, block_bytes)).reshape(-1)


def _f16_at(blocks, offset):
    """The f16 at byte `offset` of each block, as fp32 [n_blocks, 1]."""
    return blocks[:, offset:offset + 2].view("<f2").astype(np.float32)


def _nibbles(packed):
    """[n, 16] bytes -> [n, 32] values in 0..15: byte j's low nibble is value j, its high one value j + 16."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _fifth_bits(packed_u32):
    """[n, 4] bytes of a little-endian u32 -> [n, 32] in {0, 16}: bit i is value i's fifth bit."""
    return np.unpackbits(packed_u32, axis=1, bitorder="little") << 4


def _dequantize_q8_0(blocks):  # f16 d | 32 x int8
    return _f16_at(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _dequantize_q4_0(blocks):  # f16 d | 16 bytes
    return _f16_at(blocks, 0) * (_nibbles(blocks[:, 2:]).astype(np.int8) - 8).astype(np.float32)


def _dequantize_q4_1(blocks):  # f16 d | f16 m | 16 bytes
    return _f16_at(blocks, 0) * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16_at(blocks, 2)


def _dequantize_q5_0(blocks):  # f16 d | u32 fifth bits | 16 bytes
    q = _nibbles(blocks[:, 6:]) | _fifth_bits(blocks[:, 2:6])
    return _f16_at(blocks, 0) * (q.astype(np.int8) - 16).astype(np.float32)


def _dequantize_q5_1(blocks):  # f16 d | f16 m | u32 fifth bits | 16 bytes
    q = _nibbles(blocks[:, 8:]) | _fifth_bits(blocks[:, 4:8])
    return _f16_at(blocks, 0) * q.astype(np.float32) + _f16_at(blocks, 2)


def _k_scales_and_mins(packed):
    """Q4_K / Q5_K's 12 scale bytes [n, 12] -> 6-bit scales and mins of the 8 sub-blocks, [n, 8] each.

        bytes 0..3   scale of sub-blocks 0..3 in bits 0-5; bits 6-7: top 2 bits of sub-block 4..7's scale
        bytes 4..7   min   of sub-blocks 0..3 in bits 0-5; bits 6-7: top 2 bits of sub-block 4..7's min
        bytes 8..11  sub-blocks 4..7: low 4 bits of the scale (low nibble) and of the min (high nibble)
    """
    scale_low, min_low, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([scale_low & 0x3F, (high & 0x0F) | ((scale_low >> 6) << 4)], axis=1)
    mins = np.concatenate([min_low & 0x3F, (high >> 4) | ((min_low >> 6) << 4)], axis=1)
    return scales, mins


def _dequantize_k_with_mins(blocks, q):
    """x = (d * sc) * q - dmin * m per sub-block of 32; q [n, 8, 32]. Bytes 0..15: f16 d, f16 dmin, scales."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    sub_d = (_f16_at(blocks, 0) * scales.astype(np.float32))[:, :, None]  # [n, 8, 1]
    sub_m = (_f16_at(blocks, 2) * mins.astype(np.float32))[:, :, None]
    return sub_d * q.astype(np.float32) - sub_m


def _k_low_nibbles(qs):
    """Q4_K / Q5_K's 128 value bytes [n, 128] -> [n, 8, 32]: in each group g of 32 bytes, byte l
    holds value l of sub-block 2g (low nibble) and of sub-block 2g + 1 (high nibble)."""
    groups = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=2).reshape(len(qs), 8, 32)


def _dequantize_q4_k(blocks):
    """Q4_K, 144 bytes / 256: f16 d @0 | f16 dmin @2 | 12 scale bytes @4 | 128 value bytes @16."""
    return _dequantize_k_with_mins(blocks, _k_low_nibbles(blocks[:, 16:]))


def _dequantize_q5_k(blocks):
    """Q5_K, 176 bytes / 256: f16 d @0 | f16 dmin @2 | 12 scale bytes @4 | qh[32] @16 | qs[128] @48.
    qs as Q4_K's values; bit s of qh[l] is the fifth bit of sub-block s's value l."""
    fifth = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [n, 8, 32]
    return _dequantize_k_with_mins(blocks, _k_low_nibbles(blocks[:, 48:]) | (fifth << 4))


def _dequantize_q6_k(blocks):
    """Q6_K, 210 bytes / 256: ql[128] @0 | qh[64] @128 | 16 x int8 scales @192 | f16 d @208.

    x = (d * sc) * (q - 32) per sub-block of 16, q in 0..63. Each half h of 128 values is 4
    groups of 32: byte l of ql[64h:64h+32] holds group 0's value l (low nibble) and group 2's
    (high), ql[64h+32:64h+64] groups 1 and 3; qh[32h + l] the top 2 bits of groups 0..3 at
    bits 0-1, 2-3, 4-5, 6-7.
    """
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 1, 2, 32)  # [n, half, nibble, group & 1, 32]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16)
    sub_d = _f16_at(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    return sub_d[:, :, None] * q.astype(np.float32)


_DEQUANTIZERS = {"Q8_0": _dequantize_q8_0, "Q4_0": _dequantize_q4_0, "Q4_1": _dequantize_q4_1,
                 "Q5_0": _dequantize_q5_0, "Q5_1": _dequantize_q5_1, "Q4_K": _dequantize_q4_k,
                 "Q5_K": _dequantize_q5_k, "Q6_K": _dequantize_q6_k}
