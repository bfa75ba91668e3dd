"""Shared by the export tests: tiny random checkpoints of each family with a trained-looking
adapter, the exports made from them (once per module), and llama.cpp helpers.

The checkpoints (tests/hf_fixtures.py) get hidden size 256, so every row is a whole number of
K-quant blocks; the adapter's B is random (a fresh one is all zeros).
"""
import ctypes
import importlib.util

import numpy as np
import pytest
import torch

import export
from hf_fixtures import save_checkpoint
from nanolora import load_model
from nanolora.lora import attach_lora, lora_parameters, merge_lora
from nanolora.peft import save_adapter
from tok_fixtures import CORPUS

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed "
                                     "(pip install llama-cpp-python: it builds llama.cpp, ~12 min on 2 cores)")
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {  # name -> (hf_fixtures family, config overrides, LoRA settings)
    # llama3 rope scaling; 8 layers, so q4_k_m's per-layer rule has something to choose
    "llama": ("llama", dict(num_hidden_layers=8), dict(r=8, alpha=16)),
    "llama_tied": ("llama_tied", {}, dict(r=8, alpha=16)),
    # llama.cpp ignores the window: prompt + continuation stay within it
    "mistral": ("mistral", dict(sliding_window=48, head_dim=64), dict(r=8, alpha=16)),
    # rows of 384 in ffn_down: the K-quants fall back to Q5_0 / Q8_0 there; rsLoRA
    "qwen2": ("qwen2", dict(intermediate_size=384), dict(r=8, alpha=16, rslora=True)),
    "qwen3": ("qwen3", dict(head_dim=128), dict(r=8, alpha=16)),
}
TEXTS = CORPUS + ["<|begin_of_text|>Hi<|eot_id|><|im_start|>user\n<think>x</think><|im_end|>",
                  "  two leading spaces, trailing   ", "tabs\t\tand\r\nCRLF\n\n\nnewlines",
                  "don't I'll WE'VE 1234567 3.14159", "Ünïcödé — “quotes” 你好世界 🙂🚀", ""]
PROMPT = "The quick brown fox jumps over the lazy dog. It's 12 steps!"  # 30 tokens


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def calm_down(folder):
    """Halve the random weights (std 0.1 -> 0.05, norms kept around 1). At width 256 the
    fixtures' std 0.1 makes every projection grow its input ~1.6x, a chaotic network in which
    q8_0's rounding alone moves the logits by 8%; at 0.05 (gain ~0.8, like a trained model's
    layers) quantization error reaches the logits at the size it has in real models."""
    from safetensors.torch import load_file, save_file
    file = folder / "model.safetensors"
    tensors = {k: v if "norm" in k else v * 0.5 for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})


def randomize_lora(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[0] != model.lora_config.r:  # B [out, r]: what training moves off zero
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> dict(base=HF folder, adapter=PEFT folder), made on first use."""
    made = {}

    def get(family):
        if family not in made:
            hf_family, overrides, lora = FAMILIES[family]
            root = tmp_path_factory.mktemp(family)
            save_checkpoint(root / "base", hf_family, **{**SIZES, **overrides})
            calm_down(root / "base")
            model, _ = load_model(root / "base", device="cpu")
            attach_lora(model, "all", **lora)
            randomize_lora(model)
            save_adapter(model, root / "adapter", base_model_name_or_path=root / "base")
            made[family] = dict(base=root / "base", adapter=root / "adapter", root=root)
        return made[family]
    return get


def merged_model(info):
    """nanolora's own merged model (fp32): what every export is compared with."""
    model, tokenizer = load_model(info["base"], device="cpu", adapter=info["adapter"])
    merge_lora(model)
    return model, tokenizer


def run_export(info, fmt, out, *flags, base=None):
    return export.main(["--base", str(base or info["base"]), "--adapter", str(info["adapter"]), "--format", fmt,
                        "--out", str(out), *flags])


@pytest.fixture(scope="module")
def gguf_files(trained, tmp_path_factory):
    """(family, quant) -> exported GGUF path, made once."""
    made = {}

    def get(family, quant):
        if (family, quant) not in made:
            info = trained(family)
            made[family, quant] = run_export(info, "gguf", info["root"] / f"{quant}.gguf", "--quant", quant)
        return made[family, quant]
    return get


def llama(path, **kwargs):
    from llama_cpp import Llama
    return Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, **kwargs)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


# llama.cpp keeps its KV cache in f16 by default; f32 files are compared with an f32 cache
# (type_k/type_v 0 = GGML_TYPE_F32), everything else with the default.
F32_CACHE = dict(type_k=0, type_v=0)
# q8_0: the weights' rounding, and llama.cpp's CPU matmul quantizing the activations to 8 bits
# as well (llama.cpp vs nanolora running the same Q8_0 weights: 2-3%); measured 3-5.5% in all.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 8e-2}


def llama_cpp_quantize(src, dst, ftype, pure):
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 2, pure
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst
