"""Run records: one directory per run, plain JSON/CSV/NPZ artefacts.

``<results_dir>/<method>/<dataset>/setting<k>/fold<f>/seed<s>-<hash8>/`` where
``<dataset>`` is the test dataset (``<train>_to_<test>`` for cross-domain runs) and
``<hash8>`` the start of the run's hash: the resolved config plus its *inputs* (the
identity of the training and test data, of the pretrained weights, and the content hash
of an external checkpoint). A run with a different config or different inputs gets a
different directory, so nothing is ever overwritten; an identical finished run is found
and not recomputed.

Record files are written through a temporary file and a rename, with the permissions the
umask gives; a failed write (read-only folder, full disk) removes its temporary file and
raises :class:`RecordWriteError` naming the folder and the cause.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import inspect
import platform
import subprocess
import tempfile
import zipfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .errors import DataError, FsmisError, UnknownNameError
from .training.precision import with_resolved_precision

CASE_COLUMNS = [
    "method", "dataset", "train_dataset", "setting", "fold", "seed", "organ", "case_id",
    "dice", "tp", "fp", "fn",
]
COMPLETE = "COMPLETE"

# Config keys that do not change what a run computes, so they stay out of its hash.
# train.cuda_graph replays the eager step's kernels: on an H100 in TF32 its losses differ
# from the eager ones no more than two eager runs differ from each other (docs/measurements/
# gpu_engine_graph2_h100.json; with bf16, recorded vs eager 2.8 % and eager vs eager 6.0 %:
# gpu_speed_bf16_drift_h100.json); run.json records which step trained (`training_step`).
# method.predict_cuda_graph replays the plain inference's kernels in the same way (the short
# last chunk padded to a full one); the method's options in run.json record it.
_UNHASHED = ("results_dir", "data_root", "weights_root", "device", "train.num_workers", "train.cuda_graph",
             "method.predict_cuda_graph", "train.async_checkpoint")
# Keys added after records existed, hashed only where they differ from the value that every
# earlier run had, so that a new switch left at its default keeps earlier records and
# checkpoints found (their hashes stay the same). method.joint_pass gives the two-pass loss
# and method.batched_encode the four encodes' latents up to float rounding (train.fused_clip
# the clipped update; train.cudnn_benchmark other convolution algorithms), but a training is
# only reproduced bit for bit by the same kernels.
# protocol.episode_sampler's earlier rule is `uniform_pairs`: records made before the key
# existed are found again under it, and a run of today's default gets a hash of its own.
# Likewise protocol.episode_runs's earlier form is `sorted` (it only applies to the
# `reference` sampler, and is left out of the hash under `uniform_pairs`).
_HASHED_UNLESS_DEFAULT = {"train.compile_scope": "model", "method.joint_pass": False, "method.batched_encode": False,
                          "train.fused_clip": False, "train.cudnn_benchmark": False,
                          "protocol.episode_sampler": "uniform_pairs", "protocol.chunk_support": "matched",
                          "protocol.episode_runs": "sorted"}
# The checkpoint and logging cadence change no number (a resumed run is exact, and the loss
# is read, not altered, at a logging step), so they stay out of the hash: a run resumed with
# another `train.checkpoint_every` is the same run. Records made before 2026-11-28 hashed them.
_CADENCE = ("train.checkpoint_every", "train.log_every")
#: How a record's hash was formed, newest first; :func:`run_dir_for` finds earlier records
#: under the form they were made with. ``current``: the cadence left out, the pretrained
#: weights by content. ``weight_layout``: the weights' file layout hashed as well (a hub
#: cache and a ``save_pretrained`` folder of the same files were two runs; records made
#: before 2026-11-28 04:00 UTC). ``cadence``: also the cadence hashed (before 2026-11-28).
#: ``weight_paths``: also the weights with the folders they were read from (before 2026-11-27).
HashForm = Literal["current", "weight_layout", "cadence", "weight_paths"]
HASH_FORMS: tuple[HashForm, ...] = ("current", "weight_layout", "cadence", "weight_paths")
# Dataset options added after records existed, per dataset, with the value every earlier run
# had: left out of the hash at that value, and wherever they change nothing. nifti_folder's
# `n_supervoxels` and `supervoxels_out` only act with `supervoxels: auto`.
_DATASET_KEYS_UNLESS_DEFAULT: dict[str, dict[str, Any]] = {
    "nifti_folder": {"n_supervoxels": 5000, "supervoxels_out": None},
}


def comparable_dataset(node: Any) -> Any:
    """A ``dataset`` (or ``test_dataset``) config as hashed and compared between runs:
    without options added later that are at their earlier value or act on nothing."""
    if not isinstance(node, dict):
        return node
    late = _DATASET_KEYS_UNLESS_DEFAULT.get(str(node.get("name")), {})
    inactive = node.get("supervoxels") != "auto"
    return {k: v for k, v in node.items() if k not in late or (v != late[k] and not inactive)}


# `method.published_config` names the settings the published numbers were obtained with; it
# only marks a run that departs from them (non_standard_options) and changes nothing a run
# computes, so it stays out of the hashes and adding it to a method keeps that method's
# records and checkpoints found. The classic methods shipped with it hashed from their first
# version, so for them the keys it held then stay hashed, or their existing records would no
# longer be found; keys added later (the methods' mechanics, 2026-11-28) are left out.
_FIRST_PUBLISHED_KEYS = ("method.encoder", "train.steps", "train.batch_size", "train.image_size", "method.lr",
                         "train.optimizer", "train.weight_decay", "train.schedule", "train.lr_gamma", "train.grad_accum")
_PUBLISHED_CONFIG_HASHED: dict[str, tuple[str, ...]] = {
    "adnet": _FIRST_PUBLISHED_KEYS,
    "qnet": ("method.encoder", "method.refine_iterations", *_FIRST_PUBLISHED_KEYS[1:]),
    "ssl_alpnet": _FIRST_PUBLISHED_KEYS,
}
# Keys that decide the trained weights; evaluation-only options are left out so that a
# re-evaluation under another protocol option reuses the checkpoint.
_TRAINING_KEYS = (
    "method", "backbone", "dataset", "setting", "fold", "seed", "pretrained", "fidelity",
    "mixed_precision", "tf32", "train", "protocol.exclusion", "protocol.train_labels", "protocol.gt_exclusion",
    "protocol.min_fg_pixels", "protocol.episode_sampler", "protocol.episode_runs", "protocol.test_dataset",
)


def _plain(cfg: DictConfig) -> dict[str, Any]:
    # `auto` precision is hashed as what it resolves to on this machine (training/precision.py)
    return OmegaConf.to_container(with_resolved_precision(cfg), resolve=True)  # type: ignore[return-value]


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _drop(data: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(data.get(head), dict):
        _drop(data[head], rest)
    elif not rest:
        data.pop(head, None)


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _hashed_inputs(inputs: dict[str, Any], form: HashForm = "current") -> dict[str, Any]:
    """The inputs as hashed: an external checkpoint and the pretrained weights count by
    content, not by where they were read from (form ``weight_paths``: the weights with
    their paths, as records made before 2026-11-27 hashed them; see :func:`weights_content`)."""
    hashed = dict(inputs)
    checkpoint = hashed.get("checkpoint")
    if checkpoint:
        hashed["checkpoint"] = {"sha256": checkpoint["sha256"]}
    if form != "weight_paths" and "weights" in hashed:
        hashed["weights"] = weights_content(hashed["weights"], with_layout=form != "current")
    return hashed


def weights_content(weights: Any, with_layout: bool = False) -> Any:
    """A record's ``inputs.weights`` without where and how each component was stored: the
    same files in another folder (another node of a cluster, a moved cache) or in another
    layout (a hub cache, a ``save_pretrained`` folder) are the same weights, the same run and
    the same training. ``with_layout``: keep the layout, as hashes made before 2026-11-28
    04:00 UTC did."""
    if not isinstance(weights, dict):
        return weights
    dropped = _WEIGHT_LOCATION_KEYS if not with_layout else tuple(k for k in _WEIGHT_LOCATION_KEYS if k != "layout")
    return {name: {k: v for k, v in component.items() if k not in dropped}
            if isinstance(component, dict) else component for name, component in weights.items()}


def method_class(cfg: DictConfig) -> Any:
    """The method plugin class ``cfg`` names; None for a method not installed here."""
    from .plugins import registries  # late: the registry imports the method plugins

    try:
        return registries().methods.get(str(cfg.method.name))
    except UnknownNameError:
        return None


def inference_options(cfg: DictConfig) -> tuple[str, ...]:
    """The ``cfg.method`` options read only when predicting
    (:attr:`fsmis_bench.method.Method.inference_options`); those of the base class for a
    method not installed here."""
    from .method import Method

    method_cls = method_class(cfg)
    return tuple((method_cls or Method).inference_options)


def _late_method_options(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(earlier values, resolved values)`` of the method's late options
    (:attr:`fsmis_bench.method.Method.late_options`); empty for an unknown method."""
    method_cls = method_class(cfg)
    if method_cls is None:  # a method that is not installed here: nothing to resolve
        return {}, {}
    if not method_cls.late_options:
        return {}, {}
    return dict(method_cls.late_options), method_cls.late_option_values(cfg)


def _hashed_config(cfg: DictConfig, form: HashForm = "current") -> dict[str, Any]:
    if form not in HASH_FORMS:
        raise ValueError(f"unknown hash form {form!r}; known: {HASH_FORMS}")
    data = _plain(cfg)
    for key in _UNHASHED + (_CADENCE if form in ("current", "weight_layout") else ()):
        _drop(data, key)
    method = data.get("method")
    if isinstance(method, dict) and method.get("name") not in _PUBLISHED_CONFIG_HASHED:
        _drop(data, "method.published_config")
    elif isinstance(method, dict) and isinstance(method.get("published_config"), dict):
        first = _PUBLISHED_CONFIG_HASHED[str(method["name"])]
        method["published_config"] = {k: v for k, v in method["published_config"].items() if k in first}
    if _pick(data, "protocol.episode_sampler") in ("uniform_pairs", "same_slice"):
        _drop(data, "protocol.episode_runs")  # those rules draw pairs or slices, not runs
    for key, default in _HASHED_UNLESS_DEFAULT.items():
        if _pick(data, key) == default:
            _drop(data, key)
    for node in ("dataset", "test_dataset"):
        if isinstance(data.get(node), dict):
            data[node] = comparable_dataset(data[node])
    earlier, resolved = _late_method_options(cfg)
    for name, value in earlier.items():
        data["method"].pop(name, None)
        if resolved[name] != value:
            data["method"][name] = resolved[name]
    return data


def config_hash(cfg: DictConfig, inputs: dict[str, Any] | None = None, form: HashForm = "current") -> str:
    """SHA-256 of the resolved config without paths, device choice and cadence, plus ``inputs``.

    Args:
        inputs: the run's inputs as recorded in ``run.json`` (``train_data``,
            ``test_data``, ``weights``, ``checkpoint``); see :func:`fsmis_bench.runner.identify`.
        form: the hash as records made at an earlier time formed it (:data:`HashForm`).
    """
    data = _hashed_config(cfg, form)
    if inputs is not None:
        data["inputs"] = _hashed_inputs(inputs, form)
    return _digest(data)


def training_hash(cfg: DictConfig, inputs: dict[str, Any] | None = None, form: HashForm = "current",
                  with_inference_options: bool = False) -> str:
    """SHA-256 of only what decides the trained weights: training keys, training data,
    pretrained weights (by content; ``form``: as earlier records formed it, :data:`HashForm`).

    The method's options read only when predicting (:func:`inference_options`) are left
    out: a checkpoint serves an evaluation under another threshold or chunk size.
    ``with_inference_options``: hashed too, as records made before 2026-11-28 10:00 UTC did.
    """
    data = _hashed_config(cfg, form)
    if not with_inference_options and isinstance(data.get("method"), dict):
        for name in inference_options(cfg):
            data["method"].pop(name, None)
    picked = {key: _pick(data, key) for key in _TRAINING_KEYS}
    if inputs is not None:
        weights = inputs.get("weights")
        by_path = form == "weight_paths" or weights is None
        picked["inputs"] = {"train_data": inputs.get("train_data"),
                            "weights": weights if by_path else weights_content(weights, with_layout=form != "current")}
        if inputs.get("cpu_threads") is not None:  # CPU runs only (runner.identify)
            picked["inputs"]["cpu_threads"] = inputs["cpu_threads"]
    return _digest(picked)


#: training keys an evaluation of another run's weights compares apart (the method, its data)
#: or may change (precision: how the evaluation computes; the data tested on)
_COMPARED_APART = ("method", "dataset", "protocol.test_dataset", "mixed_precision", "tf32", "backbone",
                   "pretrained", "fidelity")


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The settings that shaped a training, as the training hash holds them, by dotted key
    (``train.steps``, ``seed``, ``protocol.episode_sampler``...), without the method, the
    datasets, the backbone, the fidelity and the precision (see :data:`_COMPARED_APART`).
    Two runs whose settings differ here trained different weights."""
    data = _hashed_config(cfg)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = value

    for key in _TRAINING_KEYS:
        if key not in _COMPARED_APART:
            walk(key, _pick(data, key))
    return flat


def data_identity_hash(info: dict[str, Any]) -> str:
    """Short hash of a record's data identity (training and test data), '' if unknown.

    Runs whose data identities differ are never merged by the report.
    """
    inputs = info.get("inputs")
    if not isinstance(inputs, dict):
        return ""
    return _digest({"train_data": inputs.get("train_data"), "test_data": inputs.get("test_data")})[:8]


#: where and how a weights component was stored: not part of what the weights are (the
#: digest, and ``ema`` for a file holding two sets, are)
_WEIGHT_LOCATION_KEYS = ("source", "location", "files", "base", "layout")


def weights_identity_hash(info: dict[str, Any]) -> str:
    """Short hash of the pretrained weights a record's run loaded, by content, '' if unknown.

    Each component counts by its digest (and any other property of the weights themselves,
    e.g. which set of a checkpoint was read), not by the path it was read from: the same
    files in another folder are the same weights. Runs whose weights differ are never
    merged by the report.
    """
    inputs = info.get("inputs")
    if not isinstance(inputs, dict) or "weights" not in inputs:
        return ""
    weights = inputs.get("weights") or {}
    if not isinstance(weights, dict):
        return ""
    return _digest(weights_content(weights))[:8]


def test_dataset_name(cfg: DictConfig) -> str:
    return str(cfg.protocol.get("test_dataset") or cfg.dataset.name)


def run_dir_for(cfg: DictConfig, inputs: dict[str, Any] | None = None, form: HashForm = "current") -> Path:
    """The record directory of the run that ``cfg`` (with ``inputs``) describes
    (``form``: where a record made under an earlier hash form lies, :data:`HashForm`)."""
    test = test_dataset_name(cfg)
    dataset = test if test == cfg.dataset.name else f"{cfg.dataset.name}_to_{test}"
    return (
        Path(str(cfg.results_dir)).expanduser()
        / str(cfg.method.name)
        / dataset
        / f"setting{cfg.setting}"
        / f"fold{cfg.fold}"
        / f"seed{cfg.seed}-{config_hash(cfg, inputs, form)[:8]}"
    )


def non_standard_options(cfg: DictConfig, random_weights: bool, checkpoint_sha256: str | None = None) -> list[str]:
    """Every deviation from the standard protocol, for report markers.

    ``checkpoint_sha256``: the weights came from an external checkpoint (``eval
    checkpoint=``), marked with its content hash so that runs of different checkpoints
    stay apart.
    """
    marks = []
    protocol = cfg.protocol
    if protocol.exclusion != "any" and int(cfg.setting) == 2:
        marks.append(f"exclusion={protocol.exclusion}")
    if protocol.dice != "per_volume":
        marks.append(f"dice={protocol.dice}")
    if protocol.train_labels != "supervoxels":
        marks.append(f"train_labels={protocol.train_labels}")
        if protocol.get("gt_exclusion", "per_group") != "per_group":
            marks.append(f"gt_exclusion={protocol.gt_exclusion}")  # test organs trained on
    if protocol.get("episode_sampler", "reference") != "reference":
        marks.append(f"episode_sampler={protocol.episode_sampler}")
    elif protocol.get("episode_runs", "sorted") != "reference":  # a record from before the key: sorted
        marks.append(f"episode_runs={protocol.get('episode_runs', 'sorted')}")
    if int(protocol.supp_idx) != 2:
        marks.append(f"supp_idx={protocol.supp_idx}")
    if int(protocol.n_part) != 3:
        marks.append(f"n_part={protocol.n_part}")
    if protocol.get("chunk_support", "matched") != "matched":
        marks.append(f"chunk_support={protocol.chunk_support}")
    if int(protocol.n_shot) != 1:
        marks.append(f"n_shot={protocol.n_shot}")
    if protocol.get("organs"):
        marks.append("organs=" + "+".join(protocol.organs))
    if protocol.get("max_queries") is not None:
        marks.append(f"max_queries={protocol.max_queries}")
    # the training episodes of every reference code (PROTOCOL.md §5), for a method that trains
    if _trains(cfg):
        if protocol.get("min_fg_pixels") is not None and int(protocol.min_fg_pixels) != 200:
            marks.append(f"min_fg_pixels={protocol.min_fg_pixels}")
        if cfg.get("train") is not None and cfg.train.get("augment") is False:
            marks.append("augment=false")
    marks += published_config_deviations(cfg)
    if random_weights:
        marks.append("random_weights")
    if checkpoint_sha256:
        marks.append(f"external_checkpoint={checkpoint_sha256[:8]}")
    return marks


def _trains(cfg: DictConfig) -> bool:
    """Whether the run's method trains (a training-free one, ``support_copy``, draws no
    episode, so their options change none of its numbers); True for an unknown method."""
    from .plugins import registries  # late: the registry imports the method plugins

    try:
        return bool(registries().methods.get(str(cfg.method.name)).needs_training)
    except (UnknownNameError, AttributeError):
        return True


def published_config_deviations(cfg: DictConfig) -> list[str]:
    """``key=value`` for every key of the method's reference configuration
    (:func:`reference_config`: ``method.published_config``, the configuration the published
    numbers were obtained with, or a trainable method's own budget) that this run changes
    (:func:`published_marks`): a reduced-budget run is never shown and ranked as the method."""
    return published_marks(reference_config(cfg).items(), lambda key: (True, OmegaConf.select(cfg, key)))


@functools.lru_cache(maxsize=None)
def shipped_train_steps(method: str) -> int | None:
    """The ``train.steps`` that ``method``'s own config file sets (``method/<name>.yaml``, or a
    method config it names in its ``defaults``): its reference budget. None where the file
    sets none (the general default, 1000, was chosen for no method) or cannot be read."""
    import yaml

    from .config import _config_file  # late: the config module reads the registries

    def steps_in(name: str, seen: frozenset[str]) -> int | None:
        path = _config_file("method", name)
        if path is None or name in seen:
            return None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            return None
        train = data.get("train") if isinstance(data, dict) else None
        steps = train.get("steps") if isinstance(train, dict) else None
        if isinstance(steps, int) and not isinstance(steps, bool):
            return steps
        inherited = [d for d in (data.get("defaults") or []) if isinstance(d, str) and d != "_self_"]
        for parent in reversed(inherited):  # the last one listed wins, as Hydra merges them
            found = steps_in(parent, seen | {name})
            if found is not None:
                return found
        return None

    try:
        return steps_in(method, frozenset())
    except Exception:  # noqa: BLE001 - an uninstalled plugin: nothing to compare with
        return None


def reference_config(cfg: DictConfig) -> dict[str, Any]:
    """What a run's marks judge it against (:func:`published_config_deviations`), recorded in
    ``run.json`` so that reports judge it as it was judged: the method's ``published_config``,
    or, for a trainable method without one, ``{"train.steps": <its own yaml's budget>}``;
    empty where there is neither."""
    if cfg.get("method") is None:
        return {}
    published = cfg.method.get("published_config")
    if published:
        return dict(OmegaConf.to_container(published))  # type: ignore[arg-type]
    steps = shipped_train_steps(str(cfg.method.name)) if _trains(cfg) else None
    return {"train.steps": steps} if steps is not None else {}


def published_marks(published: Iterable[tuple[str, Any]], lookup: Callable[[str], tuple[bool, Any]]) -> list[str]:
    """``key=value`` for each ``(key, published value)`` the run's value differs from; one
    rule for new records and for reports that recompute the marks from a ``config.yaml``.

    Args:
        lookup: key -> ``(found, the run's value)``; a key not found is not judged.
    A ``method.`` option left ``null`` is the method's default, which is the published one
    (ADNet's ``init``); a value given where the published one is ``null`` (resolved per
    setting, e.g. Q-Net's ``path_weight``) counts as a change.
    """
    marks = []
    for key, value in published:
        found, mine = lookup(key)
        if not found or (mine is None and value is not None and key.startswith("method.")):
            continue
        if mine != value:
            marks.append(f"{key}={mine}")
    return marks


def nearest_existing(path: Path) -> Path:
    """``path`` itself or the nearest folder above it that exists: what decides whether a
    folder that is not there yet can be created and written."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def can_write_in(folder: Path) -> bool:
    """Whether a file can be created in the existing ``folder``, found by creating (and
    removing) one: ``os.access`` says yes to root everywhere, also on a read-only file system."""
    try:
        handle, name = tempfile.mkstemp(prefix=".fsmis-write-check-", dir=folder)
    except OSError:
        return False
    os.close(handle)
    os.unlink(name)
    return True


def package_versions() -> dict[str, str]:
    """Versions of Python, fsmis-bench and its main dependencies, and of every installed
    distribution whose plugin is loaded (``{"fsmis-mini-plugin": "0.2.0"}``): a run of a
    third-party method records the version of the package that computed it."""
    versions = {"python": platform.python_version()}
    for name in ("fsmis-bench", "torch", "diffusers", "transformers", "accelerate", "monai", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    from .plugins import registries  # late: the registry imports the plugins

    for origin in registries().plugins.values():
        if origin.distribution and origin.distribution not in versions:
            versions[origin.distribution] = origin.version
    return versions


def code_identity(method_cls: type | None = None) -> dict[str, Any]:
    """Which code computed a run, for ``run.json``: the fsmis-bench checkout's git commit
    and whether it had uncommitted changes (``None`` outside a git checkout, e.g. a wheel),
    a digest of the file that defines the method's class, and digests of that file and of
    every module of its package that it imports, directly or through another
    (``method_code_files``: module -> SHA-256; ``method_code_sha256``: one over them all). The package version alone does not
    say it: it stays the same across many commits, and an edited plugin keeps its version."""
    out: dict[str, Any] = {"fsmis_bench_git": git_state(Path(__file__).resolve().parent)}
    if method_cls is not None:
        out["method_file_sha256"] = method_file_digest(method_cls)
        modules = method_code_digests(method_cls)
        if modules:
            out["method_code_sha256"] = _modules_digest(modules)
            out["method_code_files"] = modules
    return out


def code_differences(recorded: dict[str, Any], method_cls: type) -> list[str]:
    """How the code that made a record (its ``code`` entry) differs from ``method_cls``'s
    code now, in words (empty where it does not, or where the record does not say).
    Records from before ``method_code_sha256`` are compared by the class's file alone."""
    then = recorded.get("method_code_files")
    if isinstance(then, dict) and then:
        now = method_code_digests(method_cls)
        changed = sorted(name for name in set(then) | set(now) if then.get(name) != now.get(name))
        return [f"its code has changed since ({', '.join(changed)})"] if now and changed else []
    before, current = recorded.get("method_file_sha256"), method_file_digest(method_cls)
    if before and current and before != current:
        return [f"the file defining {method_cls.__name__} has changed since"]
    return []


def method_code_digests(method_cls: type) -> dict[str, str]:
    """SHA-256 of each file of :func:`method_code_files`, by module name."""
    from .data.digest import file_sha256

    out = {}
    for name, path in method_code_files(method_cls).items():
        try:
            out[name] = file_sha256(path)
        except FsmisError:  # unreadable: not part of what can be compared
            continue
    return dict(sorted(out.items()))


def method_code_files(method_cls: type) -> dict[str, Path]:
    """The file defining ``method_cls`` and the modules of the same top-level package it
    imports, transitively, by module name: ``{"fsmis_audit.method": Path(...),
    "fsmis_audit._net": Path(...)}``. Read from their source and found on disk beside the
    package, so nothing is imported (an import the method never runs, under ``if
    TYPE_CHECKING`` or in a function, may fail or cost). Empty where the class has no source
    file. A helper module is part of the method's code as much as the class's own file: an
    edit to it changes the numbers."""
    import ast
    import sys

    module_name = method_cls.__module__
    top = module_name.split(".")[0]
    roots = [Path(p) for p in getattr(sys.modules.get(top), "__path__", None) or ()]
    found: dict[str, Path] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = _module_source(name, top, roots)
        if path is None:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (OSError, SyntaxError, ValueError):
            continue
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # `from . import x`, `from ..a import b`
                    parts = package.split(".")
                    if node.level - 1 >= len(parts):
                        continue
                    base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] != top:
                    continue
                # `from pkg import _net` names a submodule, `from pkg._net import ACT` a module
                pending += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def _module_source(name: str, top: str, roots: list[Path]) -> Path | None:
    """The ``.py`` file of module ``name`` (of package ``top``, found under its ``roots``),
    or of a loaded module without a package; None where there is none (a name imported from
    a module rather than a submodule, an extension module)."""
    import sys

    module = sys.modules.get(name)
    if not roots:  # a single-module plugin, a script, a notebook: its own file only
        origin = getattr(module, "__file__", None)
        return Path(origin) if origin and str(origin).endswith(".py") else None
    relative = name.split(".")[1:]
    for root in roots:
        for candidate in (root.joinpath(*relative).with_suffix(".py") if relative else None,
                          root.joinpath(*relative, "__init__.py")):
            if candidate is not None and candidate.is_file():
                return candidate
    return None


def _modules_digest(modules: dict[str, str]) -> str:
    """One SHA-256 over each module's name and its file's SHA-256, in name order."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(f"{name}\0{modules[name]}\n".encode())
    return digest.hexdigest()


def git_state(package_dir: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout that tracks ``package_dir/__init__.py``,
    ``None`` elsewhere: an installed copy can lie inside some other repository (a project's
    ``.venv``), whose commit says nothing about it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(changes.stdout.strip()) if changes.returncode == 0 else None}


def method_file_digest(method_cls: type) -> str | None:
    """SHA-256 of the source file defining ``method_cls`` (``None`` where it has none)."""
    from .data.digest import file_sha256

    try:
        return file_sha256(inspect.getfile(method_cls))
    except (TypeError, FsmisError):  # a class without a source file; an unreadable one
        return None


def machine_identity(device: str) -> dict[str, Any]:
    """The processor (and accelerator) a run computed on, for ``run.json``: a trained
    model's numbers depend on them (other kernels round differently)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def registered_by(cfg: DictConfig) -> dict[str, dict[str, str]]:
    """Which plugin registered the run's method and datasets, from which distribution and
    version, for ``run.json``: ``{"method": {"name", "plugin", "distribution", "version"},
    "dataset": {...}}``, plus ``"test_dataset"`` for a cross-domain run. Distribution and
    version are empty for a plugin registered in-process (``register_plugin``)."""
    from .plugins import registries  # late: the registry imports the plugins

    regs = registries()
    named = [("method", regs.methods, str(cfg.method.name)), ("dataset", regs.datasets, str(cfg.dataset.name))]
    if test_dataset_name(cfg) != str(cfg.dataset.name):
        named.append(("test_dataset", regs.datasets, test_dataset_name(cfg)))
    out = {}
    for key, registry, name in named:
        entry = registry.entry(name)
        out[key] = {"name": name, "plugin": entry.plugin_name, "distribution": entry.distribution,
                    "version": entry.version}
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RecordWriteError(FsmisError):
    """A record could not be written (read-only folder, full disk, ...)."""


_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the folder is read-only for this user)",
    errno.EPERM: "operation not permitted",
}


def write_error(exc: OSError, folder: Path) -> FsmisError:
    """One clear error for a failed write under ``folder``: which folder, and why."""
    cause = _CAUSES.get(exc.errno or -1, exc.strerror or str(exc))
    folder = Path(folder).expanduser().absolute()
    target = Path(exc.filename).absolute() if exc.filename else None
    if target is not None and folder not in target.parents and target != folder:
        return FsmisError(f"cannot access {target}: {cause}", hint="check the path and its permissions")
    where = target.parent if target is not None else folder
    hint = ("free some space, then rerun the same command: finished work is kept and the run resumes"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "make the folder writable, or choose another results_dir= (FSMIS_RESULTS_DIR)")
    return RecordWriteError(f"cannot write to {where}: {cause}", hint=hint)


@contextmanager
def writing_to(folder: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing under ``folder`` into a :class:`RecordWriteError`."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, folder) from None


def new_file_mode() -> int:
    """The permissions an ordinary new file gets: 0666 minus the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the written file ``tmp`` to ``path`` so that a machine that goes down (a node
    lost on a cluster, not only a killed process) leaves either the old file or the whole
    new one: the bytes reach the disk before the rename, and the rename before return.

    Without the first flush a file system may commit the rename before the data, and a
    resume state's ``last.json`` could then name a state file of zeros."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading: the rename stands as the OS keeps it
    try:
        os.fsync(folder)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that sync no folders
            raise
    finally:
        os.close(folder)


#: the mark in the name of a file being written (``.<name>.tmp-<suffix>``) until its rename
UNFINISHED_MARK = ".tmp-"


def remove_unfinished_writes(directory: Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files of writes that never finished in ``directory``.

    A process killed while it wrote (``kill -9``, a node lost) leaves its temporary file
    (``.<name>.tmp-<suffix>``; an SD-1.5 resume state is 10.3 GB) that nothing would ever
    name again, and that would make the run's record differ from an uninterrupted one. Only
    one process works on a run (its lock), so once it holds the lock, every such file in the
    run's folder is a dead process's.

    Returns:
        the files removed, sorted.
    """
    pattern = f".*{UNFINISHED_MARK}*"
    found = Path(directory).rglob(pattern) if recursive else Path(directory).glob(pattern)
    removed = sorted(p for p in found if p.is_file())
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temporary file and rename (:func:`durable_replace`), so a crash never
    leaves half a file.

    The file gets the permissions of an ordinary new file (0666 minus the umask), and a
    failed write removes its temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    # the ``.tmp-`` mark lets a later process tell a killed write from a file of the run
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{UNFINISHED_MARK}")
    try:
        with os.fdopen(fd, mode) as handle:
            os.fchmod(handle.fileno(), new_file_mode())  # mkstemp creates 0600
            handle.write(data)
        durable_replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; say which one
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


#: the sections a resolved run config has that rebuild its datasets (``export``, ``eval
#: checkpoint=``); a report's fingerprint needs any mapping that is not empty
RUN_CONFIG_KEYS = ("method", "dataset", "setting", "fold")


def run_config_problem(run_dir: Path, needed: tuple[str, ...] = ()) -> str | None:
    """Why a run's ``config.yaml`` cannot be used (damaged YAML, bytes that are not text,
    an empty file, a list, a section in ``needed`` missing), or None when it reads as a run
    config or is absent (records from before runs wrote it)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - YAML, decoding and OmegaConf errors all mean damaged
        said = " ".join(str(exc).split()) or type(exc).__name__  # YAML errors span several lines
        return f"config.yaml is unreadable ({said[:200]})"
    if not isinstance(cfg, DictConfig):
        return "config.yaml does not hold a run config (not a mapping)"
    if not cfg:
        return "config.yaml is empty"
    missing = [key for key in needed if key not in cfg]
    return f"config.yaml lacks {missing}" if missing else None


def read_run_config(run_dir: Path) -> DictConfig:
    """A run's resolved ``config.yaml``, which rebuilds its datasets and method.

    Raises:
        DataError: there is none, or it is damaged (:func:`run_config_problem`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir} is not a run directory (no config.yaml)",
                         hint="pass a directory printed by `fsmis-bench run` (results/<method>/...)")
    problem = run_config_problem(run_dir, RUN_CONFIG_KEYS)
    if problem is not None:
        raise DataError(
            f"{run_dir}: {problem}",
            hint="run the run's own command again (`fsmis-bench run` with the overrides it was made with): a "
                 "finished run writes its config.yaml again, nothing is recomputed; or restore the file from a copy",
        )
    return OmegaConf.load(run_dir / "config.yaml")


# -- predictions ----------------------------------------------------------------------
def save_predictions(path: Path, predictions: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]) -> None:
    """Store predicted masks compressed: bit-packed, one entry per (organ, case).

    Args:
        predictions: ``(organ, case_id) -> (slice_indices (K,), pred (K, H, W) bool)``.
    """
    arrays: dict[str, np.ndarray] = {}
    for (organ, case_id), (slices, pred) in predictions.items():
        key = f"{organ}/{case_id}"
        arrays[f"{key}/slices"] = np.asarray(slices, dtype=np.int32)
        arrays[f"{key}/shape"] = np.asarray(pred.shape, dtype=np.int32)
        arrays[f"{key}/bits"] = np.packbits(np.asarray(pred, dtype=bool).ravel())
    path.parent.mkdir(parents=True, exist_ok=True)
    # numpy adds .npz to a name without it; the mark lets a later process remove a killed write
    tmp = path.with_name(f".{path.name}{UNFINISHED_MARK}{os.getpid()}.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_predictions(run_dir: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Inverse of :func:`save_predictions` for a run directory or an ``.npz`` file.

    Returns:
        ``(organ, case_id) -> (slice_indices (K,), pred (K, H, W) bool)``; empty if the
        run saved no predictions.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "predictions.npz"
    if not path.exists():
        return {}
    out = {}
    try:
        with np.load(path) as data:  # never allow_pickle: an object array is refused, not run
            keys = {name.rsplit("/", 1)[0] for name in data.files}
            for key in sorted(keys):
                organ, case_id = key.split("/", 1)
                shape = tuple(int(s) for s in data[f"{key}/shape"])
                bits = np.unpackbits(data[f"{key}/bits"], count=int(np.prod(shape)))
                out[(organ, case_id)] = (data[f"{key}/slices"], bits.reshape(shape).astype(bool))
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DamagedPredictionsError(
            f"{path} cannot be read ({type(exc).__name__}: {exc}): a damaged or foreign predictions file",
            hint=f"delete it; for a run folder's predictions.npz, delete {path.parent / COMPLETE} too and rerun "
                 "the run's command, which writes it again from the run's parts without computing anything",
        ) from None
    return out


class DamagedPredictionsError(FsmisError):
    """A ``predictions.npz`` that is not one :func:`save_predictions` wrote (truncated, foreign)."""
