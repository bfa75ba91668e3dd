"""The training loop: exact gradient accumulation, resume, the default run, bad input."""
import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from hf_fixtures import checkpoint_fixture
from nanolora import load_model
from nanolora.data import Batches, load_examples, pad_token_id
from nanolora.lora import attach_lora, lora_parameters
from nanolora.samples import format_samples, generate_samples

DATA = train.DEFAULTS["data"]


checkpoint = checkpoint_fixture("qwen2")


def lora_grads_after(model, micro_batches, accumulate):
    for p in lora_parameters(model):
        p.grad = None
    accumulate(model, micro_batches)
    return torch.cat([p.grad.flatten() for p in lora_parameters(model)])


def test_gradient_accumulation_is_exact(checkpoint, tmp_path):
    """8 variable-length, padded examples as 8x1, 2x4 and 1x8: the same LoRA gradient to fp32
    rounding. The classic bug (a mean of per-micro-batch means) is far off on the same data."""
    model, tokenizer = load_model(checkpoint, device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    rows = [{"prompt": " ".join(f"w{j}" for j in range(1 + 2 * i)),
             "completion": " ".join(str(k) for k in range(1 + (5 * i) % 8))} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(tmp_path / "d.jsonl", tokenizer, seq_len=128)
    assert len({len(e.input_ids) for e in examples}) == 8  # really variable length

    def split(batch_size):
        batches = Batches(examples, batch_size, pad_token_id(tokenizer), seed=0)
        return [batches.batch(0, i) for i in range(len(batches))]

    def exact(model, mbs):
        train.accumulate_gradients(model, mbs, train.count_labels(mbs), torch.device("cpu"),
                                   torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False))

    def mean_of_means(model, mbs):
        for mb in mbs:
            loss = model(mb["input_ids"], mb["attention_mask"], labels=mb["labels"])
            (loss / (mb["labels"] != -100).sum() / len(mbs)).backward()

    g8x1 = lora_grads_after(model, split(8), exact)
    g2x4 = lora_grads_after(model, split(2), exact)
    g1x8 = lora_grads_after(model, split(1), exact)
    rel = lambda g: ((g - g8x1).abs().max() / g8x1.abs().max()).item()
    assert rel(g2x4) <= 1e-5 and rel(g1x8) <= 1e-5
    buggy = lora_grads_after(model, split(1), mean_of_means)
    assert rel(buggy) > 100 * max(rel(g2x4), rel(g1x8), 1e-7)
    print(f"exact: {rel(g2x4):.2e} (2x4), {rel(g1x8):.2e} (1x8); mean of means: {rel(buggy):.2e}")


def run(checkpoint, out, *flags):
    return train.main(["--model", str(checkpoint), "--out", str(out), "--data", DATA, "--seq_len", "256",
                       "--batch_size", "4", "--eval_size", "4", "--samples", "1", "--log_every", "1",
                       "--dropout", "0.1", "--warmup_steps", "2", *flags])


def test_resume_continues_exactly(checkpoint, tmp_path, one_cpu_thread):
    """10 steps straight == 5 steps, interrupted, then --resume for the other 5 (dropout is on,
    so the RNG state must be restored too, and the data order and the schedule).

    One thread throughout: a CPU run otherwise follows the machine's idle cores
    (nanolora/cpu_threads.py), and another thread count sums in another order, which
    broke bit-equality now and then in full-suite runs on this 2-core machine."""
    run(checkpoint, tmp_path / "straight", "--max_steps", "10", "--save_every", "0")
    # an interrupted run: what it leaves behind is its step-5 checkpoint
    run(checkpoint, tmp_path / "first", "--max_steps", "10", "--save_every", "5")
    shutil.copytree(tmp_path / "first" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    # the interrupted run had logged past its checkpoint: those steps are redone, not repeated
    shutil.copy(tmp_path / "first" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    run(checkpoint, tmp_path / "resumed", "--max_steps", "10", "--save_every", "0", "--resume", "latest")
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # ...and the checkpoint differs from the end point, so the comparison means something
    mid = load_file(tmp_path / "first" / "checkpoint-5" / "adapter_model.safetensors")
    assert not torch.equal(mid[key], straight[key])


def test_default_run_smoke(checkpoint, tmp_path, capsys):
    """The default run's code path on a tiny checkpoint: eval before/after, samples, the
    update check, a PEFT adapter in --out, metrics.jsonl, loss going down."""
    run(checkpoint, tmp_path, "--max_steps", "12", "--lr", "3e-3")
    printed = capsys.readouterr().out
    assert "eval loss before training" in printed and "before:" in printed and "after:" in printed
    assert "(unchanged); LoRA weights sum |after - before|" in printed and "(changed)" in printed
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_gib", "elapsed_s", "eta_s"):
        assert key in records[0]


def test_nan_loss_stops_and_keeps_last_checkpoint(checkpoint, tmp_path, monkeypatch):
    real = train.accumulate_gradients
    calls = []

    def poisoned(*args):
        loss_sum = real(*args)
        calls.append(1)
        return loss_sum * float("nan") if len(calls) >= 3 else loss_sum
    monkeypatch.setattr(train, "accumulate_gradients", poisoned)
    with pytest.raises(SystemExit, match=r"loss is nan at step 3 .*checkpoint-2, is intact"):
        run(checkpoint, tmp_path, "--max_steps", "6", "--save_every", "2")
    assert not (tmp_path / "checkpoint-4").exists()
    model, _ = load_model(checkpoint, device="cpu", adapter=tmp_path / "checkpoint-2")  # loads cleanly
    assert not any(n.startswith(".") for n in __import__("os").listdir(tmp_path))  # no temp leftovers


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "bogus"], "invalid choice: 'bogus'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
    (["--rslora", "maybe"], "expected true or false, got 'maybe'"),
    (["--r", "0"], "--r must be at least 1"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--eval_size", "1.5"], "expected a count or a fraction below 1, got '1.5'"),
])
def test_bad_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_settings(flags)
    assert message in capsys.readouterr().err


def test_bad_target_names_the_target(capsys):
    with pytest.raises(SystemExit):
        train.parse_settings(["--targets", "q,qkv"])
    assert "LoRA target 'qkv' is not a projection name" in capsys.readouterr().err


def test_samples_show_the_question_and_batch_like_one_by_one(checkpoint, tmp_path):
    """The samples print the question as the row wrote it (not the end of the rendered prompt),
    and one left-padded batch of prompts generates what each prompt alone does."""
    model, tokenizer = load_model(checkpoint, device="cpu")
    rows = [{"prompt": "Define the word\n  \"Bore\" please", "completion": " a"},
            {"prompt": "Hi", "completion": " b"}, {"prompt": "x " * 80, "completion": " c"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(tmp_path / "d.jsonl", tokenizer, seq_len=256)
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    batched = generate_samples(model, tokenizer, examples, cpu, off, pad_token_id(tokenizer), max_new_tokens=12)
    alone = [generate_samples(model, tokenizer, [ex], cpu, off, pad_token_id(tokenizer), max_new_tokens=12)[0]
             for ex in examples]
    assert batched == alone and all(batched)
    shown = format_samples(examples, batched, ["after"] * 3).split("\n")
    assert shown[0] == '--- Define the word "Bore" please' and shown[1] == f"before: {batched[0]}"
    assert shown[2] == "after:  after" and shown[4] == "--- Hi"
    assert shown[8] == "--- " + ("x " * 80)[:97] + "..."


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    """Another process keeping one core busy (as /proc/stat would count it) leaves one thread
    of two; when it stops, the run takes both again. Our own CPU time is not counted as theirs."""
    from nanolora import cpu_threads
    busy = [1000.0]
    monkeypatch.setattr(cpu_threads, "_busy_cpu_seconds", lambda: busy[0])
    monkeypatch.setattr(cpu_threads.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cpu_threads, "TORCH_DEFAULT_THREADS", 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threads = cpu_threads.CPUThreads()
        start = time.monotonic()
        busy[0] += 0.2  # another process: one full core over the 0.2 s below
        assert threads.update(sample_s=0.2) == 1 and torch.get_num_threads() == 1
        assert abs(time.monotonic() - start - 0.2) < 0.1
        spent = time.process_time()
        while time.process_time() - spent < 0.1:  # our own work only
            pass
        busy[0] += time.process_time() - spent
        assert threads.update() == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(1)
        assert cpu_threads.CPUThreads().update() == 1  # the user's setting decides
    finally:
        torch.set_num_threads(before)


@pytest.mark.gpu
@pytest.mark.parametrize("has_bf16", [True, False])
def test_training_on_gpu(checkpoint, tmp_path, monkeypatch, has_bf16):
    """The loop on CUDA: bf16 autocast, or (pretending the GPU lacks bf16) fp16 weights with a
    GradScaler; the loss falls either way and the frozen weights stay as they were."""
    if not has_bf16:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    model = run(checkpoint, tmp_path, "--max_steps", "12", "--lr", "3e-3", "--grad_checkpointing", "true")
    assert model.embed_tokens.weight.dtype == (torch.bfloat16 if has_bf16 else torch.float16)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("has_bf16", [True, False])
def test_training_with_cuda_graphs(checkpoint, tmp_path, capsys, monkeypatch, has_bf16):
    """The plumbing through train.py: --pack true turns the graphs on by themselves (and, with
    them, offloaded checkpointing); the 12 losses fall and follow --cuda_graphs false's within
    3% (not bit for bit where a batch is padded to a bucket length: that changes the GEMM
    shapes and so their rounding); without bf16, fp16 with a GradScaler runs graphed too. The
    graphed arithmetic against eager is tests/test_cuda_graphs.py's."""
    if not has_bf16:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    losses = {}
    for graphs in ("auto", "false"):
        run(checkpoint, tmp_path / graphs, "--max_steps", "12", "--lr", "3e-3", "--dropout", "0", "--pack", "true",
            "--cuda_graphs", graphs, "--grad_accum", "2")
        printed = capsys.readouterr().out
        assert ("CUDA graphs: on; gradient checkpointing: offload" in printed) == (graphs == "auto"), printed
        records = [json.loads(line) for line in (tmp_path / graphs / "metrics.jsonl").read_text().splitlines()]
        losses[graphs] = [r["loss"] for r in records if "loss" in r]
    print(losses)
    assert len(losses["auto"]) == len(losses["false"]) == 12
    assert sum(losses["auto"][-3:]) < sum(losses["auto"][:3])
    for a, b in zip(losses["auto"], losses["false"]):
        assert a == pytest.approx(b, rel=0.03)


def test_weights_checksum_sees_any_change_to_a_frozen_weight():
    """The fingerprint train.py prints: equal to a plain float64 sum and sum of squares over the
    frozen tensors (across the slices it sums), blind to LoRA, and moved by a one-ulp change."""
    model = torch.nn.Module()
    model.big = torch.nn.Parameter(torch.randn(2**24 + 77, dtype=torch.bfloat16), requires_grad=False)
    model.codes = torch.nn.Parameter(torch.randint(0, 256, (300,), dtype=torch.uint8), requires_grad=False)
    model.lora = torch.nn.Parameter(torch.randn(10))
    expected = sum((t.double().sum() + t.double().square().sum()).item() for t in (model.big, model.codes))
    got = train.weights_checksum(model)
    assert got == pytest.approx(expected, rel=1e-12)
    with torch.no_grad():
        model.lora += 1
    assert train.weights_checksum(model) == got
    with torch.no_grad():
        model.big.view(torch.int16)[2**24 + 5] += 1  # the next bf16 value, in the second slice
    assert train.weights_checksum(model) != got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_checksum_costs_little_gpu_memory():
    """A float64 copy of a 256 MiB bf16 tensor would take 1 GiB (2 GiB with its square); the
    checksum sums slices of 2^24 values, ~256 MiB at most."""
    model = torch.nn.Module()
    model.big = torch.nn.Parameter(torch.randn(2**27, dtype=torch.bfloat16, device="cuda"), requires_grad=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train.weights_checksum(model)
    assert torch.cuda.max_memory_allocated() - before < 300 * 2**20


def test_adamw_8bit_under_fsdp_is_refused_before_loading(monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE set) the flags are checked before any process group or model."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_settings(["--optim", "adamw_8bit", "--parallel", "fsdp"])
    assert exit_info.value.code == 2
    assert "--optim adamw_8bit cannot step FSDP2's shards" in capsys.readouterr().err
    train.parse_settings(["--optim", "adamw_8bit", "--parallel", "ddp"])  # DDP replicates: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    train.parse_settings(["--optim", "adamw_8bit", "--parallel", "fsdp"])  # one process: no FSDP2
