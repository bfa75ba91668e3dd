"""Optimizer state memory and the time of one optimizer step: nanolora's AdamW8bit against
bitsandbytes' AdamW8bit and torch's fused AdamW, on the same parameters and gradients.

    python bench/optim_step.py                                  # 1B bf16 parameters on the GPU
    python bench/optim_step.py --params 1e6 --device cpu        # a smoke run
    PYTHONPATH=$PWD/.peers python bench/optim_step.py           # with bitsandbytes from
                                                                # ../shared/tools/peer-site.sh .peers bnb

First the analytic state size of an 8B full fine-tune (Llama-3-8B's 8,030,261,248 parameters):
fp32 AdamW keeps 8 bytes per parameter, the 8-bit ones 2 bytes of codes plus two float32 scales
per 256 (2.03 bytes). Then, measured on --params parameters cut into tensors of
--tensor_numel (a full fine-tune's matrices are ~16M-117M elements each): the bytes each
optimizer's state holds after its first step, and the median time of a step over --steps
steps (after 3 warm-up ones). bitsandbytes is skipped if it does not import. The last columns
compare with nanolora's AdamW8bit. The parameters each optimizer ends with are compared with
nanolora's (max |difference| over the largest parameter change; --dtype float32 only, as a
bf16 parameter moves by less than its rounding step): bitsandbytes' CUDA kernel decays after
the update and rounds its codes its own way, so it is close, not equal, there.
"""
import argparse
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from nanolora.adamw_8bit import BLOCKSIZE, AdamW8bit  # noqa: E402

LLAMA3_8B_PARAMS = 8_030_261_248

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--params", type=float, default=1e9, help="parameters to step (default 1e9)")
parser.add_argument("--tensor_numel", type=int, default=4096 * 4096, help="elements per parameter tensor")
parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()
device, dtype = torch.device(args.device), getattr(torch, args.dtype)

print(f"state of an 8B full fine-tune ({LLAMA3_8B_PARAMS:,} parameters):")
for name, per_param in (("adamw, fp32 moments", 8.0), ("adamw, bf16 moments", 4.0),
                        ("adamw_8bit", 2 + 2 * 4 / BLOCKSIZE)):
    print(f"  {name:<22} {per_param:.4f} bytes/param  {LLAMA3_8B_PARAMS * per_param / 2**30:6.2f} GiB")
print("  (torch's AdamW keeps its moments in the parameters' dtype: bf16 parameters get bf16 moments)")

optimizers = {"nanolora adamw_8bit": lambda ps: AdamW8bit(ps, lr=1e-4, weight_decay=0.01),
              "torch adamw (fused)" if device.type == "cuda" else "torch adamw":
                  lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")}
try:
    import bitsandbytes as bnb
    optimizers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4, weight_decay=0.01)
except Exception as e:  # not installed, or no build for this machine
    print(f"bitsandbytes skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

n_total = int(args.params)
sizes = [args.tensor_numel] * (n_total // args.tensor_numel) + ([n_total % args.tensor_numel] if n_total % args.tensor_numel else [])
g = torch.Generator(device=device).manual_seed(0)
init = [(torch.randn(n, generator=g, device=device) * 0.02).to(dtype) for n in sizes]
grads = [(torch.randn(n, generator=g, device=device) * 1e-3).to(dtype) for n in sizes]


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


rows, finals = [], {}
for name, make in optimizers.items():
    params = [torch.nn.Parameter(x.clone()) for x in init]
    for p, grad in zip(params, grads):
        p.grad = grad
    opt = make(params)
    opt.step()
    sync()
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                      if torch.is_tensor(v) and not k.startswith("qmap"))  # bnb's shared code books aside
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    finals[name] = params[0].detach().float().cpu()
    rows.append(dict(optimizer=name, state_gib=state_bytes / 2**30, bytes_per_param=state_bytes / n_total,
                     step_ms=1e3 * statistics.median(times)))
    del opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()

ours = rows[0]
change = (finals[ours["optimizer"]] - init[0].float().cpu()).abs().max().item()
print(f"\n{n_total:,} {args.dtype} parameters in {len(sizes)} tensors on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
      f"median of {args.steps} steps:")
print(f"{'optimizer':<24} {'state GiB':>10} {'bytes/param':>12} {'step ms':>9} {'state vs ours':>14} "
      f"{'time vs ours':>13} {'max |dp - ours| / max |dp|':>27}")
for r in rows:
    r["state_vs_ours"] = r["state_gib"] / ours["state_gib"]
    r["time_vs_ours"] = r["step_ms"] / ours["step_ms"]
    # in bf16 one step (~lr) is below the parameters' rounding step, so only fp32 compares updates
    r["param_diff_vs_ours"] = (finals[r["optimizer"]] - finals[ours["optimizer"]]).abs().max().item() / change \
        if dtype == torch.float32 else None
    diff = "-" if r["param_diff_vs_ours"] is None else f"{r['param_diff_vs_ours']:.2e}"
    print(f"{r['optimizer']:<24} {r['state_gib']:>10.3f} {r['bytes_per_param']:>12.4f} {r['step_ms']:>9.2f} "
          f"{r['state_vs_ours']:>13.2f}x {r['time_vs_ours']:>12.2f}x {diff:>27}")
print(json.dumps(dict(params=n_total, dtype=args.dtype, device=str(device), rows=rows)))
