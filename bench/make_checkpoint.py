"""Write a random-weight HF checkpoint of a real model's shape, for benchmarks.

    python bench/make_checkpoint.py /tmp/llama8b --shape llama3-8b

Weights are drawn on the GPU (if there is one) tensor by tensor and written in ~5 GB
safetensors shards with an index, the layout of a hub checkpoint. A WordLevel tokenizer
covering the vocabulary comes along, so every system (nanolora, HF, Unsloth) can load the
folder as it is.
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {  # the rows of ../shared/PEERS.md
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--shard_gb", type=float, default=5.0)
    parser.add_argument("--layers", type=int, default=None, help="fewer blocks of the same shape (for profiling)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=0, eos_token_id=1,
                  torch_dtype="bfloat16", **SHAPES[args.shape])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    shard, shard_bytes, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for key, shape in tensor_shapes(config):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, device=device, generator=gen) * 0.02).to(torch.bfloat16).cpu()
        shard[key] = t
        shard_bytes += t.numel() * 2
        if shard_bytes >= args.shard_gb * 1e9:
            flush()
    if shard:
        flush()
    total = sum((out / s).stat().st_size for s in shards)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}, indent=1))
    # A WordLevel vocabulary of the right size: token "t{i}" is id i.
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "t0", "eos_token": "t1", "pad_token": "t1",
                                                           "unk_token": "t2", "model_max_length": 131072,
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))
    print(f"wrote {out}: {len(shards)} shards, {total / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
