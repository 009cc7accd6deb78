#!/usr/bin/env bash
# Regenerates the committed example report (reports/example/) from real CPU runs on the
# CHAOS (abd_mri) and MS-CMRSeg (card_mri) data:
#   FSMIS_DATA_ROOT=/path/to/data FSMIS_WEIGHTS_ROOT=/path/to/weights bash scripts/make_example_report.sh
# The prototype runs use a reduced CPU budget (PROTO_STEPS optimiser steps). The diffusion
# methods use the tiny (random-init) backbone with the real TAESD codec, trained from scratch
# as in scripts/tiny_vs_support_copy.sh: SD_STEPS steps of 4 episodes at 64 px, lr 1e-3
# (the paper's 1e-5 is for the pretrained SD-1.5 U-Net). The point is to show what the tool
# produces, not to rank methods. Two lanes run side by side, one torch thread each.
set -euo pipefail
: "${FSMIS_DATA_ROOT:?set FSMIS_DATA_ROOT to the folder holding CHAOST2/ and CMR/}"
: "${FSMIS_WEIGHTS_ROOT:?set FSMIS_WEIGHTS_ROOT to the folder holding taesd/}"
export FSMIS_RESULTS_DIR="${FSMIS_RESULTS_DIR:-results/example}"
PROTO_STEPS="${PROTO_STEPS:-300}"
SD_STEPS="${SD_STEPS:-1500}"
# the training episodes' rule; the committed example was made with uniform_pairs, the rule
# before fsmis-bench followed the reference code (reports/README.md)
EPISODE_SAMPLER="${EPISODE_SAMPLER:-reference}"
OUT="${OUT:-reports/example}"
run() { OMP_NUM_THREADS=1 fsmis-bench run -m "$@" protocol.episode_sampler="$EPISODE_SAMPLER"; }
tiny_sd() {
  run method="$1" backbone=tiny dataset=abd_mri fold=0 train.steps="$SD_STEPS" train.batch_size=4 \
      train.image_size=64 method.lr=1e-3 method.vae_dtype=bfloat16 train.log_every=100 train.checkpoint_every=500
}

run method=support_copy dataset=abd_mri setting=1,2 fold=0,1,2,3,4
run method=support_copy dataset=card_mri fold=0,1,2,3,4

{
  run method=prototype dataset=abd_mri setting=1,2 fold=0,1,2,3,4 train.steps="$PROTO_STEPS"
  tiny_sd sdfsmis,sdfsmis_sii
} &
first=$!
{
  run method=prototype dataset=card_mri fold=0,1,2,3,4 train.steps="$PROTO_STEPS"
  tiny_sd sdfsmis_qe,sdfsmis_vtct,diffews
} &
second=$!
# `wait A B` returns B's status only: each lane is waited for and checked on its own, so a
# failed lane never leaves a report of partial results
failed=0
wait "$first" || failed=1
wait "$second" || failed=1
if [ "$failed" != 0 ]; then
  echo "a lane of runs failed (its error is above); no report written. Rerunning resumes the finished runs." >&2
  exit 1
fi

fsmis-bench report --out "$OUT" --force
# Keep the small, viewable files in the repository; the PDF/LaTeX twins are regenerated.
find "$OUT" \( -name '*.pdf' -o -name '*.tex' \) -delete
