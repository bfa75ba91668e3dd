"""--report_to: TensorBoard's event files and an offline W&B run, read back, hold the scalars
metrics.jsonl holds, the settings and the samples; the loss curve PNG."""
import json

import pytest

import train
from test_train import checkpoint, run  # noqa: F401  (the module's tiny checkpoint fixture)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_metrics(checkpoint, tmp_path):  # noqa: F811
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run(checkpoint, tmp_path, "--max_steps", "4", "--eval_every", "2", "--report_to", "tensorboard")
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    records = metrics(tmp_path)
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_gib", "elapsed_s", "eval_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(r["step"], r[name]) for r in records if name in r]
        assert [s for s, _ in logged] == [s for s, _ in expected] and expected, name
        assert all(v == pytest.approx(w, rel=1e-6, abs=1e-12) for (_, v), (_, w) in zip(logged, expected)), name
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    settings = json.loads("\n".join(line[4:] for line in texts["settings/text_summary"].splitlines()))
    assert settings["max_steps"] == 4 and settings["report_to"] == "tensorboard"
    assert texts["samples/text_summary"].lstrip().startswith("--- ") and "after:" in texts["samples/text_summary"]


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB's log format, 32 KiB blocks of chunks each with a 7-byte header (crc32, length
    little-endian, type: 1 full, 2 first, 3 middle, 4 last); wandb 0.31 has no Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def test_wandb_offline_run_holds_the_metrics(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(checkpoint, tmp_path, "--max_steps", "3", "--report_to", "wandb")
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [log] = run_dir.glob("*.wandb")
    history, config, summary = [], {}, {}
    for data in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("history"):
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif record.HasField("config") or record.HasField("run"):
            updates = (record.config if record.HasField("config") else record.run.config).update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif record.HasField("summary"):
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    records = metrics(tmp_path)
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for logged, record in zip(history, records):
        for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert logged[name] == pytest.approx(record[name], rel=1e-12), name
    assert config["max_steps"] == 3 and config["report_to"] == "wandb"
    assert summary["samples"].startswith("--- ")


def test_loss_curve_png(checkpoint, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("matplotlib")
    run(checkpoint, tmp_path, "--max_steps", "3")
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"loss curve: {tmp_path / 'loss.png'}" in capsys.readouterr().out


def test_report_to_is_checked():
    with pytest.raises(SystemExit):
        train.parse_settings(["--report_to", "mlflow"])
