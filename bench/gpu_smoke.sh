#!/usr/bin/env bash
# One GPU session's checks for the model/loading and LoRA/training issues (run on the GPU machine
# from the repo root): the gpu-marked tests, then the 8B-shaped random checkpoint's load time and
# peak memory, bf16 LoRA step time beside HF + PEFT, and a long bf16 run.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# nanolora.kernels is the top-level kernels/ folder (pyproject maps it); without an install, link it
[ -e nanolora/kernels ] || ln -s ../kernels nanolora/kernels
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
python bench/make_checkpoint.py /tmp/llama8b --shape llama3-8b 2>&1 | tail -1
python bench/step_time.py nanolora /tmp/llama8b --batch 2 --seq 2048 | tee -a "$OUT/steps.jsonl"
python bench/step_time.py hf /tmp/llama8b --batch 2 --seq 2048 2>&1 | grep '^{' | tee -a "$OUT/steps.jsonl"
python bench/step_time.py nanolora /tmp/llama8b --batch 2 --seq 2048 --warmup 0 --steps ${LONG_STEPS:-200} \
    --repeat_batch --print_loss_every 20 | tee "$OUT/long_run.log"
