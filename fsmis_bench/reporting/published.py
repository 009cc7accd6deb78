"""The published numbers the report compares runs with, and what to say where they differ.

The SD-FSMIS paper's tables as shipped with the package, which published row is the
counterpart of which measured run, the caveats a comparison carries (the legacy setting-2
exclusion, random weights, non-standard options, a printed mean that is not its organs'
average), and the departures of a run from its method's ``published_config``. Kept apart
from :mod:`.collect` (reading the run records) since none of it reads a record; it builds
only on :mod:`.rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

from .. import records
from .rows import N_FOLDS, _lookup

# -- published numbers -------------------------------------------------------------------

PUBLISHED_CITATION = 'Li et al., "SD-FSMIS: Adapting Stable Diffusion for Few-Shot Medical Image Segmentation", arXiv 2604.03134'


def load_published() -> pd.DataFrame:
    """The SD-FSMIS paper's Tables 1-4 as shipped with the package.

    Columns: table (int), method, venue, setting (int), train_on, test_on, backbone
    (``""`` or e.g. ``SD-1.5``), organ (incl. ``mean``), dice (percent).
    """
    source = resources.files("fsmis_bench") / "published" / "published_results.csv"
    with source.open("r", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, dtype={"backbone": str, "venue": str})
    frame["backbone"] = frame["backbone"].fillna("").astype(str)
    frame["venue"] = frame["venue"].fillna("").astype(str)
    frame["table"] = frame["table"].astype(int)
    frame["setting"] = frame["setting"].astype(int)
    frame["dice"] = frame["dice"].astype(float)
    return frame


def published_name(method: str) -> str | None:
    """The published-table name of a measured method (None if it has no published row),
    from the ``published_names`` its plugin registered (:class:`~fsmis_bench.plugins.Display`)."""
    from .style import method_style

    names = method_style(method).published_names
    return names[0] if names else None


def published_backbone(name: str) -> str:
    """``SD-1.5`` -> ``sd15`` (the run records' backbone names)."""
    return name.lower().replace("-", "").replace(".", "") if name else "none"


@lru_cache(maxsize=1)
def reported_backbones() -> frozenset[str]:
    """The backbones the shipped published tables name (``sd15``, ``sd21``), read once."""
    return frozenset(published_backbone(b) for b in load_published()["backbone"] if b)


def published_row_applies(method: str, run_backbone: str, row_backbone: str) -> bool:
    """Whether a published row of ``method`` on ``row_backbone`` (the CSV's text, empty for
    the paper's default configuration) is the counterpart of a run on ``run_backbone``.

    A row naming a backbone is the counterpart of runs on that backbone only. A default row
    is the counterpart of runs on the method's default backbone (``Display.published_backbone``;
    any backbone where the plugin names none) and of stand-ins the paper never ran (the
    ``tiny`` CPU backbone), but not of runs on another backbone the paper reports: an SD-2.1
    run is not compared with the paper's SD-1.5 numbers.
    """
    from .style import method_style

    if row_backbone:
        return published_backbone(row_backbone) == run_backbone
    default = method_style(method).published_backbone
    if not default or run_backbone == default:
        return True
    return run_backbone not in reported_backbones()


#: why a setting-2 run is not like-for-like with the published setting-2 numbers
#: (PROTOCOL.md §4): they were made with the legacy exclusion, runs default to ``any``
LEGACY_EXCLUSION_NOTE = ("the published setting-2 numbers were made with the legacy exclusion (training drops only "
                         "slices that show all four test organs at once), which leaves most test-organ slices in "
                         "training; runs use the stricter exclusion=any unless marked [exclusion=all]")


EXCLUSION_CAVEAT = "published: legacy exclusion (all four organs); this run: exclusion=any (stricter)"

#: the non-standard option that is the published setting-2 numbers' own rule
LEGACY_EXCLUSION_OPTION = "exclusion=all"

#: what a footnote says of a run whose only non-standard option is :data:`LEGACY_EXCLUSION_OPTION`:
#: not the benchmark's standard protocol, but the rule of the published setting-2 numbers, so
#: the generic "not comparable with published numbers" would say the opposite of the truth
EXCLUSION_ALL_NOTE = ("[exclusion=all]: the legacy setting-2 exclusion (training drops only slices that show all "
                      "four test organs at once), not the benchmark's standard, stricter exclusion=any, but the "
                      "rule the published setting-2 numbers used, so comparable with them")


def only_legacy_exclusion(options: str) -> bool:
    """Whether ``options`` (``;``-joined non-standard options) are exclusion=all alone."""
    return [o for o in options.split(";") if o] == [LEGACY_EXCLUSION_OPTION]


def exclusion_caveat(setting: int, options: str) -> str:
    """``LEGACY_EXCLUSION_NOTE``'s short form for a run of ``setting`` whose non-standard
    options are ``options`` (``;``-joined), or ``""`` where the exclusions agree."""
    if int(setting) != 2 or "exclusion=all" in options.split(";"):
        return ""
    return EXCLUSION_CAVEAT


#: short forms of :data:`~.rows.RANDOM_WEIGHTS_NOTES` for a caveat cell (``; ``-joined, so none
#: holds a ``;``)
RANDOM_WEIGHTS_CAVEATS: dict[str, str] = {
    "tiny": "random weights: the tiny CPU backbone trained from scratch, not the pretrained SD architecture",
    "pretrained=false": "random weights (pretrained=false)",
    "missing": "random weights: the pretrained weights were not found",
}


#: how far (Dice %) a printed mean may lie from the average of the printed organ values,
#: which are rounded to two decimals themselves
_PRINTED_ROUNDING = 0.011
#: the words of :func:`printed_mean_note` that a caption looks for
PRINTED_MEAN_NOTE = "is not the average of the published organ values"


def printed_mean_note(mean: float, organs: Sequence[float]) -> str:
    """A caveat where a paper's printed mean is not the average of its printed organ values
    ('' otherwise, or with fewer than two organs). A measured mean is the organ average, so
    its difference from such a printed mean is partly the paper's own arithmetic (e.g. PANet
    on Abd-CT in SD-FSMIS Table 1: 32.86 printed, 31.86 the average of its four organs)."""
    if len(organs) < 2:
        return ""
    average = sum(organs) / len(organs)
    if abs(average - mean) <= _PRINTED_ROUNDING:
        return ""
    return f"the published mean {mean:.2f} {PRINTED_MEAN_NOTE} ({average:.2f}), as printed in the paper"


def comparison_caveat(method: str, setting: int, options: str, random_reasons: str = "",
                      n_folds: int | None = None, of_folds: int = N_FOLDS) -> str:
    """Why a run of ``method`` is not like-for-like with its published number, ``; ``-joined,
    ``""`` where it is: what the figures' footnotes mark, so that the CSV a caption points to
    says it too.

    Args:
        options: the run's non-standard options (``;``-joined): a reduced budget
            (``train.steps=30``) or a protocol option; ``exclusion=all`` is left out (it is
            the published setting-2 exclusion, see :func:`exclusion_caveat`).
        random_reasons: why it has random weights (:func:`~.rows.random_weights_reason`, ``;``-joined).
        n_folds: folds behind the value; fewer than ``of_folds`` are said.
        of_folds: the folds of the evaluated dataset (:func:`~.collect.dataset_fold_count`).
    Returns:
        the method's own caveat (``Display.published_caveat``), random weights, the
        non-standard options, missing folds and :func:`exclusion_caveat`.
    """
    from .style import method_style

    reasons = [r for r in random_reasons.split(";") if r]
    departures = [o for o in options.split(";") if o and o != "exclusion=all"]
    parts = [
        method_style(method).published_caveat,
        *(RANDOM_WEIGHTS_CAVEATS.get(r, "random weights") for r in reasons),
        "non-standard: " + ", ".join(departures) if departures else "",
        f"{n_folds} of {of_folds} folds" if n_folds is not None and n_folds < of_folds else "",
        exclusion_caveat(setting, options),
    ]
    return "; ".join(dict.fromkeys(p for p in parts if p))

@lru_cache(maxsize=None)
def shipped_published_config(method: str) -> tuple[tuple[str, Any], ...]:
    """The ``published_config`` of ``method`` as this installation ships it; for a trainable
    method without one, ``(("train.steps", its shipped budget),)``; empty if neither.

    Used for records that do not hold one (written before the method had one, or of a method
    without published numbers), so that a reduced-budget run is marked in reports whenever
    it ran (:func:`fsmis_bench.records.published_config_deviations`).
    """
    try:
        from omegaconf import OmegaConf

        from ..config import compose

        cfg = compose([f"method={method}"], resolve_datasets=False)
    except Exception:  # noqa: BLE001 - an uninstalled plugin or a broken config: nothing to compare
        return ()
    published = cfg.method.get("published_config")
    if published:
        return tuple(OmegaConf.to_container(published).items())  # type: ignore[union-attr]
    # a trainable method without published numbers: its shipped budget is the reference
    steps = records.shipped_train_steps(method) if records._trains(cfg) else None
    return (("train.steps", steps),) if steps is not None else ()


def checkpoint_steps(meta: dict[str, Any]) -> int | None:
    """The training steps of the weights an ``eval checkpoint=`` record evaluated
    (``inputs.checkpoint``: a file's ``step``, or every group's alike); None when unknown."""
    checkpoint = (meta.get("inputs") or {}).get("checkpoint")
    if not isinstance(checkpoint, dict):
        return None
    groups = checkpoint.get("groups")
    found = ({g.get("step") for g in groups.values() if isinstance(g, dict)} if isinstance(groups, dict)
             else {checkpoint.get("step")})
    step = found.pop() if len(found) == 1 else None
    return int(step) if isinstance(step, int) and not isinstance(step, bool) else None


def judged_reference(method: str, config: dict[str, Any], meta: dict[str, Any]) -> list[tuple[str, Any]]:
    """What a record's marks are judged against: the ``published_config`` its config holds,
    else the ``reference_config`` its ``run.json`` recorded (a method's own budget, as it was
    when the run was made), else what ships now (:func:`shipped_published_config`)."""
    recorded = config["method"].get("published_config") if isinstance(config.get("method"), dict) else None
    if isinstance(recorded, dict) and recorded:
        return list(recorded.items())
    if isinstance(meta.get("reference_config"), dict):
        return list(meta["reference_config"].items())
    return list(shipped_published_config(method))


def published_deviations(method: str, config: dict[str, Any] | None, meta: dict[str, Any] | None = None) -> list[str]:
    """``key=value`` for every key of the record's reference configuration
    (:func:`judged_reference`) that the run changed.

    The same marks as :func:`fsmis_bench.records.published_config_deviations` writes into
    new records, recomputed from the run's ``config.yaml``; keys the config lacks are not
    judged. An ``eval checkpoint=`` record's ``train.steps`` are its weights' own
    (:func:`checkpoint_steps`; not judged where unknown): its config's trained nothing.
    """
    if not config or not isinstance(config.get("method"), dict):
        return []  # not a resolved run config (a hand-written or synthetic record)
    meta = meta or {}
    external = meta.get("weights_from") == "external_checkpoint"
    weights_steps = checkpoint_steps(meta) if external else None

    def lookup(key: str) -> tuple[bool, Any]:
        if external and key == "train.steps":
            return weights_steps is not None, weights_steps
        return _lookup(config, key)

    return records.published_marks(judged_reference(method, config, meta), lookup)


__all__ = [
    "PUBLISHED_CITATION", "load_published", "published_name", "published_backbone", "reported_backbones",
    "published_row_applies", "LEGACY_EXCLUSION_NOTE", "EXCLUSION_CAVEAT", "LEGACY_EXCLUSION_OPTION",
    "EXCLUSION_ALL_NOTE", "only_legacy_exclusion", "exclusion_caveat", "RANDOM_WEIGHTS_CAVEATS",
    "PRINTED_MEAN_NOTE", "printed_mean_note", "comparison_caveat", "shipped_published_config",
    "published_deviations", "judged_reference", "checkpoint_steps",
]
