#!/usr/bin/env bash
# The fused kernels on the GPU machine (run from the repo root): kernel tests against the
# references, every gpu-marked test, an 8B NF4 step with kernels on and off, and where a
# 4-block step's GPU time goes. Writes logs to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# nanolora.kernels is the top-level kernels/ folder (pyproject maps it); without an install, link it
[ -e nanolora/kernels ] || ln -s ../kernels nanolora/kernels
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest tests/test_kernels.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/kernel_tests.log"
python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python bench/make_checkpoint.py /tmp/llama8b --shape llama3-8b 2>&1 | tail -1
for k in 1 0; do
  NANOLORA_KERNELS=$k python bench/step_time.py nanolora /tmp/llama8b --batch 2 --seq 2048 --nf4 | tee -a "$OUT/steps.jsonl"
done
python bench/make_checkpoint.py /tmp/llama8b-4l --shape llama3-8b --layers 4 2>&1 | tail -1
python bench/profile_step.py /tmp/llama8b-4l --nf4 --rows 40 > "$OUT/profile_nf4.txt" 2>&1
tail -45 "$OUT/profile_nf4.txt"
