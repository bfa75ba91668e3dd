"""Bad and hostile files, as a careless user or an attacker would hand them over: config.json,
adapters, JSONL data, tokenizer files, chat templates and GGUF headers.

Each must end in a ValueError / OSError whose message names the file (and the line or key),
which train.py and export.py print as one line (tests/test_run_folder.py); never another
exception, a hang or gigabytes. Hand-picked cases state the expected message; hypothesis
throws random values at the same parsers and checks the kind of outcome.
"""
import gzip
import json
import math
import shutil
import struct
import time

import gguf
import jinja2
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from gguf_fixtures import rewrite_gguf, write_gguf_from_hf
from hf_fixtures import save_checkpoint
from nanolora import load_model
from nanolora.config import ModelConfig
from nanolora.data import load_examples
from nanolora.lora import attach_lora
from nanolora.peft import save_adapter
from nanolora.tokenizer import Tokenizer, _CappedSandbox

ACCEPTED = (ValueError, OSError)  # what cli.run turns into one line
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A llama checkpoint (tied head, so the adapter and config tests stay small)."""
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(folder, "llama_tied")
    return folder


def with_config(base, tmp_path, **changes):
    """A copy of `base` (weights linked, not copied) whose config.json has `changes`; a value
    of ... removes the key."""
    folder = tmp_path / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((base / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))
    return folder


# ----------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("changes, message", [
    (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "rope_scaling: factor must be a finite number > 0"),
    (dict(rope_scaling="linear"), "rope_scaling must be a JSON object or null, got 'linear'"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number >= 0"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a finite number >= 0, got '1e-6'"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false, got 'no'"),
    (dict(num_hidden_layers=10**9), "num_hidden_layers is 1000000000, but the checkpoint holds 2 block(s)"),
    (dict(num_hidden_layers=3), "num_hidden_layers is 3, but the checkpoint holds 2 block(s)"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    (dict(hidden_size=-64), "hidden_size must be a positive integer, got -64"),
    (dict(vocab_size=True), "vocab_size must be a positive integer, got True"),
    (dict(intermediate_size="160"), "intermediate_size must be a positive integer, got '160'"),
    (dict(num_attention_heads=5, num_key_value_heads=5, head_dim=...), "hidden_size (64) is not a multiple of num_attention_heads (5)"),
    (dict(head_dim=0), "head_dim must be a positive integer, got 0"),
    (dict(quantization_config=[]), "quantization_config must be a JSON object or null, got []"),
    (dict(model_type=None), "model_type None is not supported"),
])
def test_bad_config_values(base, tmp_path, changes, message):
    folder = with_config(base, tmp_path, **changes)
    t0 = time.time()
    with pytest.raises(ValueError) as e:
        load_model(folder, device="cpu")
    assert message in str(e.value) and "config.json" in str(e.value), str(e.value)
    assert time.time() - t0 < 10  # num_hidden_layers 10**9 is refused before the model is built


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object of model settings, got a list"),
    ('{"model_type": "llama",', "not valid JSON"),
    ("\xff\xfe{", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_config_file_that_is_not_a_config(base, tmp_path, text, message):
    folder = with_config(base, tmp_path)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json: " + message):
        load_model(folder, device="cpu")


@FUZZ
@given(key=st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
                            "tie_word_embeddings", "max_position_embeddings", "sliding_window",
                            "quantization_config", "rope_parameters", "attention_bias", "model_type"]),
       value=JSON_VALUES)
def test_config_fuzz(base, tmp_path_factory, key, value):
    """Any JSON value for a config key: loads, or a ValueError naming config.json or the weights."""
    folder = with_config(base, tmp_path_factory.mktemp("fuzz"), **{key: value})
    try:
        ModelConfig.from_json(folder / "config.json")
        load_model(folder, device="cpu")
    except ValueError as e:
        assert str(folder) in str(e)  # config.json, or the weights that do not fit it


# ----------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    model, _ = load_model(base, device="cpu")
    attach_lora(model, "q,v", r=4, alpha=8)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, folder)
    return folder


def edited_adapter(adapter, tmp_path, config=None, tensors=None, raw=None):
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    if config is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg.update(config)
        (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not ...}))
    if tensors is not None:
        state = load_file(adapter / "adapter_model.safetensors")
        key = sorted(state)[0]
        state[key] = tensors(state[key])
        save_file(state, folder / "adapter_model.safetensors")
    if raw is not None:
        name, data = raw
        (folder / name).write_bytes(data(( adapter / name).read_bytes()))
    return folder


@pytest.mark.parametrize("edit, message", [
    (dict(tensors=lambda t: t.index_fill(0, torch.tensor([0]), math.nan)), r"tensor '.*lora_A.weight' holds NaN"),
    (dict(tensors=lambda t: t.index_fill(1, torch.tensor([1]), math.inf)), r"holds NaN or infinite values"),
    (dict(tensors=lambda t: t.to(torch.int32)), r"tensor '.*' is torch.int32, expected floating point"),
    (dict(config={"lora_alpha": math.nan}), r"lora_alpha=nan is not supported \(supported: a finite number\)"),
    (dict(config={"lora_alpha": "8"}), r"lora_alpha='8' is not supported"),
    (dict(config={"r": ...}), r"r=None is not supported \(supported: a positive integer\)"),
    (dict(config={"r": True}), r"r=True is not supported"),
    (dict(config={"r": 4.0}), r"r=4.0 is not supported"),
    (dict(config={"lora_alpha": ...}), r"lora_alpha=None is not supported"),
    (dict(config={"lora_dropout": 2}), r"lora_dropout=2 is not supported"),
    (dict(config={"use_rslora": "yes"}), r"use_rslora='yes' is not supported"),
    (dict(config={"target_modules": 5}), r"target_modules=5 is not supported"),
    (dict(config={"target_modules": []}), r"target_modules=\[\] is not supported"),
    (dict(raw=("adapter_config.json", lambda b: b[:20])), r"adapter_config.json: not valid JSON"),
    (dict(raw=("adapter_config.json", lambda b: b"[1]")), r"adapter_config.json: expected a JSON object, got a list"),
    (dict(raw=("adapter_config.json", lambda b: b"\xff\xfe\x00")), r"adapter_config.json: not valid JSON"),
    (dict(raw=("adapter_model.safetensors", lambda b: b[:len(b) // 2])),
     r"adapter_model.safetensors: (not a readable safetensors file|tensor .* could not be read)"),
    (dict(raw=("adapter_model.safetensors", lambda b: b"\x00" * 64)), r"adapter_model.safetensors: not a readable"),
    (dict(raw=("adapter_model.safetensors", lambda b: b[:5])), r"adapter_model.safetensors: not a readable"),
])
def test_bad_adapters(base, adapter, tmp_path, edit, message):
    folder = edited_adapter(adapter, tmp_path, **edit)
    with pytest.raises(ValueError, match=message):
        load_model(base, device="cpu", adapter=folder)


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "peft_type",
                            "bias", "use_dora", "modules_to_save", "rank_pattern"]),
       value=JSON_VALUES)
def test_adapter_config_fuzz(base, adapter, tmp_path_factory, key, value):
    folder = edited_adapter(adapter, tmp_path_factory.mktemp("fuzz"), config={key: value})
    try:
        load_model(base, device="cpu", adapter=folder)
    except ValueError as e:
        assert "adapter_config.json" in str(e) or "adapter_model.safetensors" in str(e) or "LoRA target" in str(e)


@FUZZ
@given(cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                 max_size=4))
def test_adapter_weights_fuzz(base, adapter, tmp_path_factory, cut, flips):
    """A truncated or bit-flipped adapter_model.safetensors: loads (a flip in the values) or is
    refused naming the file; never NaN weights in the model."""
    def damage(data):
        data = bytearray(data[:len(data) - cut] if cut else data)
        for at, byte in flips:
            if at < len(data):
                data[at] = byte
        return bytes(data)
    folder = edited_adapter(adapter, tmp_path_factory.mktemp("fuzz"), raw=("adapter_model.safetensors", damage))
    try:
        model, _ = load_model(base, device="cpu", adapter=folder)
    except ValueError as e:
        assert "adapter_model.safetensors" in str(e)
    else:
        assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------- JSONL data
@pytest.fixture(scope="module")
def tokenizer(base):
    return Tokenizer.from_dir(base)


@pytest.mark.parametrize("data, message", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2 is not valid UTF-8 \(byte 0xe9 at byte 14\)"),
    ('{"text": "ok"}\n'.encode("utf-16"), r"the file is UTF-16 or UTF-32; save it as UTF-8"),
    ('{"text": "ok"}\n'.encode("utf-16-le"), r"the file is UTF-16 or UTF-32; save it as UTF-8"),
    (gzip.compress(b'{"text": "ok"}\n' * 50)[:40], r"the gzip data is damaged or cut short"),
    (b'{"text": null}\n', r'line 1: "text" must be a string, got null'),
    (b'{"prompt": "a", "completion": 5}\n', r'line 1: "completion" must be a string, got a number'),
    (b'{"messages": [{"role": "user", "content": null}]}\n', r'line 1: .*'),
    (b'{"text": "a\\ud800b"}\n', r"line 1 holds a lone surrogate escape"),
    (b'{"text": "\x00"}\n', r"line 1 is not valid JSON \(Invalid control character"),
    (b"\x00\x00\x00\x00\n", r"the file is UTF-16 or UTF-32"),
    (b'{"text": "ok"}\n' + b"[" * 200_000 + b"\n", r"line 2 is nested too deeply"),
    (b'{"text": "ok"}\n{"text": "ok"\n', r"line 2 is not valid JSON"),
    (b'"just a string"\n', r"line 1: a row with keys a JSON str, not an object matches no accepted format"),
    (b"", r"no training examples: it has no rows"),
])
def test_bad_jsonl(tokenizer, tmp_path, data, message):
    (tmp_path / "d.jsonl").write_bytes(data)
    with pytest.raises(ValueError, match=r"d.jsonl: " + message):
        load_examples(tmp_path / "d.jsonl", tokenizer, 64)


def test_gzip_and_bom_read_like_plain(tokenizer, tmp_path):
    rows = b"".join(json.dumps({"prompt": f"q{i} ", "completion": f"answer {i} \u00e9"}).encode() + b"\n"
                    for i in range(5))
    (tmp_path / "plain.jsonl").write_bytes(rows)
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(rows))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + rows)
    plain, _ = load_examples(tmp_path / "plain.jsonl", tokenizer, 64)
    assert load_examples(tmp_path / "packed.jsonl.gz", tokenizer, 64)[0] == plain
    assert load_examples(tmp_path / "bom.jsonl", tokenizer, 64)[0] == plain


def test_huge_row_is_cut_before_tokenizing(tokenizer, tmp_path):
    """A 24 MB row keeps only seq_len tokens: it must not take the time and memory of
    tokenizing 24 MB. The kept ids are those of the whole text's first seq_len tokens
    (checked on a 1 MB row, which the tokenizer can take whole)."""
    words = " ".join(f"word{i % 97}, and {i}" for i in range(60_000))  # ~1 MB
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": words}) + "\n")
    (examples, stats) = load_examples(tmp_path / "one.jsonl", tokenizer, 128)
    whole = tokenizer.encode(words, add_special_tokens=True)
    assert examples[0].input_ids == whole[:128] and stats.n_truncated == 1
    (tmp_path / "huge.jsonl").write_text(json.dumps({"text": words * 24}) + "\n")
    t0 = time.time()
    (examples, _) = load_examples(tmp_path / "huge.jsonl", tokenizer, 128)
    assert time.time() - t0 < 5 and examples[0].input_ids == whole[:128]


@FUZZ
@given(lines=st.lists(st.binary(max_size=40) | JSON_VALUES.map(lambda v: json.dumps(v).encode())
                      | st.fixed_dictionaries({"text": JSON_VALUES}).map(lambda v: json.dumps(v).encode()),
                      max_size=4))
def test_jsonl_fuzz(tokenizer, tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        load_examples(path, tokenizer, 32)
    except ValueError as e:
        assert str(e).startswith(str(path))


# ----------------------------------------------------------------------------- tokenizer files
@pytest.mark.parametrize("name, data, message", [
    ("tokenizer.json", lambda b: b[:len(b) // 2], r"tokenizer.json: not a readable tokenizer.json"),
    ("tokenizer.json", lambda b: bytes(range(256)) * 4, r"tokenizer.json: not a readable tokenizer.json"),
    ("tokenizer.json", lambda b: b"[]", r"tokenizer.json: not a readable tokenizer.json"),
    ("tokenizer_config.json", lambda b: b"{", r"tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", lambda b: b"[1, 2]", r"tokenizer_config.json: expected a JSON object, got list"),
    ("tokenizer_config.json", lambda b: b'{"bos_token": 5}', r"tokenizer files hold a value of an unexpected type"),
    ("tokenizer_config.json", lambda b: b'{"added_tokens_decoder": [1]}', r"unexpected type"),
    ("tokenizer_config.json", lambda b: b'{"chat_template": 7}', r"tokenizer_config.json: chat_template must be a string"),
    ("generation_config.json", lambda b: b"\x00\x01", r"generation_config.json: not valid JSON"),
    ("generation_config.json", lambda b: b'"eos"', r"generation_config.json: expected a JSON object, got str"),
    ("special_tokens_map.json", lambda b: b"nope", r"special_tokens_map.json: not valid JSON"),
])
def test_bad_tokenizer_files(base, tmp_path, name, data, message):
    folder = tmp_path / "tok"
    shutil.copytree(base, folder)
    old = (folder / name).read_bytes() if (folder / name).exists() else b""
    (folder / name).write_bytes(data(old))
    with pytest.raises(ValueError, match=message):
        tok = Tokenizer.from_dir(folder)
        tok.apply_chat_template([{"role": "user", "content": "hi"}])  # a template of the wrong type


# ----------------------------------------------------------------------------- chat templates
@pytest.mark.parametrize("template, message", [
    ("{% for i in range(10**9) %}{% endfor %}", "range of 1000000000 steps is too large"),
    ("{{ 'x' * 10**10 }}", "a sequence of 10000000000 items is too large"),
    ("{{ 10 ** 100000000 }}", "10 ** 100000000 is too large"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "items is too large"),
    ("{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}", "rendering took over"),
    ("{{ messages[0].content.__class__.__mro__ }}", "failed to render"),  # the sandbox, reported with the file
    ("{% if %}", "does not parse"),
])
def test_template_caps(base, tmp_path, monkeypatch, template, message):
    monkeypatch.setattr(_CappedSandbox, "MAX_SECONDS", 1.0)
    folder = tmp_path / "tok"
    shutil.copytree(base, folder)
    (folder / "chat_template.jinja").write_text(template)
    tok = Tokenizer.from_dir(folder)
    t0 = time.time()
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    except ValueError as e:
        assert message in str(e) and str(folder) in str(e), str(e)
    else:
        assert message == "failed to render" and "__mro__" not in text and "class" not in text
    assert time.time() - t0 < 5


# ----------------------------------------------------------------------------- GGUF headers
@pytest.fixture(scope="module")
def gguf_file(base, tmp_path_factory):
    return write_gguf_from_hf(base, tmp_path_factory.mktemp("gguf") / "model.gguf")


def _kv(key, value, vtype, sub=None):
    return (key, value, vtype, sub)


T = gguf.GGUFValueType


@pytest.mark.parametrize("extra, message", [
    ([_kv("general.alignment", 0, T.UINT32)], "general.alignment must be a power of two, got 0"),
    ([_kv("general.alignment", "32", T.STRING)], "general.alignment must be a power of two, got '32'"),
    ([_kv("general.alignment", 24, T.UINT32)], "general.alignment must be a power of two, got 24"),
    ([_kv("llama.attention.head_count", 0, T.UINT32)], "llama.attention.head_count must be a positive integer"),
    ([_kv("llama.embedding_length", "64", T.STRING)], "llama.embedding_length must be a positive integer"),
    ([_kv("llama.block_count", 2**31, T.UINT32)], "num_hidden_layers is 2147483648, but the checkpoint holds 2"),
    ([_kv("llama.attention.layer_norm_rms_epsilon", -1.0, T.FLOAT32)], "rms_norm_eps must be a finite number >= 0"),
    ([_kv("llama.rope.freq_base", 0.0, T.FLOAT32)], "rope_theta must be a finite number > 0"),
    ([_kv("tokenizer.ggml.merges", ["nospace", "a b"], T.ARRAY, T.STRING)],
     "tokenizer.ggml.merges holds 'nospace', not a merge"),
    ([_kv("tokenizer.ggml.token_type", [1, 2], T.ARRAY, T.INT32)], "tokenizer.ggml.token_type must be a list of"),
])
def test_bad_gguf_headers(gguf_file, tmp_path, extra, message):
    """Keys given here replace the file's (gguf-py writes the last value of a repeated key
    last; nanolora's reader keeps the last, as llama.cpp does... so the file is rewritten
    without the original key first)."""
    keys = {key for key, *_ in extra}
    src = tmp_path / "src.gguf"
    _without_keys(gguf_file, src, keys)
    rewrite_gguf(src, tmp_path / "bad.gguf", extra_kv=extra)
    with pytest.raises(ValueError, match=r"bad.gguf: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_model(tmp_path / "bad.gguf", device="cpu")


def _without_keys(src, dst, keys):
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key in keys:
            continue
        sub_type = field.types[-1] if field.types[0] == T.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_deeply_nested_arrays(tmp_path):
    """An array of arrays of ... 10,000 deep: refused at a fixed depth, not a RecursionError."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key" + struct.pack("<I", 9)
    nested = struct.pack("<IQ", 9, 1) * 10_000 + struct.pack("<IQ", 4, 0)
    (tmp_path / "deep.gguf").write_bytes(header + nested)
    with pytest.raises(ValueError, match=r"deep.gguf: metadata arrays nested deeper than 4"):
        load_model(tmp_path / "deep.gguf", device="cpu")


@FUZZ
@given(at=st.integers(0, 4000), value=st.binary(min_size=1, max_size=8))
def test_gguf_header_fuzz(gguf_file, tmp_path_factory, at, value):
    """Bytes overwritten anywhere in the header: loads, or a ValueError naming the file."""
    data = bytearray(gguf_file.read_bytes())
    data[at:at + len(value)] = value
    path = tmp_path_factory.mktemp("fuzz") / "f.gguf"
    path.write_bytes(bytes(data))
    try:
        load_model(path, device="cpu")
    except ValueError as e:
        assert str(path) in str(e)
