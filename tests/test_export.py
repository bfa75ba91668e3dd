"""export.py: PEFT adapters, merged HF checkpoints, the default run, bad input.

Oracles: peft (PeftModel.from_pretrained) and transformers (AutoModelForCausalLM and
AutoTokenizer on the merged folder); GGUF files are tests/test_export_gguf.py's.
"""
import json
import os

import gguf
import pytest
import torch

import train
from export_fixtures import (HAS_LLAMA_CPP, PROMPT, TEXTS, llama, merged_model, randomize_lora, rel_err,  # noqa: F401
                             run_export, trained)
from gguf_fixtures import write_gguf_from_hf
from hf_fixtures import save_checkpoint
from nanolora import load_model
from nanolora.lora import attach_lora, merge_lora
from nanolora.peft import save_adapter


# --------------------------------------------------------------------------------- PEFT

def test_peft_rewrite_loads_in_peft(trained, tmp_path):
    """rsLoRA adapter (qwen2) re-written for another base name: PEFT reads it and gives
    nanolora's logits; nanolora reads it back unchanged."""
    import peft
    import transformers
    info = trained("qwen2")
    run_export(info, "peft", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["base_model_name_or_path"] == str(info["base"])
    ours, _ = load_model(info["base"], device="cpu", adapter=tmp_path / "peft")
    ref = transformers.AutoModelForCausalLM.from_pretrained(info["base"], dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "peft").eval()
    ids = torch.randint(0, 480, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).logits)
    assert err <= 1e-5, err


# ------------------------------------------------------------------------------- merged

@pytest.mark.parametrize("family,dtype", [("llama", "f32"), ("qwen3", "f32"), ("llama_tied", "bf16")])
def test_merged_loads_in_transformers(trained, tmp_path, family, dtype):
    """fp32: transformers' logits equal nanolora's merged model to fp32 rounding (1e-5); bf16:
    one bf16 rounding of every merged weight (measured 8.7e-3; bound 2e-2). Small shards
    to exercise the index; the tokenizer is the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    info = trained(family)
    out = run_export(info, "merged", tmp_path / "merged", "--dtype", dtype, "--shard_size", "1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == {"f32": "float32", "bf16": "bfloat16"}[dtype]
    ours, tokenizer = merged_model(info)
    from safetensors import safe_open
    with safe_open(out / index["weight_map"]["model.norm.weight"], "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        err = rel_err(ours(ids), ref(ids).logits)
    assert err <= (1e-5 if dtype == "f32" else 2e-2), err
    print(f"\nmerged {family} {dtype}: transformers vs nanolora max|diff|/max|ref| = {err:.2e}")
    ref_tokenizer = AutoTokenizer.from_pretrained(out)
    assert all(ref_tokenizer.encode(t) == tokenizer.encode(t) for t in TEXTS)


def test_merged_from_4bit_base(tmp_path):
    """A bitsandbytes 4-bit checkpoint as the base: the merge dequantizes first; the folder is
    bf16 without quantization_config, and transformers' logits equal nanolora's merged model's
    (which folds LoRA into the same dequantized weights) to bf16 rounding."""
    pytest.importorskip("bitsandbytes")
    import transformers
    from tok_fixtures import make_bpe_tokenizer_dir
    save_checkpoint(tmp_path / "fp", "llama", intermediate_size=192)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=quantization,
                                                      device_map="cpu").save_pretrained(tmp_path / "nf4")
    make_bpe_tokenizer_dir(tmp_path / "nf4")
    model, tokenizer = load_model(tmp_path / "nf4", device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    info = dict(base=tmp_path / "nf4", adapter=tmp_path / "adapter")
    out = run_export(info, "merged", tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merge_lora(model)
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        err = rel_err(model(ids), ref(ids).logits)
    assert err <= 2e-2, err


def test_merged_from_gguf_base(trained, tmp_path):
    """A .gguf base: tokenizer.json and tokenizer_config.json are written from its tokenizer;
    transformers reads them to the same ids, and the model to the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    info = trained("qwen3")
    base = write_gguf_from_hf(info["base"], tmp_path / "base.gguf")
    out = run_export(info, "merged", tmp_path / "merged", "--dtype", "f32", base=base)
    ours, tokenizer = load_model(base, device="cpu", adapter=info["adapter"])
    merge_lora(ours)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) <= 1e-5
    ref_tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert ref_tokenizer.encode(text) == tokenizer.encode(text), text


def test_write_safetensors_streams_what_safetensors_reads(tmp_path):
    """checkpoint.write_safetensors: the safetensors library reads back every key, dtype, shape
    and value (f32, f16 and bf16; odd sizes, so the header padding is exercised); each tensor is
    in the file before the next is asked for (one in memory at a time); a tensor other than
    the table says is an error naming its key."""
    from safetensors import safe_open

    from nanolora.checkpoint import write_safetensors
    path = tmp_path / "x.safetensors"
    values = {"a.weight": torch.randn(3, 5), "b.weight": torch.randn(7).half(), "c": torch.randn(2, 3, 1).bfloat16()}
    table = {key: (t.dtype, tuple(t.shape)) for key, t in values.items()}
    sizes_when_asked = []

    def tensors():
        for t in values.values():
            sizes_when_asked.append(path.stat().st_size)
            yield t
    write_safetensors(path, table, tensors())
    header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert header_end % 8 == 0
    assert sizes_when_asked[1:] == [header_end + 60, header_end + 74]  # 15 f32, then 7 f16 written
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == sorted(values) and f.metadata() == {"format": "pt"}
        for key, t in values.items():
            assert torch.equal(f.get_tensor(key), t) and f.get_tensor(key).dtype == t.dtype
    with pytest.raises(ValueError, match=r"tensor 'b.weight' is torch.float32 \(7,\), expected torch.float16 \(7,\)"):
        write_safetensors(path, table, iter([values["a.weight"], torch.randn(7), values["c"]]))


def test_merged_export_refuses_weights_out_of_plan(tmp_path, monkeypatch):
    """The shards' headers (and a GGUF's table) are written before their data: a model whose
    weights come in another order or with one too many (merged_tensors checks both), or a
    source that runs short, is an error and leaves no output (never a file whose header
    mislabels data)."""
    from nanolora import checkpoint
    save_checkpoint(tmp_path / "base", "llama")
    model, tokenizer = load_model(tmp_path / "base", device="cpu")
    attention = model.layers[0].self_attn._modules
    attention["q_proj"] = attention.pop("q_proj")  # q_proj now after o_proj: k_proj comes first
    with pytest.raises(ValueError, match="gave weight 'model.layers.0.self_attn.k_proj.weight' out of checkpoint order"):
        checkpoint.save_merged(model, tokenizer, tmp_path / "out", shard_size=10**4)
    model, tokenizer = load_model(tmp_path / "base", device="cpu")
    weights = list(checkpoint.merged_tensors(model))
    head = model.lm_head  # one weight too many, after every expected one: found only if the export reads to the end
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]), requires_grad=False)
    with pytest.raises(ValueError, match=r"'lm_head.bias' of shape \[\d+\] is not part of a llama model"):
        checkpoint.save_merged(model, tokenizer, tmp_path / "out", shard_size=10**4)
    from nanolora.gguf_write import write_gguf_model  # the GGUF writer reads the weights to their end too
    with pytest.raises(ValueError, match=r"'lm_head.bias' of shape \[\d+\] is not part of a llama model"):
        write_gguf_model(model, tokenizer, tmp_path / "out.gguf", "f16", source=tmp_path / "base", device="cpu")
    monkeypatch.setattr(checkpoint, "merged_tensors", lambda model: iter(weights[:-1]))
    with pytest.raises(ValueError, match="no data came for tensor"):
        checkpoint.save_merged(model, tokenizer, tmp_path / "out", shard_size=10**4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_shards_are_planned_as_transformers_cuts_them():
    """A new shard when the next tensor would pass shard_size; a tensor bigger than a shard
    gets one of its own. Sizes by hand at 2 bytes a value."""
    from nanolora.checkpoint import plan_shards
    expected = {"a": (10,), "b": (20,), "c": (30,), "d": (100,), "e": (1,)}  # 20, 40, 60, 200, 2 bytes
    assert plan_shards(expected, 2, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_shards(expected, 2, 60) == [["a", "b"], ["c"], ["d"], ["e"]]  # exactly full: no new shard
    assert plan_shards(expected, 2, 59) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert plan_shards(expected, 2, 10**9) == [list(expected)]

# -------------------------------------------------------------------- the default run


def test_default_run_exports_to_every_format(tmp_path):
    """train.py's default settings on a tiny checkpoint (hidden 64: every K-quant row falls
    back), then every format; each output is read by its reader."""
    import peft
    import transformers
    save_checkpoint(tmp_path / "base", "qwen2")
    train.main(["--model", str(tmp_path / "base"), "--out", str(tmp_path / "run"), "--data", train.DEFAULTS["data"],
                "--max_steps", "2", "--batch_size", "4", "--eval_size", "4", "--samples", "0", "--save_every", "0"])
    info = dict(base=tmp_path / "base", adapter=tmp_path / "run")
    peft_out = run_export(info, "peft", tmp_path / "peft")
    ref = transformers.AutoModelForCausalLM.from_pretrained(info["base"], dtype=torch.float32)
    peft.PeftModel.from_pretrained(ref, peft_out)
    transformers.AutoModelForCausalLM.from_pretrained(run_export(info, "merged", tmp_path / "merged"))
    outputs = [run_export(info, "gguf", tmp_path / "f16.gguf"),
               run_export(info, "gguf", tmp_path / "q4_k_m.gguf", "--quant", "q4_k_m"),
               run_export(info, "gguf-lora", tmp_path / "lora.gguf")]
    for out in outputs:
        assert gguf.GGUFReader(out).tensors
    if HAS_LLAMA_CPP:
        llama(outputs[1])
        llama(outputs[0], lora_path=str(outputs[2]))


# ---------------------------------------------------------------------------- bad input

def no_leftovers(folder, expected):
    assert sorted(os.listdir(folder)) == sorted(expected), os.listdir(folder)


def test_adapter_for_another_base_is_refused(trained, tmp_path):
    info = trained("qwen2")
    save_checkpoint(tmp_path / "other", "qwen2")  # hidden 64, not 256
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.model\.layers\.0\.\S+' has shape .* "
                                         r"\(was the adapter trained on another base\?\)"):
        run_export(info, "gguf", tmp_path / "out.gguf", base=tmp_path / "other")
    no_leftovers(tmp_path, ["other"])


def test_bad_quant_and_existing_output(trained, tmp_path, capsys):
    info = trained("qwen2")
    with pytest.raises(SystemExit):
        run_export(info, "gguf", tmp_path / "out.gguf", "--quant", "q3_k")
    assert "--quant 'q3_k' is not a gguf type (choose from f32, f16, bf16, q8_0, q4_0, q4_k, q6_k, q4_k_m)" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_export(info, "gguf-lora", tmp_path / "out.gguf", "--quant", "q4_k")
    assert "is not a gguf-lora type (choose from f32, f16, bf16, q8_0)" in capsys.readouterr().err
    (tmp_path / "out.gguf").write_text("keep me")
    with pytest.raises(SystemExit):
        run_export(info, "gguf-lora", tmp_path / "out.gguf")
    assert "out.gguf already exists (pass --force to replace it)" in capsys.readouterr().err
    assert (tmp_path / "out.gguf").read_text() == "keep me"
    run_export(info, "gguf-lora", tmp_path / "out.gguf", "--force")
    assert gguf.GGUFReader(tmp_path / "out.gguf").tensors
    no_leftovers(tmp_path, ["out.gguf"])


def test_architecture_gguf_does_not_cover(tmp_path):
    """Qwen3 with an o_proj bias: llama.cpp's qwen3 has no place for it."""
    save_checkpoint(tmp_path / "base", "qwen3", attention_bias=True)
    model, _ = load_model(tmp_path / "base", device="cpu")
    attach_lora(model, "q", r=2, alpha=2)
    save_adapter(model, tmp_path / "adapter")
    info = dict(base=tmp_path / "base", adapter=tmp_path / "adapter")
    for fmt in ("gguf", "gguf-lora"):
        with pytest.raises(ValueError, match=r"GGUF export: llama.cpp's qwen3 has no o_proj bias"):
            run_export(info, fmt, tmp_path / "out.gguf")
    no_leftovers(tmp_path, ["base", "adapter"])


@pytest.mark.parametrize("fmt", ["gguf", "merged"])
def test_failure_midway_leaves_no_partial_output(trained, tmp_path, monkeypatch, fmt):
    info = trained("qwen2")
    import nanolora.checkpoint as checkpoint
    real = checkpoint.LoRALinear.delta_weight
    calls = []

    def failing(self, *rows):  # the GGUF writer asks for blocks of rows
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(self, *rows)
    monkeypatch.setattr(checkpoint.LoRALinear, "delta_weight", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(info, fmt, tmp_path / "out", "--shard_size", "100KB")
    no_leftovers(tmp_path, [])


def test_gguf_progress_and_device_flag(trained, tmp_path, capsys):
    """Progress on stderr: tensor i of n with the rate and the time left. --device: one clear
    error where it cannot apply."""
    info = trained("qwen2")
    run_export(info, "gguf", tmp_path / "out.gguf", "--quant", "q4_k", "--device", "cpu")
    lines = capsys.readouterr().err.strip().splitlines()
    n = len(gguf.GGUFReader(tmp_path / "out.gguf").tensors)
    assert len(lines) == n and lines[-1].startswith(f"[{n}/{n}] ")
    assert all(" MB/s  ETA " in line and line.endswith(" s") for line in lines)
    with pytest.raises(SystemExit) as exit_info:
        run_export(info, "merged", tmp_path / "merged", "--device", "cpu")
    assert exit_info.value.code == 2 and "--device applies to --format gguf, not merged" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run_export(info, "gguf", tmp_path / "cuda.gguf", "--device", "cuda")
        assert "--device cuda: torch sees no CUDA device here" in capsys.readouterr().err
    no_leftovers(tmp_path, ["out.gguf"])


def test_pipeline_stage_stops_with_its_consumer():
    """gguf_write._ahead: an error in the producing thread is raised in the consumer; a
    consumer that stops early stops the thread, which has made at most `depth` + 1 items more."""
    import threading

    from nanolora.gguf_write import _ahead
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i
    before = threading.active_count()
    stage = _ahead(items())
    assert [next(stage), next(stage)] == [0, 1]
    stage.close()
    assert threading.active_count() == before and len(made) <= 4

    def failing():
        yield 1
        raise OSError("read error")
    with pytest.raises(OSError, match="read error"):
        list(_ahead(failing()))


def test_non_finite_merged_weight_is_refused(trained, tmp_path):
    """A NaN in the adapter (a diverged run) is refused as the adapter loads, naming its tensor;
    finite LoRA matrices whose product overflows are named once merged; no GGUF file is left."""
    from safetensors.torch import load_file, save_file
    info = trained("qwen2")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in info["adapter"].iterdir():
        (adapter / file.name).write_bytes(file.read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1.mlp.up_proj.lora_B" in k)
    finite = {k: v.clone() for k, v in tensors.items()}
    tensors[key][3, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{key}' holds NaN or infinite values"):
        run_export(dict(info, adapter=adapter), "gguf", tmp_path / "out.gguf", "--quant", "q4_k")
    finite[key][3, 0] = 3e38  # B A overflows fp32 in the merge
    finite[key.replace("lora_B", "lora_A")][0] = 1e3
    save_file(finite, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"GGUF export: weight 'model.layers.1.mlp.up_proj.weight' holds NaN or "
                                         r"infinite values once the adapter is merged"):
        run_export(dict(info, adapter=adapter), "gguf", tmp_path / "out.gguf", "--quant", "q4_k")
    no_leftovers(tmp_path, ["adapter"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merged_rows_are_the_whole_merge(dtype, monkeypatch):
    """The GGUF writer merges a LoRA weight a block of rows at a time inside the quantizer
    (checkpoint.MergedRows): any run of whole blocks is those rows of the merge the model itself
    does (merge(), the merged checkpoint), float for float, and quantizing it by blocks on two
    threads gives the bytes of quantizing the whole merged tensor. Odd sizes: the last block is
    short, and a chunk spans several blocks."""
    from gguf_fixtures import torch_threads
    from nanolora import gguf_quantize
    from nanolora.checkpoint import MergedRows
    from nanolora.lora import MERGE_ROWS, LoRALinear
    g = torch.Generator().manual_seed(0)
    out_features, in_features = 5 * MERGE_ROWS + 17, 512
    weight = torch.nn.Parameter((torch.randn(out_features, in_features, generator=g) * 0.02).to(dtype),
                                requires_grad=False)
    layer = LoRALinear(weight, None, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_features, 8, generator=g) * 0.05)
    with torch.no_grad():
        whole = weight.float() + (layer.lora_B @ layer.lora_A) * layer.scale  # by no block at all
    merged = MergedRows("w", layer, weight.detach().clone())  # merge() changes the layer's own W in place
    every_row = merged.rows(0, out_features)
    torch.testing.assert_close(every_row, whole, rtol=1e-6, atol=1e-6)  # the same sum
    layer.merge()
    assert torch.equal(layer.weight, every_row.to(dtype))  # merge() made the same floats, rounded once
    layer.unmerge()
    for start, stop in [(0, MERGE_ROWS), (2 * MERGE_ROWS, 4 * MERGE_ROWS + 3), (5 * MERGE_ROWS, out_features)]:
        assert torch.equal(merged.rows(start, stop), every_row[start:stop]), (start, stop)
    with pytest.raises(ValueError, match="multiple of MERGE_ROWS"):
        merged.rows(1, 2)
    monkeypatch.setitem(gguf_quantize.CHUNK_VALUES, "native", 3 * MERGE_ROWS * in_features // 2)
    with torch_threads(2):
        for type_name in ("Q8_0", "Q4_K", "Q6_K", "F16"):
            assert (gguf_quantize.quantize(merged, type_name) == gguf_quantize.quantize(every_row, type_name)).all(), \
                type_name
