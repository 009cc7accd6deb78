#!/usr/bin/env bash
# The GPU speed checks not yet measured, as one script for one lent GPU session (at most
# 595 s of checks on an H100; the timeouts are caps, earlier calls of the same variants
# took 60-110 s per check). Most promising first, so a session cut short still answers it.
# Every comparison is within one machine: each part reruns its own reference.
#
#   1. Joint pass (method.joint_pass=true): support and query through the U-Net as one
#      batch, eager and recorded, TF32 and bf16 + NHWC, against the two-pass steps.
#   2. bf16 drift: two eager bf16 runs vs the recorded bf16 step (is the 6-10 % recorded-vs-
#      eager difference bf16's own run-to-run drift?).
#   3. Compiled blocks inside the recorded step (train.compile=default
#      train.compile_scope=blocks + train.cuda_graph=true), TF32 and bf16 + NHWC.
#   4. Recorded inference (method.predict_cuda_graph) at chunk 8 and 32, with the plain
#      variants as reference; the tiny backbone eager / recorded / joint + recorded /
#      compiled blocks + recorded.
#   5. ADNet and Q-Net: can their steps be recorded now that the alignment loss masks?
#   6. fidelity=code: its posterior noise is drawn on the host before the step
#      (Method.host_draws) and copied in like the images, so the step must now record
#      (no cuda_graph_fell_back in the JSON), eager and recorded losses side by side.
#
# Usage (on the GPU machine, from the repository root; OUT defaults to ./gpu_speed_out):
#   OUT=/some/dir bash benchmarks/gpu_speed_check.sh
# It writes seven JSON files (those named in docs/measurements/README.md) and one log,
# gpu_speed_log.txt: eight files, the most a lent machine returns.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_speed_out}"
mkdir -p "$OUT"
export FSMIS_NO_PROGRESS=1
PY="${PYTHON:-python3}"
LOG="$OUT/gpu_speed_log.txt"
check() {  # check <seconds> <json name> <args...>: one gpu_engine_check run, its log appended
  local limit=$1 name=$2
  shift 2
  echo "=== $name: gpu_engine_check.py $*" >> "$LOG"
  timeout "$limit" "$PY" benchmarks/gpu_engine_check.py --out "$OUT/$name.json" "$@" > /dev/null 2> "$OUT/$name.err"
  local rc=$?
  cat "$OUT/$name.err" >> "$LOG" && rm -f "$OUT/$name.err"
  echo "$name rc=$rc" | tee -a "$LOG"
  sed -n "/^=== $name:/,\$p" "$LOG" | grep -E "^ +[a-z0-9_]+ +[0-9.]+|^predict |^skipped " | grep -v "not selected" || tail -5 "$LOG"
}

check 90 gpu_speed_joint_h100 --steps 8 --warmup 2 --budget-s 85 \
  --only tf32_fused tf32_fused_graph tf32_fused_joint tf32_fused_joint_graph bf16_autocast_nhwc_graph \
  bf16_autocast_nhwc_joint_graph
check 90 gpu_speed_bf16_drift_h100 --steps 8 --warmup 2 --budget-s 85 \
  --only bf16_autocast bf16_autocast_repeat bf16_autocast_graph
check 160 gpu_speed_blocks_h100 --steps 8 --warmup 2 --budget-s 155 --compile-budget-s 75 \
  --only tf32_fused tf32_fused_blocks_graph bf16_autocast_nhwc bf16_autocast_nhwc_blocks_graph
check 120 gpu_speed_predict_tiny_h100 --steps 8 --warmup 2 --tiny-steps 60 --budget-s 115 --compile-budget-s 40 \
  --only predict tiny_eager tiny_graph tiny_joint_graph tiny_blocks_graph
for method in adnet qnet; do
  check 40 "gpu_speed_graph_${method}_h100" --method "$method" --steps 8 --warmup 2 --budget-s 35 \
    --only tf32_fused tf32_fused_graph
done
check 55 gpu_speed_graph_code_h100 --extra fidelity=code --steps 4 --warmup 2 --budget-s 50 --only tf32_fused tf32_fused_graph
