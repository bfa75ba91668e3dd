"""Time LoRA (or full fine-tuning) steps of one system on one checkpoint, in this process.

    python bench/step_time.py nanolora /tmp/llama8b --batch 2 --seq 2048 [--nf4]
    python bench/step_time.py hf       /tmp/llama8b --batch 2 --seq 2048 [--nf4]
    python bench/step_time.py unsloth  /tmp/llama8b --batch 2 --seq 2048 [--nf4]
    python bench/step_time.py nanolora /tmp/llama1b --full --optim adamw_8bit   # full fine-tuning

The setup of ../shared/PEERS.md for every system: LoRA r=16, alpha=16, dropout 0 on all seven
projections; AdamW lr 2e-4; random token ids with labels = inputs, no padding; gradient
checkpointing on; bf16. Reports the median step time of `--steps` steps after `--warmup`
and torch.cuda.max_memory_allocated() as one JSON line (bench/run.py collects them). Run
each system in its own process, so that peak memory is its own.

--full: every weight trains (no LoRA), lr 1e-5. nanolora steps with what `train.py --full true`
uses: full_finetune.AdamW for --optim adamw (bf16 weights, fp32 moments, stochastic rounding),
AdamW8bit for adamw_8bit; HF with torch.optim.AdamW(fused) on its bf16 weights (moments in bf16:
the plain Trainer-free loop). Running out of memory is reported as a JSON line with `error`
"does not fit". On a machine without CUDA it runs on the CPU (bench/full_step.py --tiny: a check
that the bench runs, not a measurement; peak_gib is then the process's peak RSS).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nanolora_setup(path, args):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from nanolora import cuda_graphs, full_finetune, load_model, ops
    from nanolora.lora import attach_lora, lora_parameters
    from nanolora.optim import make_optimizer
    from train import accumulate_gradients, count_labels
    options = {"load_in_4bit": True} if args.nf4 else {}
    device = torch.device(args.device)
    model, _ = load_model(path, device=device, dtype=torch.bfloat16, **options)
    if args.full:
        params = full_finetune.trainable_parameters(full_finetune.make_trainable(model))
    else:
        attach_lora(model, "all", r=16, alpha=16)
        params = lora_parameters(model)
        ops.use_fp8(args.fp8)  # as train.py --fp8 true
    graphs_off = cuda_graphs.why_not(model, device, full=args.full) if args.graphs == "true" else "--graphs false"
    # as train.py's auto: offload when the step is a CUDA graph, else keep the inputs on the GPU
    auto = "offload" if not graphs_off else True
    model.grad_checkpointing = {"true": True, "offload": "offload", "auto": auto}[args.checkpointing]
    model.train()
    optimizer = make_optimizer(params, args.optim, args.lr, 0.0, device, full=args.full)  # as train.py
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    no_scaling = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    graphed = None if graphs_off else cuda_graphs.GraphedMicroSteps(model, params, torch.bfloat16, no_scaling)

    packing = {}
    if args.docs > 1:  # rows packed from equal documents, as train.py --pack makes them (and finds their documents)
        from nanolora.document_attention import find_documents
        length = -(-args.seq // args.docs)
        index = torch.arange(args.seq)
        segments = (index // length + 1).expand(args.batch, -1)
        packing = {"position_ids": (index % length).expand(args.batch, -1).to(device), "segment_ids": segments.to(device),
                   "documents": None if args.docs_masked else find_documents(segments).to(device)}

    def step(ids):
        batch = {"input_ids": ids, "labels": ids, "attention_mask": None, "position_ids": None, "segment_ids": None,
                 **packing}
        n = count_labels([batch])
        loss_sum = accumulate_gradients(model, [batch], n, device, autocast, no_scaling, graphed)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / n
    return model.config.vocab_size, step, optimizer


def hf_style_step(model, args):
    """One optimizer step of a transformers/PEFT model (HF and Unsloth train the same way);
    returns it and the optimizer."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=args.device == "cuda")

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step, optimizer


def hf_setup(path, args):
    import transformers
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16) if args.nf4 else None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=args.device,
                                                              quantization_config=quant, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.full:
        import peft
        model.enable_input_require_grads()
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                           target_modules=TARGETS, task_type="CAUSAL_LM"))
    return model.config.vocab_size, *hf_style_step(model, args)


def unsloth_setup(path, args):
    from unsloth import FastLanguageModel
    model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=args.nf4)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth")
    return model.config.vocab_size, *hf_style_step(model, args)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def state_gib(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t)) / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["nanolora", "hf", "unsloth"])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--nf4", action="store_true")
    parser.add_argument("--full", action="store_true", help="full fine-tuning: every weight trains, no LoRA")
    parser.add_argument("--optim", choices=["adamw", "adamw_8bit"], default="adamw", help="nanolora's --optim")
    parser.add_argument("--checkpointing", choices=["true", "offload", "auto"],
                        default=os.environ.get("NANOLORA_BENCH_CHECKPOINTING", "auto"),
                        help="nanolora's gradient checkpointing (Unsloth offloads, HF keeps inputs on the GPU)")
    parser.add_argument("--graphs", choices=["true", "false"], default="true",
                        help="nanolora's --cuda_graphs (on by default, as in train.py)")
    parser.add_argument("--docs", type=int, default=1,
                        help="nanolora: each row packed from this many equal documents (segment ids, positions from 0)")
    parser.add_argument("--docs_masked", action="store_true",
                        help="with --docs: attention within documents by a boolean mask, not variable-length kernels")
    parser.add_argument("--fp8", action="store_true", help="nanolora: the base's GEMMs in FP8 (--fp8 true)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--print_loss_every", type=int, default=0)
    parser.add_argument("--repeat_batch", action="store_true", help="train on one batch over and over (the loss must fall)")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.lr = 1e-5 if args.full else 2e-4
    if args.fp8:  # train.py's refusals (no FP8 matmuls on this GPU, kernels off), one line each
        from nanolora import cli, ops
        cli.check_fp8(parser, torch.device(args.device), ops.kernels_enabled())
    if args.system == "unsloth":
        import unsloth  # noqa: F401  (it must be imported before transformers to patch it)
    setting = dict(system=args.system, weights="nf4" if args.nf4 else "bf16", batch=args.batch, seq=args.seq,
                   docs=args.docs, docs_masked=args.docs_masked, full=args.full,
                   optim=args.optim if args.system == "nanolora" else "adamw")
    try:
        result = measure(args)
    except torch.OutOfMemoryError as e:
        first_line = str(e).splitlines()[0] if str(e) else "out of memory"
        result = dict(error=f"does not fit: {first_line[:120]}", peak_gib=peak_gib(args.device))
    print(json.dumps({**setting, **result}))


def measure(args):
    t0 = time.time()
    vocab, step, optimizer = {"nanolora": nanolora_setup, "hf": hf_setup,
                              "unsloth": unsloth_setup}[args.system](args.checkpoint, args)
    sync(args.device)
    load_s = time.time() - t0
    load_peak_gib = peak_gib(args.device)
    loaded_gib = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else 0.0
    gen = torch.Generator(args.device).manual_seed(0)
    times, losses = [], []
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=gen)
    for i in range(args.warmup + args.steps):
        if not args.repeat_batch:
            ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=gen)
        sync(args.device)
        start = time.perf_counter()
        loss = step(ids)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        if args.print_loss_every and i % args.print_loss_every == 0:
            losses.append(round(loss.item(), 4))
            print(f"step {i}: loss {losses[-1]}", flush=True)
    median = statistics.median(times)
    return dict(tokens_per_s=args.batch * args.seq / median, step_s=median, peak_gib=peak_gib(args.device),
                # what the process holds from the GPU at most: a CUDA graph's pool is reserved, not allocated, between replays
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if args.device == "cuda" else None,
                load_s=load_s, loaded_gib=loaded_gib, load_peak_gib=load_peak_gib,
                optimizer_state_gib=state_gib(optimizer), losses=losses)


if __name__ == "__main__":
    main()
