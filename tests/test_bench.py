"""The bench's own arithmetic and files, on the CPU with tiny shapes.

bench/make_checkpoint.py --nf4 against the world: the checkpoint holds exactly what
quantize_nf4 gives for the weights the bf16 checkpoint of the same seed holds (quantize_nf4
itself equals bitsandbytes byte for byte: tests/test_nf4.py), its quantization_config is what
transformers' save_pretrained writes, transformers + bitsandbytes load it and give the same
logits as when they quantize the bf16 checkpoint themselves, and nanolora gives those logits
too. bench/long_context.py's slope against hand-worked examples, and run.py's tables from a
synthetic results file.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nanolora import load_model
from nanolora.nf4 import NF4Weight, quantize_nf4

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import fp8_gemm  # noqa: E402
import long_context  # noqa: E402
import make_checkpoint  # noqa: E402

SHARD_GB = 0.00004  # 40 kB: the tiny NF4 checkpoint (~190 kB) spreads over several shards


def make(out, *flags):
    """make_checkpoint.py's main() in this process (a subprocess would spend seconds importing torch)."""
    argv = ["make_checkpoint.py", str(out), "--shape", "llama-tiny", *flags]
    old, sys.argv = sys.argv, argv
    try:
        make_checkpoint.main()
    finally:
        sys.argv = old


def read_checkpoint(folder):
    """{key: tensor} over every shard the index lists, and {shard: tensor bytes}."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors, shard_bytes = {}, {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(folder / shard, framework="pt") as f:
            for key in f.keys():
                assert weight_map[key] == shard, key
                tensors[key] = f.get_tensor(key)
                shard_bytes[shard] = shard_bytes.get(shard, 0) + tensors[key].numel() * tensors[key].element_size()
    assert tensors.keys() == weight_map.keys()
    return tensors, shard_bytes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make(root / "nf4", "--nf4", "--shard_gb", str(SHARD_GB))
    make(root / "bf16")
    return root / "nf4", root / "bf16"


def test_nf4_checkpoint_is_the_bf16_one_quantized(checkpoints):
    nf4_dir, bf16_dir = checkpoints
    nf4, shard_bytes = read_checkpoint(nf4_dir)
    bf16, _ = read_checkpoint(bf16_dir)
    expected = {}
    for key, tensor in bf16.items():
        assert tensor.dtype == torch.bfloat16
        if make_checkpoint.is_projection(key):
            expected.update(quantize_nf4(tensor, 64, double_quant=True).to_bnb_state(key[:-len(".weight")]))
        else:
            expected[key] = tensor
    assert sum(map(make_checkpoint.is_projection, bf16)) == 14  # 2 layers x 7: the list is complete
    assert sorted(nf4) == sorted(expected)
    for key, tensor in expected.items():
        assert nf4[key].dtype == tensor.dtype and nf4[key].shape == tensor.shape, key
        assert torch.equal(nf4[key], tensor), key  # packed codes, scales, code books, quant-state JSON
    # shards are cut before the tensor that would overflow them (the biggest tensor, 64 kB, is alone)
    assert len(shard_bytes) >= 4
    assert all(size <= SHARD_GB * 1e9 or size == 512 * 64 * 2 for size in shard_bytes.values())


def test_nf4_config_is_what_transformers_writes(checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=quant,
                                                          device_map="cpu", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "nf4")
    written = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    ours = json.loads((checkpoints[0] / "config.json").read_text())["quantization_config"]
    assert ours == written


@pytest.fixture(scope="module")
def logits(checkpoints):
    """Logits of the tiny model from each way of loading it, on the same random ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    nf4_dir, bf16_dir = checkpoints
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        model, _ = load_model(nf4_dir, device="cpu", dtype=torch.float32)
        assert sum(isinstance(m, NF4Weight) for m in model.modules()) == 14
        out["nanolora, stored NF4"] = model(ids)
        model, _ = load_model(bf16_dir, device="cpu", dtype=torch.float32, load_in_4bit=True)
        out["nanolora, bf16 quantized on load"] = model(ids)
        out["nanolora, bf16 not quantized"] = load_model(bf16_dir, device="cpu", dtype=torch.float32)[0](ids)
        # transformers loads a pre-quantized checkpoint in the dtype its config names (bf16),
        # whatever dtype it is asked for; quantizing the bf16 checkpoint, it is asked for bf16
        model = transformers.AutoModelForCausalLM.from_pretrained(nf4_dir, device_map="cpu", dtype=torch.float32)
        assert model.dtype == torch.bfloat16
        out["transformers, stored NF4"] = model.train()(ids).logits
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, device_map="cpu", dtype=torch.bfloat16,
                                                                  quantization_config=quant)
        out["transformers, bf16 quantized on load"] = model.train()(ids).logits
    return out


def test_transformers_and_nanolora_load_the_nf4_checkpoint_alike(logits):
    reference = logits["transformers, bf16 quantized on load"]
    assert reference.abs().max() > 0
    # the same NF4 bytes either way: transformers reads our file as it quantizes the bf16 one
    assert torch.equal(logits["transformers, stored NF4"], reference)
    assert torch.equal(logits["nanolora, stored NF4"], logits["nanolora, bf16 quantized on load"])
    # nanolora (fp32) against transformers (bf16 activations, unit roundoff 2^-9 ~ 2e-3, a few
    # roundings deep in 2 blocks; measured 4.6e-3 of the largest logit). The tolerance still
    # tells NF4 apart from the unquantized weights (measured 0.14 off).
    def err(name):
        return ((logits[name] - reference.float()).abs().max() / reference.float().abs().max()).item()
    assert err("nanolora, stored NF4") <= 1.5e-2
    assert err("nanolora, bf16 not quantized") > 3 * 1.5e-2, err("nanolora, bf16 not quantized")


# ---- make_checkpoint.py: bad input and interrupted runs ---------------------------------------

def test_refuses_to_write_over_a_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as e:
        make(tmp_path / "out", "--nf4")
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("flags, message", [(["--shard_gb", "0"], "--shard_gb must be a positive"),
                                            (["--shard_gb", "nan"], "--shard_gb must be a positive"),
                                            (["--layers", "0"], "--layers must be at least 1")])
def test_refuses_bad_flags(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        make(tmp_path / "out", *flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_refuses_a_disk_without_room(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(make_checkpoint.shutil, "disk_usage", lambda path: type("U", (), {"free": 10**6})())
    with pytest.raises(SystemExit) as e:
        make(tmp_path / "out", "--nf4")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs 0.0 GiB (+1 GiB spare), the disk has 0.0 GiB free" in err
    assert not any(tmp_path.iterdir())  # neither OUT nor OUT.partial


def test_interrupted_run_is_replaced(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "config.json").write_text("{")  # what a killed run leaves: a config, a torn shard
    (partial / "model-00001.safetensors").write_bytes(b"\0" * 10)
    make(tmp_path / "out", "--nf4")
    assert not partial.exists()
    model, _ = load_model(tmp_path / "out", device="cpu")
    assert sum(isinstance(m, NF4Weight) for m in model.modules()) == 14


def test_partial_folder_with_other_files_is_left_alone(tmp_path, capsys):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("not ours")
    with pytest.raises(SystemExit) as e:
        make(tmp_path / "out")
    assert e.value.code == 2 and "holds files this script does not write" in capsys.readouterr().err
    assert (partial / "notes.txt").read_text() == "not ours" and not (tmp_path / "out").exists()


def test_70b_estimate():
    """The 70B checkpoint's size from its parameter count: 68.45e9 projection weights at
    4.127 bits (NF4 + double-quantized scales, nf4.py) plus two 128256 x 8192 bf16 matrices."""
    config = make_checkpoint.SHAPES["llama3-70b"]
    need = sum(make_checkpoint.stored_bytes(k, s, nf4=True) for k, s in make_checkpoint.tensor_shapes(config))
    per_block = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192
    by_hand = 80 * per_block * 4.127 / 8 + 2 * 128256 * 8192 * 2
    assert abs(need - by_hand) / by_hand < 1e-3 and need < 40e9


# ---- long-context slope and run.py's tables -------------------------------------------------

def test_least_squares_slope_by_hand():
    # x in units of 16384 tokens: 1, 2, 4; y 10, 13, 20. mean x 7/3, mean y 43/3,
    # Sxx = 42/9, Sxy = 141/9: slope 141/42 GiB per 16384 tokens, intercept 43/3 - 141/42 * 7/3 = 6.5
    intercept, slope = long_context.fit_line([(16384, 10.0), (32768, 13.0), (65536, 20.0)])
    assert slope == pytest.approx(141 / 42 / 16384, rel=1e-12)
    assert intercept == pytest.approx(6.5, rel=1e-12)
    assert long_context.longest_context(6.5, 141 / 42 / 16384, 139.0) == 646_645  # 132.5 * 42 * 16384 / 141 = 646,645.1
    assert long_context.longest_context(6.5, -1e-6, 139.0) is None
    with pytest.raises(ValueError, match="two different context lengths"):
        long_context.fit_line([(16384, 10.0), (16384, 11.0)])


def result(system, seq, peak, batch=1, **extra):
    """A bench row; tokens/s = 123456 / peak, so a speed ratio is the inverse of the memory one."""
    return dict(system=system, model="8b", weights="nf4", batch=batch, seq=seq, tokens_per_s=123456.0 / peak,
                peak_gib=peak, peak_reserved_gib=peak + 1, **extra)


def test_run_prints_both_tables_from_jsonl(tmp_path):
    results = [result("nanolora", 16384, 10.0), result("nanolora", 32768, 13.0), result("nanolora", 65536, 20.0),
               # Unsloth 9, 11, 15: slope 84/42 = 2 GiB per 16384 tokens, intercept 35/3 - 2 * 7/3 = 7
               result("unsloth", 16384, 9.0), result("unsloth", 32768, 11.0), result("unsloth", 65536, 15.0),
               # two points (the third failed): 4 GiB per 16384 tokens, intercept 8
               result("nanolora-keep", 16384, 12.0), result("nanolora-keep", 32768, 16.0),
               dict(system="nanolora-keep", model="8b", weights="nf4", batch=1, seq=65536, error="does not fit: OOM"),
               result("hf", 16384, 30.0),
               result("nanolora", 2048, 5.0, batch=2)]  # not a long-context point
    jsonl = tmp_path / "results.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in results))
    run = subprocess.run([sys.executable, BENCH / "run.py", "--table", jsonl], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "| nanolora | 8b | nf4 | 16384 x 1 |" not in run.stdout
    # 12,346 tok/s at 10 GiB; HF 30 GiB (4,115 tok/s), Unsloth 9 GiB (13,717): speed 3.00x, 0.90x; memory 0.33x, 1.11x
    assert "| nanolora | 8b | nf4 | 1 x 16384 | 12,346 | 10.00 | 11.00 | 3.00x | 0.90x | 0.33x | 1.11x |" in lines
    assert any(line.startswith("| nanolora, --grad_checkpointing true | 8b | nf4 | 1 x 65536 | failed: does not fit")
               for line in lines)
    gib_80 = 80e9 / 2**30
    slope_rows = {line.split(" | ")[0][2:]: line for line in lines[lines.index(next(
        line for line in lines if line.startswith("Long context"))):] if line.startswith("| ") and "---" not in line}
    # nanolora: 141/42 GiB per 16384 tokens = 0.2049 per 1000; longest (B - 6.5) * 42 * 16384 / 141
    assert slope_rows["nanolora"] == ("| nanolora | 8b | nf4 | 16384: 10.00, 32768: 13.00, 65536: 20.00 | 0.205 | "
                                      f"{round((gib_80 - 6.5) * 42 * 16384 / 141):,} | 646,645 | 1.68x |")
    # Unsloth: 2 GiB per 16384 tokens = 0.1221 per 1000; longest (B - 7) * 8192
    assert slope_rows["Unsloth"] == ("| Unsloth | 8b | nf4 | 16384: 9.00, 32768: 11.00, 65536: 15.00 | 0.122 | "
                                     f"{round((gib_80 - 7) * 8192):,} | 1,081,344 |  |")
    # kept inputs: 4 GiB per 16384 tokens = 0.2441 per 1000; longest (B - 8) * 4096; 2x Unsloth's slope
    assert slope_rows["nanolora, --grad_checkpointing true"] == (
        "| nanolora, --grad_checkpointing true | 8b | nf4 | 16384: 12.00, 32768: 16.00 | 0.244 | "
        f"{round((gib_80 - 8) * 4096):,} | 536,576 | 2.00x |")
    assert slope_rows["HF transformers + PEFT (+ bnb)"].startswith(
        "| HF transformers + PEFT (+ bnb) | 8b | nf4 | 16384: 30.00 | one context only |")


def test_no_slope_table_without_two_long_contexts(tmp_path):
    jsonl = tmp_path / "results.jsonl"
    jsonl.write_text(json.dumps(result("nanolora", 32768, 21.5)) + "\n" + json.dumps(result("nanolora", 8192, 9.0)) + "\n")
    run = subprocess.run([sys.executable, BENCH / "run.py", "--table", jsonl], capture_output=True, text=True)
    assert run.returncode == 0 and "Long context" not in run.stdout and "| 1 x 32768 |" in run.stdout


def test_run_slope_end_to_end(checkpoints, tmp_path, monkeypatch, capsys):
    """run.py --slope through step_time.py and back, on the tiny NF4 checkpoint with short
    contexts on the CPU (peak_gib is then the process's RSS: the plumbing, not a measurement)."""
    import run
    monkeypatch.setitem(run.CHECKPOINTS, "8b", (str(checkpoints[0]), "llama-tiny"))
    monkeypatch.setattr(run, "SLOPE_CONFIGS", "8b:nf4:1x64,8b:nf4:1x128")
    monkeypatch.setattr(long_context, "MIN_SEQ", 64)
    monkeypatch.setattr(sys, "argv", ["run.py", "--slope", "--systems", "nanolora", "--jsonl", str(tmp_path / "r.jsonl")])
    run.main()
    out = capsys.readouterr().out
    saved = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["system"], r["seq"], r["weights"]) for r in saved] == [("nanolora", 64, "nf4"), ("nanolora", 128, "nf4")]
    assert "| nanolora | 8b | nf4 | 1 x 128 |" in out
    assert f"| nanolora | 8b | nf4 | 64: {saved[0]['peak_gib']:.2f}, 128: {saved[1]['peak_gib']:.2f} |" in out


def test_offload_curve_on_cpu(checkpoints, tmp_path):
    """bench/offload_curve.py's three train.py runs end to end. On the CPU offload degrades to
    keeping the inputs, the same arithmetic: the three curves must be bit-equal."""
    _, bf16 = checkpoints
    save = tmp_path / "curves.json"
    run = subprocess.run([sys.executable, BENCH / "offload_curve.py", "--checkpoint", bf16, "--device", "cpu",
                          "--load_in_4bit", "false", "--steps", "3", "--batch_size", "2", "--seq_len", "128",
                          "--save", save], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    curves = json.loads(save.read_text())
    assert sorted(curves) == ["offload", "true", "true again"]
    assert list(curves["true"]) == ["1", "2", "3"]
    assert curves["offload"] == curves["true"] == curves["true again"]
    assert "offload vs true None, true vs true None" in run.stdout


# ---- fp8_gemm.py ----------------------------------------------------------------------------

def test_fp8_gemm_runs_on_the_cpu(capsys, monkeypatch):
    """The script's CPU run prints a row per 8B projection (its FP8 arithmetic is
    kernels/fp8_matmul.py's, tested in tests/test_fp8.py)."""
    monkeypatch.setattr(sys, "argv", ["fp8_gemm.py"])
    fp8_gemm.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| " + name for name, _, _ in fp8_gemm.SHAPES_8B]
