"""``support_copy``: the protocol's floor.

Training-free: every query slice of chunk i is predicted as the support's i-th selected
labelled mask slice. Because EP1 keeps only query slices that contain the organ and
pairs chunks with support slices at matching relative positions, this scores far above
zero; a method is only interesting by what it adds on top.
"""

from __future__ import annotations

import torch

from fsmis_bench.method import Method


class SupportCopy(Method):
    needs_training = False

    def predict(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        """``(Q, H, W)``: the (first shot's) support mask for every query slice."""
        support_mask = support_masks[0, 0] > 0.5
        return support_mask.expand(query_images.shape[0], *support_mask.shape).clone()
