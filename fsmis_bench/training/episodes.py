"""Self-supervised / supervised training episodes (PROTOCOL.md §5, the ADNet recipe).

Pick a training scan at random, then a class — a supervoxel id, or a GT organ — then a
pair of adjacent slices that both contain it: support = one slice, query = the other
(order inverted with p = 0.5). Gamma goes on one side (support or query, p = 0.5) and
affine + elastic on a side drawn independently (p = 0.5), so in half the episodes the two
sides are augmented differently (Q-Net, SD-FSMIS). Slices excluded by the setting never
enter an episode.

How a draw is made and redrawn (``protocol.episode_sampler``):

* ``reference`` (default): Q-Net's and SD-FSMIS's ``__getitem__`` rule, step by step. The
  scan is drawn once. In it a class is drawn among all the scan's classes, again until it
  shows in at least two kept slices; then a run of consecutive kept slices containing it,
  then the pair's first slice within that run. A pair whose larger mask has fewer than
  ``min_fg_pixels`` pixels draws a new class *in the same scan*; only a class without two
  adjacent slices sends the draw to a new scan. So every scan trains on its share of the
  episodes, whatever fraction of its pairs the size floor rejects. The runs are found as
  that code finds them, in a Python set's order (:func:`reference_runs`; a few true runs
  are cut, and a few pairs never drawn); ``protocol.episode_runs=sorted`` takes every true
  run whole, fsmis-bench's earlier reading of the rule.
* ``uniform_pairs``: fsmis-bench's rule before it followed the reference. A class is drawn
  among those with an adjacent pair, the pair uniformly among all of that class's pairs,
  and a rejected pair draws a new scan, so a scan trained on fewer episodes the more of
  its pairs the floor rejects. Kept so that earlier runs can be reproduced.
* ``same_slice``: SSL-ALPNet's own scheme (``dataloaders/GenericSuperDatasetv2.py`` of its
  released code), meant for its 2-D superpixels (``fsmis-bench supervoxels --method
  felzenszwalb2d --n-sv 400``). Support and query are two copies of *one* slice, each
  augmented on its own, affine + elastic and then gamma (that code's ``num_rep = 2``
  transforms), with the method's augmentation form (the ``standard`` form has that code's
  ``sabs_aug`` ranges; its affine shears about the image corner, this one about the centre).
  The slice is drawn as that code's SABS loader draws it: uniformly among all slices of the
  training scans, one table in scan order (a scan none of whose slices can end a draw
  included); a slice without a class passes the draw to the next one in the table (wrapping
  at its end), a slice the setting excludes redraws uniformly over all but the table's last
  slice (its bound is exclusive); the class is drawn uniformly among those the slice shows.
  No size floor (``min_fg_pixels`` is not applied: that code has none). Not followed: its
  CHAOS loader draws from 1000 indices modulo the table (``fix_length``), which gives the
  table's first ``1000 - N`` slices twice the weight of the rest; its class draw,
  ``randint(1, max)`` over the slice's ids, never names the highest and names an id its
  renumbering left empty (an empty mask in at least 1 in ``max - 1`` episodes); and its
  augmentation parameters, drawn from numpy's global generator in worker processes that
  all start from one state, repeat across workers and epochs. Here episode ``j`` draws from
  its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import Normalisation, VolumeDataset
from ..errors import DataError
from ..method import EpisodeBatch
from ..protocol.settings import EvalGroup, excluded_slices
from .augment import AUGMENT_FORMS, CODE_FORMS, EpisodeAugmenter


EPISODE_SAMPLERS = ("reference", "uniform_pairs", "same_slice")
#: how the reference rule finds a class's runs of adjacent slices (``protocol.episode_runs``)
EPISODE_RUNS = ("reference", "sorted")


def reference_runs(showing: np.ndarray, dropped: np.ndarray) -> list[np.ndarray]:
    """A class's runs of at least two adjacent kept slices, as Q-Net's and SD-FSMIS's
    ``__getitem__`` find them: the kept slices are ``list(set(showing) - set(showing ∩
    dropped))``, which comes in a Python set's iteration order, not sorted, and a run is a
    stretch of that list in which each slice follows the one before it (``z + 1``).

    A set of small integers iterates in the order of ``z`` modulo its table size, so a true
    run that crosses the table size is cut in two, and a run met in descending order is no
    run: kept slices {7, 8} iterate as [8, 7] and give none, {30, 31, 32, 33} give [32, 33]
    and [30, 31], so the pair (31, 32) is never drawn. Computed with the same expression, on
    the same numpy integers, so CPython orders them as it orders the reference's.

    Args:
        showing: ``(N,)`` ascending slices that show the class, dropped ones included.
        dropped: ascending slices the setting excludes.
    Returns:
        the runs, each ``(L,)`` with ``L >= 2``, in the order the reference lists them.
    """
    kept = list(set(showing) - set(np.intersect1d(showing, dropped)))
    runs: list[list[int]] = []
    for i, z in enumerate(kept):
        if runs and kept[i - 1] + 1 == z:
            runs[-1].append(int(z))
        else:
            runs.append([int(z)])
    return [np.asarray(run) for run in runs if len(run) >= 2]


@dataclass
class _Case:
    # The scan's arrays are the dataset's own (not copies): a folder of large CTs is held once.
    image: np.ndarray  # (Z, H, W) intensities as the dataset holds them
    normalise: Normalisation  # the volume's normalisation, applied to each drawn slice
    classes: np.ndarray  # (Z, H, W) map in which `classes[z] == c` is class c's mask, for every drawn c
    pairs: dict[int, np.ndarray]  # class -> (P,) z of pairs (z, z + 1) both containing it
    class_ids: np.ndarray  # every class of the scan's training labels, ascending
    slice_counts: dict[int, int]  # class -> number of kept slices showing it
    runs: dict[int, list[np.ndarray]]  # class -> runs of >= 2 consecutive kept slices showing it
    slice_classes: list[np.ndarray] | None = None  # same_slice: z -> the classes slice z shows
    dropped: np.ndarray | None = None  # same_slice: (Z,) slices the setting excludes


class EpisodeSampler:
    """Draws training episodes for one evaluation group.

    Args:
        dataset: the training dataset.
        cases: training case ids.
        group: the evaluation group (decides excluded slices and GT training organs).
        train_labels: ``"supervoxels"`` or ``"gt"``.
        norm: per-volume normalisation (the method's ``input_norm``).
        min_fg_pixels: rejection threshold on the larger of the two masks.
        rule: ``"reference"`` or ``"uniform_pairs"``, how a draw is made and redrawn
            (module docstring).
        runs: the reference rule's runs of adjacent slices: ``"reference"`` as that code
            finds them (:func:`reference_runs`), ``"sorted"`` every true run whole
            (fsmis-bench's earlier reading). ``uniform_pairs`` draws pairs, not runs.
        augment_form: ``"standard"`` or ``"sdfsmis_code"`` (:mod:`.augment`; the method's
            :meth:`~fsmis_bench.method.Method.augment_form`).
        augment: gamma on one side, affine + elastic on an independently drawn side.
        image_size: resize slices to ``(image_size, image_size)``; None keeps them.
        seed: seed of the episode stream: episode ``j`` is drawn from a generator seeded by
            ``(seed, j)`` (:meth:`episode`); the position in the stream is checkpointed.
    """

    def __init__(
        self,
        dataset: VolumeDataset,
        cases: list[str],
        group: EvalGroup,
        *,
        train_labels: str = "supervoxels",
        norm: str = "zscore",
        min_fg_pixels: int = 200,
        augment: bool = True,
        image_size: int | None = None,
        seed: int = 0,
        rule: str = "reference",
        augment_form: str = "standard",
        runs: str = "reference",
    ) -> None:
        if rule not in EPISODE_SAMPLERS:
            raise ValueError(f"episode sampler rule {rule!r}: expected one of {EPISODE_SAMPLERS}")
        if runs not in EPISODE_RUNS:
            raise ValueError(f"episode runs {runs!r}: expected one of {EPISODE_RUNS}")
        self.rule = rule
        self.runs_form = runs
        self.seed = seed
        self.next_episode = 0
        self.rng = np.random.default_rng(seed)
        self.min_fg_pixels = min_fg_pixels
        self.image_size = image_size
        self.augmenter = EpisodeAugmenter(form=augment_form) if augment else None
        self.cases: list[_Case] = []
        self.excluded_slice_count = 0
        for case_id in cases:
            volume = dataset.load(case_id, with_supervoxels=train_labels == "supervoxels")
            values = [dataset.label_map[o] for o in group.excluded_organs if o in dataset.label_map]
            dropped = excluded_slices(volume.label, values, group.exclusion)
            self.excluded_slice_count += int(dropped.sum())
            if train_labels == "supervoxels":
                classes = masks_of = volume.supervoxels
            else:
                keep = [dataset.label_map[o] for o in group.train_organs if o in dataset.label_map]
                classes = np.where(np.isin(volume.label, keep), volume.label, 0)
                # every class drawn is one of `keep`, whose masks the label map gives as they
                # are: the sampler keeps the dataset's label, not a second map of the scan
                masks_of = volume.label
            case = self._index(classes, dropped)
            if case is not None:
                self.cases.append(_Case(volume.image, Normalisation.of(volume.image, norm), masks_of, **case))
        #: same_slice: every slice of every scan, in scan order, as ``(case, z)``
        self.slice_table = [(case, z) for case in self.cases for z in range(case.image.shape[0])]
        if rule == "same_slice" and not any(len(c.slice_classes[z]) and not c.dropped[z] for c, z in self.slice_table):
            self.cases = []  # no kept slice shows a class: no draw can end
        if not self.cases:
            raise DataError(
                f"no training episode can be drawn from {len(cases)} {dataset.name} scans "
                f"(labels={train_labels}, excluded organs={list(group.excluded_organs)})",
                hint=("check the supervoxels (`fsmis-bench check-data`) or the setting" if train_labels == "supervoxels"
                      else "check the label files (each training organ in two adjacent slices, at least "
                           f"protocol.min_fg_pixels={min_fg_pixels} pixels in one of them) or the setting"),
            )

    def _index(self, classes: np.ndarray, dropped: np.ndarray) -> dict | None:
        """What a draw needs to know of one scan, or None when no draw can end in it.

        ``uniform_pairs`` keeps a scan with at least one adjacent pair. The reference rule
        would loop forever in a scan where no class can be accepted and none sends the draw
        on to another scan (no class shows in two kept slices, or every pair is below the
        size floor): such a scan is left out of the draw instead.
        """
        if self.rule == "same_slice":
            # every scan stays in the table, as in that code, even one where no draw can end
            shown = [np.setdiff1d(np.unique(plane), [0]) for plane in classes]
            return {"pairs": {}, "class_ids": np.unique(np.concatenate(shown)), "slice_counts": {}, "runs": {},
                    "slice_classes": shown, "dropped": np.asarray(dropped, dtype=bool)}
        pixels: list[dict[int, int]] = []  # z -> {class: pixel count}, empty for a dropped slice
        showing: dict[int, list[int]] = {}  # class -> every slice showing it, dropped ones included
        for z in range(classes.shape[0]):
            values, counts = np.unique(classes[z], return_counts=True)
            for v in values[values != 0]:
                showing.setdefault(int(v), []).append(z)
            pixels.append({} if dropped[z] else
                          {int(v): int(c) for v, c in zip(values, counts) if v != 0})
        slices: dict[int, list[int]] = {}
        for z, present in enumerate(pixels):
            for cls in present:
                slices.setdefault(cls, []).append(z)
        runs: dict[int, list[np.ndarray]] = {}
        for cls, zs in slices.items():
            if self.runs_form == "reference":
                runs[cls] = reference_runs(np.asarray(showing[cls]), np.flatnonzero(dropped))
            else:
                split = np.split(np.asarray(zs), np.flatnonzero(np.diff(zs) != 1) + 1)
                runs[cls] = [run for run in split if len(run) >= 2]
        pairs = self._adjacent_pairs(classes, dropped)
        if not pairs:
            return None
        if self.rule == "reference":
            accepted = any(max(pixels[z][cls], pixels[z + 1][cls]) >= self.min_fg_pixels
                           for cls, starts in pairs.items() for z in starts)
            moves_on = any(len(slices[cls]) >= 2 and not runs[cls] for cls in slices)
            if not (accepted or moves_on):
                return None
        class_ids = np.unique(classes)
        return {
            "pairs": pairs,
            "class_ids": class_ids[class_ids != 0],
            "slice_counts": {cls: len(zs) for cls, zs in slices.items()},
            "runs": runs,
        }

    @staticmethod
    def _adjacent_pairs(classes: np.ndarray, dropped: np.ndarray) -> dict[int, np.ndarray]:
        """For each class, the z of every adjacent slice pair (z, z+1) that both contain it.

        The classes are in the order ``uniform_pairs`` has always drawn from (kept as it was,
        so that its runs are reproduced).
        """
        present: list[set[int]] = []
        for z in range(classes.shape[0]):
            ids = set() if dropped[z] else set(np.unique(classes[z]).tolist())
            ids.discard(0)
            present.append(ids)
        pairs: dict[int, list[int]] = {}
        for z in range(classes.shape[0] - 1):
            for cls in present[z] & present[z + 1]:
                pairs.setdefault(cls, []).append(z)
        return {cls: np.asarray(zs) for cls, zs in pairs.items()}

    # -- position in the random stream (checkpointed) ----------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "next_episode": self.next_episode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state of seed {state['seed']} loaded into a sampler of seed {self.seed}")
        self.next_episode = int(state["next_episode"])

    def seek(self, episode: int) -> None:
        """Make episode ``episode`` the next one :meth:`batch` draws."""
        self.next_episode = int(episode)

    # -- drawing ------------------------------------------------------------------------
    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One episode: support image, support mask, query image, query mask, each ``(H, W)``."""
        if self.rule == "same_slice":
            return self._sample_same_slice()
        draw = self._draw_reference if self.rule == "reference" else self._draw_uniform_pairs
        case, cls, z = draw()
        first, second = case.classes[z] == cls, case.classes[z + 1] == cls
        slices = [self._fit(case.normalise(case.image[at]), mask) for at, mask in ((z, first), (z + 1, second))]
        if self.rng.uniform() < 0.5:
            slices.reverse()
        if self.augmenter is not None and self.augmenter.form in CODE_FORMS:
            geometric_side = int(self.rng.uniform() < 0.5)  # that code warps first, then applies gamma
            slices[geometric_side] = self.augmenter.geometric(*slices[geometric_side], self.rng)
            gamma_side = int(self.rng.uniform() < 0.5)  # drawn independently
            image, mask = slices[gamma_side]
            slices[gamma_side] = (self.augmenter.gamma(image, self.rng), mask)
        elif self.augmenter is not None:
            gamma_side = int(self.rng.uniform() < 0.5)  # 0: support, 1: query
            image, mask = slices[gamma_side]
            slices[gamma_side] = (self.augmenter.gamma(image, self.rng), mask)
            geometric_side = int(self.rng.uniform() < 0.5)  # drawn independently
            slices[geometric_side] = self.augmenter.geometric(*slices[geometric_side], self.rng)
        (support_image, support_mask), (query_image, query_mask) = slices
        return support_image, support_mask, query_image, query_mask

    def _accepted(self, case: _Case, cls: int, z: int) -> bool:
        larger = max(int((case.classes[z] == cls).sum()), int((case.classes[z + 1] == cls).sum()))
        return larger >= self.min_fg_pixels

    def _draw_reference(self) -> tuple[_Case, int, int]:
        """``(scan, class, z)`` of an accepted pair ``(z, z + 1)``, by the reference rule."""
        for _ in range(100_000):
            case = self.cases[self.rng.integers(len(self.cases))]
            while True:  # ends: _index keeps only scans where a draw can end
                cls = int(case.class_ids[self.rng.integers(len(case.class_ids))])
                if case.slice_counts.get(cls, 0) < 2:
                    continue  # the class shows in fewer than two kept slices: another class
                runs = case.runs[cls]
                if not runs:
                    break  # no two adjacent slices: the reference starts over with a new scan
                run = runs[self.rng.integers(len(runs))]
                z = int(run[self.rng.integers(len(run) - 1)])
                if self._accepted(case, cls, z):
                    return case, cls, z
        raise DataError(
            "no training episode was drawn in 100000 scan draws",
            hint="lower protocol.min_fg_pixels, or check the training labels",
        )

    def _sample_same_slice(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Two copies of one slice and class, each augmented on its own (SSL-ALPNet)."""
        case, cls, z = self._draw_same_slice()
        copies = [self._fit(case.normalise(case.image[z]), case.classes[z] == cls)] * 2  # augmentation makes new arrays
        if self.augmenter is not None:
            for side, (image, mask) in enumerate(copies):  # support first, as that code's buffer
                image, mask = self.augmenter.geometric(image, mask, self.rng)
                copies[side] = (self.augmenter.gamma(image, self.rng), mask)
        (support_image, support_mask), (query_image, query_mask) = copies
        return support_image, support_mask, query_image, query_mask

    def _draw_same_slice(self) -> tuple[_Case, int, int]:
        """``(scan, class, z)`` by SSL-ALPNet's rule (module docstring)."""
        table = self.slice_table
        index = int(self.rng.integers(len(table)))
        for _ in range(100_000):
            case, z = table[index]
            shown = case.slice_classes[z]
            if not len(shown):
                index = (index + 1) % len(table)  # that code takes the next slice of its table
                continue
            if case.dropped[z]:
                index = int(self.rng.integers(max(len(table) - 1, 1)))  # ... and redraws an excluded one
                continue
            return case, int(shown[self.rng.integers(len(shown))]), z
        raise DataError("no training slice was drawn in 100000 draws",
                        hint="check the training labels and the setting's excluded organs")

    def _draw_uniform_pairs(self) -> tuple[_Case, int, int]:
        """``(scan, class, z)`` by fsmis-bench's earlier rule: a rejected pair draws a new scan."""
        for _ in range(10_000):
            case = self.cases[self.rng.integers(len(self.cases))]
            class_ids = list(case.pairs)
            cls = class_ids[self.rng.integers(len(class_ids))]
            z = int(case.pairs[cls][self.rng.integers(len(case.pairs[cls]))])
            if self._accepted(case, cls, z):
                return case, cls, z
        raise DataError(
            f"no training pair reaches {self.min_fg_pixels} foreground pixels after 10000 draws",
            hint="lower protocol.min_fg_pixels, or check the training labels",
        )

    def _fit(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resize to the training size first, so augmentation runs at the model's size."""
        if self.image_size is None or image.shape == (self.image_size, self.image_size):
            return image, mask
        image = resize_slices(torch.from_numpy(image)[None], self.image_size)[0].numpy()
        mask = resize_slices(torch.from_numpy(mask.astype(np.float32))[None], self.image_size, nearest=True)[0].numpy()
        return image, mask > 0.5

    def episode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Episode ``index`` of the stream, as :meth:`sample` returns it.

        Each episode has its own generator, seeded by ``(seed, index)``: any episode can be
        drawn in any process and in any order (DataLoader workers, a resumed run), and a
        step holds the same episodes whether they come as one batch or as accumulated
        micro-batches. (The sampler's generator is replaced by the episode's.)
        """
        self.rng = np.random.default_rng([self.seed, index])
        return self.sample()

    def batch(self, batch_size: int) -> EpisodeBatch:
        """The next ``batch_size`` episodes of the stream as tensors (one support shot)."""
        first, self.next_episode = self.next_episode, self.next_episode + batch_size
        episodes = [self.episode(first + i) for i in range(batch_size)]
        stack = [torch.from_numpy(np.stack([e[k] for e in episodes]).astype(np.float32)) for k in range(4)]
        support_images, support_masks, query_images, query_masks = (t.unsqueeze(1) for t in stack)
        return EpisodeBatch(
            support_images=support_images.unsqueeze(1),
            support_masks=support_masks.unsqueeze(1),
            query_images=query_images,
            query_masks=query_masks,
        )


def resize_slices(
    slices: torch.Tensor, size: int | tuple[int, int] | None, nearest: bool = False
) -> torch.Tensor:
    """Resize ``(N, H, W)`` slices to ``(N, size, size)`` or ``(N, *size)`` (masks: nearest)."""
    if size is None:
        return slices
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(slices.shape[-2:]) == shape:
        return slices
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False}
    return F.interpolate(slices.unsqueeze(1).float(), size=shape, mode=mode, **kwargs).squeeze(1)
