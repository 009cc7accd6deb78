"""Row identity: what tells apart the runs that one table row may average.

A run's variant key (backbone, random weights, fidelity, non-standard options), its
configuration fingerprint (from its ``config.yaml``), and the splits that give runs of one
method differing in configuration, data, weights or plugin release their own rows; then the
rule that keeps one run of each fold and seed where a run was repeated. Kept apart from
:mod:`.collect` (which reads and checks the records and computes the frames) so that what
makes a row can be read, and used, without the record reading; it imports nothing from
:mod:`.collect` or :mod:`.published`, which both build on it. For that reason it also
holds the two constants that the record reading shares with it and with the published
comparison: :data:`N_FOLDS` and :data:`DICE_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .. import records

#: folds of the built-in datasets in the EP1 protocol (PROTOCOL.md §2), and of any dataset
#: whose record does not say how many it has (:func:`~.collect.dataset_fold_count`)
N_FOLDS = 5

#: Dice in cases.csv must equal 2tp / (2tp + fp + fn) to this tolerance
DICE_TOLERANCE = 1e-6


def variant_key(meta: dict) -> str:
    """What distinguishes runs of one method that must never be averaged together.

    Backbone (when the method has one), random weights, fidelity other than the paper text,
    and every non-standard protocol option, joined with ``,`` (empty for a standard run of a
    method without a backbone). Runs that differ in any other setting (training steps, lr,
    ...) are told apart afterwards by their configuration fingerprint
    (:func:`_split_by_config`), and runs on other data by their data identity.
    """
    parts: list[str] = []
    backbone = str(meta.get("backbone") or "none")
    if backbone != "none":
        parts.append(backbone)
    fidelity = meta.get("fidelity")
    if fidelity not in (None, "", "paper"):
        parts.append(f"fidelity={fidelity}")
    flags = set(str(x) for x in (meta.get("non_standard") or []))
    if is_random(meta):
        flags.add("random_weights")
    parts.extend(sorted(flags))
    return ",".join(parts)


def is_random(meta: dict) -> bool:
    """Whether a run's weights were random: its record's ``random_weights`` (what the method's
    ``uses_random_weights()`` said) where the record has it, so that ``pretrained=false`` on a
    method without pretrained weights (``prototype``, a plugin) is not random weights; a
    record written before that field by ``pretrained: false``."""
    if meta.get("random_weights") is not None:
        return bool(meta["random_weights"])
    return meta.get("pretrained") is False


def non_standard_options(meta: dict) -> list[str]:
    """Protocol options other than the default, without the random-weights flag."""
    return sorted(str(x) for x in (meta.get("non_standard") or []) if str(x) != "random_weights")


def random_weights_reason(backbone: str, pretrained: bool, random_weights: bool) -> str:
    """Why a run has random weights, in the words of the report's notes ('' if it has none).

    ``tiny``: the CPU backbone, a small U-Net that is always trained from scratch (no
    pretrained weights exist for it); ``pretrained=false``: the pretrained architectures built
    with random weights on request; ``missing``: pretrained weights were expected but not
    found, so the method fell back to random ones.
    """
    if not random_weights:
        return ""
    if backbone == "tiny":
        return "tiny"
    if not pretrained:
        return "pretrained=false"
    return "missing"


#: what a random-weights footnote or legend says, per :func:`random_weights_reason`
RANDOM_WEIGHTS_NOTES: dict[str, str] = {
    "tiny": "trained from scratch: the tiny CPU backbone (a small U-Net with random initial weights, "
            "not the pretrained SD architecture; no pretrained weights exist for it)",
    "pretrained=false": "random weights (pretrained=false): the pretrained architecture, randomly initialised",
    "missing": "random weights: the pretrained weights were not found, so the architecture was randomly initialised",
}


def random_weights_note(reason: str) -> str:
    """The footnote text for one reason (:data:`RANDOM_WEIGHTS_NOTES`; a generic one otherwise)."""
    return RANDOM_WEIGHTS_NOTES.get(reason, "random weights: not initialised from pretrained weights")


# -- a run's configuration ---------------------------------------------------------------

#: config keys left out of a run's configuration fingerprint: what identifies the
#: evaluation (its own columns: fold, seed, setting, the datasets; data on disk is compared
#: through the data identity instead), options that never change a number (paths, device,
#: logging and checkpoint cadence, saving predictions, ``records._UNHASHED``) and the
#: published-config annotation (it marks runs, it is not a setting)
FINGERPRINT_LEFT_OUT: tuple[str, ...] = (
    "fold", "seed", "setting", "dataset", "test_dataset", "protocol.test_dataset",
    "protocol.save_predictions", "train.log_every", "train.checkpoint_every", "method.published_config",
    *records._UNHASHED,
)
#: at most this many differing keys name a split row (``train.steps=60,method.lr=0.01``);
#: configurations that differ in more are named by their fingerprint (``config=1a2b3c4d``)
MAX_LABEL_KEYS = 3


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` as plain nested dicts (None if missing or unreadable)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged config only loses the fingerprint
        return None
    return data if isinstance(data, dict) else None


def _lookup(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in nested dicts."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 60}}`` -> ``{"train.steps": 60}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_fingerprint(config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The identity of a run's training and method settings, beyond its variant key.

    Args:
        config: the run's resolved ``config.yaml`` (:func:`read_config`); None if unknown.
    Returns:
        (8 hex digits, or '' when the config is unknown; the flattened settings it covers:
        dotted key -> value, null values left out). Two runs with the same fingerprint were
        configured alike in everything that can change their numbers, apart from fold, seed
        and data; an option set to null and one a record lacks (made before the option
        existed) count as the same, unset.
    """
    if config is None:
        return "", {}
    data = json.loads(json.dumps(config, default=str))  # a deep copy with plain values
    for key in FINGERPRINT_LEFT_OUT:
        records._drop(data, key)
    # switches added after records existed count only where they differ from the default
    for key, default in records._HASHED_UNLESS_DEFAULT.items():
        found, value = _lookup(data, key)
        if found and value == default:
            records._drop(data, key)
    _resolve_late_options(config, data)
    _resolve_null_options(config, data)
    # a null option the method does not resolve means "the method's default", which is also
    # what a record made before the option existed ran with: both count as unset
    flat = {key: value for key, value in _flatten(data).items() if value is not None}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]
    return digest, flat


def _resolve_late_options(config: dict[str, Any], data: dict[str, Any]) -> None:
    """Put a method's late options (:attr:`fsmis_bench.method.Method.late_options`) into
    ``data`` as they acted: a record made before an option existed ran with its earlier
    value, a null one with what it resolves to (e.g. from ``fidelity``). Else a record of
    the earlier form and a run of today's default would count as one configuration, and be
    averaged into one row."""
    from omegaconf import OmegaConf

    method = config.get("method")
    if not isinstance(method, dict) or not isinstance(data.get("method"), dict):
        return
    run_config = OmegaConf.create(config)
    method_cls = records.method_class(run_config)
    if method_cls is None or not method_cls.late_options:
        return
    try:
        resolved = method_cls.late_option_values(run_config)
    except Exception:  # noqa: BLE001 - a config of an older layout: left as it is
        return
    for name, earlier in method_cls.late_options.items():
        data["method"][name] = resolved[name] if name in method else earlier


def _resolve_null_options(config: dict[str, Any], data: dict[str, Any]) -> None:
    """Put the method options that are ``null`` (or that a record made before them lacks) into
    ``data`` as the method resolves them (:meth:`fsmis_bench.method.Method.option_values`,
    e.g. SD-FSMIS's threshold from ``fidelity``): a run of ``method.threshold=null`` and one of
    the value it stands for are one configuration, and a row is named by the value
    (``method.threshold=absolute``), not by ``default``. Options left out of the fingerprint
    and the late ones (:func:`_resolve_late_options`) are not touched."""
    from omegaconf import OmegaConf

    method = data.get("method")
    if not isinstance(config.get("method"), dict) or not isinstance(method, dict):
        return
    run_config = OmegaConf.create(config)
    method_cls = records.method_class(run_config)
    if method_cls is None:
        return
    try:
        resolved = method_cls.option_values(run_config)
    except Exception:  # noqa: BLE001 - a config of an older layout: left as it is
        return
    kept_out = {key.split(".", 1)[1] for key in (*FINGERPRINT_LEFT_OUT, *records._HASHED_UNLESS_DEFAULT)
                if key.startswith("method.")}
    for name, value in resolved.items():
        if name not in kept_out and name not in method_cls.late_options and method.get(name) is None:
            method[name] = value


def _label_value(value: Any) -> str:
    """A config value as shown in a row label (no ``,``: it separates the variant's parts)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_label_value(v) for v in value)
    return str(value).replace(",", "+")


def row_label(method: str, variant: str) -> str:
    return method if not variant else f"{method} [{variant}]"

def _split_variants(runs: pd.DataFrame, column: str, tags_of) -> pd.DataFrame:
    """Within each row of a table (method, variant, evaluation, setting) whose runs take
    several values of ``column``, append ``tags_of(group)[index]`` to each run's variant."""
    if runs.empty:
        return runs
    runs = runs.copy()
    for _, group in runs.groupby(["method", "variant", "train_dataset", "dataset", "setting"], sort=False):
        if group[column].nunique() < 2:
            continue
        for index, tag in tags_of(group).items():
            variant = runs.at[index, "variant"]
            runs.at[index, "variant"] = f"{variant},{tag}" if variant else tag
    return runs


def _absent_label(name: str) -> str:
    """The label of a setting a run's fingerprint lacks: a switch added after records existed
    is left out at its default (:func:`config_fingerprint`), which is what the run had; any
    other option was null (the method's own default, where the method does not resolve it:
    :meth:`~fsmis_bench.method.Method.option_values`) or unknown to the record (made before
    the option existed: the default of that time)."""
    if name in records._HASHED_UNLESS_DEFAULT:
        return _label_value(records._HASHED_UNLESS_DEFAULT[name])
    return "default"


def _split_by_config(runs: pd.DataFrame, settings: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """Runs of one method/variant configured differently get different variants.

    Where one (method, variant) has runs of several configuration fingerprints
    (:func:`config_fingerprint`: e.g. 40 training steps on folds 0-1 and 60 on fold 2) in one
    evaluation, they would otherwise be averaged into one row, or one would silently
    supersede the other. Then every run of that method/variant, in every evaluation, gets the
    settings that differ between its configurations as its variant tag (``train.steps=60``),
    so that one configuration has one name and one style across the whole report, also in an
    evaluation where it ran alone. With more than :data:`MAX_LABEL_KEYS` differing keys the
    tag is ``config=<fingerprint>``, and a note lists what each such fingerprint sets;
    ``config=unknown`` for records without a ``config.yaml``.

    Args:
        settings: run folder -> its flattened settings (the second value of
            :func:`config_fingerprint`).
    Returns:
        (the runs with split variants, the notes naming the settings behind fingerprints).
    """
    if runs.empty:
        return runs, []
    runs = runs.copy()
    notes: list[str] = []
    evaluation = ["train_dataset", "dataset", "setting"]
    for (method, variant), group in runs.groupby(["method", "variant"], sort=False):
        if not (group.groupby(evaluation, sort=False)["config_id"].nunique() > 1).any():
            continue
        known = {cid: settings.get(path, {}) for cid, path in zip(group["config_id"], group["run_dir"]) if cid}
        missing = object()  # a key one config has and another lacks differs too
        names = sorted({name for flat in known.values() for name in flat})
        differing = [name for name in names
                     if len({json.dumps(flat.get(name, missing), default=repr, sort_keys=True) for flat in known.values()}) > 1]

        def setting_text(flat: dict[str, Any], name: str) -> str:
            return f"{name}={_label_value(flat[name]) if name in flat else _absent_label(name)}"

        named_by_settings = bool(differing) and len(differing) <= MAX_LABEL_KEYS
        for index, cid in group["config_id"].items():
            if not cid:
                tag = "config=unknown"
            elif named_by_settings:
                tag = ",".join(setting_text(known[cid], name) for name in differing)
            else:
                tag = f"config={cid}"
            runs.at[index, "variant"] = f"{variant},{tag}" if variant else tag
        if not named_by_settings:
            for cid in sorted(known):
                # without `differing`, the other configuration is that of records with no config.yaml
                notes.append(f"{row_label(method, variant)} [config={cid}]: "
                             + (", ".join(setting_text(known[cid], name) for name in differing) if differing
                                else "differs from the config=unknown runs, which have no config.yaml to say how"))
    return runs, notes


def _split_by_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation on different data get different variants.

    The data identity (``run.json`` ``inputs``: the training and test data's identity) is
    normally the same for every run of a dataset; where it is not (two ``nifti_folder``
    runs on different folders, supervoxels regenerated between folds), averaging or
    superseding across them would mix data silently, so each gets ``data=<hash8>``
    (``data=unknown`` for records from before identities were recorded).
    """
    return _split_variants(runs, "data_id",
                           lambda group: {i: f"data={d or 'unknown'}" for i, d in group["data_id"].items()})


def _split_by_weights(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation that loaded different pretrained weights get
    different variants, ``weights=<hash8>`` (``weights=unknown`` for records from before
    weights were recorded): the same hub id or path can hold other files on another machine
    or after an update, and averaging across them would mix two models silently."""
    return _split_variants(runs, "weights_id",
                           lambda group: {i: f"weights={w or 'unknown'}" for i, w in group["weights_id"].items()})


def plugin_release(meta: dict[str, Any]) -> str:
    """``<distribution>-<version>`` of the third-party package whose plugin registered a
    record's method (``run.json`` ``registered_by``), ``""`` for fsmis-bench's own methods
    and records that do not say; ``"<distribution>-0.2.0 (weights 0.1.0)"`` where the run
    evaluated weights that another release trained (``weights_trained_by``). A plugin's release is not part of a run's hash, so two
    releases' runs of one configuration would otherwise be averaged into one row."""
    entry = (meta.get("registered_by") or {}).get("method") or {}
    distribution = entry.get("distribution") if isinstance(entry, dict) else None
    if not distribution or distribution == "fsmis-bench":
        return ""
    release = f"{distribution}-{entry.get('version') or 'unknown'}"
    # weights reused from a sibling training made by another release: both releases count
    trainers = {str((t.get("registered_by") or {}).get("version") or "unknown")
                for t in (meta.get("weights_trained_by") or {}).values() if isinstance(t, dict)}
    trained = sorted(trainers - {str(entry.get("version") or "unknown")})
    return release + (f" (weights {', '.join(trained)})" if trained else "")


def _split_by_plugin_release(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation computed by different releases of the plugin
    that registered the method get different variants, ``code=<distribution>-<version>``:
    a new release may compute other numbers for the same configuration."""
    return _split_variants(runs, "code_id",
                           lambda group: {i: f"code={c or 'unknown'}" for i, c in group["code_id"].items()})


def _dice_differ_text(mean_dice: dict[str, float], dropped: str, kept: str, threads_differ: bool = False) -> str:
    """``; their Dice differ (...)`` when two runs that should be identical are not, else ``""``.

    Args:
        threads_differ: the two recorded different CPU thread counts, which explains
            differing last digits (a CPU's float sums depend on how many threads share them).
    """
    a, b = mean_dice.get(dropped), mean_dice.get(kept)
    if a is None or b is None or abs(a - b) <= DICE_TOLERANCE:
        return ""
    why = ("as expected from their CPU thread counts (a CPU's float sums depend on how many threads share them)"
           if threads_differ else "the same configuration gave other numbers (nondeterminism, or a record edited by hand)")
    return f"; their Dice differ (mean over cases.csv {a:.4f} superseded, {b:.4f} kept): {why}"


def _threads_text(threads: object) -> str:
    """``2 CPU threads``, ``1 CPU thread``; ``no CPU thread count`` where none was recorded."""
    if threads is None or pd.isna(threads):
        return "no CPU thread count"
    return f"{int(threads)} CPU thread{'s' if int(threads) != 1 else ''}"


def _superseded_note(path: str, kept: str, threads: tuple[object, object], mean_dice: dict[str, float]) -> str:
    """The note on one superseded record; says so where the two differ in CPU thread count
    (which the identity of a superseding run leaves out on purpose, see :func:`_drop_superseded`)."""
    dropped_threads, kept_threads = threads
    if _threads_text(dropped_threads) != _threads_text(kept_threads):
        return (f"superseded by a later run with the same method, variant, configuration, data, weights, plugin release, "
                f"fold and seed that differs only in its CPU thread count: {path} ({_threads_text(dropped_threads)}, "
                f"not counted; kept {kept}, {_threads_text(kept_threads)})"
                + _dice_differ_text(mean_dice, path, kept, threads_differ=True))
    return (f"superseded by a later run with the same method, variant, configuration, data, weights, plugin release, "
            f"fold and seed: {path} (kept {kept})" + _dice_differ_text(mean_dice, path, kept))


def _drop_superseded(runs: pd.DataFrame, mean_dice: dict[str, float] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Keep one run per (method, variant, evaluation, fold, seed, configuration, data,
    weights): the latest finished.

    Only runs configured identically (same :func:`config_fingerprint`) on identical data
    and weights (same data and weights identities) supersede each other: they differ in
    nothing that changes a number (e.g. ``train.log_every``, the folder the weights were
    read from) and counting both would weigh that fold twice. Runs configured differently
    are never dropped; :func:`_split_by_config` has made them separate rows.

    The CPU thread count (``inputs.cpu_threads``) is part of a run's record identity but not
    of this one: it changes only a CPU run's rounding (last digits), not what was computed,
    so two runs of one fold and seed that differ in it are the same measurement twice, and
    counting both would weigh that fold twice. The later is kept and the note says that the
    thread count is the difference (:func:`~.collect.mixed_thread_notes` says where a row's folds
    used different counts).

    Args:
        mean_dice: run folder -> its mean Dice over ``cases.csv``; the note says when a
            superseded run's differs from the kept one's (they should be equal).
    """
    if runs.empty:
        return runs, []
    mean_dice = mean_dice or {}
    identity = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "seed", "config_id", "data_id",
                "weights_id", "code_id"]
    ordered = runs.sort_values(["finished_at", "run_dir"])
    duplicated = ordered.duplicated(identity, keep="last")
    kept = ordered[~ordered.duplicated(identity, keep="last")].set_index(identity)["run_dir"]
    threads = dict(zip(ordered["run_dir"], ordered["cpu_threads"])) if "cpu_threads" in ordered else {}
    notes = []
    for path, row in zip(ordered.loc[duplicated, "run_dir"], ordered.loc[duplicated, identity].itertuples(index=False)):
        keeper = kept.loc[tuple(row)]
        notes.append(_superseded_note(path, keeper, (threads.get(path), threads.get(keeper)), mean_dice))
    return ordered[~duplicated].sort_index().reset_index(drop=True), notes

__all__ = [
    "N_FOLDS", "DICE_TOLERANCE", "variant_key", "is_random", "non_standard_options", "random_weights_reason",
    "RANDOM_WEIGHTS_NOTES", "random_weights_note", "FINGERPRINT_LEFT_OUT", "MAX_LABEL_KEYS", "read_config",
    "config_fingerprint", "row_label", "plugin_release",
]
