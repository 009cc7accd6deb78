"""Raw-release preparation, supervoxel generation and data checks.

Public entry points for the harness:

- :func:`check_dataset` (``check.py``): verify a prepared root.
- :func:`ensure_supervoxels` (``supervoxels.py``): generate missing supervoxels.
- :func:`register` (``commands.py``): the ``prepare``, ``supervoxels``, ``check-data`` CLI.
- :data:`DATASET_FACTS` (``facts.py``): folders, label maps and test organs.
"""

from __future__ import annotations

import importlib
from typing import Any

from .facts import DATASET_FACTS, DatasetFacts, dataset_facts

# Imported on first use: the readers behind them (SimpleITK, pydicom) are only needed to
# prepare or check data, not to run a benchmark on prepared data.
_LAZY = {
    "CheckReport": ".check", "check_dataset": ".check", "register": ".commands",
    "ensure_supervoxels": ".supervoxels", "generate_supervoxels": ".supervoxels",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DATASET_FACTS",
    "CheckReport",
    "DatasetFacts",
    "check_dataset",
    "dataset_facts",
    "ensure_supervoxels",
    "generate_supervoxels",
    "register",
]
