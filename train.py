"""Fine-tune a model with LoRA, top to bottom: settings -> load -> LoRA -> data -> loop -> save.

    python train.py                                    # the default run (see README)
    python train.py --model Qwen/Qwen3-8B --data chats.jsonl --seq_len 2048 --grad_accum 8

    torchrun --nproc_per_node 4 -- train.py --parallel fsdp ...   # several GPUs (nanolora/distributed.py)

Every setting below is a flag (`--lr 1e-4`, `--rslora true`). The loss is summed over label
tokens and divided by the number of label tokens in the whole accumulation window (all
micro-batches, all ranks), counted before the first backward, so any split of a batch into
micro-batches or processes gives the same gradient.
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from nanolora import cli, cuda_graphs, distributed, full_finetune, load_model, ops
from nanolora.cpu_threads import CPUThreads
from nanolora.data import IGNORE, Batches, load_examples, pad_token_id, split_eval
from nanolora.default_model import DEFAULT_MODEL, resolve_model
from nanolora.document_attention import find_documents
from nanolora.dynamic_4bit import choose_for_run, read_choice
from nanolora.lora import attach_lora, lora_parameters, parse_targets, summary
from nanolora.optim import OPTIMIZERS, make_optimizer
from nanolora.peft import adapter_state, load_adapter_weights, save_adapter
from nanolora.run_folder import (check_same_run, find_resume, load_checkpoint, open_metrics, prepare_out,
                                 save_checkpoint)
from nanolora.samples import format_samples, generate_samples
from nanolora.tracking import REPORT_TO, Tracker, plot_loss

# ----------------------------------------------------------------------------- settings
DEFAULTS = dict(
    model=DEFAULT_MODEL,        # HF folder, hub id or .gguf file
    load_in_4bit=False,         # QLoRA: the frozen projections in NF4 (bitsandbytes checkpoints load 4-bit anyway);
                                # dynamic: NF4 but for the most sensitive ones, measured on the training data
    dynamic_budget=0.1,         # dynamic: 16-bit projections may add this fraction of all-NF4's projection bytes
    full=False,                 # full fine-tuning: every weight trains, no LoRA; saved to <out>/model/ (HF format)
    data=str(Path(__file__).parent / "data" / "devils_dictionary.jsonl"),  # .jsonl/.json/.parquet, folder, hub dataset
    data_split="",              # a folder's / hub dataset's split (files named train*, test*, ...); default train
    out="out",                  # adapter, checkpoints and metrics.jsonl land here
    r=16, alpha=32, dropout=0.0, rslora=False,
    targets="all",              # q_proj,...,down_proj / short forms q,k,v,o,gate,up,down / all
    seq_len=256, pack=False, train_on_prompt=False,
    group_by_length=True,       # batch rows of similar length together: less padding
    batch_size=4, grad_accum=1,
    max_steps=30,               # optimizer steps; 0 = run `epochs` epochs
    epochs=1,
    lr=1e-3, schedule="cosine", warmup_steps=4, weight_decay=0.0, max_grad_norm=1.0,
    optim="adamw",              # adamw (fp32 state: 8 bytes/param) | adamw_8bit (blockwise 8-bit: 2.03 bytes/param)
    fp8=False,                  # the frozen base's GEMMs in FP8 (Ada/Hopper; kernels/fp8_matmul.py)
    seed=1337,
    grad_checkpointing="auto",  # false | true | offload (inputs wait in CPU memory) | auto: offload when graphed
    cuda_graphs="auto",         # replay each micro-step as a CUDA graph (nanolora/cuda_graphs.py); auto: when --pack
    eval_size=24,               # held-out examples (or a fraction, e.g. 0.05)
    eval_every=0,               # steps; 0 = only before and after training
    log_every=5, save_every=15,  # steps; save_every 0 = only the final adapter
    save_total_limit=0,         # keep the newest N checkpoints; 0 = keep all
    samples=3,                  # held-out prompts to generate from before and after
    resume="",                  # a checkpoint folder, or "latest" in --out
    overwrite=False,            # a fresh run may replace the checkpoints and adapter of another run in --out
    device="",                  # default: cuda if available, else cpu
    parallel="ddp",             # under torchrun: ddp replicates the frozen base, fsdp shards it (FSDP2)
    report_to="none",           # also log to tensorboard (in <out>/tensorboard) or wandb
)
CHOICES = dict(schedule=("linear", "cosine"), parallel=("ddp", "fsdp"), report_to=REPORT_TO, optim=OPTIMIZERS)


def parse_settings(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in DEFAULTS.items():
        kind = {bool: cli.boolean, int: int, float: float}.get(type(default), str)
        if name == "eval_size":
            kind = _count_or_fraction
        if name == "grad_checkpointing":
            kind = _checkpointing
        if name == "load_in_4bit":
            kind = _load_in_4bit
        if name == "cuda_graphs":
            kind = _auto_or_boolean
        parser.add_argument(f"--{name}", type=kind, default=default, choices=CHOICES.get(name),
                            metavar=type(default).__name__.upper() if name not in CHOICES else None,
                            help=f"default: {default}")
    s = parser.parse_args(argv)
    try:
        parse_targets(s.targets)  # fails early, naming the bad target
    except ValueError as e:
        parser.error(str(e))
    cli.check_ranges(parser, s)
    if s.full and s.load_in_4bit:
        parser.error("--full true trains every weight, so they cannot be frozen in 4-bit: drop --load_in_4bit")
    if s.optim == "adamw_8bit" and s.parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--optim adamw_8bit cannot step FSDP2's shards (its 256-value blocks would straddle them): "
                     "use --parallel ddp or --optim adamw")
    if not 0 <= s.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {s.dropout}")
    if s.fp8 and (s.full or s.dropout > 0):
        parser.error("--fp8 true is for the frozen base under LoRA without dropout (the fused path): "
                     "it needs --full false and --dropout 0")
    s.device = str(cli.parse_device(parser, s.device))
    if s.fp8:
        cli.check_fp8(parser, torch.device(s.device), ops.kernels_enabled())
    return s


def _checkpointing(text):
    return cli.boolean(text, "offload", "auto")


def _auto_or_boolean(text):
    return cli.boolean(text, "auto")


def _load_in_4bit(text):
    return cli.boolean(text, "dynamic")  # dynamic: see nanolora/dynamic_4bit.py


def _count_or_fraction(text):
    """--eval_size: a number of examples (40) or a fraction of them (0.05)."""
    value = float(text)
    if not math.isfinite(value) or value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a count or a fraction below 1, got {text!r}")
    return value if value < 1 else int(value)


# ----------------------------------------------------------------------------- the step
def to_device(batch, device):
    """A batch from data.py on the device. A mask without padding is dropped while it is still
    on the host, so the model takes SDPA's causal fast path without a device sync; packed
    rows' documents are found there too (nanolora/document_attention.py)."""
    if batch["attention_mask"] is not None and bool(batch["attention_mask"].all()):
        batch = {**batch, "attention_mask": None}
    if batch.get("segment_ids") is not None and batch["segment_ids"].device.type == "cpu":
        batch = {**batch, "documents": find_documents(batch["segment_ids"])}
    return {k: None if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}


def count_labels(micro_batches) -> int:
    return sum(int((mb["labels"] != IGNORE).sum()) for mb in micro_batches)


def accumulate_gradients(model, micro_batches, n_label_tokens, device, autocast, scaler, graphed=None):
    """Backward over this rank's micro-batches of one accumulation window; returns this rank's
    summed loss (a tensor on the device).

    Each micro-batch's summed loss is divided by `n_label_tokens`, the label tokens of the WHOLE
    window (all its micro-batches, on all ranks), so the gradients add up to d(mean over all the
    window's label tokens). Dividing each micro-batch by its own count instead (a mean of
    means) weighs a token in a short micro-batch more than one in a long micro-batch. Under
    torchrun the loss is also multiplied by the world size, because DDP and FSDP2 average the
    ranks' gradients, which they reduce only in the last micro-batch's backward.
    `graphed`: the same micro-step, replayed as a CUDA graph (nanolora/cuda_graphs.py).
    """
    loss_sum, factor = torch.zeros((), device=device), distributed.world_size() / n_label_tokens
    for i, mb in enumerate(micro_batches):
        if graphed:
            loss_sum += graphed(to_device(mb, device), factor)
            continue
        with distributed.gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast:
                mb_loss = model(**to_device(mb, device))
            # fp16: scaled, unscaled before clipping (a disabled scaler passes the loss through)
            scaler.scale(mb_loss * factor).backward()
        loss_sum += mb_loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Mean loss per label token over the held-out examples, each rank taking its share."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch, counts in distributed.my_share(list(batches)):
        with autocast:
            loss = model(**to_device(batch, device))
        if counts:
            total, count = total + loss, count + int((batch["labels"] != IGNORE).sum())
    model.train(was_training)
    return (distributed.sum_over_ranks(total, device) / distributed.sum_over_ranks(count, device)).item()


def weights_checksum(model):
    """A float64 fingerprint of every frozen tensor (NF4 bytes included): unchanged weights
    give the same number, and any update to them would change it. Summed on the device in
    slices of 16M values, so it costs ~256 MiB, not a float64 copy of the largest tensor (8 GiB
    for an 8B model's embedding, which would set the run's peak memory)."""
    total = None
    for t in (p for p in model.parameters() if not p.requires_grad):
        for part in distributed.whole(t).detach().reshape(-1).split(2**24):  # FSDP2: gathered, one tensor at a time
            values = part.double()
            partial = values.sum() + values.square().sum()
            total = partial if total is None else total + partial
    return 0.0 if total is None else total.item()


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    s = parse_settings(argv)
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    device = distributed.setup(torch.device(s.device))
    rank, world = distributed.rank(), distributed.world_size()
    # bf16 autocast where the GPU has bf16; fp16 with loss scaling where it does not; fp32 on CPU
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = torch.autocast("cuda", dtype=amp_dtype)
    else:
        amp_dtype, autocast = torch.float32, nullcontext()
        threads = CPUThreads()  # as many threads as other processes leave cores idle, looked at again each log
        print(f"CPU threads: {threads.update(sample_s=0.5)} of {threads.max_threads}")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # a no-op when disabled
    out = prepare_out(s.out, bool(s.resume), s.overwrite, writer=distributed.is_main())
    if s.resume:  # checked before the model loads: the checkpoint must be intact and of this run
        resume_folder, resume_state = find_resume(out, s.resume)
        check_same_run(resume_state, vars(s), resume_folder)
    tracker = Tracker(s.report_to if distributed.is_main() else "none", out, vars(s))  # rank 0 reports

    # --- load, attach LoRA
    t0 = time.time()
    with distributed.main_first():  # one download or conversion, not one per rank
        path = full_finetune.resume_source(resume_folder) if s.full and s.resume else resolve_model(s.model)
    choice = loaded = None  # dynamic 4-bit: the projections kept 16-bit, the resumed run's or measured now
    if s.load_in_4bit == "dynamic" and s.resume:
        choice = read_choice(resume_folder, required=True)
    elif s.load_in_4bit == "dynamic":  # measured on the run's data, loaded once for both
        choice, loaded = choose_for_run(path, s, device, amp_dtype)
    model, tokenizer = load_model(path, device=distributed.load_device(device, s.parallel, s.load_in_4bit),
                                  dtype=full_finetune.weights_dtype(amp_dtype) if s.full else amp_dtype,
                                  load_in_4bit=bool(s.load_in_4bit), skip_modules=choice and choice.modules)
    model.dynamic_4bit = choice  # saved beside the adapter, so reloads need not measure
    if s.full:
        full_finetune.make_trainable(model)
    else:
        attach_lora(model, s.targets, r=s.r, alpha=s.alpha, dropout=s.dropout, rslora=s.rslora)
        ops.use_fp8(s.fp8)
    # graphs auto: only packed rows, nearly full already, are padded to a graph's length for free
    graphs_off = cuda_graphs.why_not(model, device, world_size=world, full=s.full) \
        if s.cuda_graphs is True or (s.cuda_graphs == "auto" and s.pack) else f"--cuda_graphs {s.cuda_graphs}, --pack {s.pack}"
    # checkpointing auto: on a GPU, where memory decides what fits; with the inputs offloaded to
    # CPU memory when the step is a CUDA graph (as fast there, 12-21% leaner at 8B), kept on
    # the GPU when not (offloading then cost 4-6%; README); not on a CPU, which has memory to spare
    auto = device.type == "cuda" and (True if graphs_off else "offload")
    model.grad_checkpointing = auto if s.grad_checkpointing == "auto" else s.grad_checkpointing
    print(f"loaded {s.model} in {time.time() - t0:.1f}s on {device}" + (f" x {world} ({s.parallel})" if world > 1 else "")
          + ("; full fine-tuning" if s.full else f"; LoRA r={s.r} alpha={s.alpha} on {','.join(model.lora_config.targets)}")
          + f": {summary(model)}")
    if s.resume and not s.full:
        load_adapter_weights(model, resume_folder)  # before FSDP2 shards the LoRA matrices
    train_model = distributed.parallelize(model, s.parallel)  # DDP around it, or sharded in place

    # --- data
    examples, stats = loaded or load_examples(s.data, tokenizer, s.seq_len, s.train_on_prompt, s.data_split)
    print(stats)
    train_examples, eval_examples = split_eval(examples, s.eval_size, s.seed)
    pad_id = pad_token_id(tokenizer)
    batches = Batches(train_examples, s.batch_size, pad_id, s.seed, s.pack, s.seq_len, s.group_by_length)
    eval_batches = Batches(eval_examples, s.batch_size, pad_id, s.seed, group_by_length=True) if eval_examples else None
    total_steps = s.max_steps or s.epochs * math.ceil(len(batches) / (s.grad_accum * world))
    print(f"{len(train_examples)} train / {len(eval_examples)} held-out examples; {len(batches)} batches "
          f"of {s.batch_size} per epoch; {total_steps} steps of {s.grad_accum} x {world} micro-batch(es)")

    # --- optimizer and schedule: linear warmup, then linear or cosine decay to zero
    params = full_finetune.trainable_parameters(model) if s.full else lora_parameters(model)  # after parallelize: FSDP2 makes them DTensors
    optimizer = make_optimizer(params, s.optim, s.lr, s.weight_decay, device, seed=s.seed, full=s.full)

    graphed = None if graphs_off else cuda_graphs.GraphedMicroSteps(model, params, amp_dtype, scaler)
    print("CUDA graphs: " + ("on" if graphed else f"off ({graphs_off})") + f"; gradient checkpointing: {model.grad_checkpointing}")

    def lr_factor(step):
        if step < s.warmup_steps:
            return (step + 1) / (s.warmup_steps + 1)
        progress = (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps)
        return 1 - progress if s.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    step = load_checkpoint(resume_folder, resume_state, model, optimizer, scheduler, scaler, batches) if s.resume else 0
    last_checkpoint = resume_folder if s.resume else None

    # --- before
    base_checksum = weights_checksum(model)
    lora_before = [] if s.full else [distributed.whole(p).detach().clone() for p in params]  # full: no second copy
    shown, eval_points = eval_examples[:s.samples], []  # eval_points: (step, eval loss) for the loss curve
    if step == 0 and eval_batches:
        eval_before = evaluate(model, eval_batches, device, autocast)
        with distributed.unsharded(model):  # FSDP2: every rank runs it
            samples_before = generate_samples(model, tokenizer, shown, device, autocast, pad_id)
        print(f"eval loss before training: {eval_before:.4f}")
        eval_points.append((0, eval_before))

    # --- the loop
    model.train()
    metrics = open_metrics(out, step if s.resume else None) if distributed.is_main() else open(os.devnull, "w")
    stream = batches.forever()
    window_loss, window_tokens, window_seen, t_window, t_start = torch.zeros((), device=device), 0, 0, time.time(), time.time()
    start_step = step
    while step < total_steps:
        # the global window, as one process would draw it; this rank trains on every world-th.
        # Every rank holds the whole window, so it counts its label tokens without communicating.
        micro_batches = [next(stream) for _ in range(s.grad_accum * world)]
        n_label = count_labels(micro_batches)
        loss_sum = accumulate_gradients(train_model, micro_batches[rank::world], n_label, device, autocast, scaler, graphed)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window_loss += loss_sum
        window_tokens += n_label
        window_seen += sum(int(mb["attention_mask"].sum()) for mb in micro_batches)

        is_last = step == total_steps
        if step % s.log_every == 0 or is_last or (s.save_every and step % s.save_every == 0):
            loss = (distributed.sum_over_ranks(window_loss, device) / window_tokens).item()  # the one sync per logged step
            if not math.isfinite(loss):
                kept = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was written"
                sys.exit(f"loss is {loss} at step {step} (lr {scheduler.get_last_lr()[0]:.3g}): stopping; {kept}")
            now = time.time()
            elapsed = now - t_start
            record = dict(step=step, total_steps=total_steps, loss=loss, lr=scheduler.get_last_lr()[0],
                          grad_norm=distributed.whole(grad_norm).item(), tokens_per_s=window_seen / (now - t_window),
                          peak_gib=peak_memory_gib(device), elapsed_s=elapsed,
                          eta_s=elapsed / (step - start_step) * (total_steps - step))
            if device.type == "cpu":
                record["cpu_threads"] = threads.update()
            if s.eval_every and eval_batches and (step % s.eval_every == 0 or is_last):
                record["eval_loss"] = evaluate(model, eval_batches, device, autocast)
            print(f"step {step}/{total_steps} | loss {loss:.4f} | lr {record['lr']:.2e} | grad norm "
                  f"{record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | peak "
                  f"{record['peak_gib']:.2f} GiB | {elapsed:.0f}s elapsed, ETA {record['eta_s']:.0f}s"
                  + (f" | eval loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""))
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            tracker.log(record)
            window_loss, window_tokens, window_seen, t_window = torch.zeros((), device=device), 0, 0, time.time()
            if s.save_every and step % s.save_every == 0:
                last_checkpoint = out / f"checkpoint-{step}"
                save_checkpoint(last_checkpoint, model, optimizer, scheduler, scaler, batches, step, s, tokenizer, path)
    metrics.close()

    # --- save, and show what changed
    if s.full:  # every rank: FSDP2's shards are gathered
        full_finetune.save_model(model, tokenizer, out / full_finetune.MODEL_FOLDER, path)
    else:
        adapter = adapter_state(model)  # every rank: FSDP2's shards are gathered
        if distributed.is_main():
            save_adapter(model, out / "adapter", s.model, adapter)
    print(f"model saved to {out / full_finetune.MODEL_FOLDER}/ (HF checkpoint)" if s.full else f"adapter saved to {out / 'adapter'}/ (PEFT format)")
    if eval_batches:
        eval_after = evaluate(model, eval_batches, device, autocast)
        eval_points.append((step, eval_after))
        if start_step == 0:
            print(f"eval loss: {eval_before:.4f} before -> {eval_after:.4f} after")
            with distributed.unsharded(model):  # FSDP2: every rank runs it
                samples_after = generate_samples(model, tokenizer, shown, device, autocast, pad_id)
            shown_text = format_samples(shown, samples_before, samples_after)
            print("\n" + shown_text)
            tracker.text("samples", shown_text)
        else:
            print(f"eval loss after training: {eval_after:.4f}")
    # The check Unsloth's docs recommend: the frozen weights did not move, the adapter did.
    if not s.full:
        lora_change = sum((distributed.whole(p).detach() - p0).abs().sum().item() for p, p0 in zip(params, lora_before))
        base_after = weights_checksum(model)
        print(f"\nbase weights checksum {base_checksum:.6f} -> {base_after:.6f} "
              f"({'unchanged' if base_after == base_checksum else 'CHANGED'}); "
              f"LoRA weights sum |after - before| = {lora_change:.4f} ({'changed' if lora_change > 0 else 'UNCHANGED'})")
    tracker.close()
    if distributed.is_main() and plot_loss(out / "metrics.jsonl", out / "loss.png", eval_points):
        print(f"loss curve: {out / 'loss.png'}")
    return model


if __name__ == "__main__":
    cli.run(main, "train.py")
    distributed.close()
