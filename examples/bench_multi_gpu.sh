#!/usr/bin/env bash
# The benchmark runs of issues 11 (P = 2) and 7 (P = 4, 8): every mesh shape of P ranks in one torchrun per
# preset, with shift, TP-only, SP-only, DP and the Hugging Face peer on the same GPUs. The same command line runs
# on CPU gloo ranks in tests/test_bench.py (tiny preset, P = 1, 2, 4).
#
#   examples/bench_multi_gpu.sh P [OUT_DIR]     # P = 2, 4 or 8; OUT_DIR defaults to docs/bench
#
# Keep NCCL's NVLink multicast off on shared machines (NCCL_NVLS_ENABLE=0).
set -euo pipefail
P=${1:?usage: $0 P [OUT_DIR]  (P = 2, 4 or 8)}
OUT=${2:-docs/bench}
case $P in
  2) MESHES=2x1,1x2 ;;
  4) MESHES=4x1,2x2,1x4 ;;
  8) MESHES=8x1,4x2,2x4,1x8 ;;
  *) echo "P must be 2, 4 or 8, got $P" >&2; exit 2 ;;
esac
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for PRESET in llama-8b llama-70b-8l; do
  torchrun --nproc-per-node "$P" -m shiftlib.bench --preset "$PRESET" --meshes "$MESHES" \
    --configs shift,tp,sp,dp,hf --concurrency 1,4,16,64,256 --input-len 512 --output-len 64 --waves 2 \
    --hf-max-concurrency 16 --rates 4,16,64 --num-requests 32 --trace bursty --trace-seconds 20 \
    --long-prompts 2048,8192,32768 --long-output-len 8 --no-progress \
    --output "$OUT/p${P}_${PRESET}.json" --plots "$OUT/p${P}_${PRESET}"
done
