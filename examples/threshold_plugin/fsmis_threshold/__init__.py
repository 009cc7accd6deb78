"""An out-of-tree fsmis-bench plugin, as a third party would write it.

``intensity_window``: training-free. A query pixel is foreground when its intensity lies
inside the central range of the support's foreground intensities. It registers a method
(with the name and colour report figures give it) and ships that method's config group
through ``fsmis_config_dirs``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fsmis_bench.method import Method
from fsmis_bench.plugins import Display, Registry, hookimpl


class IntensityWindow(Method):
    needs_training = False

    def predict(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        foreground = support_images[support_masks > 0.5]
        low = torch.quantile(foreground, float(self.cfg.method.low))
        high = torch.quantile(foreground, float(self.cfg.method.high))
        return ((query_images >= low) & (query_images <= high))[:, 0]


@hookimpl
def fsmis_register_methods(registry: Registry[Method]) -> None:
    # `display` is optional: how report figures name and colour the method (and, for a
    # re-implementation of a published method, `published_names=("PANet",)` puts the
    # paper's number beside the measured one)
    registry.register("intensity_window", IntensityWindow, description="example plugin: support intensity window",
                      display=Display(name="Intensity window", colour="#882255"))


@hookimpl
def fsmis_config_dirs() -> list[str]:
    return [str(Path(__file__).parent / "configs")]
