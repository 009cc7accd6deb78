"""Evaluation of one trained model on EP1 (PROTOCOL.md §3)."""

from __future__ import annotations

import os
from contextlib import nullcontext
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .method import Method, method_name
from .plugins import PluginError, origin_of, plugin_code
from .protocol.ep1 import QueryCase, SupportSlices
from .protocol.metrics import confusion_counts, dice_from_counts
from .training.episodes import resize_slices


@dataclass
class OrganEpisodes:
    """Everything needed to evaluate one organ of one fold."""

    organ: str
    support: SupportSlices
    queries: list[QueryCase]
    #: fold scans neither support nor query because they lack the organ (recorded, warned)
    absent: list[str] = field(default_factory=list)

    def support_record(self) -> dict[str, list]:
        """The support as ``run.json`` records it: its scans and, per scan, the z index of
        the slice each query chunk reads."""
        return {
            "cases": list(self.support.case_ids),
            "slices": [[int(z) for z in self.support.slice_indices[:, shot]]
                       for shot in range(self.support.slice_indices.shape[1])],
        }


#: what :meth:`Method.predict` must return, for messages
PREDICT_CONTRACT = (
    "Method.predict(support_images (S, 1, H, W), support_masks (S, 1, H, W), query_images (Q, 1, H, W)) "
    "must return a (Q, H, W) torch.bool tensor on the query images' device (or the CPU): one foreground mask per query slice, "
    "at the query images' size; threshold scores inside predict (e.g. `return probabilities[:, 0] > 0.5`)"
)


def check_prediction(method: Method, mask: object, queries: int, size: tuple[int, int],
                     device: torch.device | str | None = None) -> None:
    """Refuse a :meth:`Method.predict` output that breaks the contract.

    Args:
        mask: what ``predict`` returned for ``queries`` query slices of ``size`` ``(H, W)``;
            it must be a ``(queries, H, W)`` bool tensor. Nothing is thresholded, broadcast
            or guessed: a float mask (0.5 would be a guess, NaN would become background),
            a ``(1, H, W)`` mask (broadcast over every slice) or one mask too few is an error.
        device: the query images' device, which the mask must be on too, or the CPU (None:
            any); a mask on another device (``meta``, which holds no data) is an error.
    Raises:
        PluginError: naming the method, the plugin and distribution that registered it, and
            what it returned, with the contract as the hint.
    """
    expected = torch.device(device) if device is not None else None
    if isinstance(mask, torch.Tensor):
        shape = tuple(mask.shape)
        # the CPU too: a mask copied out early is as good as one on the query's device
        on_device = expected is None or mask.device.type == "cpu" or _same_device(mask.device, expected)
        if mask.dtype == torch.bool and shape == (queries, *size) and on_device:
            return
        got = f"a {mask.dtype} tensor of shape {shape}" + ("" if on_device else f" on device {mask.device}")
    else:
        got = f"a {type(mask).__name__}"
    raise PluginError(
        f"{origin_of('method', method_name(method))} broke the predict contract: it returned {got} "
        f"for {queries} query slices of {size[0]}x{size[1]} "
        f"(expected torch.bool of shape ({queries}, {size[0]}, {size[1]})"
        + (f" on device {expected})" if expected is not None else ")"),
        hint=PREDICT_CONTRACT,
    )


def _same_device(got: torch.device, expected: torch.device) -> bool:
    """``cuda:0`` is ``cuda`` (a device without an index is the current one)."""
    return got.type == expected.type and (got.index is None or expected.index is None or got.index == expected.index)


@torch.no_grad()
def predict_case(
    method: Method,
    support: SupportSlices,
    query: QueryCase,
    device: torch.device,
    image_size: int | None,
    autocast=None,
    chunk_support: str = "matched",
) -> np.ndarray:
    """Predict every kept slice of one query volume, chunk by chunk.

    Args:
        chunk_support: ``"matched"`` (EP1: chunk ``i`` is segmented with support slice
            ``i`` of each shot) or ``"all"`` (the released SD-FSMIS test script: every chunk
            gets all ``n_part`` support slices of every shot as its shots,
            ``(n_part * S, 1, H, W)``).
    Returns:
        ``(K, H, W)`` bool at the query's native resolution.
    Raises:
        PluginError: ``method.predict`` returned anything but ``(Q, H, W)`` bool for a chunk of
            ``Q`` slices at ``image_size`` (:func:`check_prediction`).
    """
    height, width = query.masks.shape[-2:]
    prediction = np.zeros(query.masks.shape, dtype=bool)
    for part, (lo, hi) in enumerate(zip(query.edges[:-1], query.edges[1:])):
        if hi <= lo:
            continue
        if chunk_support == "all":
            images, masks = support.images.reshape(-1, *support.images.shape[2:]), support.masks.reshape(-1, *support.masks.shape[2:])
        else:
            images, masks = support.images[part], support.masks[part]
        support_images = resize_slices(torch.from_numpy(np.ascontiguousarray(images)), image_size)
        support_masks = resize_slices(torch.from_numpy(masks.astype(np.float32)), image_size, nearest=True)
        query_images = resize_slices(torch.from_numpy(query.images[lo:hi]), image_size)
        query_input = query_images.unsqueeze(1).to(device)
        with plugin_code("method", method_name(method), "predict"), (autocast() if autocast is not None else nullcontext()):
            mask = method.predict(
                support_images.unsqueeze(1).to(device),
                support_masks.unsqueeze(1).to(device),
                query_input,
            )
        check_prediction(method, mask, hi - lo, tuple(query_images.shape[-2:]), query_input.device)
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
    chunk_support: str = "matched",
) -> tuple[list[dict], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """Per-case rows (organ, case_id, dice, tp, fp, fn) and predicted masks.

    ``chunk_support``: which support slices each chunk gets (:func:`predict_case`).
    """
    method.eval()
    rows, predictions = [], {}
    total = sum(len(e.queries) for e in episodes)
    bar = tqdm(total=total, desc=description, file=sys.stderr, dynamic_ncols=True,
               disable=os.environ.get("FSMIS_NO_PROGRESS") == "1")
    for organ_episodes in episodes:
        for query in organ_episodes.queries:
            pred = predict_case(method, organ_episodes.support, query, device, image_size, autocast,
                                chunk_support=chunk_support)
            tp, fp, fn = confusion_counts(pred, query.masks)
            rows.append({"organ": organ_episodes.organ, "case_id": query.case_id,
                         "dice": dice_from_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn})
            if keep_predictions:
                predictions[(organ_episodes.organ, query.case_id)] = (query.slice_indices, pred)
            bar.update(1)
            bar.set_postfix(organ=organ_episodes.organ, dice=f"{rows[-1]['dice']:.3f}")
    bar.close()
    return rows, predictions
