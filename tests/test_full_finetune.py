"""Full fine-tuning (train.py --full true): the optimizer against torch's AdamW, stochastic
rounding's expectation, exact gradient accumulation, kernels on vs off, exact resume, the
output folder in transformers and through export.py's GGUF writer, and the refusals."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import export
import train
from hf_fixtures import checkpoint_fixture
from nanolora import load_model, ops
from nanolora.data import Batches, load_examples, pad_token_id
from nanolora.full_finetune import AdamW, make_trainable, round_stochastically, trainable_parameters

DATA = train.DEFAULTS["data"]


tied = checkpoint_fixture("llama_tied")  # the embedding is also the head, one parameter trained once


qwen3 = checkpoint_fixture("qwen3")  # untied head, q/k norms (inside the fused q/k/v op), head_dim != hidden/heads


def run(checkpoint, out, *flags):
    return train.main(["--model", str(checkpoint), "--out", str(out), "--data", DATA, "--seq_len", "256",
                       "--batch_size", "2", "--eval_size", "2", "--samples", "0", "--log_every", "1",
                       "--warmup_steps", "1", "--lr", "3e-3", "--full", "true", *flags])


# ----------------------------------------------------------------------------- the optimizer
def test_adamw_on_fp32_is_torch_adamw():
    """fp32 parameters (CPU runs): the same arithmetic as torch.optim.AdamW, 6 steps with weight
    decay and a changing lr, on tensors larger than one update chunk."""
    import nanolora.full_finetune as ff
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 7), (5,), (1000,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = AdamW(ours, lr=1e-2, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    chunk, ff._CHUNK = ff._CHUNK, 256  # several chunks per tensor
    try:
        for step in range(6):
            for a, b in zip(ours, ref):
                a.grad = torch.randn(a.shape, generator=g) * 10 ** (step % 3 - 1)
                b.grad = a.grad.clone()
            for o in (opt, opt_ref):
                o.param_groups[0]["lr"] = 1e-2 / (step + 1)
            opt.step()
            opt_ref.step()
    finally:
        ff._CHUNK = chunk
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], opt_ref.state[b]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_stochastic_rounding_is_unbiased():
    """Each result is one of the two bf16 values around x (torch.nextafter finds them), and
    the mean of many roundings is x: within 5 standard errors of a Bernoulli draw, while
    round-to-nearest is off by up to half an ulp."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(64, generator=g) * 10.0 ** torch.randint(-8, 4, (64,), generator=g),
                   torch.tensor([1.0, -1.0, 0.0, 3.0 + 2**-10])])
    down = x.to(torch.bfloat16).float()
    down = torch.where(down > x, torch.nextafter(down.bfloat16(), torch.tensor(-np.inf).bfloat16()).float(), down)
    up = torch.nextafter(down.bfloat16(), torch.tensor(np.inf).bfloat16()).float()
    up = torch.where(down == x, x, up)
    n = 4000
    draws = torch.stack([round_stochastically(x, g).float() for _ in range(n)])
    assert ((draws == down) | (draws == up)).all()
    p_up = torch.where(up > down, (x - down) / (up - down), torch.zeros_like(x))
    standard_error = (up - down) * (p_up * (1 - p_up) / n).sqrt()
    assert ((draws.mean(0) - x).abs() <= 5 * standard_error + 1e-30).all()
    exact = down == x
    assert (draws[:, exact] == x[exact]).all()


# ----------------------------------------------------------------------------- gradients
def full_grads(model, micro_batches):
    for p in model.parameters():
        p.grad = None
    train.accumulate_gradients(model, micro_batches, train.count_labels(micro_batches), torch.device("cpu"),
                               torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False))
    return [p.grad.clone() for p in trainable_parameters(model)]


def test_gradient_accumulation_is_exact(tied, tmp_path):
    """8 variable-length padded examples as 8x1, 2x4 and 1x8 give every weight (tied embedding
    and head, norms, projections) the same gradient to fp32 rounding."""
    model, tokenizer = load_model(tied, device="cpu")
    make_trainable(model)
    assert len(trainable_parameters(model)) == len(list(model.state_dict()))  # tied: one tensor
    rows = [{"prompt": " ".join(f"w{j}" for j in range(1 + 2 * i)),
             "completion": " ".join(str(k) for k in range(1 + (5 * i) % 8))} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = load_examples(tmp_path / "d.jsonl", tokenizer, seq_len=128)

    def split(batch_size):
        batches = Batches(examples, batch_size, pad_token_id(tokenizer), seed=0)
        return [batches.batch(0, i) for i in range(len(batches))]

    g8x1, g2x4, g1x8 = full_grads(model, split(8)), full_grads(model, split(2)), full_grads(model, split(1))
    for a, b, c in zip(g8x1, g2x4, g1x8):
        scale = a.abs().max()
        assert scale > 0
        assert (b - a).abs().max() <= 1e-5 * scale and (c - a).abs().max() <= 1e-5 * scale


def test_kernels_on_give_the_same_weight_gradients(qwen3, monkeypatch):
    """With every weight trainable, ops must not send a projection, norm or the loss to a
    kernel that treats its weight as frozen (no dW). Kernels forced on (the Triton interpreter
    on the CPU, as tests/test_kernels.py does) vs off: the same loss and weight gradients.
    The same step with LoRA's frozen-base assumption violated would leave those gradients None."""
    monkeypatch.setattr(ops, "_fast", lambda *tensors: ops.kernels_enabled())
    model, _ = load_model(qwen3, device="cpu")
    make_trainable(model)
    model.grad_checkpointing = True
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 20), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100
    batch = [{"input_ids": ids, "attention_mask": None, "labels": labels}]
    fused = full_grads(model, batch)
    ops.use_kernels(False)
    try:
        reference = full_grads(model, batch)
    finally:
        ops.use_kernels(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, f, r in zip(names, fused, reference):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-5 * r.abs().max().item(), msg=name)


# ----------------------------------------------------------------------------- runs
def test_output_loads_in_transformers_with_the_same_logits(qwen3, tmp_path):
    """The trained model (returned by train.main) and transformers reading <out>/model/ give
    the same fp32 logits; nanolora's load_model reads it to the same numbers; every weight,
    the head and norms included, moved."""
    import transformers
    model = run(qwen3, tmp_path / "out", "--max_steps", "3")
    folder = tmp_path / "out" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    before, after = load_file(qwen3 / "model.safetensors"), load_file(folder / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reloaded, _ = load_model(folder, device="cpu")
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        ours, theirs, again = model(ids), hf(ids).logits, reloaded(ids)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours, again)


def test_resume_continues_exactly(tied, tmp_path, one_cpu_thread):
    """4 steps straight == 2 steps, a checkpoint, then --resume for the other 2: bit-equal
    weights (the checkpoint holds the weights and the AdamW moments)."""
    run(tied, tmp_path / "straight", "--max_steps", "4", "--save_every", "0")
    run(tied, tmp_path / "first", "--max_steps", "4", "--save_every", "2")
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert (checkpoint / "model" / "model.safetensors").exists()
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    run(tied, tmp_path / "resumed", "--max_steps", "4", "--save_every", "0", "--resume", "latest")
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    mid = load_file(checkpoint / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert any(not torch.equal(mid[k], straight[k]) for k in straight)


def test_refusals(tied, tmp_path, capsys):
    """--full with --load_in_4bit: one line naming both flags, exit status 2, before loading.
    A LoRA run's checkpoint cannot be resumed as a full one (the settings differ)."""
    with pytest.raises(SystemExit) as exit_info:
        run(tied, tmp_path / "x", "--load_in_4bit", "true")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--full" in err and "--load_in_4bit" in err
    assert not (tmp_path / "x").exists()
    model, _ = load_model(tied, device="cpu", load_in_4bit=True)  # e.g. a bitsandbytes 4-bit checkpoint
    with pytest.raises(ValueError, match="4-bit"):
        make_trainable(model)
    # a full fine-tune's checkpoint resumed as a LoRA run, and the reverse: refused, naming --full
    run(tied, tmp_path / "full", "--max_steps", "1", "--save_every", "1")
    with pytest.raises(ValueError, match="--full True -> False"):
        run(tied, tmp_path / "full", "--max_steps", "2", "--resume", "latest", "--full", "false")
    run(tied, tmp_path / "lora", "--max_steps", "1", "--save_every", "1", "--full", "false")
    with pytest.raises(ValueError, match="--full False -> True"):
        run(tied, tmp_path / "lora", "--max_steps", "2", "--resume", "latest")


def test_export_gguf_without_adapter(tied, tmp_path):
    """export.py --base <out>/model --format gguf (no --adapter): gguf-py reads back each
    trained weight (f32) as the safetensors file holds it."""
    import gguf
    run(tied, tmp_path / "out", "--max_steps", "1")
    folder = tmp_path / "out" / "model"
    export.main(["--base", str(folder), "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "m.gguf")])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    weights = load_file(folder / "model.safetensors")
    np.testing.assert_array_equal(tensors["token_embd.weight"], weights["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], weights["model.layers.1.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(tensors["output_norm.weight"], weights["model.norm.weight"].numpy())
    with pytest.raises(SystemExit):  # a LoRA format needs the adapter
        export.main(["--base", str(folder), "--format", "gguf-lora", "--out", str(tmp_path / "a.gguf")])


@pytest.mark.gpu
def test_full_fine_tune_on_gpu(qwen3, tmp_path):
    """On CUDA: bf16 weights under bf16 autocast, the fused kernels on for what they cover, the
    stochastically rounded AdamW; the loss goes down, the weights stay bf16, and transformers
    reads <out>/model/ to the logits of the trained model (bf16: within 2% of the largest)."""
    import transformers
    model = run(qwen3, tmp_path / "out", "--max_steps", "12", "--device", "cuda", "--lr", "1e-3")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3)).cuda()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= 2e-2 * theirs.abs().max()
