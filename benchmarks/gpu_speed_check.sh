#!/usr/bin/env bash
# The GPU speed checks still open, as one script for one lent GPU session (at most 620 s on
# an H100; the timeouts are caps). Every comparison is within one machine: each part reruns
# its own reference. What earlier sessions measured is in docs/measurements/ (README there);
# this script's files have names of their own, so copying them there overwrites none.
#
#   1. Background checkpoint writes into page-locked host buffers (the default now) against
#      ordinary memory (5.2 s of step time per 10.3 GB SD-1.5 resume state before).
#   2. The default recorded step with CUDA now (joint pass, one call for an episode's four
#      VAE encodes, clipping inside fused AdamW) against the previous default, and the
#      fastest opt-in step (bf16 + NHWC + compiled GroupNorms) against bf16 + NHWC alone, 40
#      steps each; the default in NHWC, with and without compiled GroupNorms (still TF32: a
#      candidate default if its losses stay within TF32's drift); the tiny backbone likewise.
#   3. Inference: every variant again, a bf16 VAE with 64-slice recorded chunks, and NHWC
#      with compiled GroupNorms (as `speed=fast` leaves them for the evaluation).
#   4. The whole engine through `fsmis-bench run`: SD-1.5 (random weights) on the embedded
#      phantom, 500 steps with a resume state every 250, DataLoader workers, evaluation,
#      once with the defaults and once with `speed=fast`: what a 15k-step fold costs end to
#      end, from train_log.csv's elapsed times. (The kernel profiles of the default steps,
#      `--profile`, are the optional part `profile`.)
#
# Usage (on the GPU machine, from the repository root; OUT defaults to ./gpu_speed_out):
#   OUT=/some/dir bash benchmarks/gpu_speed_check.sh
#   PARTS="checkpoint runs" OUT=/some/dir bash benchmarks/gpu_speed_check.sh   # some parts only
# (parts: checkpoint, defaults, tiny, predict, profile, runs; by default all but tiny: the
# default tiny step against the same step with every U-Net block compiled, fewer and fused
# kernels for a step bound by their count, ~100 s of compilation allowed; and profile: the
# kernel time and top kernels of the eager default steps, SD-1.5 and tiny, the floor of the
# recorded ones)
# The default parts write seven files and one log, gpu_speed_log.txt: eight files, the most a
# lent machine returns; with tiny or profile, leave other parts out (each check writes one
# file, the checkpoint part one, the runs four).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_speed_out}"
mkdir -p "$OUT"
export FSMIS_NO_PROGRESS=1
PY="${PYTHON:-python3}"
PARTS=" ${PARTS:-checkpoint defaults predict runs} "
wants() { [[ "$PARTS" == *" $1 "* ]]; }
LOG="$OUT/gpu_speed_log.txt"
# The checks import the installed fsmis-bench (a wheel carried to the lent machine): it must
# be this checkout's code, or the session measures an older build.
if ! "$PY" -P - <<'PYEOF'
import hashlib, importlib, pathlib, sys
def digest(root):
    h = hashlib.sha256()
    for f in sorted(pathlib.Path(root).rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()
stale = [name for name, folder in (("fsmis_bench", "fsmis_bench"), ("fsmis_methods", "methods"), ("fsmis_datasets", "datasets"))
         if digest(pathlib.Path(importlib.import_module(name).__file__).parent) != digest(folder)]
sys.exit(f"the installed {', '.join(stale)} differ from this checkout: rebuild the wheel" if stale else 0)
PYEOF
then
  exit 2
fi
check() {  # check <seconds> <json name> <args...>: one gpu_engine_check run, its log appended
  local limit=$1 name=$2
  shift 2
  echo "=== $name: gpu_engine_check.py $*" >> "$LOG"
  timeout "$limit" "$PY" benchmarks/gpu_engine_check.py --out "$OUT/$name.json" "$@" > /dev/null 2> "$OUT/$name.err"
  local rc=$?
  cat "$OUT/$name.err" >> "$LOG" && rm -f "$OUT/$name.err"
  echo "$name rc=$rc" | tee -a "$LOG"
  sed -n "/^=== $name:/,\$p" "$LOG" | grep -E "^ *[a-z0-9_]+ +[0-9.]+ +[0-9.]+|^predict |^skipped " \
    | grep -v "not selected" || tail -5 "$LOG"
}

if wants checkpoint; then
  echo "=== gpu_checkpoint_pinned_h100: gpu_checkpoint_check.py --out /tmp/fsmis_ckpt" >> "$LOG"
  timeout 100 "$PY" benchmarks/gpu_checkpoint_check.py --out /tmp/fsmis_ckpt > "$OUT/gpu_checkpoint_pinned_h100.json" 2>> "$LOG"
  echo "gpu_checkpoint_pinned_h100 rc=$?" | tee -a "$LOG"; cat "$OUT/gpu_checkpoint_pinned_h100.json"
fi
wants defaults && check 150 gpu_defaults_h100 --steps 40 --warmup 2 --tiny-steps 100 --budget-s 145 --compile-budget-s 30 \
  --only tf32_fused_joint_graph tf32_fused_joint_batched_fclip_graph bf16_autocast_nhwc_joint_graph \
  tf32_fused_nhwc_joint_batched_fclip_graph tf32_fused_nhwc_joint_batched_fclip_norms_graph \
  bf16_autocast_nhwc_joint_batched_fclip_norms_graph tiny_joint_graph tiny_joint_batched_fclip_graph
wants tiny && check 170 gpu_tiny_h100 --steps 40 --warmup 2 --tiny-steps 100 --budget-s 165 --compile-budget-s 100 \
  --only tiny_joint_batched_fclip_graph tiny_joint_batched_fclip_blocks_graph
wants profile && check 60 gpu_profile_h100 --steps 8 --warmup 2 --tiny-steps 30 --profile 3 --budget-s 55 \
  --only tf32_fused_joint_batched_fclip tiny_joint_batched_fclip tiny_joint_batched_fclip_graph
wants predict && check 90 gpu_predict_h100 --steps 3 --warmup 1 --budget-s 85 --only predict
# the whole engine: `fsmis-bench run` with the package's defaults with CUDA, then with
# speed=fast, each in a fresh results folder: 500 steps with a resume state every 250
engine_run() {  # engine_run <seconds> <name> <extra overrides...>
  local limit=$1 name=$2
  shift 2
  local run_dir=/tmp/fsmis_run_$name
  rm -rf "$run_dir"
  echo "=== $name: fsmis-bench run method=sdfsmis backbone=sd15 pretrained=false dataset=phantom train.steps=500 train.checkpoint_every=250 $*" >> "$LOG"
  local start=$SECONDS
  timeout "$limit" "$PY" -P -m fsmis_bench.cli run method=sdfsmis backbone=sd15 pretrained=false dataset=phantom device=cuda \
    train.steps=500 train.checkpoint_every=250 train.log_every=100 results_dir="$run_dir" "$@" >> "$LOG" 2>&1
  echo "$name rc=$? wall_s=$((SECONDS - start))" | tee -a "$LOG"
  for f in train_log.csv run.json; do
    local found
    found=$(find "$run_dir" -name "$f" 2>/dev/null | head -1)
    [ -n "$found" ] && cp "$found" "$OUT/${name}_$f"
  done
  cat "$OUT/${name}_train_log.csv" 2>/dev/null
}
if wants runs; then
  engine_run 110 gpu_run_default_h100  # 79 s in the eighth session
  engine_run 170 gpu_run_fast_h100 speed=fast  # 75 s of training (43 s compiling and recording) + ~37 s around it
fi
