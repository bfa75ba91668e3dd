"""Local folder, hub id or .gguf file -> (model on the device, tokenizer).

The model is built on the meta device (no memory), then each tensor is read from the
checkpoint, cast, moved to the target device and put in place one at a time: the checkpoint
is never held twice, and peak memory stays at the loaded model plus one tensor.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from nanolora.config import ModelConfig
from nanolora.model import Transformer, hf_key
from nanolora.tokenizer import Tokenizer

# What snapshot_download fetches from a hub repo: weights, configs and tokenizer files only
# (repos often also hold .bin / .pth / .gguf copies of the same weights).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json"]
# Keys some checkpoints carry that hold nothing we load (RoPE tables are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def load_model(name_or_path, device=None, dtype=None, *, adapter=None, **options):
    """Load a Llama / Mistral / Qwen2 / Qwen3 checkpoint.

    name_or_path: an HF checkpoint folder, a hub repo id ("org/name"), or a .gguf file.
    device: default "cuda" when available, else "cpu". dtype: default bf16 on GPU, fp32 on CPU.
    adapter: a PEFT LoRA adapter folder to attach (see nanolora/peft.py).
    Returns (model, tokenizer). The model's weights are frozen (requires_grad=False): LoRA
    adds the trainable parameters.
    """
    if options:
        raise TypeError(f"load_model: unsupported option(s) {', '.join(sorted(options))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    if str(name_or_path).endswith(".gguf"):
        from nanolora.gguf import read_gguf_checkpoint
        hf_config, tensors, tokenizer = read_gguf_checkpoint(name_or_path)
        config = ModelConfig.from_hf(hf_config, source=str(name_or_path))
    else:
        folder = resolve_checkpoint(name_or_path)
        config = ModelConfig.from_json(folder / "config.json")
        tensors = iter_safetensors(folder)
        tokenizer = Tokenizer.from_dir(folder)

    with torch.device("meta"):
        model = Transformer(config)
    place_tensors(model, tensors, device, dtype, source=str(name_or_path))
    model.rope_inv_freq = config.rope_inv_freq().to(device)
    if adapter is not None:
        from nanolora.peft import load_adapter
        load_adapter(model, adapter)
    return model.eval(), tokenizer


def resolve_checkpoint(name_or_path) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (only the files we read)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_like_repo_id = str(name_or_path).count("/") == 1 and not str(name_or_path).startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder (expected a folder with "
                                f"config.json and *.safetensors, a hub repo id like 'org/name', or a .gguf file)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated, network: all mean "cannot get it"
        raise FileNotFoundError(f"{name_or_path}: not a local folder, and the Hugging Face hub "
                                f"could not provide it ({type(e).__name__}: {e})") from None


def iter_safetensors(folder: Path):
    """Yield (hf_key, load) for every tensor of a single-file or sharded checkpoint, where
    load() reads that one tensor from disk, and `where` names its file for errors."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors checkpoints are supported)")
    for name in files:
        file = folder / name
        if not file.exists():
            raise FileNotFoundError(f"{file}: listed in {index_file.name} but missing")
        try:
            handle = safe_open(file, framework="pt", device="cpu")
            keys = list(handle.keys())
        except Exception as e:
            raise ValueError(f"{file}: not a readable safetensors file, possibly truncated ({e})") from None
        for key in keys:
            yield key, _reader(handle, key, file)


def _reader(handle, key, file):
    def load():
        try:
            return handle.get_tensor(key)
        except Exception as e:
            raise ValueError(f"{file}: tensor {key!r} could not be read, the file may be truncated ({e})") from None
    load.where = str(file)
    return load


def place_tensors(model: nn.Module, tensors, device, dtype, source: str):
    """Fill the meta-device `model` from (hf_key, load) pairs, one tensor at a time."""
    params = {hf_key(name): (module, attr)
              for module_name, module in model.named_modules()
              for attr, p in module.named_parameters(recurse=False)
              for name in [f"{module_name}.{attr}" if module_name else attr]}
    tied = model.config.tie_word_embeddings
    for key, load in tensors:
        where = getattr(load, "where", source)
        if key.endswith(IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue  # a tied head may also be stored; HF ties it to the embedding regardless
        if key not in params:
            raise ValueError(f"{where}: unexpected tensor {key!r} (not a parameter of a "
                             f"{model.config.model_type} model with this config)")
        module, attr = params.pop(key)
        expected = getattr(module, attr).shape
        tensor = load()
        if tensor.shape != expected:
            raise ValueError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, "
                             f"expected {list(expected)} from the config")
        tensor = tensor.to(dtype=dtype).to(device)  # cast first: a bf16 checkpoint moves half the bytes
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    if params:
        missing = sorted(params)
        raise ValueError(f"{source}: checkpoint is missing {len(missing)} tensor(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
