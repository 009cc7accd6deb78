#!/usr/bin/env bash
# A classic FSMIS method (default ADNet) on abd_mri setting 1, all five folds, on one GPU:
# trains and evaluates each fold with the full-size architecture (ResNet-101, 256 px, batch 1,
# SGD + step decay as released), then prints the per-fold and 5-fold Dice beside the
# published number, the gap, and the measured seconds per training step.
#
#   MODE=quick bash scripts/gpu_classic_methods.sh    # default: STEPS (300) steps per fold
#   MODE=full  bash scripts/gpu_classic_methods.sh    # the published budget (ADNet: 50k steps per fold)
#   METHOD=qnet MODE=quick bash scripts/gpu_classic_methods.sh
#   DEVICE=cpu FOLDS=0 STEPS=2 EXTRA="method.encoder=resnet18 train.image_size=64 protocol.max_queries=1" \
#       bash scripts/gpu_classic_methods.sh                # CPU smoke test of this script
#
# Expected on one H100 (estimate from FLOPs counted by benchmarks/classic_step_cost.py: ADNet
# 538 GFLOP per step, Q-Net 1592, SSL-ALPNet 538; plus ~1000 kernel launches per step and the
# serial CPU episode sampler): ADNet ~30-50 ms per step, so MODE=full ~2-3.5 h for five folds;
# MODE=quick (300 steps per fold) ~3 min including data loading and evaluation.
#
# Weights: the COCO DeepLabv3-ResNet-101 file is used when it is under FSMIS_WEIGHTS_ROOT
# (deeplabv3_resnet101_coco-586e9e4e.pth, or torchvision/<that name>); otherwise the run uses
# the same architecture with random weights and is marked random_weights. A quick run is also
# marked with its reduced train.steps: neither is comparable with the published number.
set -euo pipefail
cd "$(dirname "$0")/.."

METHOD=${METHOD:-adnet}
MODE=${MODE:-quick}
STEPS=${STEPS:-300}
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
FOLDS=${FOLDS:-0,1,2,3,4}
read -r -a extra <<< "${EXTRA:-}"
export FSMIS_DATA_ROOT=${FSMIS_DATA_ROOT:-$(cd ../shared/data 2>/dev/null && pwd || echo shared/data)}
export FSMIS_RESULTS_DIR=${FSMIS_RESULTS_DIR:-$PWD/results_gpu_classic}
export FSMIS_NO_PROGRESS=1

coco=deeplabv3_resnet101_coco-586e9e4e.pth
pretrained=false
for candidate in "${FSMIS_WEIGHTS_ROOT:-/nonexistent}/$coco" "${FSMIS_WEIGHTS_ROOT:-/nonexistent}/torchvision/$coco"; do
  [ -f "$candidate" ] && pretrained=true
done

overrides=(method="$METHOD" dataset=abd_mri setting=1 fold="$FOLDS" pretrained=$pretrained
           device="$DEVICE" mixed_precision=no protocol.save_predictions=false "${extra[@]}")
if [ "$MODE" = quick ]; then
  overrides+=(train.steps="$STEPS" train.checkpoint_every=$(( STEPS > 100 ? STEPS / 2 : STEPS )))
elif [ "$MODE" != full ]; then
  echo "MODE must be quick or full" >&2; exit 2
fi

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
echo "[gpu_classic] $METHOD mode=$MODE pretrained=$pretrained data=$FSMIS_DATA_ROOT results=$FSMIS_RESULTS_DIR" >&2
start=$(date +%s)
"$PY" -m fsmis_bench.cli run -m "${overrides[@]}"
echo "[gpu_classic] wall ${METHOD} ${MODE}: $(( $(date +%s) - start )) s" >&2

"$PY" - "$FSMIS_RESULTS_DIR" "$METHOD" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

from fsmis_bench.reporting.collect import load_results
from fsmis_bench.reporting.tables import main_table, published_gap

root, method = Path(sys.argv[1]), sys.argv[2]
results = load_results(root)
scores = results.fold_scores[results.fold_scores["method"] == method]
wide = scores.pivot_table(index=["variant", "fold"], columns="organ", values="dice") * 100
wide["mean"] = wide.mean(axis=1)
print("per-fold Dice (%):")
print(wide.round(2).to_string())
gaps = published_gap(main_table(results))
print("\nmeasured vs published (Dice %, mean of organs and folds):")
print(gaps[gaps["method"].str.startswith(method)].to_string(index=False))
for run_dir, log in results.train_logs.items():
    if f"/{method}/" in run_dir and len(log) > 1:
        rate = (log["elapsed_s"].iloc[-1] - log["elapsed_s"].iloc[0]) / (log["step"].iloc[-1] - log["step"].iloc[0])
        print(f"{run_dir}: {rate * 1000:.1f} ms per training step (steps {log['step'].iloc[0]}..{log['step'].iloc[-1]})")
EOF
