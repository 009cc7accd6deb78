"""The standard FSMIS evaluation protocol (PROTOCOL.md §2–§4).

* :mod:`.folds` — the fixed folds and their validation;
* :mod:`.ep1` — support selection, chunking and the test episodes of EP1;
* :mod:`.metrics` — 3-D Dice per volume, pooled Dice, fold aggregation;
* :mod:`.settings` — setting 1/2 exclusion forms and training-label groups.
"""

from .ep1 import QueryCase, SupportSlices, build_test_episodes, chunk_edges, support_positions
from .folds import FOLDS, fold_indices
from .metrics import confusion_counts, dice_from_counts, fold_organ_scores
from .settings import EvalGroup, eval_groups, excluded_slices

__all__ = [
    "FOLDS",
    "EvalGroup",
    "QueryCase",
    "SupportSlices",
    "build_test_episodes",
    "chunk_edges",
    "confusion_counts",
    "dice_from_counts",
    "eval_groups",
    "excluded_slices",
    "fold_indices",
    "fold_organ_scores",
    "support_positions",
]
