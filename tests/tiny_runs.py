"""The smallest real run (prototype on a small phantom) and how to find run records, for
tests that run the CLI."""

from __future__ import annotations

from pathlib import Path

#: overrides of a prototype run on a 64-pixel phantom: seconds on a CPU
SMALL = [
    "method=prototype", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16",
    "method.width=8", "method.feature_dim=16", "train.image_size=64", "train.batch_size=2",
    "protocol.min_fg_pixels=20",
]


def run_dirs(results: Path) -> list[Path]:
    """Every run record folder under ``results``, sorted."""
    return sorted(p.parent for p in results.glob("**/run.json"))
