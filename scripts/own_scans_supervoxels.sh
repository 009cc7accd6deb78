#!/usr/bin/env bash
# Does self-supervised training on a user's own scans (dataset=nifti_folder,
# dataset.supervoxels=auto) compute what the built-in dataset computes from the same scans?
#   FSMIS_DATA_ROOT=/path/to/data bash scripts/own_scans_supervoxels.sh
# Stores all 20 prepared CHAOS scans as a NIfTI folder in six orientations (scripts/
# make_mixed_folder.py --all), then trains and evaluates `prototype` on fold FOLD twice, STEPS
# steps each: on the folder, whose pseudo-labels `supervoxels=auto` makes, and on abd_mri with
# the pseudo-labels `fsmis-bench supervoxels` makes from the prepared files. Prints both runs'
# Dice and whether every tp/fp/fn and every supervoxel agrees.
set -euo pipefail
: "${FSMIS_DATA_ROOT:?set FSMIS_DATA_ROOT to the folder holding CHAOST2/}"
WORK="${WORK:-results/own_scans_supervoxels}"
STEPS="${STEPS:-1000}"
FOLD="${FOLD:-0}"
PY="${PYTHON:-python}"
HERE="$(cd "$(dirname "$0")" && pwd)"

if [ ! -d "$WORK/scans" ]; then
  "$PY" "$HERE/make_mixed_folder.py" "$FSMIS_DATA_ROOT" "$WORK/scans" --all
fi
time fsmis-bench run method=prototype dataset=nifti_folder dataset.path="$(cd "$WORK/scans" && pwd)" \
    "+dataset.label_map={liver:1,right_kidney:2,left_kidney:3,spleen:4}" dataset.supervoxels=auto \
    fold="$FOLD" train.steps="$STEPS" results_dir="$WORK/own"
time fsmis-bench supervoxels abd_mri --root "$FSMIS_DATA_ROOT" --out "$WORK/sv"
time fsmis-bench run method=prototype dataset=abd_mri dataset.supervoxel_dir="$(cd "$WORK/sv" && pwd)" \
    fold="$FOLD" train.steps="$STEPS" results_dir="$WORK/builtin"

"$PY" - "$WORK" <<'PYTHON'
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from fsmis_bench.data.nifti import load_nifti

work = Path(sys.argv[1])
runs = {name: pd.read_csv(next((work / name).glob("prototype/*/setting1/fold*/seed*/cases.csv")), dtype={"case_id": str})
        for name in ("own", "builtin")}
both = runs["own"].merge(runs["builtin"], on=["organ", "case_id"], suffixes=("_own", "_builtin"))
same_counts = all((both[f"{c}_own"] == both[f"{c}_builtin"]).all() for c in ("tp", "fp", "fn"))
print((100 * both.groupby("organ")[["dice_own", "dice_builtin"]].mean()).round(2).to_string())
print(f"{len(both)} (organ, scan) pairs; tp/fp/fn identical: {same_counts}")
same_sv = []
for made in sorted((work / "sv").glob("superpix-MIDDLE_*.nii.gz")):
    builtin = sitk.GetArrayFromImage(sitk.ReadImage(str(made)))
    own = load_nifti(work / "scans" / "supervoxels_5000" / made.name, np.int32, "LAS").array
    same_sv.append(builtin.shape == own.shape and bool((builtin == own).all()))
print(f"{len(same_sv)} scans' supervoxels, read back in LAS, identical: {all(same_sv)}")
PYTHON
