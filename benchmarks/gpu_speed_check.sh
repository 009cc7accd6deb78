#!/usr/bin/env bash
# The GPU speed checks not yet measured, as one script for one lent GPU session (at most
# 530 s of checks on an H100). Every comparison is within one machine: each part reruns its
# own reference.
#
#   1. bf16 drift: two eager bf16 runs vs the recorded bf16 step (is the 6-10 % recorded-vs-
#      eager difference bf16's own run-to-run drift?), and the recorded reference steps.
#   2. Compiled blocks inside the recorded step (train.compile=default
#      train.compile_scope=blocks + train.cuda_graph=true), TF32 and bf16 + NHWC.
#   3. Recorded inference (method.predict_cuda_graph) at chunk 8 and 32, with the plain
#      variants as reference; the tiny backbone eager / recorded / compiled blocks + recorded.
#   4. ADNet and Q-Net: can their steps be recorded now that the alignment loss masks?
#
# Usage (on the GPU machine, from the repository root; OUT defaults to ./gpu_speed_out):
#   OUT=/some/dir bash benchmarks/gpu_speed_check.sh
# The JSON files it writes are those named in docs/measurements/README.md.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_speed_out}"
mkdir -p "$OUT"
export FSMIS_NO_PROGRESS=1
PY="${PYTHON:-python3}"
check() {  # check <seconds> <json name> <args...>: one gpu_engine_check run, its log beside it
  local limit=$1 name=$2
  shift 2
  timeout "$limit" "$PY" benchmarks/gpu_engine_check.py --out "$OUT/$name.json" "$@" 2> "$OUT/$name.err"
  echo "$name rc=$?"
  grep -E "^ +[a-z0-9_]+ +[0-9.]+|^predict |^skipped " "$OUT/$name.err" || tail -5 "$OUT/$name.err"
}

check 140 gpu_speed_bf16_drift_h100 --steps 8 --warmup 2 --budget-s 130 \
  --only tf32_fused tf32_fused_graph bf16_autocast bf16_autocast_repeat bf16_autocast_graph
check 180 gpu_speed_blocks_h100 --steps 8 --warmup 2 --budget-s 170 --compile-budget-s 80 \
  --only tf32_fused tf32_fused_blocks_graph bf16_autocast_nhwc bf16_autocast_nhwc_blocks_graph
check 130 gpu_speed_predict_tiny_h100 --steps 8 --warmup 2 --tiny-steps 60 --budget-s 120 --compile-budget-s 40 \
  --only predict tiny_eager tiny_graph tiny_blocks_graph
for method in adnet qnet; do
  check 40 "gpu_speed_graph_${method}_h100" --method "$method" --steps 8 --warmup 2 --budget-s 35 \
    --only tf32_fused tf32_fused_graph
done
