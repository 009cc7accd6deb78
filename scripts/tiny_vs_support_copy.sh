#!/usr/bin/env bash
# Does the tiny diffusion model beat the protocol's floor once the engine is fast?
# `sdfsmis backbone=tiny` trained on real CHAOS (abd_mri) fold 0, setting 1, vs
# `support_copy` on the same fold; prints one JSON line: per-organ Dice (%) of both, their
# means, the training steps and the wall time of the sdfsmis run.
#
#   FSMIS_DATA_ROOT=... FSMIS_WEIGHTS_ROOT=... scripts/tiny_vs_support_copy.sh [STEPS] [LR] [extra overrides...]
#
# Defaults: 1500 steps of 4 episodes, lr 1e-3 (a randomly initialised 2 M-parameter U-Net;
# the paper's 1e-5 is for the pretrained SD-1.5 U-Net), IMAGE_SIZE=64 (8 x 8 latents), bf16
# VAE, on CUDA when there is one. These were chosen on the 2-core CPU, where the run takes
# 16-26 min depending on load (README "Measured figures"); 600 steps of 1 episode at 128 px still gave
# empty masks. Needs FSMIS_DATA_ROOT (CHAOST2/) and FSMIS_WEIGHTS_ROOT (taesd/).
set -euo pipefail
STEPS="${1:-1500}"
IMAGE_SIZE="${IMAGE_SIZE:-64}"
LR="${2:-1e-3}"
shift $(( $# > 2 ? 2 : $# )) || true
: "${FSMIS_DATA_ROOT:?set FSMIS_DATA_ROOT to the folder holding CHAOST2/}"
: "${FSMIS_WEIGHTS_ROOT:?set FSMIS_WEIGHTS_ROOT to the folder holding taesd/}"
export FSMIS_NO_PROGRESS="${FSMIS_NO_PROGRESS:-1}"
export FSMIS_RESULTS_DIR="${FSMIS_RESULTS_DIR:-results_tiny_vs_support_copy}"
PY="${PYTHON:-python}"

"$PY" -m fsmis_bench.cli run method=support_copy dataset=abd_mri fold=0 >&2
began=$(date +%s)
"$PY" -m fsmis_bench.cli run method=sdfsmis backbone=tiny dataset=abd_mri fold=0 \
  train.steps="$STEPS" method.lr="$LR" train.batch_size=4 train.image_size="$IMAGE_SIZE" train.log_every=100 \
  train.checkpoint_every=1000 method.vae_dtype=bfloat16 "$@" >&2
wall=$(( $(date +%s) - began ))

"$PY" - "$FSMIS_RESULTS_DIR" "$STEPS" "$LR" "$wall" <<'PYEOF'
import json, sys
from pathlib import Path
import pandas as pd
root, steps, lr, wall = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
out = {"dataset": "abd_mri", "fold": 0, "setting": 1, "steps": steps, "episodes_per_step": 4, "lr": lr, "sdfsmis_wall_s": wall}
for method in ("support_copy", "sdfsmis"):
    runs = sorted((root / method / "abd_mri" / "setting1" / "fold0").glob("*/cases.csv"), key=lambda p: p.stat().st_mtime)
    cases = pd.read_csv(runs[-1])
    organs = (cases.groupby("organ").dice.mean() * 100).round(2)
    out[method] = {**organs.to_dict(), "mean": round(float(organs.mean()), 2)}
    out[method + "_record"] = str(runs[-1].parent)
out["sdfsmis_beats_support_copy"] = out["sdfsmis"]["mean"] > out["support_copy"]["mean"]
print(json.dumps(out))
PYEOF
