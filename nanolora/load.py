"""Local folder, hub id or .gguf file -> (model on the device, tokenizer).

The model is built on the meta device (no memory), then each tensor is read from the
checkpoint, cast, moved to the target device and put in place one at a time: the checkpoint
is never held twice, and peak memory stays at the loaded model plus one tensor. With
load_in_4bit that one tensor is quantized to NF4 on the device before the next is read
(plus ~14 MB of quantization temporaries, see nf4._CHUNK), so a 4-bit model never exists in
16-bit on the device; a bitsandbytes 4-bit checkpoint is read as stored.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from nanolora import ops
from nanolora.config import ModelConfig
from nanolora.dynamic_4bit import check_choice, read_choice
from nanolora.model import Linear, Transformer, hf_key
from nanolora.nf4 import NF4Weight, quantize_nf4, read_bnb_quantization_config
from nanolora.tokenizer import Tokenizer

# What snapshot_download fetches from a hub repo: weights, configs and tokenizer files only
# (repos often also hold .bin / .pth / .gguf copies of the same weights).
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json"]
TOKENIZER_HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                      "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
# Keys some checkpoints carry that hold nothing we load (RoPE tables are recomputed).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
NF4_BLOCKSIZE = 64  # QLoRA's, and every *-bnb-4bit checkpoint's


def load_model(name_or_path, device=None, dtype=None, *, adapter=None, load_in_4bit=False,
               skip_modules=None, **options):
    """Load a Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 checkpoint.

    name_or_path: an HF checkpoint folder, a hub repo id ("org/name"), or a .gguf file.
    device: default "cuda" when available, else "cpu". dtype: default bf16 on GPU, fp32 on CPU;
    "stored": each tensor as the checkpoint holds it (a GGUF block type: fp32), so that nothing
    is rounded or widened (export.py).
    adapter: a PEFT LoRA adapter folder to attach (see nanolora/peft.py).
    load_in_4bit: hold the seven projections of every block (q, k, v, o, gate, up, down) in
    NF4 with double quantization (QLoRA), quantizing each on the device as it streams in;
    embeddings, norms, biases and the head stay in `dtype`. "dynamic": NF4 except the
    projections the adapter's dynamic_4bit.json keeps 16-bit (see nanolora/dynamic_4bit.py).
    A bitsandbytes 4-bit checkpoint (config.json's quantization_config) loads in NF4 as
    stored, with or without this flag.
    skip_modules: projections to keep in `dtype` anyway, by name or name suffix, e.g.
    ["down_proj"], ["mlp.down_proj"] or ["layers.0.mlp.down_proj"] (see `matches`).
    Returns (model, tokenizer). The model's weights are frozen (requires_grad=False): LoRA
    adds the trainable parameters.
    """
    if options:
        raise TypeError(f"load_model: unsupported option(s) {', '.join(sorted(options))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    if str(name_or_path).endswith(".gguf"):
        from nanolora.gguf import read_gguf_checkpoint
        # "stored" (export): views of the file, not copies, as nothing outlives the export
        hf_config, tensors, tokenizer = read_gguf_checkpoint(name_or_path, copy=dtype != "stored")
        config = ModelConfig.from_hf(hf_config, source=str(name_or_path))
        config_file = str(name_or_path)
    else:
        folder = resolve_checkpoint(name_or_path)
        config = ModelConfig.from_json(folder / "config.json")
        config_file = str(folder / "config.json")
        tensors = iter_safetensors(folder)
        tokenizer = Tokenizer.from_dir(folder)
    # None, or the modules a bitsandbytes 4-bit checkpoint left unquantized
    bnb_skipped = read_bnb_quantization_config(config.hf_config.get("quantization_config"), config_file)
    tensors = list(tensors)  # (key, load) pairs; nothing is read yet
    check_layer_count(config, [key for key, _ in tensors], config_file)

    with torch.device("meta"):
        model = Transformer(config)
    skip_modules = list(skip_modules or [])
    # an adapter trained on a dynamic 4-bit base records which projections stayed 16-bit
    choice = None
    if adapter is not None:
        from nanolora.peft import adapter_folder
        choice = read_choice(adapter_folder(adapter), required=load_in_4bit == "dynamic")
    if load_in_4bit == "dynamic":
        if adapter is None:
            raise ValueError("load_in_4bit='dynamic' needs the adapter whose dynamic_4bit.json says which projections "
                             "stay 16-bit (train.py --load_in_4bit dynamic measures and records it)")
        check_choice(model, choice, adapter_folder(adapter))
        skip_modules += choice.modules
    module_names = [name for name, _ in model.named_modules()]
    for pattern in skip_modules:
        if not any(matches(name, [pattern]) for name in module_names):
            raise ValueError(f"skip_modules: {pattern!r} names no module of this model (expected a "
                             f"projection name like 'down_proj', 'mlp.down_proj' or 'layers.0.mlp.down_proj')")
    quantize = set()
    if load_in_4bit or bnb_skipped is not None:
        keep_16bit = skip_modules + (bnb_skipped or [])
        quantize = {hf_key(f"{name}.weight") for name, module in model.named_modules()
                    if isinstance(module, Linear) and not matches(name, keep_16bit)}
    place_tensors(model, tensors, device, dtype, source=str(name_or_path), quantize=quantize)
    model.compute_rope(device)
    if adapter is not None:
        from nanolora.peft import load_adapter
        load_adapter(model, adapter)
        model.dynamic_4bit = choice  # saved again with the adapter (export --format peft keeps it)
    return model.eval(), tokenizer


def check_layer_count(config, keys, source):
    """The config's layer count against the blocks the checkpoint holds, before a model of
    that many blocks is built (num_hidden_layers 10**9 would take hours on the meta device)."""
    blocks = {int(key.split(".")[2]) for key in keys
              if key.startswith("model.layers.") and key.split(".")[2].isdigit()}
    # distinct integers: exactly 0..n-1 when there are n of them from 0 to n-1 (no set(range(10**9)))
    if len(blocks) != config.n_layers or (blocks and (min(blocks), max(blocks)) != (0, config.n_layers - 1)):
        found = f"{len(blocks)} block(s)" + (f", numbered {min(blocks)}..{max(blocks)}" if blocks else "")
        raise ValueError(f"{source}: num_hidden_layers is {config.n_layers}, but the checkpoint holds {found}")


def matches(module_name: str, patterns) -> bool:
    """Whether a module is named by any of `patterns`: its full name (ours, or HF's with the
    leading "model."), a trailing part of it ("down_proj", "mlp.down_proj") or a leading one
    ("layers.0" names every projection of block 0). Parts are whole dotted components:
    "layers.1" does not name "layers.10.mlp.up_proj". (transformers also reads each pattern
    as a regular expression; nanolora does not.)"""
    names = (module_name, hf_key(module_name))
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".")
               for p in patterns for name in names)


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a model, without its weights: an HF checkpoint folder, a hub repo id
    (only the tokenizer and config files are fetched), or a .gguf file (a vocab-only GGUF
    too, as llama.cpp's tokenizer tests use)."""
    if str(name_or_path).endswith(".gguf"):
        from nanolora.gguf import GGUFFile, gguf_tokenizer
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"{name_or_path}: no such GGUF file")
        return gguf_tokenizer(GGUFFile(name_or_path))
    return Tokenizer.from_dir(resolve_checkpoint(name_or_path, TOKENIZER_HUB_FILES))


def resolve_checkpoint(name_or_path, hub_files=HUB_FILES) -> Path:
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
        return Path(snapshot_download(str(name_or_path), allow_patterns=hub_files))
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


def place_tensors(model: nn.Module, tensors, device, dtype, source: str, quantize=frozenset()):
    """Fill the meta-device `model` from (hf_key, load) pairs, one tensor at a time.

    `quantize` holds the keys of projection weights to keep in NF4 ("model.layers.0.mlp.up_proj.weight").
    A 16-bit one is moved to the device, quantized there and dropped, so the device never
    holds more than one 16-bit projection at a time. A bitsandbytes pre-quantized one arrives
    as several tensors (P.weight, P.weight.absmax, ..., maybe in any order, across shards):
    they are kept on the device until all of the ones the checkpoint lists are in, then read
    as an NF4Weight as they are (or dequantized, for a module that must stay 16-bit).
    """
    params = {hf_key(name): (module, attr)
              for module_name, module in model.named_modules()
              for attr, p in module.named_parameters(recurse=False)
              for name in [f"{module_name}.{attr}" if module_name else attr]}
    tied = model.config.tie_word_embeddings
    tensors = list(tensors)  # (key, load) pairs; nothing is read yet
    keys = {key for key, _ in tensors}
    # the parts of each bitsandbytes 4-bit weight in the checkpoint: {"P.weight": {its keys}}
    bnb_groups = {}
    for key in keys:
        if key != _weight_key(key) and _weight_key(key) in params:
            bnb_groups.setdefault(_weight_key(key), set()).add(key)
    for weight_key, parts in bnb_groups.items():
        parts.update({weight_key} & keys)  # P.weight itself, the packed codes (if it is there)
    from_16bit = {key for key in quantize if key in params and key not in bnb_groups}
    for key in sorted(from_16bit):
        numel = getattr(*params[key]).numel()
        if numel % NF4_BLOCKSIZE:
            raise ValueError(f"{source}: tensor {key!r} has {numel} values, not a multiple of {NF4_BLOCKSIZE}, "
                             f"so it cannot be held in NF4 (keep it 16-bit with skip_modules=['{key[:-7]}'])")
    arrived = {}  # "P.weight" -> {key: tensor on the device} while a 4-bit weight is incomplete
    for key, load in tensors:
        where = getattr(load, "where", source)
        if key.endswith(IGNORED_SUFFIXES) or (tied and key == "lm_head.weight"):
            continue  # a tied head may also be stored; HF ties it to the embedding regardless
        weight_key = _weight_key(key)
        if weight_key in bnb_groups:
            parts = arrived.setdefault(weight_key, {})
            tensor = load()
            parts[key] = tensor if ".quant_state." in key else tensor.to(device)
            if parts.keys() == bnb_groups[weight_key]:
                module, attr = params.pop(weight_key)
                weight = NF4Weight.from_bnb_state(arrived.pop(weight_key), weight_key[:-7], source=where)
                if weight.shape != getattr(module, attr).shape:
                    raise ValueError(f"{where}: tensor {weight_key!r} has shape {list(weight.shape)} in its quant_state, "
                                     f"expected {list(getattr(module, attr).shape)} from the config")
                if weight_key not in quantize:  # skipped, not a projection, or no quantization_config
                    as_dtype = weight.dtype if dtype == "stored" else dtype  # the dtype it was quantized from
                    weight = nn.Parameter(ops.dequantize_nf4(weight, as_dtype), requires_grad=False)
                _replace_weight(module, attr, weight)
            continue
        if key not in params:
            raise ValueError(f"{where}: unexpected tensor {key!r} (not a parameter of a "
                             f"{model.config.model_type} model with this config)")
        module, attr = params.pop(key)
        expected = getattr(module, attr).shape
        tensor = load()
        if tensor.shape != expected:
            raise ValueError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, "
                             f"expected {list(expected)} from the config")
        if dtype != "stored":
            tensor = tensor.to(dtype=dtype)  # cast first: a bf16 checkpoint moves half the bytes
        tensor = tensor.to(device)
        if key in quantize:
            weight = quantize_nf4(tensor, NF4_BLOCKSIZE, double_quant=True)
            del tensor  # the 16-bit copy goes as soon as its NF4 form exists
            _replace_weight(module, attr, weight)
        else:
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    if params:
        missing = sorted(params)
        raise ValueError(f"{source}: checkpoint is missing {len(missing)} tensor(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _replace_weight(module, attr, weight):
    """Put `weight` (a parameter, or an NF4Weight module) where the meta placeholder parameter is:
    nn.Module refuses to assign a module over a parameter of the same name, so drop it first."""
    delattr(module, attr)
    setattr(module, attr, weight)


def _weight_key(key):
    """"P.weight.absmax" (a part of a bitsandbytes 4-bit weight) -> "P.weight"; others as they are."""
    return key.rsplit(".weight.", 1)[0] + ".weight" if ".weight." in key else key
