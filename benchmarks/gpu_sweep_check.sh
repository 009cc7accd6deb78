#!/usr/bin/env bash
# Sweeps and pre-emption on a GPU (issue 12), in about two minutes on one H100:
#   1. a joblib sweep of two SD-FSMIS jobs at once on the GPU (CUDA inside joblib's worker processes);
#   2. SIGUSR1 during a GPU training: checkpoint at a step boundary, exit 138, and the rerun
#      must end with the uninterrupted run's losses and Dice (to 1e-4: cuDNN need not be bitwise
#      deterministic; the actual differences are printed).
# Needs the launchers (pip install 'fsmis-bench[launchers]'). Prints PASS/FAIL lines; exit 1 on a FAIL.
#   bash benchmarks/gpu_sweep_check.sh [out_dir]     (DEVICE=cpu STEPS=12 to try it without a GPU)
set -u
OUT=${1:-/tmp/gpu_sweep_check}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-60}
PY=${PYTHON:-python}
rm -rf "$OUT" && mkdir -p "$OUT"
export FSMIS_NO_PROGRESS=1
SD="method=sdfsmis backbone=tiny pretrained=false device=$DEVICE dataset=phantom protocol.organs=[liver] protocol.max_queries=1"
status=0
report() { if [ "$1" = 0 ]; then echo "PASS $2"; else echo "FAIL $2"; status=1; fi; }

start=$(date +%s)
$PY -m fsmis_bench.cli run -m hydra/launcher=joblib hydra.launcher.n_jobs=2 $SD train.steps=10 seed=0,1 \
    results_dir="$OUT/joblib" > "$OUT/joblib.out" 2> "$OUT/joblib.err"
grep -q "2 runs: 2 completed" "$OUT/joblib.err"
report $? "joblib sweep of 2 GPU jobs ($(( $(date +%s) - start )) s): $(grep 'sweep summary' "$OUT/joblib.err")"

TRAIN="train.steps=$STEPS train.checkpoint_every=$((STEPS / 6)) train.log_every=$((STEPS / 12))"
start=$(date +%s)
$PY -m fsmis_bench.cli run $SD $TRAIN results_dir="$OUT/reference" > /dev/null 2> "$OUT/reference.err"
report $? "uninterrupted GPU run ($(( $(date +%s) - start )) s)"

$PY -m fsmis_bench.cli run $SD $TRAIN results_dir="$OUT/preempted" > /dev/null 2> "$OUT/preempted.err" &
pid=$!
for _ in $(seq 1 3000); do
  compgen -G "$OUT/preempted/*/*/*/*/*/checkpoints/all/last.json" > /dev/null && break
  sleep 0.1
done
kill -USR1 $pid
wait $pid
rc=$?
[ $rc = 138 ] && grep -q "checkpoint saved" "$OUT/preempted.err"
report $? "SIGUSR1: exit $rc, $(grep -o 'interrupted at step [0-9]*' "$OUT/preempted.err")"
$PY -m fsmis_bench.cli run $SD $TRAIN results_dir="$OUT/preempted" > /dev/null 2>> "$OUT/preempted.err"
report $? "rerun: $(grep -o 'resuming train.* from step [0-9]*' "$OUT/preempted.err" | sed 's/ (.*//')"

$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
(a,) = (out / "reference").glob("**/COMPLETE")
(b,) = (out / "preempted").glob("**/COMPLETE")
log_a, log_b = (pd.read_csv(p.parent / "train_log.csv")[["step", "loss"]] for p in (a, b))
cases_a, cases_b = (pd.read_csv(p.parent / "cases.csv") for p in (a, b))
same = (list(log_a.step) == list(log_b.step) and (log_a.loss - log_b.loss).abs().max() <= 1e-4 * log_a.loss.abs().max()
        and (cases_a.dice - cases_b.dice).abs().max() <= 1e-4)
print(("PASS" if same else "FAIL") + f" resumed run equals the uninterrupted one: losses {log_b.loss.round(5).tolist()} "
      f"vs {log_a.loss.round(5).tolist()}; Dice {cases_b.dice.round(5).tolist()} vs {cases_a.dice.round(5).tolist()}")
sys.exit(0 if same else 1)
EOF
[ $? = 0 ] || status=1
exit $status
