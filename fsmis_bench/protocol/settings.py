"""Settings 1 and 2, and the training-label variants (PROTOCOL.md §4).

A run is split into *evaluation groups*: each group trains one model and evaluates it on
the group's organs. Setting 1 has one group. Setting 2 in its correct form (``any``,
SSL-ALPNet) trains once per organ group — {liver, spleen} and {left kidney, right kidney} —
dropping every training slice that shows *any* organ of the group. The legacy form
(``all``, ADNet-derived code) trains once, dropping only slices that show *all* test organs
at once, which leaves most test-organ slices in training.

Training on ground truth (``train_labels=gt``) removes test organs from the training
classes. ``gt_exclusion=per_group`` (default, correct) removes each group's test organs
from that group's model. ``gt_exclusion=liver_spleen`` is the released SD-FSMIS training
script as shipped (``--test_label 1``): it removes only liver and spleen (label values
[1, 4] on CHAOS, [1, 6] on SABS; none of the cardiac labels) and trains one model that is
then tested on every organ, so the kidneys (and all cardiac structures) are trained on and
tested — a label leak, kept for reproducing the released code and marked non-standard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.base import VolumeDataset
from ..errors import ConfigError

EXCLUSION_MODES = ("any", "all")
TRAIN_LABELS = ("supervoxels", "gt")
GT_EXCLUSIONS = ("per_group", "liver_spleen")
#: the organs the shipped ``--test_label 1`` removes from the GT training classes.
SHIPPED_GT_REMOVED = ("liver", "spleen")


@dataclass(frozen=True)
class EvalGroup:
    """One trained model and the organs it is evaluated on.

    Attributes:
        name: ``"all"`` or the joined organ names (used in checkpoint paths).
        organs: test organs evaluated with this model.
        excluded_organs: organs whose slices are dropped from training.
        exclusion: ``"none"``, ``"any"`` or ``"all"``.
        train_organs: GT organs used as training classes (``train_labels=gt`` only).
    """

    name: str
    organs: tuple[str, ...]
    excluded_organs: tuple[str, ...] = ()
    exclusion: str = "none"
    train_organs: tuple[str, ...] = field(default=())


def _label_groups(test_dataset: VolumeDataset) -> tuple[tuple[str, ...], ...]:
    groups = test_dataset.setting2_groups or tuple((o,) for o in test_dataset.test_organs)
    return tuple(tuple(o for o in g if o in test_dataset.test_organs) for g in groups)


def eval_groups(
    train_dataset: VolumeDataset,
    test_dataset: VolumeDataset,
    setting: int,
    exclusion: str = "any",
    train_labels: str = "supervoxels",
    gt_exclusion: str = "per_group",
) -> list[EvalGroup]:
    """The evaluation groups of a run.

    With ``train_labels=gt`` and ``gt_exclusion=per_group`` the training classes are the
    training dataset's GT organs minus the group's test organs, so the groups follow the
    setting-2 organ grouping (leave-one-organ-out where a dataset defines none) even in
    setting 1. With ``gt_exclusion=liver_spleen`` the groups are those of supervoxel
    training and every group trains on the GT organs minus liver and spleen.
    """
    if exclusion not in EXCLUSION_MODES:
        raise ConfigError(f"protocol.exclusion={exclusion!r} is unknown", hint="use any or all")
    if train_labels not in TRAIN_LABELS:
        raise ConfigError(
            f"protocol.train_labels={train_labels!r} is unknown", hint="use supervoxels or gt"
        )
    if gt_exclusion not in GT_EXCLUSIONS:
        raise ConfigError(
            f"protocol.gt_exclusion={gt_exclusion!r} is unknown", hint="use per_group or liver_spleen"
        )
    if setting not in (1, 2):
        raise ConfigError(f"setting={setting!r} is unknown", hint="use setting=1 or setting=2")
    organs = tuple(test_dataset.test_organs)
    if setting == 2 and not test_dataset.setting2_groups:
        raise ConfigError(
            f"setting 2 is defined for the abdominal datasets only; {test_dataset.name} has no "
            "setting-2 organ groups",
            hint="use setting=1, or define setting2_groups for this dataset",
        )

    if setting == 2 and exclusion == "all":
        groups = [EvalGroup("all", organs, organs, "all")]
    elif setting == 2 or (train_labels == "gt" and gt_exclusion == "per_group"):
        groups = [
            EvalGroup("+".join(g), g, g if setting == 2 else (), "any" if setting == 2 else "none")
            for g in _label_groups(test_dataset)
        ]
    else:
        groups = [EvalGroup("all", organs)]

    if train_labels == "gt":
        resolved = []
        for group in groups:
            removed = SHIPPED_GT_REMOVED if gt_exclusion == "liver_spleen" else group.organs
            train_organs = tuple(o for o in train_dataset.label_map if o not in removed)
            if not train_organs:
                raise ConfigError(
                    f"train_labels=gt leaves no training organ for group {group.name}",
                    hint="use protocol.train_labels=supervoxels",
                )
            resolved.append(
                EvalGroup(group.name, group.organs, group.excluded_organs, group.exclusion, train_organs)
            )
        groups = resolved
    return groups


def excluded_slices(label: np.ndarray, organ_values: list[int], mode: str) -> np.ndarray:
    """``(Z,)`` bool: training slices to drop.

    Args:
        label: ``(Z, H, W)`` label volume.
        organ_values: label values of the excluded organs.
        mode: ``"none"``; ``"any"`` — slices showing any of the organs; ``"all"`` — slices
            showing every one of them at once (the legacy bitwise-and form).
    """
    if mode == "none" or not organ_values:
        return np.zeros(label.shape[0], dtype=bool)
    flat = label.reshape(label.shape[0], -1)
    present = np.stack([(flat == v).any(axis=1) for v in organ_values], axis=1)
    if mode == "any":
        return present.any(axis=1)
    if mode == "all":
        return present.all(axis=1)
    raise ConfigError(f"unknown exclusion mode {mode!r}", hint="use any or all")
