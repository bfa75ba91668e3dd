"""Export a trained LoRA adapter: as PEFT reads it, merged into an HF checkpoint, or as GGUF.

    python export.py --base MODEL --adapter out/ --format peft      --out adapter/
    python export.py --base MODEL --adapter out/ --format merged    --out merged/ [--dtype bf16] [--shard_size 5GB]
    python export.py --base MODEL --adapter out/ --format gguf      --out model.gguf [--quant q4_k_m] [--device cpu]
    python export.py --base MODEL --adapter out/ --format gguf-lora --out adapter.gguf [--quant f32]
    python export.py --base out/model --format gguf --out model.gguf    # a full fine-tune (train.py --full true)

MODEL is what the adapter was trained on: an HF folder, a hub id or a .gguf file; without
--base, the base_model_name_or_path that adapter_config.json records (as peft does). Without
--adapter, --base itself is exported (merged or gguf): the HF folder a full fine-tune writes
to <out>/model/ needs no adapter. Outputs appear only once complete (written under a
temporary name, then renamed); an existing output is replaced only with --force. GGUF --quant: f32, f16 (default), bf16, q8_0, q4_0,
q4_k, q6_k (every 2-D weight in that type) or q4_k_m (llama.cpp's mix: see
nanolora/gguf_write.py); gguf-lora: f32 (default), f16, bf16, q8_0. GGUF tensors are quantized
on --device (default: cuda when there is one, else the CPU's threads), with llama.cpp's bytes.
"""
import json
import sys
import time
from pathlib import Path

import torch

from nanolora import cli, load_model
from nanolora.checkpoint import DTYPES, parse_size, save_merged
from nanolora.default_model import resolve_model
from nanolora.gguf_write import LORA_QUANTS, QUANTS, write_gguf_lora, write_gguf_model
from nanolora.load import resolve_checkpoint
from nanolora.peft import CONFIG_FILE, adapter_folder, save_adapter

FORMATS = ("peft", "merged", "gguf", "gguf-lora")


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the base model: HF folder, hub id or .gguf file "
                                       "(default: the adapter's base_model_name_or_path)")
    parser.add_argument("--adapter", help="the PEFT adapter folder train.py wrote (none for a full fine-tune's "
                                          "<out>/model/, passed as --base)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output folder (peft, merged) or file (gguf, gguf-lora)")
    parser.add_argument("--quant", help="GGUF tensor type (default: f16 for gguf, f32 for gguf-lora)")
    parser.add_argument("--dtype", default="bf16", choices=DTYPES, help="merged: weight dtype (default bf16)")
    parser.add_argument("--shard_size", default="5GB", help="merged: largest shard (default 5GB)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="gguf: where tensors are quantized (default: cuda when there is one)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.adapter is None and (args.base is None or args.format in ("peft", "gguf-lora")):
        parser.error("--adapter is required" + (f" for --format {args.format}" if args.base else
                                                " (or --base alone, for a full fine-tune's model folder)"))
    if args.format in ("gguf", "gguf-lora"):
        args.quant = args.quant or ("f16" if args.format == "gguf" else "f32")
        allowed = QUANTS if args.format == "gguf" else LORA_QUANTS
        if args.quant not in allowed:
            parser.error(f"--quant {args.quant!r} is not a {args.format} type (choose from {', '.join(allowed)})")
    elif args.quant:
        parser.error(f"--quant applies to the gguf formats, not {args.format}")
    if args.device and args.format != "gguf":
        parser.error(f"--device applies to --format gguf, not {args.format}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    try:
        args.shard_size = parse_size(args.shard_size)
    except ValueError as e:
        parser.error(f"--shard_size: {e}")
    out = Path(args.out)
    wants_folder = args.format in ("peft", "merged")
    if out.exists() and out.is_dir() != wants_folder:
        parser.error(f"--out {out} is a {'file' if wants_folder else 'folder'}; --format {args.format} "
                     f"writes a {'folder' if wants_folder else 'file'}")
    if out.exists() and not args.force:
        parser.error(f"--out {out} already exists (pass --force to replace it)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        parser.error(f"--out {out}: {blocking} is a file, not a folder")
    return args


def recorded_base(adapter):
    """The base_model_name_or_path the adapter's config records, or None."""
    file = adapter_folder(adapter) / CONFIG_FILE
    try:
        base = json.loads(file.read_text()).get("base_model_name_or_path")
        return base if isinstance(base, str) else None
    except (OSError, ValueError, AttributeError):
        return None  # load_model reads the file again and says what is wrong with it


class Progress:
    """Tensor i of n on stderr (one line rewritten in place on a terminal, a line per tensor
    elsewhere); where the writer says how many bytes of how many are written, also the rate
    and the time left at that rate."""

    def __init__(self):
        self.start = time.perf_counter()
        self.in_place = sys.stderr.isatty()

    def __call__(self, done, total, name, bytes_done=None, bytes_total=None):
        line = f"[{done}/{total}] {name}"
        if bytes_done:
            rate = bytes_done / max(time.perf_counter() - self.start, 1e-9)
            line += f"  {rate / 1e6:.1f} MB/s  ETA {(bytes_total - bytes_done) / rate:.0f} s"
        if self.in_place:
            print(f"\r{line:<100}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"--adapter {args.adapter}: no such adapter folder")
    base_name = args.base or recorded_base(args.adapter)
    if not base_name:
        raise ValueError(f"--adapter {args.adapter}: {CONFIG_FILE} records no base_model_name_or_path; pass --base")
    base = resolve_model(base_name)  # the default run's model offline too, as train.py found it

    # the base with the adapter attached; load_model checks that every LoRA matrix fits it
    # each tensor as the base stores it: nothing rounded, and no fp32 copy of a 16-bit base
    model, tokenizer = load_model(base, device="cpu", dtype="stored", adapter=args.adapter)
    source = base if str(base).endswith(".gguf") else resolve_checkpoint(base)
    name = Path(str(base_name).rstrip("/")).stem
    if args.format == "peft":
        save_adapter(model, out, base_model_name_or_path=base_name)
    elif args.format == "merged":
        save_merged(model, tokenizer, out, DTYPES[args.dtype], args.shard_size, source, Progress())
    elif args.format == "gguf":
        write_gguf_model(model, tokenizer, out, args.quant, source, name, Progress(), args.device)
    else:
        write_gguf_lora(model, out, args.quant, Progress())
    print(f"wrote {out} ({args.format}{', ' + args.quant if args.quant else ''})")
    return out


if __name__ == "__main__":
    cli.run(main, "export.py")
