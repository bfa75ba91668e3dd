"""A model with its LoRA merged, written as a Hugging Face checkpoint folder.

`merged_tensors(model)` gives each weight under its HF key as W + scale * B A, summed in
fp32 one tensor at a time: the model is not changed (its base weights may be bf16 or NF4,
dequantized first), and the merged weights are rounded once, to the output's dtype.
`save_merged` writes them as transformers does:

    config.json                      the base's, with `dtype` set and quantization_config dropped
    generation_config.json           the base's (or bos/eos/pad from the tokenizer)
    model.safetensors                or model-00001-of-0000N.safetensors ... shards of at
    model.safetensors.index.json     most `shard_size` bytes, and the index naming each
                                     tensor's shard
    tokenizer files                  copied from the base folder; for a GGUF base, tokenizer.json
                                     and tokenizer_config.json written from its tokenizer
"""
import json
import math
import shutil
import struct
from itertools import islice
from pathlib import Path

import torch

from nanolora import distributed, ops
from nanolora.files import DiskWriteback, atomic_path
from nanolora.lora import MERGE_ROWS, LoRALinear
from nanolora.model import Transformer, hf_key

# The architecture a config.json without `architectures` (e.g. one read from a GGUF file) is
# written with; a config.json that names its architecture keeps it.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SAFETENSORS_DTYPES = {dtype: name.upper() for name, dtype in DTYPES.items()}  # F32, F16, BF16


def expected_weights(config) -> dict:
    """{HF key: shape} of every weight a model of `config` has, in checkpoint order."""
    with torch.device("meta"):
        reference = Transformer(config)
    return {hf_key(name): tuple(p.shape) for name, p in reference.named_parameters()}


class MergedRows:
    """W + scale B A of one LoRA layer over a 16-bit or fp32 W, made when asked a block of rows
    at a time: rows(start, stop) (start a multiple of block_rows) is those rows of the fp32 sum,
    the same floats as the whole tensor's. The GGUF writer quantizes each block while it is in
    cache, so the fp32 sum of a whole weight (4 bytes a value, in fresh pages) is never made."""

    block_rows = MERGE_ROWS

    def __init__(self, key, layer, weight):
        self.key, self.layer, self.weight = key, layer, weight
        self.shape, self.device = tuple(weight.shape), weight.device

    @torch.no_grad()
    def rows(self, start, stop):
        block = self.layer.delta_weight(start, stop)
        block += self.weight[start:stop]
        check_finite(self.key, block)
        return block


def check_finite(key, values):
    """A merged weight with NaN or inf (llama.cpp would quantize it into garbage blocks) is an
    error. aminmax: NaN propagates, in one vectorised pass without a bool tensor (10x faster
    than isfinite().all())."""
    if values.numel() and not all(bound.isfinite() for bound in torch.aminmax(values)):
        raise ValueError(f"GGUF export: weight {key!r} holds NaN or infinite values once the adapter is merged "
                         f"(a diverged training run?)")


def merged_tensors(model, by_rows=False):
    """Yield (HF key, CPU tensor) for every weight of `model`, LoRA folded in: W + scale B A
    of an unmerged LoRA layer, or an NF4 weight, in fp32; any other as the model holds it (no
    fp32 copy: callers cast, and the GGUF writer converts chunk by chunk as it quantizes).
    by_rows: an unmerged LoRA layer over a 16-bit or fp32 weight comes as a MergedRows
    instead, computed by its consumer block by block.

    Checked against the weights a model of this config has, in checkpoint order (the order of
    expected_weights, in which its consumers lay out their files before the data comes): a
    weight that is missing, extra, out of that order or of another shape is an error, not a
    checkpoint transformers would refuse later.
    """
    expected = expected_weights(model.config)
    planned, produced = iter(expected), 0
    for module_name, module in model.named_modules():
        for attr in ("weight", "bias"):
            # a 16-bit parameter, or an NF4Weight module (dequantized by ops.dense_weight)
            value = module._parameters.get(attr, module._modules.get(attr))
            if value is None:
                continue
            # a full fine-tune under FSDP2 holds shards: gathered (a collective, every rank calls it)
            value = distributed.whole(value)
            key = hf_key(f"{module_name}.{attr}")
            lora = attr == "weight" and isinstance(module, LoRALinear) and not module.merged
            if lora and by_rows and isinstance(value, torch.Tensor):
                tensor = MergedRows(key, module, value.detach())
            elif lora:
                # W + scale B A as delta += W, in the update's own fresh fp32 tensor: the same sums
                # (addition commutes; a 16-bit W is exact in fp32) without two more temporaries
                # the size of W, whose fresh pages cost as much as the arithmetic (GGUF export)
                tensor = module.delta_weight()
                tensor += value if isinstance(value, torch.Tensor) else ops.dense_weight(value, torch.float32)
            elif isinstance(value, torch.Tensor):
                tensor = value.detach()
            else:
                tensor = ops.dense_weight(value, torch.float32)
            if expected.get(key) != tuple(tensor.shape):
                raise ValueError(f"merging: weight {key!r} of shape {list(tensor.shape)} is not part of a "
                                 f"{model.config.model_type} model with this config (expected "
                                 f"{list(expected[key]) if key in expected else 'no such weight'})")
            if key != next(planned, None):
                raise ValueError(f"merging: the model gave weight {key!r} out of checkpoint order")
            produced += 1
            yield key, tensor if isinstance(tensor, MergedRows) else tensor.cpu()
            del tensor, value  # not held while the next weight is gathered and merged
    if produced != len(expected):
        raise ValueError(f"merging: the model gave {produced} weights, a {model.config.model_type} model with "
                         f"this config has {len(expected)}")


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    text = str(text).strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[:-len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        size = int(float(number) * factor)
    except (ValueError, OverflowError):  # "abc", "infGB"; int(nan) is a ValueError
        raise ValueError(f"shard size {text!r}: expected a size like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return size


def save_merged(model, tokenizer, folder, dtype=torch.bfloat16, shard_size=5 * 10**9, source=None,
                progress=None):
    """Write `model` with its LoRA merged into `folder` (see the module docstring), atomically.
    The shards are planned from the config's shapes, so each file is written as its tensors are
    merged, one at a time: no shard is gathered in memory first (a 5 GB shard of an 8B model).

    source: the base model's folder (tokenizer and generation config are copied from it) or
    .gguf file. progress: called as progress(done, total, tensor key) as each tensor is merged.
    """
    config = model.config
    expected = expected_weights(config)
    architectures = config.hf_config.get("architectures") or [HF_ARCHITECTURES.get(config.model_type)]
    if architectures == [None]:
        raise ValueError(f"merged export: the base config has no 'architectures' and model_type "
                         f"{config.model_type!r} has no default (known: {', '.join(HF_ARCHITECTURES)})")
    shards = plan_shards(expected, dtype.itemsize, shard_size)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def in_order():  # the merged weights (in expected's order), each rounded to dtype when the writer asks
        for done, (key, tensor) in enumerate(merged_tensors(model), 1):
            if progress:
                progress(done, len(expected), key)
            tensor = tensor.to(dtype)
            yield tensor
            del tensor  # before the next merge: one merged weight in memory at a time

    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        weights = in_order()
        for name, shard in zip(names, shards):  # each file written as its tensors are made
            write_safetensors(tmp / name, {key: (dtype, expected[key]) for key in shard}, islice(weights, len(shard)))
        next(weights, None)  # runs merged_tensors to its end, which checks that nothing is left
        if len(shards) > 1:
            total_size = sum(math.prod(shape) for shape in expected.values()) * dtype.itemsize
            index = {"metadata": {"total_size": total_size},
                     "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        hf_config = {k: v for k, v in config.hf_config.items() if k != "quantization_config"}
        hf_config["architectures"] = architectures
        hf_config["dtype"] = DTYPE_NAMES[dtype]
        if "torch_dtype" in hf_config:
            hf_config["torch_dtype"] = DTYPE_NAMES[dtype]
        _write_json(tmp / "config.json", hf_config)

        base = Path(source) if source is not None and Path(source).is_dir() else None
        if base is not None and (base / "generation_config.json").exists():
            shutil.copy(base / "generation_config.json", tmp)
        else:
            eos = tokenizer.eos_token_ids
            generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
                          "pad_token_id": tokenizer.pad_token_id}
            _write_json(tmp / "generation_config.json", {k: v for k, v in generation.items() if v not in (None, [])})
        if base is not None:
            for name in TOKENIZER_FILES:
                if (base / name).exists():
                    shutil.copy(base / name, tmp)
        else:
            write_tokenizer_files(tokenizer, tmp)


def plan_shards(expected, element_size, shard_size):
    """The keys of `expected` ({key: shape}, in order) cut into shards as transformers cuts
    them: a new shard when the next tensor would take this one past shard_size bytes."""
    shards, shard_bytes = [[]], 0
    for key, shape in expected.items():
        size = math.prod(shape) * element_size
        if shards[-1] and shard_bytes + size > shard_size:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(key)
        shard_bytes += size
    return shards


def write_safetensors(path, table, tensors):
    """A safetensors file of `table` ({key: (dtype, shape)}, in file order), whose data come from
    the iterable `tensors` in the same order as the file is written: one tensor in memory at a
    time, sent to disk while the next is made (files.DiskWriteback). The format: the header's
    length (u64, little-endian), the JSON header (each key's dtype, shape and [start, end) in
    the data; spaces pad it to a multiple of 8 bytes, so every tensor starts aligned), the data.
    Not atomic by itself: an error leaves a partial file, so callers write inside atomic_path."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (dtype, shape) in table.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f, DiskWriteback(f) as writeback:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        tensors = iter(tensors)
        for key, (dtype, shape) in table.items():
            tensor = next(tensors, None)
            if tensor is None:
                raise ValueError(f"{path}: no data came for tensor {key!r}")
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"expected {dtype} {tuple(shape)}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next one is made
            writeback.wrote()


def write_tokenizer_files(tokenizer, folder):
    """tokenizer.json (the backend as it is: vocabulary, pipeline, BOS/EOS post-processor) and
    a tokenizer_config.json naming the special tokens and the chat template, which
    transformers' PreTrainedTokenizerFast reads as written."""
    folder = Path(folder)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **tokenizer.special_tokens}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    _write_json(folder / "tokenizer_config.json", config)


def _write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
