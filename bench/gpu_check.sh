#!/usr/bin/env bash
# One GPU call's checks before resolving anything that touches kernels, quantization, memory
# or speed (repo root, GPU machine; peers from ../shared/tools/peer-site.sh in .peers):
# every gpu-marked test, and bench/run.py's rows with the peers. On a machine with two GPUs
# the tests run on the second while the bench has the first to itself; on one GPU, one after
# the other. CONFIGS and SYSTEMS pass through to bench/run.py. Logs land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.peers PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the device's KINDS.md
[ -e nanolora/kernels ] || ln -s ../kernels nanolora/kernels  # pyproject maps kernels/ there; no install here
git log --oneline -1 2>/dev/null; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n_gpus=$(nvidia-smi -L | wc -l)
tests() {
  python -m pytest -m gpu -q -p no:cacheprovider -rfE tests ${TESTS:-} 2>&1 | tail -40 > "$OUT/gpu_tests.log"
}
bench() {
  CUDA_VISIBLE_DEVICES=0 python bench/run.py --jsonl "$OUT/bench.jsonl" ${CONFIGS:+--configs $CONFIGS} \
    ${SYSTEMS:+--systems $SYSTEMS} > "$OUT/bench.log" 2>&1
}
if [ "$n_gpus" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=$((n_gpus - 1)) tests & bench; wait
else
  tests; bench
fi
tail -40 "$OUT/gpu_tests.log"; grep -v "^|" "$OUT/bench.log" | tail -20
python bench/run.py --table "$OUT/bench.jsonl"
