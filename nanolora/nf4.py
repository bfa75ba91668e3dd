"""NF4: the 4-bit weight format of QLoRA, byte for byte as bitsandbytes stores it.

A weight W (any shape, read row-major, e.g. ``[out, in]``) is cut into blocks of
``blocksize`` (64) consecutive elements of its flattened form. Block b keeps

    absmax[b] = max_i |W_b,i|                                        (float32)
    q_b,i     = the index k of the NF4 code closest to W_b,i / absmax[b]

and W is read back as ``W_b,i ~= NF4[q_b,i] * absmax[b]``. The 16 codes are quantiles of a
standard normal, rescaled to [-1, 1] (QLoRA, Dettmers et al. 2023), because trained weights
are roughly normal: each code is then used about equally often.

Packing: two 4-bit indices per byte, the FIRST element of a pair in the HIGH nibble, so
elements (2j, 2j+1) live in ``packed[j] = q[2j] << 4 | q[2j+1]``; ``packed`` is uint8 of
shape ``[numel / 2, 1]`` (bitsandbytes' layout). Example: ``[-1.0, 1.0]`` -> codes (0, 15)
-> byte 0x0F.

Double quantization (``double_quant=True``, what QLoRA and every ``*-bnb-4bit``
checkpoint use) stores absmax in 8 bits instead of 32: with ``offset = mean(absmax)``, the
values ``absmax - offset`` are cut into blocks of 256, each with its own float32
``nested_absmax`` (max |.|), and each value is replaced by the index of the nearest entry
of bitsandbytes' signed dynamic 8-bit code (``nested_code``, 256 values in [-1, 1]):

    absmax[b] ~= nested_code[absmax_q[b]] * nested_absmax[b // 256] + offset

That costs 8/64 + 32/(64*256) bits per weight for the scales instead of 32/64: 4.127 bits
per weight in all, instead of 4.5.

Order of operations (it decides the last bit). Everything that reads an NF4Weight, here and
in ``kernels/nf4_dequant.py``, computes in float32, in this order, and casts once at the end:

    absmax = nested_code[absmax_q] * nested_absmax[b // 256]   # one fp32 multiply
    absmax = absmax + offset                                   # one fp32 add (no FMA)
    value  = NF4[q] * absmax                                   # one fp32 multiply
    out    = value.to(dtype)                                   # round to nearest even

which is also what bitsandbytes does on the CPU, so our values equal its ``dequantize_4bit``.

Rounding on the way in, matched to bitsandbytes 0.50 on the CPU (its tests are our oracle):
  - 4-bit: x = clamp(w * (1 / absmax), -1, 1) (a multiply by the fp32 reciprocal, not a
    division), then q = the number of code midpoints ``(NF4[k] + NF4[k+1]) / 2`` strictly
    below x: the nearest code, a tie going to the LOWER index.
  - 8-bit (double quantization): bitsandbytes' CPU kernel does not search the code; it
    first snaps x = v * (1 / block absmax) to a grid of 65536 points on [-1, 1],
    ``g = trunc(fma((clamp(x, -1, 1) + 1) * 0.5, 65535, 0.5))``, then takes the code nearest
    to grid point ``-1 + 2g / 65535`` (ties lower). That is "nearest" up to half a grid step
    (1.5e-5 of the block's absmax), which only matters near 0 where the dynamic code is
    denser than the grid. We reproduce it exactly (see ``quantize_dynamic_8bit``).
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import torch.nn as nn

# The 16 NF4 values, index 0..15 (bitsandbytes ``get_4bit_type("nf4")``). They are
# create_normal_map(offset=0.9677083): 8 positive quantiles Phi^-1(linspace(offset, 0.5, 9))
# and 7 negative ones Phi^-1(linspace(offset, 0.5, 8)), plus an exact 0, divided by the
# largest so the ends are exactly -1 and 1. Hard-coded as float32, like bitsandbytes does.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # bitsandbytes always double-quantizes absmax in blocks of 256
_SUPPORTED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GRID = 65535  # bitsandbytes' CPU 8-bit quantizer: 65536 grid points on [-1, 1]
# Quantize at most this many elements at once: the temporaries take ~13 bytes per element
# (fp32 copy, scaled copy, int32 and uint8 codes), ~14 MB here. load_model quantizes each
# weight on the GPU as it streams in; this keeps that well below one layer's 16-bit weights.
_CHUNK = 1 << 20


def dynamic_code(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (``create_dynamic_map(signed)``): float32 [256], sorted.

    A tiny float format: for each decade 10^-6 ... 10^0 (exponent e = 0..6), the midpoints of
    k equal steps of [0.1, 1], times 10^(e-6), plus 0 and 1.0; dense near 0 (relative precision
    is what matters for scales and optimizer moments). Signed: k = 2^e steps, each value with
    both signs, 2 * (1 + 2 + ... + 64) + 2 = 256 values from -0.99296875 to 1.0 (double
    quantization's absmax, AdamW's first moment). Unsigned: k = 2^(e+1) steps, positive only,
    (2 + 4 + ... + 128) + 2 = 256 values from 0 to 1.0, twice as fine (AdamW's second moment,
    which is never negative). Computed with the same float32 operations as bitsandbytes, so the
    values are bit-identical (tested).
    """
    values = [0.0, 1.0]
    for e in range(7):
        steps = torch.linspace(0.1, 1.0, (2**e if signed else 2 ** (e + 1)) + 1, dtype=torch.float32)
        means = (steps[:-1] + steps[1:]) / 2.0
        decade = 10.0 ** (e - 6)
        values += (decade * means).tolist() + ((-decade * means).tolist() if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code(signed=True)
DYNAMIC_CODE_UNSIGNED = dynamic_code(signed=False)


class NF4Weight(nn.Module):
    """A weight in NF4, laid out as bitsandbytes lays it out (see the module docstring).

    packed         uint8 [numel/2, 1]   two 4-bit code indices per byte, first in the high nibble
    absmax         uint8 [numel/blocksize] when double-quantized, else float32
    nested_absmax  float32 [ceil(n_blocks/256)]  (double quant only, else None)
    nested_code    float32 [256], the dynamic 8-bit code (double quant only, else None)
    offset         float32 [1], mean of the original absmax (double quant only)
    code           float32 [16], the NF4 code book
    shape, dtype   the original weight's shape and dtype (dequantize's default output dtype)
    blocksize      elements per absmax block (64)

    A module whose tensors are frozen parameters: model.to() moves them, state_dict() holds them
    (as `<projection>.weight.packed`, `.weight.absmax`, ...), and FSDP2 shards them like any
    other parameter (all-gathered as bytes when the dtypes of a block differ). They are
    parameters, not buffers, because FSDP2 shards only parameters. The offset is [1], not a
    0-dim tensor: FSDP2 refuses scalar parameters. Do not call model.to(dtype) on a model
    holding NF4 weights: it would cast the float32 scales and code books too.

    One buffer is derived from them at construction: row_absmax, each row's largest |value|
    (for --fp8; None where blocks straddle rows, or on the meta device). The scales are never
    replaced in place, so it cannot go stale; it is not saved.
    """

    def __init__(self, packed, absmax, code, shape, dtype, blocksize,
                 nested_absmax=None, nested_code=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE):
        super().__init__()
        for name, tensor in (("packed", packed), ("absmax", absmax), ("code", code),
                             ("nested_absmax", nested_absmax), ("nested_code", nested_code),
                             ("offset", None if offset is None else offset.reshape(1))):
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.nested_blocksize = nested_blocksize
        # each row's largest |value| (its blocks' largest scale: a block's largest value is
        # quantized to the code +-1), for scaling the row into FP8 straight from the 4-bit codes
        # (--fp8, kernels/fp8_matmul.py); None where blocks straddle rows. A buffer, moved by
        # .to() and left out of state_dict().
        rows_whole = len(self.shape) == 2 and self.shape[1] % blocksize == 0 and absmax.device.type != "meta"
        self.register_buffer("row_absmax", dequantize_absmax(self).abs().view(self.shape[0], -1).amax(1)
                             if rows_whole else None, persistent=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    @property
    def nbytes(self) -> int:
        """Bytes of all the tensors it holds (packed codes, scales, code books)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        dq = "double-quantized" if self.double_quant else "fp32 absmax"
        return f"shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}, {self.nbytes} bytes"

    # ---- bitsandbytes checkpoint interop -------------------------------------------------

    @classmethod
    def from_bnb_state(cls, tensors: dict[str, torch.Tensor], prefix: str, source: str) -> "NF4Weight":
        """Read the NF4 weight of linear ``prefix`` from a bitsandbytes-quantized checkpoint.

        ``tensors`` maps checkpoint keys to tensors (e.g. one safetensors file); ``source``
        names it in error messages. Keys read (transformers' ``save_pretrained`` of a bnb
        4-bit model): ``P.weight`` (uint8 [numel/2, 1]), ``P.weight.absmax``,
        ``P.weight.quant_map`` (the NF4 code book), ``P.weight.quant_state.bitsandbytes__nf4``
        (JSON: quant_type, blocksize, dtype, shape, and with double quantization
        nested_blocksize, nested_dtype, nested_offset) and, with double quantization,
        ``P.weight.nested_absmax`` and ``P.weight.nested_quant_map``.
        """
        w = f"{prefix}.weight"

        def fail(key, msg):
            raise ValueError(f"{source}: {key}: {msg}")

        def get(key, dtype=None, numel=None, what=""):
            """tensors[key], flattened, after checking that it exists and its dtype and size."""
            if key not in tensors:
                fail(key, f"missing (needed to read the bitsandbytes 4-bit weight '{w}')")
            t = tensors[key]
            if (dtype is not None and t.dtype != dtype) or (numel is not None and t.numel() != numel):
                fail(key, f"expected {dtype} [{numel}]{what}, got {t.dtype} {list(t.shape)}")
            return t.flatten()

        qs_key = f"{w}.quant_state.bitsandbytes__nf4"
        if qs_key not in tensors:
            others = sorted(k for k in tensors if k.startswith(f"{w}.quant_state."))
            if others:
                fail(", ".join(others), f"only NF4 is supported (expected the key '{qs_key}'); "
                                        "FP4 and other 4-bit types are not")
        try:
            state = json.loads(bytes(get(qs_key).cpu().to(torch.uint8).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(qs_key, f"expected JSON bytes of the quant state, could not parse them ({e})")
        nested = "nested_offset" in state or f"{w}.nested_absmax" in tensors
        fields = ("quant_type", "blocksize", "dtype", "shape")
        fields += ("nested_blocksize", "nested_dtype", "nested_offset") if nested else ()
        if not isinstance(state, dict) or any(f not in state for f in fields):
            fail(qs_key, f"expected a JSON object with the fields {fields}, got {state!r}")
        if state["quant_type"] != "nf4":
            fail(qs_key, f"quant_type {state['quant_type']!r} is not supported (expected 'nf4')")
        blocksize, shape = state["blocksize"], state["shape"]
        if blocksize not in VALID_BLOCKSIZES:
            fail(qs_key, f"blocksize {blocksize!r} is not one of {VALID_BLOCKSIZES}")
        if state["dtype"] not in _SUPPORTED_DTYPES:
            fail(qs_key, f"dtype {state['dtype']!r} is not one of {sorted(_SUPPORTED_DTYPES)}")
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
            fail(qs_key, f"shape {shape!r} is not a list of positive integers")
        numel = torch.Size(shape).numel()
        if numel % blocksize:
            fail(qs_key, f"shape {shape} has {numel} elements, not a multiple of blocksize {blocksize} "
                         "(bitsandbytes pads such weights; nanolora does not read them)")
        n_blocks = numel // blocksize

        packed = get(w)
        if packed.dtype != torch.uint8:
            # bnb_4bit_quant_storage (e.g. bf16 for FSDP) stores the same bytes in a wider dtype
            packed = packed.contiguous().view(torch.uint8)
        if packed.numel() != numel // 2:
            fail(w, f"expected {numel // 2} packed bytes (shape {shape} from the quant state, "
                    f"2 codes per byte), got {tensors[w].dtype} {list(tensors[w].shape)}")
        code = get(f"{w}.quant_map", torch.float32, 16)
        if not torch.equal(code.cpu(), NF4_CODE):
            fail(f"{w}.quant_map", f"expected the NF4 code book {NF4_CODE.tolist()}, got {code.tolist()}")
        weight = dict(packed=packed.view(-1, 1), code=code, shape=shape, blocksize=blocksize,
                      dtype=_SUPPORTED_DTYPES[state["dtype"]])
        per_block = f" (one per block of {blocksize} in shape {shape})"
        if not nested:
            return cls(absmax=get(f"{w}.absmax", torch.float32, n_blocks, per_block), **weight)

        nested_blocksize = state["nested_blocksize"]
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            fail(qs_key, f"nested_blocksize {nested_blocksize!r} is not a positive integer")
        if state["nested_dtype"] != "float32":
            fail(qs_key, f"nested_dtype {state['nested_dtype']!r} is not supported (expected 'float32')")
        if not isinstance(state["nested_offset"], (int, float)):
            fail(qs_key, f"nested_offset {state['nested_offset']!r} is not a number")
        absmax = get(f"{w}.absmax", torch.uint8, n_blocks, per_block + ", double-quantized")
        n_nested = -(-n_blocks // nested_blocksize)
        nested_absmax = get(f"{w}.nested_absmax", torch.float32, n_nested,
                            f" (one per {nested_blocksize} of the {n_blocks} absmax values)")
        return cls(absmax=absmax, nested_absmax=nested_absmax,
                   nested_code=get(f"{w}.nested_quant_map", torch.float32, 256),
                   offset=torch.tensor([float(state["nested_offset"])], dtype=torch.float32, device=absmax.device),
                   nested_blocksize=nested_blocksize, **weight)

    def to_bnb_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint entries transformers + bitsandbytes write for linear ``prefix``.

        Same keys, dtypes, shapes and JSON bytes as ``save_pretrained`` of a bnb 4-bit model.
        """
        w = f"{prefix}.weight"
        state = {"quant_type": "nf4", "blocksize": self.blocksize,
                 "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        out = {w: self.packed, f"{w}.absmax": self.absmax, f"{w}.quant_map": self.code}
        if self.double_quant:
            out[f"{w}.nested_absmax"] = self.nested_absmax
            out[f"{w}.nested_quant_map"] = self.nested_code
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                         nested_offset=self.offset.item())
        out[f"{w}.quant_state.bitsandbytes__nf4"] = torch.tensor(
            list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return out


def read_bnb_quantization_config(quantization_config: dict | None, source: str) -> list[str] | None:
    """config.json's ``quantization_config`` -> None for an unquantized checkpoint, else the
    module names bitsandbytes left unquantized (``llm_int8_skip_modules``, maybe empty).

    Only bitsandbytes 4-bit NF4 is read (what QLoRA and every ``*-bnb-4bit`` checkpoint
    use); anything else is refused here, naming the file and the field, before any weight
    is read. ``source`` names config.json.
    """
    if not quantization_config:
        return None
    config = quantization_config

    def refuse(field, supported):
        raise ValueError(f"{source}: quantization_config.{field} = {config.get(field)!r} is not supported "
                         f"(supported: {supported}; nanolora reads bitsandbytes 4-bit NF4 checkpoints only)")

    if config.get("quant_method", "bitsandbytes") != "bitsandbytes":
        refuse("quant_method", "'bitsandbytes'")
    if config.get("load_in_8bit"):
        refuse("load_in_8bit", "false")
    if not config.get("load_in_4bit"):
        refuse("load_in_4bit", "true")
    if config.get("bnb_4bit_quant_type", "fp4") != "nf4":  # bitsandbytes' default is fp4
        refuse("bnb_4bit_quant_type", "'nf4'")
    skipped = config.get("llm_int8_skip_modules") or []
    if isinstance(skipped, str) or not all(isinstance(name, str) for name in skipped):
        refuse("llm_int8_skip_modules", "null or a list of module names")
    return list(skipped)


# ---- quantize ------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def grid_to_code_index(device: torch.device, signed: bool = True) -> torch.Tensor:
    """uint8 [65536]: grid point g (value -1 + 2g/65535, fp32) -> nearest dynamic code index.

    "Nearest, ties lower" = the number of code midpoints strictly below the grid value.
    Float32 throughout, like bitsandbytes' table. (The unsigned code only meets the upper half
    of the grid, x >= 0.) kernels/adamw_8bit.py looks codes up in this same table.
    """
    code = DYNAMIC_CODE if signed else DYNAMIC_CODE_UNSIGNED
    g = torch.arange(_GRID + 1, dtype=torch.float32)
    grid_values = (g + g) / torch.full_like(g, _GRID) - 1.0
    midpoints = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(midpoints, grid_values, right=False).to(torch.uint8).to(device)


def quantize_dynamic_8bit(values: torch.Tensor, blocksize: int,
                          signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of float32 ``values`` with the dynamic code (signed or
    unsigned), as bitsandbytes 0.50 does it on the CPU. Returns (uint8 indices [n], float32
    block absmax [ceil(n/blocksize)]); ``dequantize_dynamic_8bit`` reads them back.
    """
    n = values.numel()
    n_blocks = -(-n // blocksize)
    # zero padding changes no block's max |.| and its codes are sliced off below
    blocks = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # an all-zero block: x = 0, not NaN
    x = (blocks * inverse.unsqueeze(1)).clamp(-1.0, 1.0)
    # g = trunc(fma(t, 65535, 0.5)) with t = (x + 1) * 0.5. In float64, t * 65535 + 0.5 is exact
    # whenever t >= 2^-30 (40-bit product + 0.5 fits in 53 bits), so rounding that to float32
    # gives the fused multiply-add's single rounding; for smaller t both give g = 0.
    t = (x + 1.0) * 0.5
    g = (t.double() * _GRID + 0.5).float().trunc().long()
    g.clamp_(0, _GRID)  # a NaN (an optimizer fed a NaN gradient) becomes some index, not an out-of-range one
    q = grid_to_code_index(values.device, signed)[g]
    q[absmax == 0] = 0  # bitsandbytes writes index 0 for an all-zero block
    return q.flatten()[:n], absmax


def dequantize_dynamic_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                            signed: bool = True) -> torch.Tensor:
    """float32 [n]: code[q] * absmax[block], one fp32 multiply (bitsandbytes' dequantize_blockwise)."""
    code = (DYNAMIC_CODE if signed else DYNAMIC_CODE_UNSIGNED).to(q.device)
    return (code[q.long()] * absmax.repeat_interleave(blocksize)[:q.numel()]).view(q.shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (fp32/fp16/bf16, any shape) to NF4, on the weight's device.

    The result equals bitsandbytes' ``quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` byte for byte (packed codes, absmax, nested absmax,
    offset). ``weight.numel()`` must be a multiple of ``blocksize``: bitsandbytes pads a
    ragged last block, nanolora refuses it (every linear of the supported models has an
    input dimension that is a multiple of 64).
    """
    if weight.dtype not in _SUPPORTED_DTYPES.values():
        raise ValueError(f"quantize_nf4: weight dtype {weight.dtype} is not supported "
                         "(expected float32, float16 or bfloat16)")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize {blocksize} is not one of {VALID_BLOCKSIZES}")
    numel = weight.numel()
    if numel == 0 or numel % blocksize:
        raise ValueError(f"quantize_nf4: weight of shape {list(weight.shape)} has {numel} elements, "
                         f"not a positive multiple of blocksize {blocksize} (nanolora requires whole "
                         "blocks; bitsandbytes would pad the last one)")
    flat = weight.detach().reshape(-1)
    device = weight.device
    code = NF4_CODE.to(device)
    midpoints = (code[:-1] + code[1:]) / 2
    n_blocks = numel // blocksize
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    packed = torch.empty(numel // 2, dtype=torch.uint8, device=device)
    step = max(_CHUNK // blocksize, 1) * blocksize
    for start in range(0, numel, step):
        blocks = flat[start:start + step].float().view(-1, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        b0 = start // blocksize
        absmax[b0:b0 + blocks.shape[0]] = block_absmax
        # multiply by the reciprocal (as bitsandbytes does); the clamp(min) keeps an all-zero
        # block finite (0 * 1e38 = 0 -> code 7, the exact 0) while absmax itself stays 0
        scaled = (blocks * (1.0 / block_absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1.0, 1.0)
        q = torch.bucketize(scaled.view(-1), midpoints, out_int32=True).to(torch.uint8)  # ties lower
        packed[start // 2:(start + blocks.numel()) // 2] = (q[0::2] << 4) | q[1::2]
    packed = packed.view(-1, 1)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, code=code, shape=weight.shape,
                         dtype=weight.dtype, blocksize=blocksize)
    offset = absmax.mean()
    absmax_q, nested_absmax = quantize_dynamic_8bit(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Weight(packed=packed, absmax=absmax_q, code=code, shape=weight.shape, dtype=weight.dtype,
                     blocksize=blocksize, nested_absmax=nested_absmax,
                     nested_code=DYNAMIC_CODE.to(device), offset=offset)


# ---- dequantize ----------------------------------------------------------------------------

def dequantize_absmax(q: NF4Weight) -> torch.Tensor:
    """float32 [n_blocks]: the per-block scales, undoing double quantization if there was one."""
    if not q.double_quant:
        return q.absmax
    n_blocks = q.absmax.numel()
    nested = q.nested_absmax.repeat_interleave(q.nested_blocksize)[:n_blocks]
    return q.nested_code[q.absmax.long()] * nested + q.offset  # mul, then add: two roundings


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of the original shape, in ``dtype`` (default: the original dtype).

    float32 math, one cast at the end (see the module docstring for the exact order): equal
    to bitsandbytes' ``dequantize_4bit`` and to ``kernels/nf4_dequant.py``, bit for bit.
    """
    dtype = q.dtype if dtype is None else dtype
    packed = q.packed.view(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).view(-1).int()  # high nibble first
    values = q.code[codes].view(-1, q.blocksize) * dequantize_absmax(q).unsqueeze(1)
    return values.to(dtype).view(q.shape)
