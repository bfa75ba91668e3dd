#!/usr/bin/env bash
# One GPU call for the kernel and memory issues (repo root, GPU machine; peers from
# ../shared/tools/peer-site.sh in .peers): offload's GPU test decides the checkpointing mode the
# bench uses, then nanolora's rows (bench/run.py), what the kernels buy (NANOLORA_KERNELS=0) and
# what offloading costs (inputs kept), then the whole-model kernel and parity tests.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
[ -e nanolora/kernels ] || ln -s ../kernels nanolora/kernels
t() { python -m pytest -q -p no:cacheprovider -rA "$@" 2>&1 | grep -E "passed|failed|PASSED|FAILED|Error|offload vs" | tail -25; }
if t -m gpu tests/test_checkpointing.py -s | tee "$OUT/offload_test.log" | grep -q FAILED; then
  export NANOLORA_BENCH_CHECKPOINTING=true
fi
cat "$OUT/offload_test.log"; echo "bench checkpointing: ${NANOLORA_BENCH_CHECKPOINTING:-offload}"
python bench/run.py --systems nanolora --jsonl "$OUT/bench.jsonl" ${CONFIGS:+--configs $CONFIGS} 2>&1 | grep -v "^|"
python bench/run.py --systems nanolora-ref,nanolora-keep --configs 8b:nf4:2x2048,1b:nf4:4x2048 --jsonl "$OUT/bench.jsonl" 2>&1 | grep -v "^|"
t tests/test_kernels.py -k "training_step or refreshed or skips" | tee "$OUT/kernel_tests.log"
t -m gpu tests/test_model.py tests/test_qlora.py tests/test_nf4_kernel.py | tee "$OUT/gpu_tests.log"
python bench/run.py --table "$OUT/bench.jsonl"
