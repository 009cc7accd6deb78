#!/usr/bin/env bash
# The prototype demo step of the code before issue 11 (commit ee93447^), timed by
# benchmarks/pre_issue_step.py, then make bench's reconstruction of it and today's step,
# in one session so that the three share the machine's load. Needs the git history.
#   bash benchmarks/pre_issue_step.sh [commit]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
commit=${1:-ee93447^}
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
echo "before issue 11 ($commit):"
(cd "$work" && PYTHONPATH="$work/path" FSMIS_NO_PROGRESS=1 "$py" "$root/benchmarks/pre_issue_step.py")
echo "make bench, prototype variants (this checkout):"
(cd "$root" && "$py" -m pytest benchmarks/test_bench_training.py --benchmark-only -p no:xdist -q \
    -k prototype --benchmark-columns=mean,min,rounds 2>&1 | grep -E "test_prototype_step|passed")
