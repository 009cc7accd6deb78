#!/usr/bin/env bash
# Does a prototype trained on our supervoxels score like one trained on the reference
# supervoxels shipped with the data? (issue: `fsmis-bench supervoxels`, docs/supervoxels.md)
#   FSMIS_DATA_ROOT=/path/to/data bash scripts/compare_supervoxels.sh
# Generates our ADNet-recipe supervoxels for CHAOS into $WORK/sv, then trains and evaluates
# `prototype` on the five abd_mri folds with each set (same seed, same budget) and prints
# both report tables. STEPS (default 300) sets the training budget of every run;
# EPISODE_SAMPLER (default reference) and EPISODE_RUNS (default reference) the training
# episodes' rule. docs/supervoxels.md's tables were made by an earlier checkout with the rule
# EPISODE_RUNS=sorted now names, its last paragraph with EPISODE_SAMPLER=uniform_pairs.
set -euo pipefail
: "${FSMIS_DATA_ROOT:?set FSMIS_DATA_ROOT to the folder holding CHAOST2/}"
WORK="${WORK:-results/supervoxel_comparison}"
STEPS="${STEPS:-300}"
FOLDS="${FOLDS:-0,1,2,3,4}"
EPISODE_SAMPLER="${EPISODE_SAMPLER:-reference}"
EPISODE_RUNS="${EPISODE_RUNS:-reference}"

time fsmis-bench supervoxels abd_mri --root "$FSMIS_DATA_ROOT" --out "$WORK/sv" --workers 2 \
    --compare-to "$FSMIS_DATA_ROOT/CHAOST2/supervoxels_5000"

FSMIS_RESULTS_DIR="$WORK/reference" fsmis-bench run -m method=prototype dataset=abd_mri fold="$FOLDS" \
    train.steps="$STEPS" protocol.episode_sampler="$EPISODE_SAMPLER" protocol.episode_runs="$EPISODE_RUNS"
FSMIS_RESULTS_DIR="$WORK/ours" fsmis-bench run -m method=prototype dataset=abd_mri fold="$FOLDS" \
    train.steps="$STEPS" protocol.episode_sampler="$EPISODE_SAMPLER" protocol.episode_runs="$EPISODE_RUNS" \
    dataset.supervoxel_dir="$(cd "$WORK/sv" && pwd)"

for which in reference ours; do
  echo "## prototype trained on the $which supervoxels"
  fsmis-bench report --results "$WORK/$which" --no-published
done
