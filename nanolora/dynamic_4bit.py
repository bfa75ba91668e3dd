"""Dynamic 4-bit: NF4 for every projection except the few whose rounding hurts most, chosen
by measuring on the training data, within a memory budget.

The measure. For a projection y = x W^T and its NF4 form W' = dequantize(quantize(W)), the
score is the energy of the error NF4 puts into its output relative to the output itself,

    score = sum_t |x_t (W - W')^T|^2 / sum_t |x_t W^T|^2      over the calibration tokens t,

with x_t the projection's real inputs, captured by hooks on the all-NF4 model (the model
QLoRA would train) running a few rows of the training data. It is what the next operation
sees: a noise-to-signal ratio of the projection's output. It sees what a weight-only error
|W - W'| misses: NF4's error is spread evenly over a block's 64 weights, so an input channel
that carries large activations (the outlier features of LLMs) multiplies the error of its
column, and a block with one large weight (its absmax) rounds the other 63 coarsely. It costs
one forward pass and one extra matmul per projection, not a forward per projection as
measuring each one's effect on the final logits would (210 forwards for SmolLM2-135M), and
needs no backward.

The choice. Keeping projection p in 16-bit removes its score and costs extra_bytes(p) =
2 numel - NF4 bytes (16-bit meaning 2 bytes per weight, whatever dtype the run computes in).
Picking the set with the most score under the budget is a 0/1 knapsack; taking projections
in order of score per extra byte (skipping any that no longer fit) is optimal for the
fractional knapsack and, since one projection is small next to the budget, close to optimal
here. Ranking by score alone would spend the budget on one large MLP projection where two
small k/v projections with more error between them cost a third as much. Ties break by
name, and the scores come from a fixed sample of the training rows, so the same data and
model give the same set.

How well it chooses (bench/dynamic_4bit.py, SmolLM2-135M-Instruct, 10% budget): it keeps all
30 v_proj and 3 k_proj and closes 24% of all-NF4's held-out loss gap to 16-bit; the same
bytes picked at random close 7%; ranking by score alone, 21%; ranking per byte by the KL each
projection alone causes at the logits (210 forwards) closes 30%. The score agrees with that
KL only loosely in rank (Spearman 0.35) but finds most of what it finds, for one forward.

The record. train.py saves the choice as dynamic_4bit.json beside the adapter (and in each
checkpoint); `load_model(..., adapter=folder, load_in_4bit="dynamic")`, chat.py and a
resumed run read it instead of measuring again.
"""
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nanolora import ops
from nanolora.model import Linear, hf_key

CHOICE_FILE = "dynamic_4bit.json"
CALIBRATION_ROWS = 16  # training rows in the one measuring forward pass (~1.5k tokens on the default data)
_TOKEN_CHUNK = 4096    # tokens per error matmul: bounds the fp32 temporaries on an 8B model


@dataclass
class Kept:
    """One projection kept in 16-bit: its HF module name, score and extra bytes over NF4."""
    module: str
    score: float
    extra_bytes: int


@dataclass
class Dynamic4bitChoice:
    budget: float            # allowed extra bytes, as a fraction of all-NF4 projection bytes
    nf4_bytes: int           # the projections' bytes when all are NF4
    keep_16bit: list = field(default_factory=list)  # [Kept], most sensitive per byte first

    @property
    def modules(self) -> list[str]:
        return [k.module for k in self.keep_16bit]

    def describe(self) -> str:
        """One line for the set, then one per projection kept: its score and cost."""
        extra = sum(k.extra_bytes for k in self.keep_16bit)
        lines = [f"dynamic 4-bit: {len(self.keep_16bit)} projection(s) stay 16-bit, +{extra / 2**20:.2f} MiB "
                 f"({extra / max(self.nf4_bytes, 1):.1%} of the {self.nf4_bytes / 2**20:.2f} MiB of all-NF4 "
                 f"projections; budget {self.budget:.1%}); the rest NF4"]
        lines += [f"  {k.module}: NF4 output error {k.score:.3%} of its output energy, +{k.extra_bytes / 2**20:.2f} MiB"
                  for k in self.keep_16bit]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring
def projection_layers(model):
    """(our module name, projection) for every frozen projection of the blocks."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Linear)]


@torch.no_grad()
def measure_sensitivity(model, checkpoint_tensors, batch) -> dict[str, float]:
    """Score every projection of `model` (all-NF4) on `batch` (collate's dict; padding is left
    out of the sums): {our module name: relative NF4 output error}. `checkpoint_tensors` maps
    HF keys to load() functions giving the 16-bit weights, read one at a time when its hook
    runs, so the device holds the NF4 model plus one 16-bit weight."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    real = batch["attention_mask"].reshape(-1).bool().to(device)  # [batch * seq]
    sums = {}  # name -> [error energy, output energy]

    def score(name, layer, x):
        x = x.reshape(-1, x.shape[-1])[real]  # [real tokens, in]
        key = hf_key(f"{name}.weight")
        stored = checkpoint_tensors[key]() if key in checkpoint_tensors else None
        if stored is None or not stored.is_floating_point() or stored.shape != layer.weight.shape:
            raise ValueError(f"--load_in_4bit dynamic needs the checkpoint's 16-bit weights to measure against; "
                             f"{key} is not one (a checkpoint already quantized, e.g. *-bnb-4bit?)")
        # the weight as the 16-bit model holds it (cast to the run's dtype), then fp32 for the sums
        exact = stored.to(device, dtype).float()
        error = exact - ops.dense_weight(layer.weight, torch.float32)
        err, out = sums.setdefault(name, [0.0, 0.0])
        for part in x.split(_TOKEN_CHUNK):
            part = part.float()
            err += (part @ error.T).square().sum().item()
            out += (part @ exact.T).square().sum().item()
        sums[name] = [err, out]

    # q/k/v and gate/up are computed inside ops' fused calls, not by calling the Linear, so the
    # hooks sit on what feeds them: the attention and MLP modules' inputs, and o_proj itself
    hooks = []
    for block_name, block in model.named_modules():
        if hasattr(block, "q_proj"):
            def attention_input(module, args, prefix=block_name):
                for p in ("q_proj", "k_proj", "v_proj"):
                    score(f"{prefix}.{p}", getattr(module, p), args[0])
            hooks.append(block.register_forward_pre_hook(attention_input))
            hooks.append(block.o_proj.register_forward_pre_hook(
                lambda module, args, name=f"{block_name}.o_proj": score(name, module, args[0])))
        if hasattr(block, "gate_proj"):
            def mlp_input(module, args, prefix=block_name):
                x = args[0]
                score(f"{prefix}.gate_proj", module.gate_proj, x)
                score(f"{prefix}.up_proj", module.up_proj, x)
                # down_proj's input as the NF4 model computes it
                hidden = ops.ACTIVATIONS[module.activation](ops.projection_reference(x, module.gate_proj)) \
                    * ops.projection_reference(x, module.up_proj)
                score(f"{prefix}.down_proj", module.down_proj, hidden)
            hooks.append(block.register_forward_pre_hook(mlp_input))
    try:
        model.hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            batch["position_ids"].to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: err / out if out > 0 else 0.0 for name, (err, out) in sums.items()}


def choose(scores: dict[str, float], extra_bytes: dict[str, int], nf4_bytes: int, budget: float) -> Dynamic4bitChoice:
    """The projections to keep in 16-bit: greedy by score per extra byte within
    budget * nf4_bytes extra bytes (see the module docstring); ties by name."""
    allowed = budget * nf4_bytes
    order = sorted(scores, key=lambda name: (-scores[name] / max(extra_bytes[name], 1), name))
    kept, spent = [], 0
    for name in order:
        if scores[name] > 0 and spent + extra_bytes[name] <= allowed:
            kept.append(Kept(hf_key(name), scores[name], extra_bytes[name]))
            spent += extra_bytes[name]
    return Dynamic4bitChoice(budget, nf4_bytes, kept)


def costs(model) -> tuple[dict[str, int], int]:
    """({our name: extra bytes of keeping it 16-bit}, all-NF4 bytes of the projections) for an
    all-NF4 model."""
    extra, total = {}, 0
    for name, layer in projection_layers(model):
        nf4 = layer.weight.nbytes
        extra[name] = 2 * layer.weight.numel() - nf4
        total += nf4
    return extra, total


def checkpoint_tensors(path) -> dict:
    """{HF key: load()} of a checkpoint folder or .gguf file, nothing read yet."""
    if str(path).endswith(".gguf"):
        from nanolora.gguf import read_gguf_checkpoint
        return dict(read_gguf_checkpoint(path)[1])
    from nanolora.load import iter_safetensors, resolve_checkpoint
    return dict(iter_safetensors(resolve_checkpoint(path)))


def calibration_batch(train_examples, pad_id, seed, n_rows=CALIBRATION_ROWS):
    """A fixed sample of the training rows (by `seed`), as one padded batch."""
    from nanolora.data import collate
    rows = random.Random(f"dynamic_4bit/{seed}").sample(range(len(train_examples)), min(n_rows, len(train_examples)))
    return collate([[train_examples[i]] for i in sorted(rows)], pad_id, packed=False)


def measure_and_choose(path, batch, budget, device, dtype) -> Dynamic4bitChoice:
    """Load `path` all-NF4, score its projections on `batch`, choose within `budget`; the
    measuring model is dropped before returning."""
    from nanolora.load import load_model
    model, _ = load_model(path, device=device, dtype=dtype, load_in_4bit=True)
    if not all(isinstance(layer.weight, torch.nn.Module) for _, layer in projection_layers(model)):
        raise ValueError(f"{path}: --load_in_4bit dynamic needs a 16-bit checkpoint to choose from "
                         f"(this one is already 4-bit, or keeps projections 16-bit itself)")
    extra, nf4_bytes = costs(model)
    scores = measure_sensitivity(model, checkpoint_tensors(path), batch)
    del model
    return choose(scores, extra, nf4_bytes, budget)


def choose_for_run(path, settings, device, dtype):
    """train.py's choice: measured on a fixed sample of the run's training rows (the held-out
    ones left out exactly as train.py splits them), printed. Returns (the choice, what
    load_examples gave), so that train.py does not read and tokenize the data again."""
    from nanolora.data import load_examples, pad_token_id, split_eval
    from nanolora.load import load_tokenizer
    tokenizer = load_tokenizer(path)
    loaded = load_examples(settings.data, tokenizer, settings.seq_len, settings.train_on_prompt, settings.data_split)
    train_examples, _ = split_eval(loaded[0], settings.eval_size, settings.seed)
    batch = calibration_batch(train_examples, pad_token_id(tokenizer), settings.seed)
    choice = measure_and_choose(path, batch, settings.dynamic_budget, device, dtype)
    print(f"measured NF4 output error of every projection on {int(batch['attention_mask'].sum())} tokens "
          f"of {len(batch['input_ids'])} training rows")
    print(choice.describe())
    return choice, loaded


# ----------------------------------------------------------------------------- the record
def save_choice(folder, choice: Dynamic4bitChoice):
    record = {"budget": choice.budget, "nf4_bytes": choice.nf4_bytes,
              "measure": "sum |x (W - NF4(W))^T|^2 / sum |x W^T|^2 over training tokens",
              "keep_16bit": [asdict(k) for k in choice.keep_16bit]}
    (Path(folder) / CHOICE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_choice(folder, required=False) -> Dynamic4bitChoice | None:
    """The choice recorded in `folder` (an adapter or checkpoint folder), checked; None when
    there is none (an error if `required`)."""
    file = Path(folder) / CHOICE_FILE
    if not file.is_file():
        if required:
            raise FileNotFoundError(f"{file}: no dynamic 4-bit choice (train.py --load_in_4bit dynamic "
                                    f"records one beside the adapter)")
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise ValueError(f"{file}: not valid JSON ({e})") from None

    def fail(key, expected, got):
        raise ValueError(f"{file}: {key} must be {expected}, got {got!r}"[:300])
    if not isinstance(record, dict):
        fail("the file", "a JSON object", type(record).__name__)
    budget, nf4_bytes, kept = record.get("budget"), record.get("nf4_bytes"), record.get("keep_16bit")
    if not _is_number(budget) or not math.isfinite(budget) or budget < 0:
        fail("budget", "a number >= 0", budget)
    if not isinstance(nf4_bytes, int) or isinstance(nf4_bytes, bool) or nf4_bytes < 0:
        fail("nf4_bytes", "an integer >= 0", nf4_bytes)
    if not isinstance(kept, list):
        fail("keep_16bit", "a list of {module, score, extra_bytes}", kept)
    choice = Dynamic4bitChoice(budget, nf4_bytes)
    for i, entry in enumerate(kept):
        if not isinstance(entry, dict) or not isinstance(entry.get("module"), str):
            fail(f"keep_16bit[{i}].module", "a projection name like 'model.layers.0.mlp.down_proj'",
                 entry.get("module") if isinstance(entry, dict) else entry)
        score, extra = entry.get("score", 0.0), entry.get("extra_bytes", 0)
        if not _is_number(score) or not math.isfinite(score):
            fail(f"keep_16bit[{i}].score", "a finite number", score)
        if not isinstance(extra, int) or isinstance(extra, bool) or extra < 0:
            fail(f"keep_16bit[{i}].extra_bytes", "an integer >= 0", extra)
        choice.keep_16bit.append(Kept(entry["module"], float(score), extra))
    return choice


def check_choice(model, choice: Dynamic4bitChoice, folder):
    """Every module the choice keeps 16-bit is a projection of `model` (a choice made for
    another model is refused, naming the entry)."""
    names = {key for name, _ in projection_layers(model) for key in (name, hf_key(name))}
    for i, kept in enumerate(choice.keep_16bit):
        if kept.module not in names:
            raise ValueError(f"{Path(folder) / CHOICE_FILE}: keep_16bit[{i}].module {kept.module!r} is not a "
                             f"projection of this model (was the adapter trained on another base?)")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
