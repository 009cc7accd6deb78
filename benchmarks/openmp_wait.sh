#!/usr/bin/env bash
# How idle OpenMP threads wait, timed on the default benchmark: the package's default, a
# short spin (fsmis_bench/__init__.py: GOMP_SPINCOUNT=10000), against sleeping at once
# (OMP_WAIT_POLICY=PASSIVE, the earlier default), on a quiet machine and then with LOAD
# busy processes beside it (with STEPS training steps there: a loaded machine is slow).
#
#   bash benchmarks/openmp_wait.sh            # LOAD=6 STEPS=100 by default
#
# Prints one line per run: the policy, the load, the wall seconds and the liver Dice (the
# same for both policies: how threads wait changes no number).
set -u
cd "$(dirname "$0")/.."
FSMIS="${FSMIS:-.venv/bin/fsmis-bench}"
LOAD="${LOAD:-6}"
STEPS="${STEPS:-100}"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
export FSMIS_NO_PROGRESS=1
one() {  # one <label> <load label> <policy...>: run the benchmark under `env <policy...>`
  local label=$1 load=$2; shift 2
  rm -rf "$WORK/results"
  local began ended dice
  began=$(date +%s.%N)
  dice=$(env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT -u KMP_BLOCKTIME "$@" run results_dir="$WORK/results" \
    ${RUN_ARGS:-} 2>&1 | awk '$1 == "liver" {print $2}')
  ended=$(date +%s.%N)
  python3 -c "print(f'{\"$label\":8} {\"$load\":7} wall {$ended - $began:6.1f} s  liver $dice')"
}
RUN_ARGS="" one spin quiet "$FSMIS"
RUN_ARGS="" one passive quiet OMP_WAIT_POLICY=PASSIVE "$FSMIS"
for _ in $(seq "$LOAD"); do python3 -c "while True: pass" & done
sleep 5
RUN_ARGS="train.steps=$STEPS" one spin "load$LOAD" "$FSMIS"
RUN_ARGS="train.steps=$STEPS" one passive "load$LOAD" OMP_WAIT_POLICY=PASSIVE "$FSMIS"
