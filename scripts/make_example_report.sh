#!/usr/bin/env bash
# Regenerates the committed example report (reports/example/) from real CPU runs on the
# CHAOS (abd_mri) and MS-CMRSeg (card_mri) data:
#   FSMIS_DATA_ROOT=/path/to/data FSMIS_WEIGHTS_ROOT=/path/to/weights bash scripts/make_example_report.sh
# The prototype runs use a reduced CPU budget (PROTO_STEPS optimiser steps) and the
# diffusion methods the tiny (random-weight) backbone for SD_STEPS steps at a learning rate
# suited to training from scratch: the point is to show what the tool produces, not to
# rank methods. Two sweeps run side by side, one torch thread each.
set -euo pipefail
: "${FSMIS_DATA_ROOT:?set FSMIS_DATA_ROOT to the folder holding CHAOST2/ and CMR/}"
export FSMIS_RESULTS_DIR="${FSMIS_RESULTS_DIR:-results/example}"
PROTO_STEPS="${PROTO_STEPS:-300}"
SD_STEPS="${SD_STEPS:-200}"
OUT="${OUT:-reports/example}"
run() { OMP_NUM_THREADS=1 fsmis-bench run -m "$@"; }

run method=support_copy dataset=abd_mri setting=1,2 fold=0,1,2,3,4
run method=support_copy dataset=card_mri fold=0,1,2,3,4

run method=prototype dataset=abd_mri setting=1,2 fold=0,1,2,3,4 train.steps="$PROTO_STEPS" &
first=$!
{
  run method=prototype dataset=card_mri fold=0,1,2,3,4 train.steps="$PROTO_STEPS"
  run method=sdfsmis,sdfsmis_sii,sdfsmis_qe,sdfsmis_vtct,diffews backbone=tiny dataset=abd_mri fold=0 \
      train.steps="$SD_STEPS" train.image_size=128 method.lr=1e-3
} &
second=$!
wait "$first" "$second"

fsmis-bench report --out "$OUT" --force
# Keep the small, viewable files in the repository; the PDF/LaTeX twins are regenerated.
find "$OUT" \( -name '*.pdf' -o -name '*.tex' \) -delete
