"""The --out folder of a training run: checkpoints, resuming, and keeping runs apart.

    <out>/adapter/              the final adapter (PEFT format), written as one folder swap
    <out>/model/                instead, with --full true: the whole model as an HF checkpoint
    <out>/checkpoint-<step>/    adapter (or model/) + trainer_state.pt, every --save_every steps
    <out>/metrics.jsonl         one record per logged step

A fresh run refuses an --out that holds another run's checkpoints or adapter (a later
`--resume latest` would pick the wrong run); `--overwrite true` removes them first. A resumed
run must be the same run: the settings that decide the model, the data or the batches are
compared with those saved in the checkpoint.
"""
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from nanolora import distributed, full_finetune
from nanolora.files import atomic_path, clean_leftovers
from nanolora.peft import adapter_state, save_adapter

STATE_FILE = "trainer_state.pt"
# Changing one of these makes another run: resuming would mix two runs in one adapter.
SAME_RUN = ("model", "full", "load_in_4bit", "dynamic_budget", "data", "r", "alpha", "dropout", "rslora", "targets",
            "seq_len", "pack", "train_on_prompt", "batch_size", "grad_accum", "seed", "eval_size", "data_split",
            "group_by_length", "optim")  # another optimizer's state does not load into this one
# Changing one of these continues the run on another course: allowed, with a warning.
WARN_ON_CHANGE = ("lr", "schedule", "warmup_steps", "weight_decay", "max_grad_norm", "max_steps", "epochs", "fp8")


def checkpoints(out) -> list[Path]:
    """The checkpoint-<step> folders in `out`, oldest step first (others, e.g. checkpoint-best, ignored)."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("checkpoint-"):]))


def prepare_out(out, resume: bool, overwrite: bool, writer: bool = True) -> Path:
    """Make `out` ready for a run: a folder, no leftovers of killed writes, and for a fresh
    run no other run's checkpoints or adapter (removed with `overwrite`, refused without).
    Every rank checks; only the `writer` (rank 0) changes anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, expected a folder")
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
    earlier = checkpoints(out) + [p for p in (out / "adapter", out / "model") if p.exists()]
    if earlier and not resume:
        if not overwrite:
            raise ValueError(f"--out {out} holds another run ({', '.join(p.name for p in earlier[:3])}"
                             f"{' ...' if len(earlier) > 3 else ''}): pass --resume latest to continue it, "
                             "--overwrite true to replace it, or another --out")
        for path in earlier if writer else []:
            shutil.rmtree(path)
    return out


def save_checkpoint(folder, model, optimizer, scheduler, scaler, batches, step, settings, tokenizer=None,
                    source=None):
    """Adapter (PEFT format) plus everything --resume needs to continue exactly, written by
    rank 0 under a temporary name and renamed, so a crash never leaves a half checkpoint;
    then only the newest settings.save_total_limit checkpoints are kept. Every rank calls it:
    FSDP2's shards of the adapter and optimizer state are gathered. The state holds tensors,
    numbers, strings and containers only, so it loads with weights_only=True.
    A full fine-tune (settings.full) saves the whole model instead of the adapter, as an HF
    checkpoint in model/ (tokenizer files from `source`, the folder the run loaded)."""
    full = getattr(settings, "full", False)
    adapter = None if full else adapter_state(model)
    optimizer_state = distributed.optimizer_state(model, optimizer)
    if not distributed.is_main():
        if full:
            full_finetune.save_model(model, tokenizer, None, source)  # takes part in rank 0's gathers
        return
    with atomic_path(folder) as tmp:
        if full:
            full_finetune.save_model(model, tokenizer, tmp / full_finetune.MODEL_FOLDER, source)
        else:
            save_adapter(model, tmp, settings.model, adapter)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "data": batches.state_dict(), "launch": distributed.launch(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                    "settings": vars(settings)}, tmp / STATE_FILE)
    if settings.save_total_limit:
        for old in checkpoints(Path(folder).parent)[:-settings.save_total_limit]:
            shutil.rmtree(old)


def read_state(folder) -> dict:
    """trainer_state.pt of a checkpoint, loaded without unpickling code (weights_only=True):
    a checkpoint folder from anywhere cannot run anything."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise ValueError(f"--resume: {folder} is not a checkpoint folder (no {STATE_FILE})")
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, foreign pickle, refused global: one line, named
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: not a readable trainer state ({first_line})") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "data", "rng"} <= state.keys():
        raise ValueError(f"{file}: not a trainer state written by train.py")
    return state


def find_resume(out, resume) -> tuple[Path, dict]:
    """(checkpoint folder, its state) for --resume: a folder, or `latest`: the newest
    checkpoint in `out` whose state reads (a truncated newer one is named and passed over)."""
    if resume != "latest":
        return Path(resume), read_state(resume)
    for folder in reversed(checkpoints(out)):
        try:
            return folder, read_state(folder)
        except ValueError as e:
            print(f"warning: skipping {folder}: {e}", file=sys.stderr)
    raise ValueError(f"--resume latest: no intact checkpoint-<step> folder in {out}")


def check_same_run(state: dict, now: dict, folder):
    """Refuse a resume whose launch or settings make it another run; warn where it changes course."""
    if state.get("launch", "one process") != distributed.launch():
        raise ValueError(f"--resume: {folder} was written by {state.get('launch', 'one process')}, this run by "
                         f"{distributed.launch()}; resume it the same way (each step's examples depend on it)")
    saved = state.get("settings", {})
    changed = [k for k in SAME_RUN if k in saved and k in now and saved[k] != now[k]]
    if changed:
        diffs = ", ".join(f"--{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume {folder}: {diffs} would make this another run (start it fresh with "
                         "another --out, or use the checkpoint's settings)")
    for k in WARN_ON_CHANGE:
        if k in saved and k in now and saved[k] != now[k]:
            print(f"warning: --resume {folder}: --{k} changed from {saved[k]!r} to {now[k]!r}", file=sys.stderr)


def load_checkpoint(folder, state, model, optimizer, scheduler, scaler, batches) -> int:
    """Restore what save_checkpoint wrote besides the adapter (train.py loads that before the
    model is sharded); returns the step it was taken at."""
    distributed.load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    batches.load_state_dict(state["data"])
    print(f"resumed from {folder} at step {state['step']}")
    random.setstate(_as_tuple(state["rng"]["python"]))
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def open_metrics(out, resumed_step: int | None):
    """metrics.jsonl for appending: fresh for a new run; for a resumed one, the records of
    steps after the checkpoint are dropped (they are about to be redone), atomically."""
    path = Path(out) / "metrics.jsonl"
    if resumed_step is None:
        return open(path, "w")
    if path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill that ended the run
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return open(path, "a")
