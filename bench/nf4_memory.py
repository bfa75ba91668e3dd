"""What an NF4 model occupies, against what the format implies, and the loading peak.

    python bench/nf4_memory.py /tmp/llama8b

Format: per quantized weight of n values, n/2 bytes of codes, n/64 uint8 absmax, a float32
nested absmax per 256 blocks, the 16-entry code book, the 256-entry nested code book and an
offset. Everything else (embeddings, norms, head) stays 16-bit. Loading may add at most one
block's 16-bit projections (the one being quantized) on top.
"""
import json
import math
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from nanolora import load_model  # noqa: E402
from nanolora.nf4 import NF4Weight  # noqa: E402

path = sys.argv[1]
torch.cuda.reset_peak_memory_stats()
t0 = time.time()
model, _ = load_model(path, device="cuda", dtype=torch.bfloat16, load_in_4bit=True)
torch.cuda.synchronize()
load_s = time.time() - t0
nf4 = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Weight)]
implied = sum(w.numel() // 2 + w.numel() // 64 + 4 * math.ceil(w.numel() / 64 / 256) + 16 * 4 + 256 * 4 + 4
              for w in nf4)
actual = sum(w.nbytes for w in nf4)
dense = sum(p.numel() * p.element_size() for p in model.parameters())
block = model.layers[0]
one_block_16bit = 2 * sum(w.numel() for w in (block.self_attn.q_proj.weight, block.self_attn.k_proj.weight,
                                               block.self_attn.v_proj.weight, block.self_attn.o_proj.weight,
                                               block.mlp.gate_proj.weight, block.mlp.up_proj.weight,
                                               block.mlp.down_proj.weight))
allocated, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
print(json.dumps(dict(load_s=round(load_s, 1), nf4_weights=len(nf4), nf4_gib=actual / 2**30,
                      nf4_implied_gib=implied / 2**30, nf4_over_implied=actual / implied - 1,
                      dense_16bit_gib=dense / 2**30, allocated_gib=allocated / 2**30,
                      allocated_over_format=allocated / (implied + dense) - 1,
                      load_peak_gib=peak / 2**30, one_block_16bit_gib=one_block_16bit / 2**30,
                      peak_within_bound=peak <= implied + dense + one_block_16bit)))
