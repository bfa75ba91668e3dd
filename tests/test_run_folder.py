"""The --out folder and the command lines: atomic replacement, checkpoints from elsewhere
(no unpickling), keeping runs apart, resume checks, flags, and every mistake as one line
with exit status 2."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from hf_fixtures import save_checkpoint
from nanolora import files
from nanolora.run_folder import checkpoints, read_state

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(root / "base", "qwen2")
    rows = [{"prompt": f"Define word {i}:", "completion": f" a thing numbered {i} that means {i * 7}."}
            for i in range(24)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(setup, out, *flags):
    return train.main(["--model", str(setup / "base"), "--data", str(setup / "data.jsonl"), "--out", str(out),
                       "--seq_len", "64", "--batch_size", "2", "--eval_size", "2", "--samples", "0",
                       "--log_every", "1", *flags])


# ----------------------------------------------------------------------------- atomic_path
def test_folder_swap_never_deletes_first(tmp_path, monkeypatch):
    """A kill between renaming the old folder aside and the new one in (simulated by failing
    the second rename) leaves the old one intact aside; the next write beside it puts it back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, between the two renames
        return real(src, dst)
    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("new")
    monkeypatch.setattr(files.os, "replace", real)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [f".out.old-{os.getpid()}"]
    files.clean_leftovers(tmp_path)
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temporaries_are_cleaned_and_an_existing_temp_name_is_no_error(tmp_path):
    dead = 2**22 + 12345  # above Linux's pid_max: no such process
    (tmp_path / f".checkpoint-5.tmp-{dead}").mkdir()
    (tmp_path / f".model.gguf.tmp-{dead}").write_text("half")
    (tmp_path / f".model.gguf.tmp-{os.getpid()}").write_text("same pid, before a container restart")
    live = tmp_path / f".other.tmp-{os.getppid()}"  # a writer that is still running: left alone
    live.write_text("busy")
    with files.atomic_path(tmp_path / "model.gguf") as tmp:
        assert not tmp.exists()
        tmp.write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model.gguf"]
    assert (tmp_path / "model.gguf").read_text() == "complete"


def test_failure_inside_keeps_the_old_output(tmp_path):
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(tmp_path / "f") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("disk full")
    assert (tmp_path / "f").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_disk_writeback_syncs_while_writing_and_reports_its_failure(tmp_path, monkeypatch):
    """DiskWriteback fdatasyncs the file being written after wrote(), before the writer is done;
    a sync that fails (a full or failing disk) fails the write, and atomic_path keeps the old output."""
    sync = getattr(os, "fdatasync", os.fsync)
    name = sync.__name__
    synced, first_synced = [], files.threading.Event()

    def recording(fd):
        synced.append((fd, os.fstat(fd).st_size))
        first_synced.set()
        return sync(fd)
    monkeypatch.setattr(files.os, name, recording)
    with open(tmp_path / "f", "wb") as f, files.DiskWriteback(f) as writeback:
        fd = f.fileno()
        f.write(b"x" * 4096)  # within Python's buffer: wrote() flushes it
        writeback.wrote()
        assert first_synced.wait(10)
        f.write(b"y" * 100)
    assert synced[0] == (fd, 4096)  # the first part went to disk before the rest was written
    assert not writeback.thread.is_alive()

    failed = files.threading.Event()

    def full(fd):
        failed.set()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, name, full)
    (tmp_path / "out").write_text("old")
    with pytest.raises(OSError, match=r"No space left on device: '.*\.out\.tmp-"):  # the file named
        with files.atomic_path(tmp_path / "out") as tmp, open(tmp, "wb") as f, files.DiskWriteback(f) as writeback:
            f.write(b"new")
            writeback.wrote()
            assert failed.wait(10)
            writeback.thread.join(10)
            writeback.wrote()  # the next write hears of it, not only the end
            pytest.fail("wrote() after a failed sync did not raise")
    assert (tmp_path / "out").read_text() == "old" and len(list(tmp_path.iterdir())) == 2


# ----------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this runs code (writes a marker file): what a hostile trainer_state.pt does."""
    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_resume_never_unpickles_code(setup, tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    payload = _Payload()
    payload.marker = str(tmp_path / "marker")
    torch.save({"step": 3, "optimizer": payload}, folder / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"trainer_state.pt: not a readable trainer state"):
        read_state(folder)
    with pytest.raises(ValueError, match=r"no intact checkpoint"):
        run(setup, tmp_path, "--resume", "latest", "--max_steps", "4")
    assert not (tmp_path / "marker").exists()
    pickle.loads(pickle.dumps(payload))  # the payload itself is live: plain unpickling runs it
    assert (tmp_path / "marker").exists()


def test_run_folder_lifecycle(setup, tmp_path, capsys):
    """One run through the folder's life: save_total_limit, checkpoint-best ignored, a fresh run
    refused then allowed with --overwrite, resume refusing another run and warning on lr, a
    truncated newest state skipped by `latest`."""
    out = tmp_path / "out"
    run(setup, out, "--max_steps", "6", "--save_every", "2", "--save_total_limit", "2")
    assert [p.name for p in checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    (out / "checkpoint-best").mkdir()  # a user's copy beside the numbered ones: ignored, not a crash

    with pytest.raises(ValueError, match=r"--out .* holds another run \(checkpoint-4, checkpoint-6, adapter\)"):
        run(setup, out, "--max_steps", "2")
    with pytest.raises(ValueError, match=r"--r 16 -> 8 would make this another run"):
        run(setup, out, "--max_steps", "8", "--resume", "latest", "--r", "8")
    with pytest.raises(ValueError, match=r"--model .* -> .* would make this another run"):
        run(setup, out, "--max_steps", "8", "--resume", "latest", "--model", str(tmp_path))

    state = out / "checkpoint-6" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a kill or full disk mid-copy
    capsys.readouterr()
    run(setup, out, "--max_steps", "8", "--resume", "latest", "--lr", "5e-4", "--save_every", "0")
    printed = capsys.readouterr()
    assert "skipping" in printed.err and "checkpoint-6/trainer_state.pt: not a readable trainer state" in printed.err
    assert "--lr changed from 0.001 to 0.0005" in printed.err
    assert "resumed from" in printed.out and "checkpoint-4 at step 4" in printed.out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # 5 and 6 redone, logged once

    run(setup, out, "--max_steps", "2", "--overwrite", "true", "--save_every", "1")
    assert [p.name for p in checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-best").exists()  # not ours to remove


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, message", [
    (["--max_grad_norm", "-1"], "--max_grad_norm must be a positive number, got -1.0"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be a positive number, got nan"),
    (["--max_steps", "-5"], "--max_steps must be 0 (run --epochs) or more, got -5"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "inf"], "--lr must be a positive number, got inf"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--weight_decay", "-1"], "--weight_decay must be 0 or more"),
    (["--log_every", "0"], "--log_every must be at least 1, got 0"),
    (["--save_every", "-2"], "--save_every must be 0 or more"),
    (["--warmup_steps", "-1"], "--warmup_steps must be 0 or more"),
    (["--seq_len", "1"], "--seq_len must be at least 2"),
    (["--seed", "-3"], "--seed must be in [0, 2**63)"),
    (["--save_total_limit", "-1"], "--save_total_limit must be 0 (keep all) or more"),
    (["--eval_size", "nan"], "expected a count or a fraction below 1, got 'nan'"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--device", "meta"], "--device 'meta' is not supported"),
    (["--overwrite", "perhaps"], "expected true or false, got 'perhaps'"),
    (["--fp8", "true", "--dropout", "0.1"], "--fp8 true is for the frozen base under LoRA without dropout"),
    (["--fp8", "true", "--full", "true"], "it needs --full false and --dropout 0"),
    (["--fp8", "true", "--device", "cpu"], "--fp8 true needs a CUDA GPU with FP8 matmuls (Ada, Hopper or later); "
                                           "the device is cpu"),
])
def test_numeric_and_device_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_settings(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_fp8_refused_with_the_kernels_off(capsys, monkeypatch):
    """--fp8 runs on the fused path: NANOLORA_KERNELS=0 would silently leave it in bf16."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a GPU with FP8 matmuls, where --fp8 true is otherwise accepted")
    monkeypatch.setattr(train.ops, "_kernels_enabled", False)
    with pytest.raises(SystemExit):
        train.parse_settings(["--fp8", "true"])
    assert "NANOLORA_KERNELS=0 turns them off" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        train.parse_settings(["--device", "cuda"])
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


def test_out_that_is_a_file(setup, tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=r"--out .*out: is a file, expected a folder"):
        run(setup, tmp_path / "out", "--max_steps", "1")


# ----------------------------------------------------------------------------- whole programs
def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_programs_end_user_errors_in_one_line(setup, tmp_path):
    """train.py and export.py, as a user runs them: a bad data row, a bad flag, a missing
    adapter, an --out of the wrong kind: one line on stderr, exit status 2, no traceback."""
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (tmp_path / "a.gguf").mkdir()
    cases = [
        (["train.py", "--model", str(setup / "base"), "--data", str(tmp_path / "bad.jsonl"), "--out",
          str(tmp_path / "o")], 'bad.jsonl: line 2: "text" must be a string, got null'),
        (["train.py", "--lr", "-1"], "--lr must be a positive number"),
        (["export.py", "--base", str(setup / "base"), "--adapter", str(tmp_path / "none"), "--format", "peft",
          "--out", str(tmp_path / "p")], "--adapter"),
        (["export.py", "--base", str(setup / "base"), "--adapter", str(tmp_path), "--format", "gguf",
          "--out", str(tmp_path / "a.gguf"), "--force"], "a.gguf is a folder; --format gguf writes a file"),
        (["export.py", "--base", str(setup / "base"), "--adapter", str(tmp_path), "--format", "merged",
          "--out", str(tmp_path / "m"), "--shard_size", "infGB"], "--shard_size: shard size 'INFGB'"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
