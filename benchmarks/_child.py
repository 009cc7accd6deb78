"""Runs a benchmark's measuring code in a fresh Python process per case, so that each
peak resident memory is its own (``supervoxel_memory.py``, ``episode_memory.py``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Sequence


def run_children(code: str, cases: Iterable[Sequence[str]]) -> int:
    """``python -c code *case`` for each case, printing each one's stdout (a JSON line);
    stops at the first that fails, with its stderr, and returns its exit status (else 0)."""
    for case in cases:
        done = subprocess.run([sys.executable, "-c", code, *case], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        print(done.stdout.strip(), flush=True)
    return 0
