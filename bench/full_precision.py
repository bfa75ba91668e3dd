"""Full fine-tuning's precision scheme against an fp32 run: the loss curves, on a CPU.

    python bench/full_precision.py [--steps 60] [--lrs 3e-4,3e-5]

A tiny random Llama (4 blocks of width 128, tests/hf_fixtures.py's weights of std 0.1 and its
512-token BPE tokenizer) trains on the default run's data (the Devil's Dictionary), the same
batches in every run, with each of:

    fp32          fp32 weights, compute and AdamW (torch.optim.AdamW): the reference   16 B/param
    bf16+master   bf16 weights and compute, an fp32 master copy stepped by torch's
                  AdamW and copied back rounded to nearest                              16 B/param
    bf16+SR       bf16 weights and compute, fp32 moments, the new weight rounded
                  stochastically (nanolora.full_finetune.AdamW: what --full uses)        12 B/param
    bf16 nearest  the same without stochastic rounding: small updates round away        12 B/param

At lr 3e-5 a step changes a weight of size ~0.1 by ~3e-4 of itself, below half a bf16 ulp
(2^-9 = 2e-3 of it), the regime of a real fine-tune (lr 1e-5 on weights of ~0.02). Prints,
per lr, each scheme's training loss at a few steps, the mean and largest |loss - fp32 loss|
over all steps, and the held-out loss of its final weights (evaluated in fp32).
"""
import argparse
import copy
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import train  # noqa: E402
from hf_fixtures import save_checkpoint  # noqa: E402
from nanolora import full_finetune, load_model  # noqa: E402
from nanolora.data import Batches, load_examples, pad_token_id, split_eval  # noqa: E402

SCHEMES = ("fp32", "bf16+master", "bf16+SR", "bf16 nearest")
CPU = torch.device("cpu")


def train_run(folder, scheme, lr, batches, eval_batches, steps, seed=0):
    torch.manual_seed(seed)
    dtype = torch.float32 if scheme == "fp32" else torch.bfloat16
    model, _ = load_model(folder, device="cpu", dtype=dtype)
    params = full_finetune.trainable_parameters(full_finetune.make_trainable(model))
    masters = None
    if scheme == "fp32":
        optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)
    elif scheme == "bf16+master":
        masters = [p.detach().float().requires_grad_() for p in params]
        optimizer = torch.optim.AdamW(masters, lr=lr, foreach=False)
    else:
        optimizer = full_finetune.AdamW(params, lr=lr, seed=seed)
    no_scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    losses = []
    for step in range(steps):
        micro_batches = [batches.batch(0, step % len(batches))]
        n_label = train.count_labels(micro_batches)
        loss = train.accumulate_gradients(model, micro_batches, n_label, CPU, nullcontext(), no_scaler)
        losses.append(loss.item() / n_label)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if masters is not None:
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
        optimizer.step()
        if masters is not None:
            with torch.no_grad():
                for p, m in zip(params, masters):
                    p.copy_(m)
        for p in params:
            p.grad = None
    evaluated = copy.deepcopy(model).float()
    return losses, train.evaluate(evaluated, eval_batches, CPU, nullcontext())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lrs", default="3e-4,3e-5")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_checkpoint(folder, "llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
        _, tokenizer = load_model(folder, device="cpu")
        examples, _ = load_examples(train.DEFAULTS["data"], tokenizer, 256)
        train_examples, eval_examples = split_eval(examples, 32, 0)
        pad = pad_token_id(tokenizer)
        batches = Batches(train_examples, args.batch_size, pad, seed=0)
        eval_batches = Batches(eval_examples, args.batch_size, pad, seed=0, group_by_length=True)
        shown = [0, 4, 9, 19, 39, args.steps - 1]
        shown = sorted({s for s in shown if s < args.steps})
        for lr in (float(x) for x in args.lrs.split(",")):
            results = {}
            for scheme in SCHEMES:
                t0 = time.time()
                if scheme == "bf16 nearest":  # the same optimizer, rounding to nearest
                    real = full_finetune.round_stochastically
                    full_finetune.round_stochastically = lambda x, generator: x.to(torch.bfloat16)
                try:
                    results[scheme] = train_run(folder, scheme, lr, batches, eval_batches, args.steps)
                finally:
                    if scheme == "bf16 nearest":
                        full_finetune.round_stochastically = real
                print(f"  lr {lr:g} {scheme}: {time.time() - t0:.0f}s", file=sys.stderr)
            reference, _ = results["fp32"]
            print(f"\nlr {lr:g}, {args.steps} steps of {args.batch_size} examples (train loss per label token)")
            print(f"| scheme | {' | '.join(f'step {s + 1}' for s in shown)} | mean abs diff vs fp32 | max abs diff "
                  f"| held-out loss (fp32 eval) |")
            print("|---" * (len(shown) + 4) + "|")
            for scheme, (losses, held_out) in results.items():
                diffs = [abs(a - b) for a, b in zip(losses, reference)]
                print(f"| {scheme} | {' | '.join(f'{losses[s]:.4f}' for s in shown)} | {sum(diffs) / len(diffs):.4f} "
                      f"| {max(diffs):.4f} | {held_out:.4f} |")


if __name__ == "__main__":
    main()
