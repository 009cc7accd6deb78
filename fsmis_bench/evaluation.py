"""Evaluation of one trained model on EP1 (PROTOCOL.md §3)."""

from __future__ import annotations

import os
from contextlib import nullcontext
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .method import Method
from .protocol.ep1 import QueryCase, SupportSlices
from .protocol.metrics import confusion_counts, dice_from_counts
from .training.episodes import resize_slices


@dataclass
class OrganEpisodes:
    """Everything needed to evaluate one organ of one fold."""

    organ: str
    support: SupportSlices
    queries: list[QueryCase]


@torch.no_grad()
def predict_case(
    method: Method,
    support: SupportSlices,
    query: QueryCase,
    device: torch.device,
    image_size: int | None,
    autocast=None,
) -> np.ndarray:
    """Predict every kept slice of one query volume, chunk by chunk.

    Returns:
        ``(K, H, W)`` bool at the query's native resolution.
    """
    height, width = query.masks.shape[-2:]
    prediction = np.zeros(query.masks.shape, dtype=bool)
    for part, (lo, hi) in enumerate(zip(query.edges[:-1], query.edges[1:])):
        if hi <= lo:
            continue
        support_images = resize_slices(torch.from_numpy(support.images[part]), image_size)
        support_masks = resize_slices(torch.from_numpy(support.masks[part].astype(np.float32)), image_size, nearest=True)
        query_images = resize_slices(torch.from_numpy(query.images[lo:hi]), image_size)
        with autocast() if autocast is not None else nullcontext():
            mask = method.predict(
                support_images.unsqueeze(1).to(device),
                support_masks.unsqueeze(1).to(device),
                query_images.unsqueeze(1).to(device),
            )
        mask = mask.float().cpu()
        if tuple(mask.shape[-2:]) != (height, width):
            mask = resize_slices(mask, (height, width), nearest=True)
        prediction[lo:hi] = mask.numpy() > 0.5
    return prediction



def evaluate(
    method: Method,
    episodes: list[OrganEpisodes],
    *,
    device: torch.device,
    image_size: int | None,
    autocast=None,
    keep_predictions: bool = True,
    description: str = "eval",
) -> tuple[list[dict], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """Per-case rows (organ, case_id, dice, tp, fp, fn) and predicted masks."""
    method.eval()
    rows, predictions = [], {}
    total = sum(len(e.queries) for e in episodes)
    bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True,
               disable=os.environ.get("FSMIS_NO_PROGRESS") == "1")
    for organ_episodes in episodes:
        for query in organ_episodes.queries:
            pred = predict_case(method, organ_episodes.support, query, device, image_size, autocast)
            tp, fp, fn = confusion_counts(pred, query.masks)
            rows.append({"organ": organ_episodes.organ, "case_id": query.case_id,
                         "dice": dice_from_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn})
            if keep_predictions:
                predictions[(organ_episodes.organ, query.case_id)] = (query.slice_indices, pred)
            bar.update(1)
            bar.set_postfix(organ=organ_episodes.organ, dice=f"{rows[-1]['dice']:.3f}")
    bar.close()
    return rows, predictions
