"""Loading: bad input gets a clear error naming the file or key and what was expected."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import save_checkpoint
from nanolora import load_model


@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(tmp_path, "llama")
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope", device="cpu")


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="nanolora-tests/no-such-model.*hub could not provide it"):
        load_model("nanolora-tests/no-such-model", device="cpu")


def test_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'phi3' is not supported \(supported: llama, "
                                         r"mistral, qwen2, qwen3, gemma2, gemma3_text\)"):
        load_model(checkpoint, device="cpu")


def test_unsupported_rope_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        load_model(checkpoint, device="cpu")


def test_missing_tensor(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        load_model(checkpoint, device="cpu")


def test_wrong_shape(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                         r"has shape \[64, 64\], expected \[32, 64\]"):
        load_model(checkpoint, device="cpu")


def test_unexpected_tensor(checkpoint):
    file = checkpoint / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
        load_model(checkpoint, device="cpu")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(checkpoint, keep):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"model.safetensors: .*truncated"):
        load_model(checkpoint, device="cpu")


def test_missing_shard(tmp_path):
    save_checkpoint(tmp_path, "qwen2", max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: listed in model.safetensors.index.json but missing"):
        load_model(tmp_path, device="cpu")


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(checkpoint, device="cpu")


def test_weights_are_frozen_and_dtype_default(checkpoint):
    model, _ = load_model(checkpoint, device="cpu")
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model16, _ = load_model(checkpoint, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())


@pytest.mark.gpu
def test_gpu_load_peak_memory_is_the_model(tmp_path):
    """Streaming load: peak GPU memory = the loaded weights (+ a few MiB of allocator slack)."""
    save_checkpoint(tmp_path, "llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=64)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = load_model(tmp_path)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 1.05 * weights, (peak, weights)


def test_loading_does_not_import_dynamo(checkpoint):
    """The model is built on the meta device, where torch runs its Python reference ops, whose
    first use imports torch._dynamo: ~1 s added to every train.py, chat.py and export.py start.
    Checked in a fresh process (this one may have imported it already)."""
    import subprocess
    import sys
    code = ("import sys; from nanolora import load_model; load_model(sys.argv[1], device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
