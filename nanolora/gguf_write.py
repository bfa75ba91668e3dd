"""Writing GGUF files for llama.cpp: a model with its LoRA merged, or the LoRA adapter alone.

The file layout is the one nanolora/gguf.py reads (header, metadata, tensor table, data
aligned to 32 bytes). Tensor sizes follow from shapes and types, so the table is written
first and the data streamed after it, one tensor at a time: a model is never held twice.

What llama.cpp expects, from convert_hf_to_gguf.py / convert_lora_to_gguf.py:

- Architectures: Llama and Mistral are `llama` (Mistral's sliding window is not applied by
  llama.cpp there), Qwen2 `qwen2`, Qwen3 `qwen3`. Tensor names as in nanolora/gguf.py.
- Llama only: q and k rows (weights and biases) are permuted from HF's rotate-half layout to
  llama.cpp's interleaved pairs: per head, rows [2, head_dim/2] become [head_dim/2, 2].
- Llama-3 rope scaling is a `rope_freqs.weight` tensor [head_dim/2] of per-frequency divisors
  (qwen2 / qwen3 have no such tensor in llama.cpp); linear scaling is `rope.scaling.*` keys.
- Tensor types (`quant`): 1-D tensors (norms, biases, rope_freqs) stay F32; every 2-D weight
  gets the chosen type, except with `q4_k_m`, llama.cpp's mix (llama_tensor_get_type in
  src/llama-quant.cpp, for a dense model without an importance matrix):
    output.weight (token_embd.weight when the head is tied)  Q6_K (Q8_0 if its rows are not
                                                              a multiple of 256)
    blk.i.attn_v.weight, blk.i.ffn_down.weight                Q6_K when use_more_bits(i), else Q4_K
    everything else                                           Q4_K
  with use_more_bits(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2 for n layers (so the
  first and last eighth of the layers and every third in between); and what llama.cpp calls
  a 70B model (80 layers: llama with grouped-query attention, or qwen2) gets Q5_K instead of
  Q4_K for the other attn_v. LoRA layers' lora_a / lora_b are never K-quants (f32 to q8_0).
- Rows whose length is not a multiple of the type's block fall back as llama-quantize's
  tensor_type_fallback does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to F16 when even
  32 does not divide the row (also for Q8_0 / Q4_0, as convert_hf_to_gguf.py does).
- LoRA adapters: general.type `adapter`, adapter.type `lora`, adapter.lora.alpha; per
  adapted weight W, `W.lora_a` = A [r, in] and `W.lora_b` = B [out, r] as torch stores them
  (so dims [in, r] and [r, out] in the file), B's rows permuted like W's for llama q/k.
  llama.cpp scales by alpha / r, so rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r).
"""
import math
import queue
import struct
import threading
import warnings

import numpy as np
import torch

from nanolora.checkpoint import MergedRows, check_finite, expected_weights, merged_tensors
from nanolora.files import DiskWriteback, atomic_path
from nanolora.gguf import GLOBAL_NAMES, LAYER_NAMES
from nanolora.gguf_quants import GGML_TYPES, TYPE_IDS, row_bytes
from nanolora.gguf_quantize import quantize
from nanolora.gguf_vocab import tokenizer_metadata
from nanolora.lora import lora_layers
from nanolora.model import hf_key
from nanolora.ops import rope_inv_freq

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # HF -> llama.cpp
QUANTS = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
          "q4_k": ("Q4_K", 14), "q6_k": ("Q6_K", 18), "q4_k_m": ("Q4_K", 15)}  # -> (type, general.file_type)
LORA_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what convert_lora_to_gguf.py writes
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
ALIGNMENT = 32
# HF names -> GGUF names: the reader's tables (nanolora/gguf.py) turned around
_GLOBAL_TO_GGUF = {hf: name for name, hf in GLOBAL_NAMES.items()}
_LAYER_TO_GGUF = {hf: name for name, hf in LAYER_NAMES.items()}


def gguf_name(key: str) -> str:
    """HF key -> GGUF tensor name: model.layers.3.mlp.down_proj.weight -> blk.3.ffn_down.weight."""
    if key in _GLOBAL_TO_GGUF:
        return _GLOBAL_TO_GGUF[key]
    layer, rest = key.removeprefix("model.layers.").split(".", 1)
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_TO_GGUF[module]}.{param}"


def gguf_architecture(config) -> str:
    """The llama.cpp architecture for `config`, or an error for what llama.cpp cannot run."""
    arch = ARCHITECTURES.get(config.model_type)
    problem = None
    if arch is None:
        problem = f"model_type {config.model_type!r} has no llama.cpp architecture here"
    elif (config.rope_scaling or {}).get("rope_type") == "llama3" and arch != "llama":
        problem = f"llama3 rope scaling has no rope_freqs tensor in llama.cpp's {arch}"
    elif arch == "qwen3" and config.o_bias:
        problem = "llama.cpp's qwen3 has no o_proj bias"
    if problem:
        raise ValueError(f"GGUF export: {problem} (supported: {', '.join(ARCHITECTURES)}; llama3 rope scaling "
                         f"on llama and mistral only; no o_proj bias on qwen3)")
    return arch


def _permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved pairs (the inverse of gguf.unpermute_rows)."""
    return w.reshape(n_heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape, quant: str, config) -> str:
    """The ggml type `name` is written in for --quant `quant` (see the module docstring)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return "F32"
    ggml_type = QUANTS[quant][0]
    if quant == "q4_k_m":
        kind = name.split(".")[-2]
        if name == "output.weight" or (config.tie_word_embeddings and name == "token_embd.weight"):
            ggml_type = "Q6_K" if shape[-1] % 256 == 0 else "Q8_0"
        elif kind in ("attn_v", "ffn_down") and _use_more_bits(int(name.split(".")[1]), config.n_layers):
            ggml_type = "Q6_K"
        elif kind == "attn_v" and config.n_layers == 80 and (
                config.model_type == "qwen2" or config.n_heads != config.n_kv_heads):
            ggml_type = "Q5_K"  # llama.cpp's "70B" (80 layers: Llama 2/3 70B, Qwen2 72B): 8x smaller attn_v
    if shape[-1] % GGML_TYPES[TYPE_IDS[ggml_type]][1]:
        ggml_type = FALLBACK.get(ggml_type, ggml_type)
        if shape[-1] % GGML_TYPES[TYPE_IDS[ggml_type]][1]:
            ggml_type = "F16"
    return ggml_type


def model_metadata(config, arch: str, quant: str, name: str) -> dict:
    """The general.* and {arch}.* keys convert_hf_to_gguf.py writes for this config."""
    meta = {"general.architecture": arch, "general.type": "model", "general.name": name,
            "general.file_type": QUANTS[quant][1], "general.quantization_version": 2,
            f"{arch}.context_length": config.max_position_embeddings,
            f"{arch}.embedding_length": config.hidden_size,
            f"{arch}.feed_forward_length": config.intermediate_size,
            f"{arch}.block_count": config.n_layers,
            f"{arch}.attention.head_count": config.n_heads,
            f"{arch}.attention.head_count_kv": config.n_kv_heads,
            f"{arch}.attention.key_length": config.head_dim,
            f"{arch}.attention.value_length": config.head_dim,
            f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
            f"{arch}.rope.freq_base": float(config.rope_theta),
            f"{arch}.rope.dimension_count": config.head_dim,
            f"{arch}.vocab_size": config.vocab_size}
    if (config.rope_scaling or {}).get("rope_type") == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(config.rope_scaling["factor"])
    return meta


def write_gguf_model(model, tokenizer, path, quant="f16", source=None, name=None, progress=None, device=None):
    """Write `model` with its LoRA merged (W + scale B A in fp32, rounded once) as one GGUF file.

    source: the base model's folder or .gguf file (for the tokenizer metadata). progress: see
    write_gguf. device: where tensors are quantized (default: CUDA when there is one).
    Three stages run at once, tensor by tensor: a thread makes the next weight while another
    quantizes the one before it and this one writes the one before that. On the CPU a LoRA
    weight is merged by the quantizer's threads, a block of rows at a time (MergedRows).
    """
    if quant not in QUANTS:
        raise ValueError(f"--quant {quant!r} is not a GGUF model type (supported: {', '.join(QUANTS)})")
    config = model.config
    arch = gguf_architecture(config)
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        warnings.warn(f"llama.cpp's {arch} architecture does not apply the sliding window "
                      f"({config.sliding_window} tokens): its outputs differ from this model's past that length")
    metadata = model_metadata(config, arch, quant, name or "model")
    metadata.update(tokenizer_metadata(tokenizer, config.vocab_size, source, config))

    def permuted_heads(key):  # llama.cpp's llama kernels take q/k rows in its own order (see _permute_rows)
        if arch == "llama" and ".self_attn.q_proj." in key:
            return config.n_heads
        if arch == "llama" and ".self_attn.k_proj." in key:
            return config.n_kv_heads
        return None

    tensors = []  # (name, shape, type, key): the table, known before any data is computed
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", (config.head_dim // 2,), "F32", None))
    for key, shape in expected_weights(config).items():
        tensor_name = gguf_name(key)
        tensors.append((tensor_name, shape, tensor_type(tensor_name, shape, quant, config), key))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # on the CPU a LoRA weight is merged a block of rows at a time inside the quantizer, in cache
    # (checkpoint.MergedRows); for CUDA it is merged whole here, on the CPU, beside the GPU's work
    merged = merged_tensors(model, by_rows=torch.device(device).type == "cpu")

    def values():
        for tensor_name, shape, ggml_type, key in tensors:
            if key is None:
                yield rope_freqs(config, source), ggml_type, None
                continue
            _, values = next(merged)  # merged_tensors gives them in this order, or raises
            if not isinstance(values, MergedRows):  # a MergedRows checks each block it makes
                check_finite(key, values)
            yield values, ggml_type, permuted_heads(key)
        next(merged, None)  # runs merged_tensors to its end, which checks that nothing is left

    encoded = (_encode_tensor(v, t, device, heads) for v, t, heads in _ahead(values()))
    write_gguf(path, metadata, [(n, s, t) for n, s, t, _ in tensors], _ahead(encoded), progress)


def rope_freqs(config, source=None):
    """rope_freqs.weight: llama.cpp divides frequency i by factor i, so the factors are the
    unscaled frequencies over ours (the same arithmetic as the model's). A GGUF base's own
    tensor is carried through as stored: the factors read back from its fit can differ from
    it in the last bit (1.0 -> 1.0000001)."""
    if source is not None and str(source).endswith(".gguf"):
        from nanolora.gguf import GGUFFile
        base = GGUFFile(source)
        if "rope_freqs.weight" in base.tensors and base.tensors["rope_freqs.weight"][0] == (config.head_dim // 2,):
            return base.tensor("rope_freqs.weight")
    plain = rope_inv_freq(config.head_dim, config.rope_theta)
    return plain.double() / rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).double()


def write_gguf_lora(model, path, quant="f32", progress=None):
    """Write the LoRA adapter of `model` alone, as llama.cpp's `--lora` reads it."""
    if quant not in LORA_QUANTS:
        raise ValueError(f"--quant {quant!r} is not a GGUF LoRA type (supported: {', '.join(LORA_QUANTS)})")
    config = model.config
    arch = gguf_architecture(config)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("GGUF LoRA export: the model has no LoRA layers")
    first = layers[0][1]
    alpha = first.scale * first.r  # llama.cpp's scale is alpha / r (rank = lora_b's first GGUF dim)
    metadata = {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                "adapter.lora.alpha": float(alpha), "general.file_type": QUANTS[quant][1],
                "general.quantization_version": 2}
    tensors, matrices = [], []
    for module_name, layer in layers:
        if layer.scale != first.scale:
            raise ValueError(f"GGUF LoRA export: {module_name} has scale {layer.scale}, not {first.scale}; "
                             f"llama.cpp applies one alpha to the whole adapter")
        base = gguf_name(hf_key(f"{module_name}.weight"))
        lora_b = layer.lora_B.detach().float().cpu()
        if arch == "llama" and module_name.endswith("q_proj"):
            lora_b = _permute_rows(lora_b, config.n_heads)
        elif arch == "llama" and module_name.endswith("k_proj"):
            lora_b = _permute_rows(lora_b, config.n_kv_heads)
        for suffix, matrix in (("lora_a", layer.lora_A.detach().float().cpu()), ("lora_b", lora_b)):
            ggml_type = tensor_type(f"{base}.{suffix}", tuple(matrix.shape), quant, config)
            tensors.append((f"{base}.{suffix}", tuple(matrix.shape), ggml_type))
            matrices.append(matrix)
    write_gguf(path, metadata, tensors, (_encode_tensor(m, t) for m, (_, _, t) in zip(matrices, tensors)),
               progress)


def _encode_tensor(values, ggml_type: str, device="cpu", permuted_heads=None) -> np.ndarray:
    """The bytes of one tensor, [rows, row bytes]; a 1-D tensor is a column of one-value rows.
    Quantization is row by row, so llama.cpp's q/k row order is applied to the encoded rows."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        values = values.reshape(-1, 1) if values.dim() == 1 else values.reshape(-1, values.shape[-1])
    encoded = quantize(values, ggml_type, device)
    if permuted_heads:
        encoded = _permute_rows(torch.from_numpy(encoded), permuted_heads).numpy()
    return encoded


def _ahead(items, depth=1):
    """Iterate `items` in a background thread, up to `depth` items ahead of the consumer, so
    that making the next item overlaps using this one (torch ops and file writes release the
    GIL). An exception in `items` is raised here; if the consumer stops early, so does the
    thread."""
    slots, stop = queue.Queue(depth), threading.Event()

    def put(entry):
        while not stop.is_set():
            try:
                return slots.put(entry, timeout=0.1)
            except queue.Full:
                pass

    def produce():
        try:
            for item in items:
                put((True, item))
                if stop.is_set():
                    return
            put((False, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((False, e))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            more, item = slots.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


# ----------------------------------------------------------------------------- the file

def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value) -> tuple[int, bytes]:
    """A metadata value -> (GGUF value type, bytes). bool -> BOOL, int -> UINT32, float ->
    FLOAT32, str -> STRING; a list -> ARRAY of its items' type, except that a list of ints
    is INT32 (token types: the only integer arrays llama.cpp reads here)."""
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    if isinstance(value, str):
        return 8, _string(value)
    if isinstance(value, (list, tuple)) and value:
        head = struct.pack("<Q", len(value))
        if isinstance(value[0], str):
            return 9, struct.pack("<I", 8) + head + b"".join(_string(v) for v in value)
        if isinstance(value[0], bool):
            return 9, struct.pack("<I", 7) + head + np.asarray(value, np.bool_).tobytes()
        if isinstance(value[0], int):
            return 9, struct.pack("<I", 5) + head + np.asarray(value, "<i4").tobytes()
        if isinstance(value[0], float):
            return 9, struct.pack("<I", 6) + head + np.asarray(value, "<f4").tobytes()
    raise TypeError(f"GGUF metadata: cannot store {type(value).__name__} {value!r}")


def _padding(n: int) -> bytes:
    return bytes(-n % ALIGNMENT)


def write_gguf(path, metadata: dict, tensors, data, progress=None):
    """Write a GGUF v3 file. tensors: [(name, torch-order shape, ggml type name)]; data: an
    iterable giving each tensor's bytes (uint8 array) in the same order, produced as the file
    is written. The file appears at `path` only once complete. progress: called after each
    tensor as progress(done, total, label, bytes_done, bytes_total) (bytes of tensor data)."""
    header = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        value_type, encoded = _value(value)
        header += [_string(key), struct.pack("<I", value_type), encoded]
    offset, sizes = 0, []
    for name, shape, ggml_type in tensors:
        size = math.prod(shape[:-1]) * row_bytes(ggml_type, shape[-1])
        header += [_string(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *reversed(shape)),
                   struct.pack("<IQ", TYPE_IDS[ggml_type], offset)]
        sizes.append(size)
        offset += size + len(_padding(size))
    header = b"".join(header)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, DiskWriteback(f) as writeback:
        f.write(header + _padding(len(header)))
        data, written = iter(data), 0
        for i, ((name, shape, ggml_type), size) in enumerate(zip(tensors, sizes)):
            raw = np.ascontiguousarray(next(data)).view(np.uint8)
            if raw.size != size:
                raise ValueError(f"GGUF: tensor {name} has {raw.size} bytes of data, expected {size}")
            f.write(raw)  # the array's buffer as it is (tobytes would copy it first)
            f.write(_padding(size))
            writeback.wrote()
            written += size
            if progress:
                progress(i + 1, len(tensors), f"{name} {ggml_type}", written, sum(sizes))
        if next(data, None) is not None:  # also what lets the producer finish, and raise what it found
            raise ValueError(f"GGUF: more tensor data than the {len(tensors)} tensors of the table")
