"""Dynamic 4-bit (nanolora/dynamic_4bit.py): the sensitivity score against transformers +
bitsandbytes, the choice (planted sensitivity, budget, determinism), the record beside the
adapter (reload, export, resume without measuring again), and bad input.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import export
import train
from hf_fixtures import checkpoint_fixture, save_checkpoint
from nanolora import dynamic_4bit, load_model, load_tokenizer
from nanolora.data import load_examples, pad_token_id, split_eval
from nanolora.dynamic_4bit import CHOICE_FILE, calibration_batch, checkpoint_tensors, choose, costs
from nanolora.nf4 import NF4Weight
from test_qlora import prequantized  # noqa: F401 (a fixture: a bitsandbytes 4-bit checkpoint)

DATA = train.DEFAULTS["data"]
SIZES = dict(intermediate_size=192)  # every projection a multiple of 64 values, as NF4 needs
PLANTED = "layers.1.mlp.down_proj"  # a large projection: the per-byte ranking works against it


def plant_sensitivity(folder):
    """What makes a projection sensitive in a real LLM: a massive activation channel meeting a
    column NF4 rounds coarsely. up_proj's row 7 is made 600x larger, so hidden channel 7, the
    down projection's input, is ~600x the others; down_proj's column 7 is made 20x smaller
    than its neighbours, so in NF4 (each block of 64 scaled by its absmax) it rounds to ~0,
    and that column carries most of the output. Nothing else changes."""
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][7] *= 600
    tensors["model.layers.1.mlp.down_proj.weight"][:, 7] *= 0.05
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


plain = checkpoint_fixture("llama", **SIZES)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    save_checkpoint(folder, "llama", **SIZES)
    plant_sensitivity(folder)
    return folder


def calibration(folder, seed=1337):
    tokenizer = load_tokenizer(folder)
    examples, _ = load_examples(DATA, tokenizer, 256)
    train_examples, _ = split_eval(examples, 2, seed)
    return calibration_batch(train_examples, pad_token_id(tokenizer), seed, n_rows=6)


def scores_and_costs(folder, batch):
    model, _ = load_model(folder, device="cpu", load_in_4bit=True)
    extra, nf4_bytes = costs(model)
    return dynamic_4bit.measure_sensitivity(model, checkpoint_tensors(folder), batch), extra, nf4_bytes


# ---- the score, against transformers + bitsandbytes ------------------------------------------

def test_scores_equal_bitsandbytes_reference(plain):
    """The same score computed from the world's side: transformers' model quantized by
    bitsandbytes (nf4, double quant; training mode: see test_qlora.py), each projection's real
    input taken by a forward hook on its Linear4bit, its weight dequantized by bitsandbytes,
    W from the fp32 checkpoint. The NF4 bytes are identical to ours, so only fp32 summation
    order differs: 1e-4 relative."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from test_qlora import load_reference
    batch = calibration(plain)
    ours, _, _ = scores_and_costs(plain, batch)

    ref = load_reference(plain)
    exact = load_file(plain / "model.safetensors")
    real = batch["attention_mask"].reshape(-1).bool()
    expected, hooks = {}, []
    for name, module in ref.named_modules():
        if name.endswith("_proj"):
            def hook(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])[real].float()
                w = exact[f"{name}.weight"].float()
                w_nf4 = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                expected[name.removeprefix("model.")] = ((x @ (w - w_nf4).T).square().sum()
                                                         / (x @ w.T).square().sum()).item()
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"])
    assert sorted(ours) == sorted(expected) and len(ours) == 14
    for name in ours:
        assert ours[name] == pytest.approx(expected[name], rel=1e-4), name


# ---- the choice ------------------------------------------------------------------------------

def test_planted_sensitive_projection_is_chosen(plain, planted):
    """With room for about one MLP projection, the one made sensitive is kept 16-bit, ranked
    first; on the unplanted twin it is not the first choice, so the plant is what chose it."""
    batch = calibration(planted)
    scores, extra, nf4_bytes = scores_and_costs(planted, batch)
    budget = 1.2 * extra[PLANTED] / nf4_bytes
    choice = choose(scores, extra, nf4_bytes, budget)
    assert choice.modules[0] == f"model.{PLANTED}"
    plain_scores, plain_extra, plain_bytes = scores_and_costs(plain, batch)
    assert choose(plain_scores, plain_extra, plain_bytes, budget).modules[:1] != [f"model.{PLANTED}"]
    assert scores[PLANTED] > 5 * plain_scores[PLANTED]


def test_choice_respects_budget_and_fills_it(plain):
    batch = calibration(plain)
    scores, extra, nf4_bytes = scores_and_costs(plain, batch)
    for budget in (0.0, 0.02, 0.1, 0.3, 10.0):
        choice = choose(scores, extra, nf4_bytes, budget)
        spent = sum(k.extra_bytes for k in choice.keep_16bit)
        assert spent <= budget * nf4_bytes
        # greedy to the end: no projection left out would still fit
        left = budget * nf4_bytes - spent
        assert all(extra[n] > left for n in scores if f"model.{n}" not in choice.modules)
        assert all(k.extra_bytes == extra[k.module.removeprefix("model.")] for k in choice.keep_16bit)
    assert choose(scores, extra, nf4_bytes, 0.0).keep_16bit == []
    assert len(choose(scores, extra, nf4_bytes, 10.0).keep_16bit) == 14


def test_choice_is_deterministic(planted):
    """Two measurements from scratch (fresh loads, fresh batch): the same scores and set."""
    first = scores_and_costs(planted, calibration(planted))
    second = scores_and_costs(planted, calibration(planted))
    assert first == second
    assert choose(*first, 0.1) == choose(*second, 0.1)


# ---- the record: train.py writes it, reloads use it without measuring --------------------------

def train_args(folder, out, *extra):
    return ["--model", str(folder), "--out", str(out), "--load_in_4bit", "dynamic", "--dynamic_budget", "0.5",
            "--data", DATA, "--seq_len", "256", "--batch_size", "2", "--eval_size", "2", "--samples", "0",
            "--max_steps", "2", "--save_every", "1", "--lr", "1e-2", *extra]


def no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measured again")
    monkeypatch.setattr(dynamic_4bit, "measure_sensitivity", refuse)


def test_train_records_choice_and_reloads_identically(planted, tmp_path, monkeypatch, capsys):
    from nanolora import data
    loads, real_load = [], data.load_examples
    counting = lambda *args, **kwargs: loads.append(args[0]) or real_load(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(data, "load_examples", counting)  # what choose_for_run imports
    monkeypatch.setattr(train, "load_examples", counting)
    model = train.main(train_args(planted, tmp_path / "out"))
    assert len(loads) == 1  # the data read and tokenized once, for the choice and the training
    printed = capsys.readouterr().out
    kept = [name for name, m in model.named_modules() if name.endswith("_proj")
            and not isinstance(m.weight, NF4Weight)]
    assert f"model.{PLANTED}" in model.dynamic_4bit.modules and f"  model.{PLANTED}: NF4 output error" in printed
    assert sorted(f"model.{n}" for n in kept) == sorted(model.dynamic_4bit.modules)
    adapter = tmp_path / "out" / "adapter"
    record = json.loads((adapter / CHOICE_FILE).read_text())
    assert [k["module"] for k in record["keep_16bit"]] == model.dynamic_4bit.modules
    assert (tmp_path / "out" / "checkpoint-1" / CHOICE_FILE).exists()

    no_measuring(monkeypatch)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.eval()(ids)
        reloaded, _ = load_model(planted, device="cpu", load_in_4bit="dynamic", adapter=adapter)
        assert torch.equal(reloaded(ids), expected)
        all_nf4, _ = load_model(planted, device="cpu", load_in_4bit=True, adapter=adapter)
        assert not torch.equal(all_nf4(ids), expected)  # the choice is what made them equal

    # export --format peft carries the record; a resumed run reads it from its checkpoint
    export.main(["--base", str(planted), "--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert json.loads((tmp_path / "peft" / CHOICE_FILE).read_text()) == record
    resumed = train.main(train_args(planted, tmp_path / "out", "--max_steps", "3", "--resume", "latest"))
    assert resumed.dynamic_4bit.modules == model.dynamic_4bit.modules


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, shown", [("-0.1", "got -0.1"), ("nan", "got nan"), ("inf", "got inf"),
                                          ("ten", "invalid float value: 'ten'")])
def test_bad_budget_is_one_line(value, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_settings(["--load_in_4bit", "dynamic", "--dynamic_budget", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--dynamic_budget" in err and shown in err


def test_bad_load_in_4bit_is_one_line(capsys):
    with pytest.raises(SystemExit):
        train.parse_settings(["--load_in_4bit", "dynamc"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--load_in_4bit" in err and "true, false or dynamic, got 'dynamc'" in err


@pytest.fixture(scope="module")
def adapter(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(train_args(planted, out, "--max_steps", "1", "--save_every", "0"))
    return out / "adapter"


@pytest.mark.parametrize("edit, message", [
    (lambda r: "{not json", "not valid JSON"),
    (lambda r: [1, 2], "the file must be a JSON object"),
    (lambda r: {**r, "keep_16bit": "down_proj"}, "keep_16bit must be a list"),
    (lambda r: {k: v for k, v in r.items() if k != "keep_16bit"}, "keep_16bit must be a list"),
    (lambda r: {**r, "keep_16bit": [{"module": 7}]}, r"keep_16bit\[0\].module must be"),
    (lambda r: {**r, "keep_16bit": ["model.layers.0.mlp.up_proj"]}, r"keep_16bit\[0\].module must be"),
    (lambda r: {**r, "keep_16bit": [{"module": "model.layers.0.mlp.up_proj", "score": "high"}]},
     r"keep_16bit\[0\].score must be"),
    (lambda r: {**r, "keep_16bit": [{"module": "model.layers.0.mlp.up_proj", "extra_bytes": -5}]},
     r"keep_16bit\[0\].extra_bytes must be"),
    (lambda r: {**r, "keep_16bit": [{"module": "model.layers.9.mlp.up_proj"}]},
     r"keep_16bit\[0\].module 'model.layers.9.mlp.up_proj' is not a projection of this model"),
    (lambda r: {**r, "keep_16bit": [{"module": "model.embed_tokens"}]}, "is not a projection of this model"),
    (lambda r: {**r, "budget": float("nan")}, "budget must be a number >= 0"),
    (lambda r: {**r, "nf4_bytes": "lots"}, "nf4_bytes must be an integer"),
])
def test_corrupted_choice_file_is_one_line(planted, adapter, tmp_path, edit, message):
    import shutil
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    edited = edit(json.loads((folder / CHOICE_FILE).read_text()))
    (folder / CHOICE_FILE).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ValueError, match=message) as error:
        load_model(planted, device="cpu", load_in_4bit="dynamic", adapter=folder)
    assert str(error.value).startswith(str(folder / CHOICE_FILE)) and "\n" not in str(error.value)


def test_dynamic_needs_a_recorded_choice(planted, adapter, tmp_path):
    import shutil
    with pytest.raises(ValueError, match="needs the adapter"):
        load_model(planted, device="cpu", load_in_4bit="dynamic")
    shutil.copytree(adapter, tmp_path / "adapter")
    (tmp_path / "adapter" / CHOICE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{CHOICE_FILE}: no dynamic 4-bit choice"):
        load_model(planted, device="cpu", load_in_4bit="dynamic", adapter=tmp_path / "adapter")
    load_model(planted, device="cpu", load_in_4bit=True, adapter=tmp_path / "adapter")  # all-NF4 needs none


@pytest.mark.gpu
def test_gpu_dynamic_choice_and_reload(planted, tmp_path):
    """On the GPU (bf16, fused kernels on): the hooks still see every projection (q/k/v and
    gate/up run inside fused ops there), the planted one is kept, and the reload from the
    record gives the same logits."""
    model = train.main(train_args(planted, tmp_path / "out", "--device", "cuda", "--save_every", "0"))
    assert f"model.{PLANTED}" in model.dynamic_4bit.modules
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model.eval()(ids)
        reloaded, _ = load_model(planted, device="cuda", load_in_4bit="dynamic", adapter=tmp_path / "out" / "adapter")
        assert torch.equal(reloaded(ids), expected)


def test_prequantized_checkpoint_is_refused(prequantized, tmp_path):
    """A bitsandbytes 4-bit checkpoint has no 16-bit weights to measure NF4's error against."""
    with pytest.raises(ValueError, match=r"needs the checkpoint's 16-bit weights.*q_proj.weight is not one"):
        train.main(train_args(prequantized, tmp_path / "out", "--max_steps", "1", "--save_every", "0"))
