"""GGUF files made by the tests: an HF checkpoint folder converted with gguf-py's GGUFWriter
and gguf.quants, following llama.cpp's convert_hf_to_gguf.py (names, q/k permutation, keys,
tokenizer metadata). This is the reference side of the GGUF tests: nothing here comes from
nanolora.
"""
import contextlib
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

QUANT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
               "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# HF model_type -> llama.cpp architecture (Mistral converts as llama)
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
         "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(hf_folder, out_path, quant="f32", tokenizer_pre="llama-bpe"):
    """Convert the HF checkpoint in `hf_folder` to a GGUF file at `out_path`.

    quant: every 2-D weight is stored in this type (f32, f16, bf16, q8_0, q4_0, q4_1); 1-D
    tensors (norms, biases, rope_freqs) stay F32, as llama.cpp keeps them.
    tokenizer_pre: what `tokenizer.ggml.pre` says for a byte-level BPE tokenizer
    (llama.cpp's converter derives it from a hash of the vocabulary; the test tokenizers
    are trained with Llama-3's split, which is "llama-bpe").
    """
    folder = Path(hf_folder)
    cfg = json.loads((folder / "config.json").read_text())
    arch = ARCHS[cfg["model_type"]]
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv_head = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = {**(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    # TextModel.set_gguf_parameters (+ LlamaModel's additions)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(n_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv_head)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])

    if (folder / "tokenizer.model").exists():
        _set_vocab_sentencepiece(writer, folder, cfg["vocab_size"])
    else:
        _set_vocab_gpt2(writer, folder, cfg["vocab_size"], tokenizer_pre)

    tensors = load_file(folder / "model.safetensors")
    if rope_type == "llama3":  # LlamaModel.generate_extra_tensors
        tensors["rope_freqs.weight"] = llama3_rope_factors(rope, rope_theta, head_dim)
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    for hf_key, w in tensors.items():
        w = w.float()
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in hf_key:  # weight and bias alike
            w = permute(w, n_head)
        elif arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in hf_key:
            w = permute(w, n_kv_head)
        name = hf_key if hf_key == "rope_freqs.weight" else name_map.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_key
        data = w.numpy()
        if data.ndim == 1 or quant == "f32":
            writer.add_tensor(name, data)
        elif quant == "f16":
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, QUANT_TYPES[quant]), raw_dtype=QUANT_TYPES[quant])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


def llama3_rope_factors(rope, theta, head_dim):
    """LlamaModel.generate_extra_tensors: per-frequency divisors for Llama-3 rope scaling.
    (The converter reads original_max_position_embeddings from the top of config.json,
    defaulting to 8192; here it comes from the rope parameters, where HF keeps it.)"""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1.0)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _set_vocab_gpt2(writer, folder, vocab_size, tokenizer_pre):
    """TextModel._set_vocab_gpt2 / get_vocab_base: the vocabulary in id order (holes and the
    rows past the tokenizer become [PAD{i}]), added tokens marked control or user-defined."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reverse_vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse_vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = reverse_vocab[i]
            looks_special = token.startswith("<|") and token.endswith("|>")  # does_token_look_special
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(reverse_vocab[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _set_vocab_sentencepiece(writer, folder, vocab_size):
    """TextModel._set_vocab_sentencepiece: pieces, scores and types from tokenizer.model."""
    from sentencepiece import SentencePieceProcessor
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                    else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def rewrite_gguf(src, dst, extra_kv=(), replace_tensors=None):
    """Copy a GGUF file through gguf-py's reader and writer, adding metadata keys
    (extra_kv: (key, value, GGUFValueType, sub_type or None) tuples) and swapping tensors
    (replace_tensors: {name: (raw uint8 array, GGMLQuantizationType)})."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for key, value, vtype, sub_type in extra_kv:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for t in reader.tensors:
        data, qtype = (replace_tensors or {}).get(t.name, (t.data, t.tensor_type))
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype)  # quantized data: byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@contextlib.contextmanager
def torch_threads(n):
    """torch on n CPU threads inside the block (the quantizers share chunks out to them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
