"""Raw-release preparation, supervoxel generation and data checks.

Public entry points for the harness:

- :func:`check_dataset` (``check.py``): verify a prepared root.
- :func:`ensure_supervoxels` (``supervoxels.py``): generate missing supervoxels.
- :func:`register` (``commands.py``): the ``prepare``, ``supervoxels``, ``check-data`` CLI.
- :data:`DATASET_FACTS` (``facts.py``): folders, label maps and test organs.
"""

from __future__ import annotations

from .check import CheckReport, check_dataset
from .commands import register
from .facts import DATASET_FACTS, DatasetFacts, dataset_facts
from .supervoxels import ensure_supervoxels, generate_supervoxels

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
