"""The Python entry points behind the CLI, for scripts and notebooks."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import compose
from .data.base import VolumeDataset
from .method import Method
from .runner import build_dataset, execute
from .runner import build_method as _build_method


def build_method(overrides: list[str] | DictConfig | None = None) -> Method:
    """A method instance from Hydra-style overrides (``["method=sdfsmis", "backbone=tiny"]``)."""
    cfg = overrides if isinstance(overrides, DictConfig) else compose(list(overrides or []))
    return _build_method(cfg)


def load_dataset(name: str, data_root: str | Path | None = None, **options) -> VolumeDataset:
    """A dataset plugin instance by name, with its config-group defaults under ``options``."""
    cfg = compose([f"dataset={name}"], resolve_datasets=False)
    merged = {**OmegaConf.to_container(cfg.dataset), **options}
    return build_dataset(merged, str(data_root) if data_root is not None else cfg.data_root)


def run(overrides: list[str] | None = None, *, train: bool = True) -> Path:
    """Train (if needed) and evaluate one configuration; returns its record directory."""
    return execute(compose(list(overrides or [])), allow_training=train)


__all__ = ["build_method", "compose", "load_dataset", "run"]
