"""The LoRA linear, and attaching / merging / counting it.

    y = x W^T + b + scale * (dropout(x) A^T) B^T

W [out, in] is the frozen base weight (a 16-bit tensor, or an NF4Weight for QLoRA), A
[r, in] and B [out, r] are the trainable low-rank pair. B starts at zero so an attached
model computes exactly what the base model did; A starts like nn.Linear's weight
(kaiming-uniform with a=sqrt(5)), as PEFT does. scale = alpha / r, or alpha / sqrt(r) for
rsLoRA, which keeps the update's size independent of the rank.
"""
import math

import torch
import torch.nn as nn

from nanolora import ops
from nanolora.config import LoRAConfig
from nanolora.model import Linear, Transformer
from nanolora.nf4 import NF4Weight



# B A is multiplied MERGE_ROWS rows of B at a time, by every merge (merge(), export's whole
# tensors and its GGUF writer, which quantizes a block of merged rows while it is in cache): a
# BLAS may sum a row's r products in another order in a matmul of another shape, and one block
# shape everywhere makes every path's merged floats the same on one device (a GPU's BLAS is
# another BLAS).
MERGE_ROWS = 64


class LoRALinear(nn.Module):
    def __init__(self, weight, bias, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = weight  # frozen: nn.Parameter(requires_grad=False) or an NF4Weight module
        self.bias = bias
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        device = weight.device
        # fp32 whatever the base dtype: the optimizer's updates to A and B are ~1e-4 of their
        # size, below bf16's resolution; autocast casts them down for the matmuls.
        # A is drawn from the CPU's generator wherever the weight lives, so a seed gives the same
        # adapter on a GPU, on the CPU, and under FSDP2 (which loads a 16-bit base on the CPU)
        lora_A = torch.empty(r, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A.to(device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self):
        return self.lora_A.shape[1]

    @property
    def out_features(self):
        return self.lora_B.shape[0]

    def forward(self, x):
        return ops.projection(x, self)  # the base projection alone once merged

    @torch.no_grad()  # a merge's product, never differentiated (and matmul's out= refuses autograd)
    def delta_weight(self, start=0, stop=None):
        """scale * B A [out, in], the update LoRA adds to W (fp32); or its rows start:stop
        (start a multiple of MERGE_ROWS), which are the same floats."""
        stop = self.out_features if stop is None else stop
        if start % MERGE_ROWS:
            raise ValueError(f"delta_weight: start {start} is not a multiple of MERGE_ROWS ({MERGE_ROWS})")
        B, A = self.lora_B.float(), self.lora_A.float()
        delta = torch.empty(stop - start, self.in_features, dtype=torch.float32, device=A.device)
        for row in range(start, stop, MERGE_ROWS):  # each block's matmul writes its rows of delta
            end = min(row + MERGE_ROWS, stop)
            torch.matmul(B[row:end], A, out=delta[row - start:end - start])
        return delta.mul_(self.scale)  # in place: the same products

    @torch.no_grad()
    def merge(self, dtype=None):
        """Fold the update into the base weight (W += scale B A); forward then skips LoRA.

        A 16-bit W is updated in place. A 4-bit W cannot hold W + scale B A: it is replaced by
        a 16-bit copy, dequantize(W) + scale B A summed in fp32 and cast to `dtype` (default:
        the dtype it was quantized from; merge_lora passes the model's), and stays 16-bit
        after unmerge; the NF4 bytes are dropped. (Export does not change the model: it computes
        the same fp32 sum tensor by tensor, in checkpoint.merged_tensors.)
        """
        if self.merged:
            return
        if isinstance(self.weight, NF4Weight):
            dense = ops.dequantize_nf4(self.weight, torch.float32) + self.delta_weight()
            dtype = dtype or self.weight.dtype
            del self.weight  # the NF4 module; nn.Module would refuse a parameter in its place
            self.weight = nn.Parameter(dense.to(dtype), requires_grad=False)
        else:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scale={self.scale:.4g}, merged={self.merged}")


def parse_targets(targets, names=Transformer.projection_names) -> list[str]:
    """'all', 'q,v', ['q_proj', 'down'] ... -> projection names, in the order of `names` (the
    model's projection_names). A short form is a name without its "_proj"."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    short = {n.removesuffix("_proj"): n for n in names if n.endswith("_proj")}
    chosen = set()
    for t in targets:
        if t == "all":
            chosen.update(names)
        elif t in names or t in short:
            chosen.add(short.get(t, t))
        else:
            raise ValueError(f"LoRA target {t!r} is not a projection name (expected 'all' or any "
                             f"of {', '.join(names)}, or short forms {', '.join(short)})")
    if not chosen:
        raise ValueError("LoRA targets: none given (expected e.g. 'all' or 'q_proj,v_proj')")
    return [n for n in names if n in chosen]


def attach_lora(model, targets="all", r=16, alpha=16, dropout=0.0, rslora=False):
    """Replace each targeted projection by a LoRALinear; freeze everything else.

    Targets are the model's frozen projections (model.Linear modules) found by their leaf
    name, wherever they sit; the names come from model.projection_names. Records the
    settings as model.lora_config (a LoRAConfig) and returns the model. Parameters stay on
    the device of the weights they wrap.
    """
    config = LoRAConfig(parse_targets(targets, model.projection_names), r, alpha, dropout, rslora)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, Linear) and name.rsplit(".", 1)[-1] in config.targets]
    for name, linear in chosen:
        parent_name, _, leaf = name.rpartition(".")
        lora = LoRALinear(linear.weight, linear.bias, r, alpha, dropout, rslora)
        setattr(model.get_submodule(parent_name), leaf, lora)
    model.lora_config = config
    return model


def lora_layers(model):
    """(name, LoRALinear) for every LoRA layer, name as in model.named_modules()."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


def merge_lora(model):
    """Merge every LoRA layer; 4-bit bases become 16-bit in the model's dtype (its embedding's)."""
    for _, layer in lora_layers(model):
        layer.merge(dtype=model.embed_tokens.weight.dtype)


def unmerge_lora(model):
    for _, layer in lora_layers(model):
        layer.unmerge()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total). The total counts the weights a model of this config has (the same
    model built on the meta device), so an NF4 weight counts the values it stands for, not
    its packed bytes, and LoRA's matrices on top."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.device("meta"):
        base = Transformer(model.config)
    lora = sum(p.numel() for p in lora_parameters(model))
    return trainable, sum(p.numel() for p in base.parameters()) + lora


def summary(model) -> str:
    """'41,943,040 trainable of 8.03B (0.52%)'."""
    trainable, total = count_parameters(model)
    size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.2f}M"
    return f"{trainable:,} trainable of {size} ({100 * trainable / total:.2f}%)"
