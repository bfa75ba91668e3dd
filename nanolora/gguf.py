"""GGUF, llama.cpp's one-file checkpoint: read one as a base model.

`read_gguf_checkpoint(path)` turns a .gguf file into what load.py gets from an HF folder:
an HF-style config dict, the tensors under their HF names (read lazily, one at a time, in HF
layout: F32/F16/BF16 as stored, the block types dequantized to fp32) and the tokenizer the
file describes.

File layout (GGUF v2/v3, little-endian; ggml-org/ggml docs/gguf.md):

    "GGUF" | u32 version | u64 n_tensors | u64 n_metadata
    n_metadata x (string key | u32 value type | value)
    n_tensors  x (string name | u32 n_dims | n_dims x u64 dim | u32 ggml type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets are from here)

A string is a u64 byte count then UTF-8 bytes; an array is a u32 item type, a u64 count and
the items. Dims are listed fastest-varying first, so a torch [out, in] weight has dims
[in, out]. Quantized types store each row as blocks of 32 (256 for the K-quants) consecutive
values (the block formats are in nanolora/gguf_quants.py; nanolora/gguf_write.py writes GGUF
files).
"""
import math
import struct

import numpy as np
import torch

from nanolora.gguf_quants import GGML_TYPES as ALL_GGML_TYPES, READABLE, dequantize  # noqa: F401 (re-exported)

# ------------------------------------------------------------------------------- reading

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# ggml tensor types we read: id -> (name, values per block, bytes per block)
GGML_TYPES = {type_id: spec for type_id, spec in ALL_GGML_TYPES.items() if spec[0] in READABLE}
# the others, by name, for error messages (gguf-py constants.py GGMLQuantizationType)
OTHER_GGML_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
                    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
                    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# metadata value types: fixed-size ones as struct formats; 8 is a string, 9 an array
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
MAX_ARRAY_DEPTH = 4  # llama.cpp writes flat arrays; deeper nesting is a hostile file, not a model


class GGUFFile:
    """The metadata and tensor table of a GGUF file. The file is memory-mapped: tensor data
    is only read when `tensor(name)` asks for it.

    metadata: {key: value} (arrays as lists); tensors: {name: (shape [torch order],
    ggml type, absolute byte offset, byte count)}.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            # copy-on-write: a float tensor may be handed out over the mapping itself (see tensor()),
            # and a write to it (LoRALinear.merge in place) must change a private page, not the file
            self.data = np.memmap(path, dtype=np.uint8, mode="c")
        except ValueError:  # numpy cannot map an empty file
            raise ValueError(f"{path}: not a GGUF file (it is empty)") from None
        self._buf = memoryview(self.data)
        self._pos = 0
        try:
            self._read_header()
        except (EOFError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from None

    def _read_header(self):
        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError(f"{self.path}: not a GGUF file (it starts with {bytes(self._buf[:4])!r}, "
                             f"not the magic b'GGUF')")
        self._pos = 4
        version = self._unpack("I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise ValueError(f"{self.path}: GGUF version {version}{hint} is not supported (supported: 2, 3)")
        n_tensors, n_metadata = self._unpack("Q"), self._unpack("Q")
        self.metadata = {}
        for _ in range(n_metadata):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("Q") for _ in range(self._unpack("I"))]
            infos.append((name, tuple(reversed(dims)), self._unpack("I"), self._unpack("Q")))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-self._pos // alignment) * alignment  # round up to the alignment
        self.tensors = {}
        for name, shape, ggml_type, offset in infos:
            n_values = math.prod(shape)
            if ggml_type in GGML_TYPES:
                _, block_values, block_bytes = GGML_TYPES[ggml_type]
                if shape and shape[-1] % block_values:
                    raise ValueError(f"{self.path}: tensor {name!r} has rows of {shape[-1]} values, not a "
                                     f"multiple of the {GGML_TYPES[ggml_type][0]} block size {block_values}")
                n_bytes = n_values // block_values * block_bytes
                if data_start + offset + n_bytes > len(self.data):
                    raise ValueError(f"{self.path}: tensor {name!r} ends past the end of the file "
                                     f"(truncated: {len(self.data)} bytes)")
            else:
                n_bytes = None  # unknown type: only an error when someone reads it
            self.tensors[name] = (shape, ggml_type, data_start + offset, n_bytes)

    def _take(self, n_bytes):
        """The offset of the next n_bytes, which the cursor moves past."""
        if self._pos + n_bytes > len(self._buf):
            raise EOFError(f"{n_bytes} bytes needed at offset {self._pos}, past the end of the file")
        self._pos += n_bytes
        return self._pos - n_bytes

    def _unpack(self, fmt):
        return struct.unpack_from("<" + fmt, self._buf, self._take(struct.calcsize(fmt)))[0]

    def _string(self):
        return self._strings(1)[0]

    def _strings(self, count):
        """The next `count` strings: an array's (a vocabulary, its merges: ~10^5 of them) in one
        loop, 4x faster than reading them one call at a time."""
        buf, pos, end, strings = self._buf, self._pos, len(self._buf), []
        for _ in range(count):
            if pos + 8 > end:
                raise EOFError(f"a string's length needed at offset {pos}, past the end of the file")
            (n,) = _U64.unpack_from(buf, pos)
            if pos + 8 + n > end:
                raise EOFError(f"{n} bytes needed at offset {pos + 8}, past the end of the file")
            strings.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
            pos += 8 + n
        self._pos = pos
        return strings

    def _value(self, value_type, depth=0):
        if value_type in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._unpack("I"), self._unpack("Q")
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"{self.path}: metadata arrays nested deeper than {MAX_ARRAY_DEPTH} "
                                 f"at offset {self._pos - 12}")
            if item_type in _SCALAR_FORMATS:  # one vectorised read (token scores, types ...)
                dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
                return np.frombuffer(self._buf, dtype, count, self._take(count * dtype.itemsize)).tolist()
            if item_type == _STRING:
                return self._strings(count)
            return [self._value(item_type, depth + 1) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown metadata value type {value_type} at offset {self._pos - 4}")

    def tensor(self, name, copy=True) -> torch.Tensor:
        """One tensor in torch order (a weight is [out, in]): F32, F16 and BF16 in that dtype,
        the block types dequantized to fp32. copy=False: a float tensor is a view of the
        file's mapping instead (export reads a 16-bit base without copying it), which lives as
        long as the tensor: a file rewritten meanwhile changes it, one cut short crashes its
        reader (SIGBUS), so a model that outlives its reading gets copies."""
        shape, ggml_type, start, n_bytes = self.tensors[name]
        check_tensor_type(self.path, name, ggml_type)
        raw = self.data[start:start + n_bytes]
        stored = _FLOAT_TYPES.get(GGML_TYPES[ggml_type][0])
        if stored is None:
            return torch.from_numpy(dequantize(raw, ggml_type)).reshape(shape)
        if not n_bytes:
            return torch.empty(shape, dtype=stored)
        if copy or start % stored.itemsize:  # general.alignment 1 may leave a tensor misaligned: a copy then
            raw = raw.copy()
        return torch.from_numpy(raw).view(stored).reshape(shape)


def check_tensor_type(path, name, ggml_type):
    if ggml_type not in GGML_TYPES:
        type_name = OTHER_GGML_TYPES.get(ggml_type, "unknown")
        supported = ", ".join(name for name, _, _ in GGML_TYPES.values())
        raise ValueError(f"{path}: tensor {name!r} has ggml type {type_name} ({ggml_type}), which "
                         f"nanolora cannot read (supported: {supported})")


# GGUF tensor name -> HF key. Per layer: "blk.{i}.<name>" -> "model.layers.{i}.<HF name>".
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(path, name):
    """A GGUF tensor name -> its HF key, or a clear error for names a decoder does not have."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"{path}: tensor {name!r} has no place in a Llama / Qwen2 / Qwen3 decoder")


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (llama architecture only).

    HF rotates the pairs (i, i + head_dim/2) of each head; llama.cpp's llama kernels rotate
    adjacent pairs (2i, 2i + 1), so its converter reorders each head's rows from
    [2, head_dim/2] to [head_dim/2, 2]. Here the rows go back: [n_heads, head_dim/2, 2] ->
    [n_heads, 2, head_dim/2]. Biases are rows too and were reordered the same way.
    """
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_checkpoint(path, copy=True):
    """A .gguf file -> (hf_config dict, [(hf_key, load)], Tokenizer); load() reads one tensor
    (copy=False: float tensors as views of the file, see GGUFFile.tensor)."""
    gguf = GGUFFile(path)
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    for name, (_, ggml_type, _, _) in gguf.tensors.items():
        check_tensor_type(path, name, ggml_type)
    config = hf_config(gguf, arch)

    tensors = []
    for name in gguf.tensors:
        if name == "rope_freqs.weight":  # folded into config["rope_scaling"]
            continue
        permuted_heads = None  # llama.cpp permutes llama's q and k rows (see unpermute_rows)
        if arch == "llama" and ".attn_q." in name:
            permuted_heads = config["num_attention_heads"]
        elif arch == "llama" and ".attn_k." in name:
            permuted_heads = config["num_key_value_heads"]
        tensors.append((hf_name(path, name), _loader(gguf, name, permuted_heads, copy)))
    return config, tensors, gguf_tokenizer(gguf)


def _loader(gguf, name, permuted_heads, copy):
    def load():
        w = gguf.tensor(name, copy)
        return w if permuted_heads is None else unpermute_rows(w, permuted_heads)
    load.where = gguf.path
    return load


def hf_config(gguf, arch) -> dict:
    """The HF config.json the file's `{arch}.*` metadata stands for."""
    meta, path = gguf.metadata, gguf.path

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {arch}.{name} is missing")
        if isinstance(value, list):
            raise ValueError(f"{path}: metadata key {arch}.{name} holds one value per layer, "
                             f"which is not supported (supported: one value for all layers)")
        return value

    if "token_embd.weight" not in gguf.tensors:
        hint = "; a vocab-only GGUF holds a tokenizer alone: nanolora.load_tokenizer reads it" if not gguf.tensors else ""
        raise ValueError(f"{path}: no tensor 'token_embd.weight' (the token embedding){hint}")
    hidden, n_heads = key("embedding_length"), key("attention.head_count")
    for name, value in (("embedding_length", hidden), ("attention.head_count", n_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {arch}.{name} must be a positive integer, got {value!r}")
    # llama writes the rotary width as rope.dimension_count (= head_dim: all of it rotates)
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") \
        or hidden // n_heads
    config = {
        "model_type": arch,
        "vocab_size": gguf.tensors["token_embd.weight"][0][0],
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,  # llama.cpp reuses token_embd
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported "
                         f"(supported: none, linear, and Llama-3 scaling as a rope_freqs tensor)")
    if "rope_freqs.weight" in gguf.tensors:
        config["rope_scaling"] = llama3_rope_scaling(gguf.tensor("rope_freqs.weight").double().numpy(),
                                                     config["rope_theta"], head_dim, path)
    return config


def llama3_rope_scaling(freq_factors, theta, head_dim, path):
    """rope_freqs.weight -> the HF `rope_scaling` of type llama3 that gives the same RoPE.

    llama.cpp divides rotary frequency i (wavelength w_i = 2pi theta^(2i/d)) by factor_i.
    Llama-3 scaling makes that 1 where w < orig/high, `factor` where w > orig/low, and
    1 / ((1 - s)/factor + s) in between, with s = (orig/w - low) / (high - low): s is a line
    in x = 1/w that crosses 0 at w = orig/low and 1 at w = orig/high. So read `factor` as
    the largest divisor, s_i from each divisor, fit the line, and fix low = 1 (only orig/low
    and orig/high matter). The result is checked against every divisor.
    """
    from nanolora.ops import rope_inv_freq  # what the model will compute from the result
    x = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    if freq_factors.shape != x.shape:
        raise ValueError(f"{path}: rope_freqs.weight has {freq_factors.size} values, expected "
                         f"{x.size} (head_dim / 2)")
    factor = freq_factors.max()
    if factor <= 1.0 + 1e-6:
        return None  # nothing is scaled
    s = (1 / freq_factors - 1 / factor) / (1 - 1 / factor)
    medium = (s > 1e-6) & (s < 1 - 1e-6)
    x_long, short = x[s <= 1e-6].max(), x[s >= 1 - 1e-6]
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], s[medium], 1)
    else:  # too few points inside the band to fit: any line through them with the long
        # wavelengths at s <= 0 and the short ones at s >= 1 gives the same divisors
        xm, sm = (x[medium][0], s[medium][0]) if medium.any() else (x_long, 0.0)
        slopes = [sm / (xm - x_long)] if medium.any() else []
        slopes += [(1 - sm) / (short.min() - xm)] if short.size else [1 / x_long]
        slope = max(slopes)
        intercept = sm - slope * xm
    scaling = {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
               "high_freq_factor": float(1 - 1 / intercept),
               "original_max_position_embeddings": float(-slope / intercept)}
    got = (rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, scaling)).double().numpy()
    if not (slope > 0 > intercept) or not np.allclose(got, freq_factors, rtol=1e-5):
        raise ValueError(f"{path}: rope_freqs.weight does not follow Llama-3 rope scaling "
                         f"(per-frequency factors {freq_factors.tolist()}); not supported")
    return scaling


# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre`: the regexes llama.cpp splits text with
# (src/llama-vocab.cpp), applied in turn, each to the pieces the previous one left.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_CJK = "[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK_LLM_LETTERS = (  # llama.cpp's explicit letter ranges for deepseek-llm (escaped: some are
    # canonically equivalent to other characters, and an editor's normalization would change them)
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-"
    "\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113"
    "\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
    "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-"
    "\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")
# Mistral Nemo's: an upper-case run then lower-case letters, where "upper" is any letter but a-z
# and "lower" any letter but A-Z (llama.cpp's rewrite of \p{Lu}... / \p{Ll}..., which it lacks)
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
                 r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"], [_LLAMA3_SPLIT]),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], [_QWEN2_SPLIT]),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"], [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"], [_GPT2_SPLIT]),
    "deepseek-llm": ["[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", _CJK, r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"],
    "tekken": [_TEKKEN_SPLIT],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
# pre-tokenizers for which llama.cpp adds BOS and takes a whole word in the vocabulary as is
_LLAMA3_LIKE = ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "tekken")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (1 normal, 2 unknown, 5 unused, 6 byte)


def _bpe(path, vocab, merges, **options):
    """A BPE backend; tokenizers' own error (a merge of tokens not in the vocabulary, say) named with the file."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models
    try:
        return Backend(models.BPE(vocab, merges, **options))
    except Exception as e:  # tokenizers raises plain Exception
        raise ValueError(f"{path}: the tokenizer metadata does not make a BPE vocabulary ({e})") from None


def gguf_tokenizer(gguf):
    """The tokenizer the file's `tokenizer.*` metadata describes, as a nanolora Tokenizer.

    gpt2: byte-level BPE (tokens + merges) behind the pre-tokenizer `tokenizer.ggml.pre` names.
    llama: sentencepiece, rebuilt as transformers does: a byte-fallback BPE whose merges are
    every split of a normal token into two tokens, best score first, behind the pipeline of
    transformers' LlamaTokenizer (tokenizer.llama_pipeline: spaces become '▁', one before the
    text unless tokenizer.ggml.add_space_prefix is false). Control tokens become special
    added tokens and user-defined ones plain added tokens, so they are matched whole in text.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

    from nanolora.tokenizer import Tokenizer, llama_pipeline
    meta, path = gguf.metadata, gguf.path
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama, "
                         f"with a tokenizer.ggml.tokens list)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    for name, values, kinds in (("tokens", tokens, str), ("token_type", types, int),
                                ("scores", meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens), (int, float))):
        if not isinstance(values, list) or len(values) != len(tokens) or not all(isinstance(v, kinds) for v in values):
            raise ValueError(f"{path}: tokenizer.ggml.{name} must be a list of {len(tokens)} "
                             f"{getattr(kinds, '__name__', 'number')} values")
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                             f"(supported: {', '.join(PRE_TOKENIZERS)})")
        # llama.cpp splits a merge at the first space after its first character
        merges = meta.get("tokenizer.ggml.merges", [])
        bad = next((m for m in merges if not isinstance(m, str) or " " not in m[1:]), None) \
            if isinstance(merges, list) else merges
        if bad is not None:
            raise ValueError(f"{path}: tokenizer.ggml.merges holds {str(bad)[:80]!r}, not a merge \"left right\"")
        merges = [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
        tok = _bpe(path, vocab, merges, ignore_merges=pre in _LLAMA3_LIKE)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        add_bos_default = pre in _LLAMA3_LIKE
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        candidates = [(tokens[i][:cut], tokens[i][cut:], scores[i]) for i in range(len(tokens)) if types[i] == 1
                      for cut in range(1, len(tokens[i])) if tokens[i][:cut] in vocab and tokens[i][cut:] in vocab]
        # best merged score first; ties as transformers' generate_merges orders them
        candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        if unk_id is not None and not (isinstance(unk_id, int) and 0 <= unk_id < len(tokens)):
            raise ValueError(f"{path}: tokenizer.ggml.unknown_token_id {unk_id!r} is not a token id")
        tok = _bpe(path, vocab, [(a, b) for a, b, _ in candidates], fuse_unk=True, byte_fallback=True,
                   unk_token=None if unk_id is None else tokens[unk_id])
        llama_pipeline(tok, add_prefix_space=meta.get("tokenizer.ggml.add_space_prefix", True),
                       precompiled_charsmap=bytes(meta.get("tokenizer.ggml.precompiled_charsmap") or b""),
                       remove_extra_whitespaces=bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False)))
        add_bos_default = True
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ttype in zip(tokens, types) if ttype == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ttype in zip(tokens, types) if ttype == USER_DEFINED])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None
    end_ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return Tokenizer.from_tokenizers(
        tok, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"), unk_token=token("unknown"),
        add_bos=meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
        add_eos=meta.get("tokenizer.ggml.add_eos_token", False), chat_template=meta.get("tokenizer.chat_template"),
        eos_token_ids=[i for i in end_ids if i is not None])
