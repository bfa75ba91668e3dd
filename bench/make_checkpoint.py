"""Write a random-weight HF checkpoint of a real model's shape, for benchmarks.

    python bench/make_checkpoint.py /tmp/llama8b --shape llama3-8b
    python bench/make_checkpoint.py /tmp/llama70b-nf4 --shape llama3-70b --nf4

Weights are drawn on the GPU (if there is one) tensor by tensor and written in ~5 GB
safetensors shards with an index, the layout of a hub checkpoint. A WordLevel tokenizer
covering the vocabulary comes along, so every system (nanolora, HF, Unsloth) can load the
folder as it is.

--nf4 writes a bitsandbytes pre-quantized checkpoint instead, the layout transformers +
bitsandbytes `save_pretrained` writes for a 4-bit NF4 model (double quantization, blocks
of 64): the seven projections of every block as packed codes and scales quantized with
nanolora's own quantize_nf4, config.json's quantization_config; embeddings, norms and the
head stay bf16. The same weights are drawn as without --nf4 (same seed, same order), so the
two checkpoints of one shape hold the same model. This is how a 70B model fits the GPU
machine: in bf16 it is 140 GB, in NF4 ~40 GB. Each projection is quantized as soon as it is
drawn, so no more than one shard (plus one tensor) is ever held in memory.

The folder appears only once complete (it is written as OUT.partial and renamed), so an
interrupted run never leaves a checkpoint that looks whole; an existing OUT is refused, and
so is a disk without room for the estimated size.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanolora.nf4 import quantize_nf4  # noqa: E402

SHAPES = {  # the rows of ../shared/PEERS.md
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # the 70B row of bench/run.py: written with --nf4 (bf16 would not fit the GPU machine's disk)
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # a few hundred million parameters (253M), every row a whole number of 256-blocks: bench/gguf_export.py
    "llama-250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # a CPU check that a bench runs (bench/full_step.py --tiny)
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
OUR_FILES = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCKSIZE = 64
# config.json's quantization_config as transformers 5.24 + bitsandbytes 0.50 save it for
# BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute) (tests/test_bench.py compares)
QUANTIZATION_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
    "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
    "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def tensor_shapes(c):
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], h)


def is_projection(key):
    return key.endswith(tuple(f".{p}.weight" for p in PROJECTIONS))


def stored_bytes(key, shape, nf4):
    """Bytes `key` takes on disk: bf16, or (--nf4 projections) 4-bit codes, one uint8 scale per
    64 weights, one float32 per 256 scales, the two code books and the quant-state JSON."""
    numel = torch.Size(shape).numel()
    if not (nf4 and is_projection(key)):
        return 2 * numel
    n_blocks = numel // NF4_BLOCKSIZE
    return numel // 2 + n_blocks + 4 * -(-n_blocks // 256) + 4 * (16 + 256) + 200


def draw_tensors(config, device, nf4):
    """Yield (key, CPU tensor) of the checkpoint, drawn one at a time on `device` (seed 0):
    norms 1, every matrix N(0, 0.02) in bf16; with `nf4`, each projection as the tensors of
    its bitsandbytes 4-bit state instead, quantized on `device`."""
    gen = torch.Generator(device).manual_seed(0)
    for key, shape in tensor_shapes(config):
        if len(shape) == 1:
            yield key, torch.ones(shape, dtype=torch.bfloat16)
            continue
        weight = (torch.randn(shape, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        if not (nf4 and is_projection(key)):
            yield key, weight.cpu()
            continue
        state = quantize_nf4(weight, NF4_BLOCKSIZE, double_quant=True).to_bnb_state(key[:-len(".weight")])
        del weight
        for part, tensor in state.items():
            # own storage for each: on the CPU the code books of all weights are one tensor,
            # which safetensors refuses to save twice
            yield part, tensor.cpu() if tensor.is_cuda else tensor.clone()


def main():
    parser = argparse.ArgumentParser(description="Write a random-weight checkpoint of a real model's shape.")
    parser.add_argument("out")
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--nf4", action="store_true",
                        help="write the projections pre-quantized, as a bitsandbytes 4-bit NF4 checkpoint")
    parser.add_argument("--shard_gb", type=float, default=5.0)
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks of the same shape (for profiling)")
    args = parser.parse_args()
    if not args.shard_gb > 0:
        parser.error(f"--shard_gb must be a positive number of GB, got {args.shard_gb}")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} already exists (remove it, or give a new folder: a checkpoint is never written over)")
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=0, eos_token_id=1,
                  torch_dtype="bfloat16", **SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    if args.nf4:
        config["quantization_config"] = QUANTIZATION_CONFIG
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # a run that was interrupted: its folder was never renamed to OUT
        if not all(f.name in OUR_FILES or f.name.startswith("model-") for f in partial.iterdir()):
            parser.error(f"{partial} holds files this script does not write; remove it by hand")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    need = sum(stored_bytes(key, shape, args.nf4) for key, shape in tensor_shapes(config))
    free = shutil.disk_usage(partial).free
    if need + 2**30 > free:
        partial.rmdir()
        print(f"make_checkpoint.py: {out}: the checkpoint needs {need / 2**30:.1f} GiB (+1 GiB spare), "
              f"the disk has {free / 2**30:.1f} GiB free", file=sys.stderr)
        sys.exit(2)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shard, shard_bytes, weight_map, shards, written = {}, 0, {}, [], 0

    def flush():
        nonlocal shard, shard_bytes, written
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, partial / name, metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0
        written += (partial / name).stat().st_size
        print(f"{name}: {written / 2**30:.1f} of ~{need / 2**30:.1f} GiB", file=sys.stderr, flush=True)

    for key, tensor in draw_tensors(config, device, args.nf4):
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > args.shard_gb * 1e9:
            flush()  # before the tensor that would make the shard too big: one shard held at a time
        shard[key] = tensor
        shard_bytes += size
    if shard:
        flush()
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": written},
                                                                        "weight_map": weight_map}, indent=1))
    # A WordLevel vocabulary of the right size: token "t{i}" is id i.
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(partial / "tokenizer.json"))
    (partial / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t0", "eos_token": "t1", "pad_token": "t1",
                                                               "unk_token": "t2", "model_max_length": 131072,
                                                               "tokenizer_class": "PreTrainedTokenizerFast"}))
    partial.rename(out)
    print(f"wrote {out}: {len(shards)} shards, {written / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
