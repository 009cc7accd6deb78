#!/usr/bin/env bash
# The GPU speed checks not yet measured, as one script for one lent GPU session (at most
# 590 s of checks on an H100; the timeouts are caps). Most promising first, so a session cut
# short still answers it. Every comparison is within one machine: each part reruns its own
# reference. Measured earlier and no longer here: the joint pass, recorded inference, bf16's
# own drift, ADNet's and Q-Net's recorded steps (docs/measurements/gpu_speed_*_h100.json);
# this script's files have other names, so copying them there overwrites none of those.
#
#   0. Background checkpoint writes (train.async_checkpoint, on by default with CUDA): how
#      long the step waits for a 10.3 GB resume state, against the whole write (17.7 s).
#   1. Two switches of the recorded joint step, each against the step without it, SD-1.5 in
#      TF32 and in bf16 + NHWC: the clipping inside fused AdamW (train.fused_clip; and the
#      tiny backbone) and cuDNN's convolution algorithms timed instead of chosen by
#      heuristics (train.cudnn_benchmark); whether this torch's GroupNorm keeps NHWC on the
#      device (group_norm_keeps_channels_last).
#   2. Every GroupNorm compiled (train.compile=default train.compile_scope=norms: one function
#      with dynamic shapes, so few graphs) in the recorded joint step, SD-1.5 in bf16 + NHWC,
#      where layout copies took ~11 ms of the step, and the tiny backbone; each against the
#      step without it. The first compiled variant also says how long compilation takes here
#      (the later ones reuse its graphs). Then both candidates together, clipping inside AdamW
#      and compiled GroupNorms, on the bf16 + NHWC step: whether it reaches the 0.05 s target.
#   3. The frozen VAE in the recorded joint step: an episode's four encodes as one call
#      (method.batched_encode) and a bf16 VAE without autocast (method.vae_dtype=bfloat16),
#      SD-1.5 and the tiny backbone; inference with 64-slice chunks and a bf16 VAE with and
#      without autocast (autocast runs GroupNorm in fp32), plain and recorded, two of them
#      with train.cudnn_benchmark too.
#   4. fidelity=code: the recorded step against the eager one now that every variant starts
#      from the same generator states (the first measurement compared different posterior
#      draws: 37 %), with an eager repeat for the drift of two eager runs.
#   5. ADNet and Q-Net, recorded vs eager and eager vs eager, from the same generator states,
#      each where the time left allows it.
#
# Usage (on the GPU machine, from the repository root; OUT defaults to ./gpu_speed_out):
#   OUT=/some/dir bash benchmarks/gpu_speed_check.sh
# It writes at most seven JSON files (those named in docs/measurements/README.md) and one
# log, gpu_speed_log.txt: eight files, the most a lent machine returns.
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

echo "=== gpu_async_checkpoint_h100: gpu_checkpoint_check.py --out /tmp/fsmis_ckpt" >> "$LOG"
timeout 80 "$PY" benchmarks/gpu_checkpoint_check.py --out /tmp/fsmis_ckpt > "$OUT/gpu_async_checkpoint_h100.json" 2>> "$LOG"
echo "gpu_async_checkpoint_h100 rc=$?" | tee -a "$LOG"; cat "$OUT/gpu_async_checkpoint_h100.json"
check 95 gpu_step_switches_h100 --steps 8 --warmup 2 --tiny-steps 60 --budget-s 90 \
  --only tf32_fused_joint_graph tf32_fused_joint_fclip_graph tf32_fused_joint_cudnnbench_graph \
  bf16_autocast_nhwc_joint_graph bf16_autocast_nhwc_joint_fclip_graph bf16_autocast_nhwc_joint_cudnnbench_graph \
  tiny_joint_graph tiny_joint_fclip_graph
check 150 gpu_norms_h100 --steps 8 --warmup 2 --tiny-steps 60 --budget-s 145 --compile-budget-s 30 \
  --only bf16_autocast_nhwc_joint_graph bf16_autocast_nhwc_joint_norms_graph bf16_autocast_nhwc_joint_fclip_graph \
  bf16_autocast_nhwc_joint_fclip_norms_graph tiny_joint_graph tiny_joint_norms_graph
check 150 gpu_vae_h100 --steps 8 --warmup 2 --tiny-steps 60 --budget-s 145 \
  --only tf32_fused_joint_graph tf32_fused_joint_batched_graph tf32_fused_joint_bf16vae_graph \
  tf32_fused_joint_batched_bf16vae_graph bf16_autocast_nhwc_joint_graph bf16_autocast_nhwc_joint_batched_graph \
  predict tiny_joint_graph tiny_joint_batched_graph
check 95 gpu_reseeded_code_h100 --extra fidelity=code --steps 4 --warmup 2 --budget-s 90 \
  --only tf32_fused tf32_fused_repeat tf32_fused_graph
for method in adnet qnet; do
  if (( SECONDS + 45 > 590 )); then  # the lent machine's limit per command is 600 s
    echo "gpu_reseeded_${method}_h100 skipped: ${SECONDS} s used" | tee -a "$LOG"
    continue
  fi
  check 45 "gpu_reseeded_${method}_h100" --method "$method" --steps 8 --warmup 2 --budget-s 40 \
    --only tf32_fused tf32_fused_repeat tf32_fused_graph
done
