"""What train.py and export.py share as command-line programs: flags checked before any work
starts, and every user mistake ending as one line naming the flag or file, exit status 2.

`NANOLORA_TRACEBACK=1` shows the full traceback instead (for reporting a nanolora bug).
"""
import argparse
import math
import os
import sys

import torch

# The range of each numeric flag of train.py: (lowest, highest, what the message says).
# A flag not listed here takes any value of its type.
RANGES = {
    "r": (1, None, "at least 1"),
    "alpha": (0, None, "a positive number"),
    "seq_len": (2, None, "at least 2"),
    "batch_size": (1, None, "at least 1"),
    "grad_accum": (1, None, "at least 1"),
    "max_steps": (0, None, "0 (run --epochs) or more"),
    "epochs": (1, None, "at least 1"),
    "lr": (0, None, "a positive number"),
    "warmup_steps": (0, None, "0 or more"),
    "weight_decay": (0, None, "0 or more"),
    "max_grad_norm": (0, None, "a positive number"),
    "seed": (0, 2**63 - 1, "in [0, 2**63)"),
    "eval_every": (0, None, "0 or more"),
    "log_every": (1, None, "at least 1"),
    "save_every": (0, None, "0 or more"),
    "save_total_limit": (0, None, "0 (keep all) or more"),
    "samples": (0, None, "0 or more"),
    "dynamic_budget": (0, None, "0 or more (extra bytes, as a fraction of all-NF4 projection bytes)"),
}
POSITIVE = ("alpha", "lr", "max_grad_norm")  # 0 itself is refused too


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`train.py: --lr: ...`), not usage plus an error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def check_ranges(parser, settings):
    """Refuse a numeric flag out of its range, or not finite, naming it."""
    for name, (low, high, expected) in RANGES.items():
        value = getattr(settings, name, None)
        if value is None or isinstance(value, bool):
            continue
        bad = (isinstance(value, float) and not math.isfinite(value)) or value < low \
            or (high is not None and value > high) or (name in POSITIVE and value == 0)
        if bad:
            parser.error(f"--{name} must be {expected}, got {value}")


def boolean(text, *words):
    """A flag's value: true or false (also 1/0, yes/no, on/off), or one of `words` (e.g.
    --load_in_4bit dynamic, --grad_checkpointing offload), returned as written in lower case."""
    value = text.lower()
    if value in words:
        return value
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    options = ["true", "false", *words]
    raise argparse.ArgumentTypeError(f"expected {', '.join(options[:-1])} or {options[-1]}, got {text!r}")


def parse_device(parser, text):
    """--device: '' (cuda when there is one, else cpu), cpu, cuda or cuda:N, checked against
    what this machine has, before any weight is loaded."""
    if not text:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device {text!r} is not a device (expected cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: no CUDA GPU is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        parser.error(f"--device {text!r} is not supported (expected cpu, cuda or cuda:N)")
    return device


def check_fp8(parser, device, kernels_enabled):
    """--fp8 true runs the frozen base's GEMMs in FP8 on the fused path: a GPU with FP8 tensor
    cores (compute capability 8.9: Ada, Hopper and later) and the fused kernels on."""
    if device.type != "cuda":
        parser.error(f"--fp8 true needs a CUDA GPU with FP8 matmuls (Ada, Hopper or later); the device is {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        parser.error(f"--fp8 true: {torch.cuda.get_device_name(device)} has compute capability "
                     f"{capability[0]}.{capability[1]}; FP8 matmuls need 8.9 or later (Ada, Hopper)")
    if not kernels_enabled:
        parser.error("--fp8 true runs on the fused kernels, and NANOLORA_KERNELS=0 turns them off")
    try:  # row-wise scaled FP8 matmuls came to torch per GPU generation (Hopper first): ask this one
        probe = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        scale = torch.ones(16, 1, device=device)
        torch._scaled_mm(probe, probe.T, scale_a=scale, scale_b=scale.T, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        parser.error(f"--fp8 true: torch {torch.__version__} has no row-wise scaled FP8 matmul for "
                     f"{torch.cuda.get_device_name(device)} ({str(e).splitlines()[0][:120]})")


def run(main, prog):
    """Call main(); a user's mistake (a ValueError or OSError: bad file, bad value, missing
    path) ends as `prog: message` on stderr with exit status 2."""
    try:
        return main()
    except (ValueError, OSError, RecursionError, MemoryError, OverflowError) as e:
        if os.environ.get("NANOLORA_TRACEBACK"):
            raise
        message = str(e) or type(e).__name__
        print(f"{prog}: {message}", file=sys.stderr)
        sys.exit(2)
