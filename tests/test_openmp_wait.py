"""How idle OpenMP threads wait (``fsmis_bench/__init__.py``): a short spin unless the user
chose a policy, set before torch loads its OpenMP runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PROBE = ("import json, os, fsmis_bench, torch; "
         f"print(json.dumps({{k: os.environ.get(k) for k in {KEYS!r}}}))")


def _environment_after_import(**chosen: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env.update(chosen)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("chosen, expected", [
    ({}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}),
    ({"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "0", "KMP_BLOCKTIME": None}),
    ({"KMP_BLOCKTIME": "200"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": "200"}),
], ids=["default", "user-policy", "user-spincount", "user-blocktime"])
def test_a_short_spin_unless_the_user_chose(chosen, expected):
    assert _environment_after_import(**chosen) == expected
