"""Volumes, datasets and the organ vocabulary shared by every dataset plugin."""

from .base import ORGANS, Volume, VolumeDataset, normalise_volume

__all__ = ["ORGANS", "Volume", "VolumeDataset", "normalise_volume"]
