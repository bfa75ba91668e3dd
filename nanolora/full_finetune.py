"""Full fine-tuning (`train.py --full true`): every weight of the model trains, no LoRA.

The precision scheme, per parameter on a GPU with bf16:

    bf16 weight 2 B + bf16 gradient 2 B + fp32 AdamW moments 8 B = 12 bytes

The weights stay bf16 (the forward runs in bf16 under autocast anyway) and there is no fp32
master copy. Without one, a plain round-to-nearest update loses every step whose change is
below half a bf16 ulp of the weight, 2^-9 = 0.2% of it: at a fine-tuning learning rate
(1e-5 on weights of ~0.02, a relative step of ~5e-4) most updates round away and training
stalls. `AdamW` below computes each update in fp32 and rounds the new weight to bf16
*stochastically* (up with probability equal to the fraction of the ulp it lies above the
bf16 below it), so the rounding is unbiased and small updates survive in expectation.
bench/full_precision.py measures the loss curve of this scheme against an fp32 run, a
round-to-nearest bf16 one and an fp32-master one (16 bytes a parameter: 4 B more for the
master copy); the README quotes it. An 8B model: 96 GB (weights 16, gradients 16, moments
64) against 128 GB with fp32 master weights, plus activations.

On a CPU (fp32 runs) and on a GPU without bf16 (fp16 autocast, whose GradScaler cannot unscale
fp16 gradients) the weights are fp32: 16 bytes a parameter, plain AdamW arithmetic.

The result is an HF checkpoint folder (checkpoint.save_merged: a model without LoRA is
written as it is), and a resume checkpoint holds the same folder plus the optimizer state.
"""
from pathlib import Path

import torch

from nanolora import distributed
from nanolora.checkpoint import merged_tensors, save_merged
from nanolora.nf4 import NF4Weight
from nanolora.stochastic_rounding import round_stochastically, rounding_generator

MODEL_FOLDER = "model"  # <out>/model/ and <checkpoint>/model/: the weights as an HF checkpoint


def weights_dtype(amp_dtype):
    """The dtype the weights are held in: bf16 when the run computes in bf16, else fp32."""
    return torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32


def make_trainable(model):
    """Unfreeze every weight (embedding, norms, projections, biases, head; a tied head is the
    embedding, one parameter). Returns the model."""
    if any(isinstance(m, NF4Weight) for m in model.modules()):
        raise ValueError("--full true: this checkpoint holds 4-bit (NF4) weights, which cannot train; "
                         "full fine-tuning needs a 16-bit or 32-bit checkpoint")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def resume_source(resume_folder):
    """The model a resumed full fine-tune loads: the checkpoint's own weights."""
    folder = Path(resume_folder) / MODEL_FOLDER
    if not (folder / "config.json").is_file():
        raise ValueError(f"--resume {resume_folder}: no {MODEL_FOLDER}/config.json (not a --full true checkpoint)")
    return folder


def save_model(model, tokenizer, folder, source):
    """Write the model's weights, as they are (its dtype), to `folder` as an HF checkpoint.
    Every rank calls it: FSDP2 gathers each weight on all ranks, and rank 0 writes."""
    dtype = model.embed_tokens.weight.dtype
    if distributed.is_main():
        save_merged(model, tokenizer, folder, dtype, source=source)
    else:
        for _ in merged_tensors(model):  # the same gathers, in the same order, as rank 0's
            pass


# ----------------------------------------------------------------------------- the optimizer
# elements updated at a time: fp32 temporaries of 64 MiB, not of the largest tensor (a multiple of
# stochastic_rounding.NOISE_CHUNK, which any chunk of a parameter but its last must be)
_CHUNK = 2**24


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 moments whatever the parameter's dtype, and a stochastically rounded
    update for bf16 parameters (see the module docstring; the rounding is
    nanolora/stochastic_rounding.py's, shared with AdamW8bit). For fp32 parameters it is
    torch.optim.AdamW's arithmetic, step for step (tests/test_full_finetune.py compares them).

    The rounding noise of parameter i of group j at step t comes from a generator seeded with
    (seed, j, i, t): a resumed run draws the same noise, and DDP's replicas, which hold the same
    weights and averaged gradients, stay identical without communicating.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        for group_index, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # zeros_like keeps FSDP2's sharding: the moments are DTensors like p
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"])
                step_size = lr / (1 - beta1 ** step)
                bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
                generator = None
                if p.dtype == torch.bfloat16:
                    generator = rounding_generator(self.seed, group_index, index, step, p.device)
                # this rank's part (FSDP2), flattened and taken a chunk at a time; views, so the
                # in-place updates land in the parameter and its state
                tensors = [distributed.local(t).view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for param, grad, exp_avg, exp_avg_sq in zip(*(t.split(_CHUNK) for t in tensors)):
                    grad = grad.float()
                    weight = param.float()  # param itself when fp32: updated in place
                    weight.mul_(1 - lr * weight_decay)
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                    weight.addcdiv_(exp_avg, denom, value=-step_size)
                    if generator is not None:
                        param.copy_(round_stochastically(weight, generator))
                    elif weight.data_ptr() != param.data_ptr():
                        param.copy_(weight)
