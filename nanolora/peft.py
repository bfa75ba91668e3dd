"""LoRA adapters in PEFT's format, so that `peft.PeftModel.from_pretrained` reads what we
write and we read what PEFT writes.

A folder holds adapter_config.json and adapter_model.safetensors. Tensor keys are the HF
module path under `base_model.model.`, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
"""
import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanolora.distributed import whole
from nanolora.files import atomic_path
from nanolora.config import LoRAConfig
from nanolora.dynamic_4bit import save_choice
from nanolora.lora import attach_lora, lora_layers, parse_targets
from nanolora.model import hf_key

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def peft_key(module_name: str, matrix: str) -> str:
    """('layers.0.self_attn.q_proj', 'lora_A') -> PEFT's tensor key."""
    return f"base_model.model.{hf_key(module_name)}.{matrix}.weight"


def adapter_state(model) -> dict:
    """The LoRA tensors of `model` under PEFT's key names (fp32 copies on the CPU). Under FSDP2
    the shards are gathered: every rank calls this."""
    state = {}
    for name, layer in lora_layers(model):
        state[peft_key(name, "lora_A")] = whole(layer.lora_A.detach()).float().cpu().contiguous()
        state[peft_key(name, "lora_B")] = whole(layer.lora_B.detach()).float().cpu().contiguous()
    return state


def save_adapter(model, folder, base_model_name_or_path=None, state=None):
    """Write `model`'s adapter (or `state`, adapter_state's result) as the folder `folder`,
    replaced whole and atomically (see files.atomic_path): its config and weights always come
    from the same save."""
    cfg = model.lora_config
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "target_modules": cfg.targets,
        "bias": "none", "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        save_file(adapter_state(model) if state is None else state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if getattr(model, "dynamic_4bit", None) is not None:  # the base it was trained on: which projections stayed 16-bit
            save_choice(tmp, model.dynamic_4bit)


def adapter_folder(folder) -> Path:
    """The adapter in `folder`: the folder itself, or the `adapter/` a train.py run folder holds."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() and (folder / "adapter" / CONFIG_FILE).exists():
        return folder / "adapter"
    return folder


def read_adapter_config(folder) -> dict:
    """adapter_config.json -> LoRAConfig, refusing what nanolora cannot apply."""
    file = adapter_folder(folder) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config (expected a PEFT LoRA adapter folder "
                                f"with {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got a {type(config).__name__}")

    def refuse(key, got, expected):
        raise ValueError(f"{file}: {key}={got!r} is not supported (supported: {expected})")
    if config.get("peft_type", "LORA") != "LORA":
        refuse("peft_type", config["peft_type"], "LORA")
    for key, default in (("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(key, default):
            refuse(key, config[key], "false")
    if config.get("bias", "none") != "none":
        refuse("bias", config["bias"], "'none'")
    for key in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            refuse(key, config[key], "null or empty")
    targets = config.get("target_modules")
    if isinstance(targets, str):  # PEFT accepts a regex or "all-linear" (every linear but the head) here
        targets = ["all"] if targets == "all-linear" else refuse(
            "target_modules", targets, "a list of projection names, or 'all-linear'")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        refuse("target_modules", targets, "a list of projection names, or 'all-linear'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    dropout, rslora = config.get("lora_dropout") or 0.0, config.get("use_rslora") or False
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        refuse("r", r, "a positive integer")
    if not _is_number(alpha) or not math.isfinite(alpha):
        refuse("lora_alpha", alpha, "a finite number")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        refuse("lora_dropout", dropout, "a number in [0, 1)")
    if not isinstance(rslora, bool):
        refuse("use_rslora", rslora, "true or false")
    try:
        return LoRAConfig(parse_targets(targets), r, alpha, dropout, rslora)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_adapter(model, folder):
    """Attach the adapter in `folder` to `model` and fill in its weights."""
    attach_lora(model, **dataclasses.asdict(read_adapter_config(folder)))
    return load_adapter_weights(model, adapter_folder(folder))


def load_adapter_weights(model, folder):
    """Copy the LoRA matrices in `folder` into `model`'s LoRA layers (already attached),
    checking that every one is there, with the shape the model needs."""
    file = Path(folder) / WEIGHTS_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file}: adapter weights missing")
    expected = {}
    for name, layer in lora_layers(model):
        expected[peft_key(name, "lora_A")] = layer.lora_A
        expected[peft_key(name, "lora_B")] = layer.lora_B
    try:
        f = safe_open(file, framework="pt", device="cpu")
        keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{file}: not a readable safetensors file, possibly truncated ({e})") from None
    with f:
        for key in keys:
            # PEFT may save keys with the adapter name in them ("lora_A.default.weight")
            param = expected.pop(key.replace(".default.weight", ".weight"), None)
            if param is None:
                raise ValueError(f"{file}: unexpected tensor {key!r} (not a LoRA matrix of the "
                                 f"targets {model.lora_config.targets} on this model)")
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise ValueError(f"{file}: tensor {key!r} could not be read, the file may be truncated ({e})") from None
            if not tensor.is_floating_point():
                raise ValueError(f"{file}: tensor {key!r} is {tensor.dtype}, expected floating point")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{file}: tensor {key!r} holds NaN or infinite values")
            if tensor.shape != param.shape:
                raise ValueError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, but the base "
                                 f"model needs {list(param.shape)} (was the adapter trained on another base?)")
            with torch.no_grad():
                param.copy_(tensor)
    if expected:
        missing = sorted(expected)
        raise ValueError(f"{file}: missing {len(missing)} LoRA tensor(s): {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}")
    return model
