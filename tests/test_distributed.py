"""torchrun's two engines on the CPU (gloo, 2 processes): the adapter from 2 ranks x batch 2 x
accumulation 2 equals the one from 1 process x batch 2 x accumulation 4, for --parallel ddp and
fsdp, on an fp32 base and an NF4 one; resume under 2 processes is bit-exact.

The rows have different lengths, so the two ranks hold different numbers of label tokens: a
loop that divides each rank's loss by its own count (a mean of per-rank means) trains another
adapter, and test_per_rank_mean_is_caught shows the comparison sees it. AdamW is blind to a
gradient's overall scale, so the steps' logged grad norms (taken before clipping) are compared
too: a missing world-size factor, say, halves them.

All the 2-process runs happen in one torch.multiprocessing.spawn (starting processes and
importing torch is most of the cost), on a tiny 2-block model for 4 steps each.
"""
import json
import os
import shutil
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from hf_fixtures import save_checkpoint

# fp32 on the CPU. The 2-rank sum of gradients is added in another order than one process's
# accumulation, so losses and grad norms agree to fp32 rounding (measured <= 2e-7 relative).
# The adapters agree as closely except on the few entries whose gradient is ~0, where AdamW's
# g / (sqrt(v) + eps) turns a rounding difference into a visible one (measured: 3 to 9 of
# 8,960 entries differ by up to 3.5e-4 of the adapter's largest entry; the mean difference is
# <= 6e-8 of it). A per-rank mean moves 8,942 of them, by 3.5e-3 on average.
RTOL = 1e-6  # losses and grad norms
MEAN_TOL, MAX_TOL = 1e-6, 1e-3  # adapter: mean and max |difference| / max |adapter|


def flags(checkpoint, data, out, accum, *extra):
    return ["--model", str(checkpoint), "--data", str(data), "--out", str(out), "--seq_len", "64",
            "--batch_size", "2", "--grad_accum", str(accum), "--max_steps", "4", "--save_every", "2",
            "--lr", "1e-2", "--warmup_steps", "0", "--dropout", "0", "--r", "4", "--alpha", "8",
            "--eval_size", "4", "--samples", "0", "--log_every", "1", "--seed", "7", *extra]


CASES = {"ddp": [], "fsdp": ["--parallel", "fsdp", "--samples", "1"],  # generate() under FSDP2 once
         "ddp_nf4": ["--load_in_4bit", "true"],  # and the block recompute under FSDP2 once:
         "fsdp_nf4": ["--parallel", "fsdp", "--load_in_4bit", "true", "--grad_checkpointing", "true"]}
FULL_CASES = {"ddp_full": ["--full", "true"], "fsdp_full": ["--parallel", "fsdp", "--full", "true"]}


def _worker(rank, port, jobs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from nanolora import distributed
    for kind, argv in jobs:
        if kind == "copy":  # an interrupted run leaves its checkpoint behind; rank 0 sets it up
            if rank == 0:
                shutil.copytree(*argv)
            torch.distributed.barrier()
        elif kind == "per_rank_mean":  # the bug: each rank normalises by its own label count
            real = train.count_labels
            with mock.patch.object(train, "count_labels", lambda window: real(window[rank::2]) * 2):
                train.main(argv)
        elif kind == "integers_whole":  # FSDP2 before torch 2.12: NF4's uint8 codes stay unsharded
            with mock.patch.object(distributed, "FSDP2_SHARDS_INTEGERS", False):
                train.main(argv)
        else:
            train.main(argv)
    distributed.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with a tiny qwen2 checkpoint (model/) and 40 rows of 1 to 13 label tokens (data.jsonl)."""
    root = tmp_path_factory.mktemp("distributed")
    save_checkpoint(root / "model", "qwen2")
    rows = [{"prompt": " ".join(f"w{j}" for j in range(1 + (3 * i) % 7)),  # 1 to 13 label tokens
             "completion": " ".join(str(k) for k in range(1 + (5 * i) % 13))} for i in range(40)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def runs(inputs):
    """The folder of `inputs`, with the outputs of the 1-process references and of every 2-process run."""
    root = inputs
    args = lambda name, accum, *extra: flags(root / "model", root / "data.jsonl", root / name, accum, *extra)
    assert "WORLD_SIZE" not in os.environ
    train.main(args("one", 4))
    train.main(args("one_nf4", 4, "--load_in_4bit", "true"))
    train.main(args("one_full", 4, "--full", "true"))
    jobs = [("train", args(name, 2, *extra)) for name, extra in CASES.items()]
    jobs.append(("per_rank_mean", args("per_rank_mean", 2)))
    jobs.append(("integers_whole", args("fsdp_nf4_codes_whole", 2, *CASES["fsdp_nf4"])))
    jobs += [("train", args(name, 2, *extra)) for name, extra in FULL_CASES.items()]
    for name, extra in [("ddp", CASES["ddp"]), ("fsdp", CASES["fsdp"]), ("fsdp_full", FULL_CASES["fsdp_full"])]:
        jobs.append(("copy", (root / name / "checkpoint-2", root / f"{name}_resumed" / "checkpoint-2")))
        jobs.append(("train", args(f"{name}_resumed", 2, *extra, "--resume", "latest")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, jobs), nprocs=2)
    return root


def adapter(folder):
    """A run folder's final adapter (<out>/adapter/), or a checkpoint's."""
    from nanolora.peft import adapter_folder
    return load_file(adapter_folder(folder) / "adapter_model.safetensors")


def metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def rel_diff(a, b):
    """(mean, max) of |a - b| over all the adapter's entries, relative to b's largest entry."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]) / max(t.abs().max() for t in b.values())
    return diff.mean().item(), diff.max().item()


@pytest.mark.parametrize("name", [*CASES, "fsdp_nf4_codes_whole"])
def test_two_ranks_train_the_same_adapter_as_one_process(runs, name):
    reference = runs / ("one_nf4" if "nf4" in name else "one")
    mean, most = rel_diff(adapter(runs / name), adapter(reference))
    print(f"{name}: adapter |2 ranks - 1 process| / max |adapter|: mean {mean:.2e}, max {most:.2e}")
    assert mean <= MEAN_TOL and most <= MAX_TOL
    # rank 0 alone logs; loss and the pre-clipping grad norm are those of the global window
    ours, ref = metrics(runs / name), metrics(reference)
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL)
    assert adapter(runs / name / "checkpoint-2").keys() == adapter(reference).keys()


def test_per_rank_mean_is_caught(runs):
    """The same comparison on a loop that divides by each rank's own label count fails by far."""
    mean, most = rel_diff(adapter(runs / "per_rank_mean"), adapter(runs / "one"))
    print(f"per-rank mean: adapter |2 ranks - 1 process| / max |adapter|: mean {mean:.2e}, max {most:.2e}")
    assert mean > 100 * MEAN_TOL and most > 10 * MAX_TOL
    grad_norms = [(a["grad_norm"], b["grad_norm"]) for a, b in zip(metrics(runs / "per_rank_mean"), metrics(runs / "one"))]
    assert all(a != pytest.approx(b, rel=100 * RTOL) for a, b in grad_norms)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_resume_under_two_ranks_is_exact(runs, name):
    straight, resumed = adapter(runs / name), adapter(runs / f"{name}_resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    mid = adapter(runs / name / "checkpoint-2")
    assert not all(torch.equal(mid[k], straight[k]) for k in straight)  # the comparison means something


def full_model(folder):
    """A full fine-tune's weights (<out>/model/ or a checkpoint's model/)."""
    return load_file(Path(folder) / "model" / "model.safetensors")


@pytest.mark.parametrize("name", FULL_CASES)
def test_two_ranks_full_fine_tune_like_one_process(runs, name):
    """--full true: every weight, gathered from FSDP2's shards for the checkpoint and the output,
    as one process trains it (fp32 weights: the plain AdamW arithmetic, same tolerances)."""
    mean, most = rel_diff(full_model(runs / name), full_model(runs / "one_full"))
    print(f"{name}: weights |2 ranks - 1 process| / max |weight|: mean {mean:.2e}, max {most:.2e}")
    assert mean <= MEAN_TOL and most <= MAX_TOL
    for a, b in zip(metrics(runs / name), metrics(runs / "one_full"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=RTOL)
    if name == "fsdp_full":  # once, not per case: fsdp_full's resume is exact and every weight moved
        straight, resumed = full_model(runs / "fsdp_full"), full_model(runs / "fsdp_full_resumed")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
        before = load_file(runs / "model" / "model.safetensors")
        assert all(not torch.equal(before[k], straight[k]) for k in straight)


def test_resume_with_another_world_size_is_refused(runs, tmp_path):
    shutil.copytree(runs / "ddp" / "checkpoint-2", tmp_path / "checkpoint-2")
    argv = flags(runs / "model", runs / "data.jsonl", tmp_path, 4, "--resume", "latest")
    with pytest.raises(ValueError, match=r"written by torchrun with 2 process\(es\), this run by one process; resume it the same way"):
        train.main(argv)


@pytest.mark.gpu
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_on_gpus_trains_like_one_process(inputs, tmp_path, parallel):
    """NCCL, the fused kernels and FSDP2 over NF4 bytes on real GPUs: torchrun with up to 2 GPUs
    (one is enough to run the DDP/FSDP2 code with NCCL) against one process with the same global
    batch. Each micro-batch's forward is the same computation in both runs; only the fp32
    gradient sums are added in another order, so bf16 autocast leaves the two close (expected
    well inside 1e-3; not yet measured on a GPU)."""
    import subprocess
    import sys
    n = min(2, torch.cuda.device_count())
    args = lambda out, accum, *extra: flags(inputs / "model", inputs / "data.jsonl", out, accum, "--load_in_4bit", "true", *extra)
    train.main(args(tmp_path / "one", 4))
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "--",
                    str(repo / "train.py"), *args(tmp_path / "torchrun", 4 // n, "--parallel", parallel)],
                   cwd=repo, check=True, env={**os.environ, "PYTHONPATH": str(repo)})
    for a, b in zip(metrics(tmp_path / "torchrun"), metrics(tmp_path / "one"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    mean, most = rel_diff(adapter(tmp_path / "torchrun"), adapter(tmp_path / "one"))
    print(f"{n} GPU(s), {parallel}: adapter |torchrun - 1 process| / max |adapter|: mean {mean:.2e}, max {most:.2e}")
    assert mean <= 1e-4
