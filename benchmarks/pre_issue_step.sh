#!/usr/bin/env bash
# make bench's two training steps (the prototype demo; tiny SD-FSMIS) on the code before
# issue 11 (commit ee93447^) against today's, alternating one process of each REPEATS times
# (default 3), so that the CPU's drift over minutes hits both alike; then the median of each
# and their ratio. Needs the git history.
#   bash benchmarks/pre_issue_step.sh [commit]      # REPEATS=5 bash ... for more
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
commit=${1:-ee93447^}
repeats=${REPEATS:-3}
py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$root" worktree add --detach "$work/tree" "$commit" >/dev/null 2>&1
# the old package layout (pyproject's package-dir), importable ahead of the installed one
mkdir "$work/path"
ln -s "$work/tree/fsmis_bench" "$work/path/fsmis_bench"
ln -s "$work/tree/methods" "$work/path/fsmis_methods"
ln -s "$work/tree/datasets" "$work/path/fsmis_datasets"
ln -sfn "$work/tree/configs" "$work/tree/fsmis_bench/configs"
export FSMIS_NO_PROGRESS=1
old() { (cd "$work" && PYTHONPATH="$work/path" "$py" "$root/benchmarks/pre_issue_step.py" "$@" 2>/dev/null); }
new() { (cd "$root" && "$py" "$root/benchmarks/pre_issue_step.py" "$@" 2>/dev/null); }
for ((r = 1; r <= repeats; r++)); do
  old --method prototype
  new --method prototype --variant prototype-plain
  new --method prototype --variant prototype-now
  old --method sdfsmis_tiny --rounds 4 --warmup 1
  new --method sdfsmis_tiny --variant sdfsmis_tiny-plain --rounds 4 --warmup 1
  new --method sdfsmis_tiny --variant sdfsmis_tiny-now --rounds 4 --warmup 1
done | tee "$work/runs.jsonl"
"$py" - "$work/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
median = {}
for run in runs:
    median.setdefault((run["method"], run["variant"]), []).append(run["mean_ms"])
median = {key: statistics.median(values) for key, values in median.items()}
for method in ("prototype", "sdfsmis_tiny"):
    before, now = median[(method, "pre_issue")], median[(method, f"{method}-now")]
    print(json.dumps({"method": method, "repeats": len([r for r in runs if r["method"] == method]) // 3,
                      "median_ms": {variant: value for (m, variant), value in median.items() if m == method},
                      "speedup_vs_pre_issue": round(before / now, 2)}))
PY
