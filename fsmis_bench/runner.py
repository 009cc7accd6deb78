"""Runs: compose -> identify -> protocol episodes -> train (or resume, or reuse) -> evaluate -> record.

Order matters for trust:

1. options are validated when the config is composed (:func:`fsmis_bench.config.validate`),
   before any data or disk is touched;
2. :func:`identify` builds the datasets and the method and fixes the run's *inputs* (data
   identity, pretrained weights, an external checkpoint's content hash), which go into
   the run hash and ``run.json``;
3. :func:`plan` loads and checks every volume the run will read (test episodes, training
   scans), so bad data stops the run before its folder exists;
4. only then is the run folder created and training started.

Each evaluation group is recorded as soon as it is done, so an interrupted run resumes
where it stopped, and a finished run is never recomputed or overwritten.
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import os
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from .data.base import VolumeDataset
from .data.consistency import shared_slices, slice_digests, spacing_mismatch
from .data.digest import file_sha256, files_sha256
from .errors import ConfigError, DataWarning, FsmisError
from .evaluation import OrganEpisodes, evaluate
from .method import Method
from .plugins import registries
from .protocol.ep1 import build_test_episodes
from .protocol.metrics import fold_organ_scores
from .protocol.settings import EvalGroup, eval_groups
from .record_repair import DamagedRecordError, part_cases, rebuild_cases  # noqa: F401 (DamagedRecordError re-exported)
from .records import (
    CASE_COLUMNS, COMPLETE, HASH_FORMS, RUN_CONFIG_KEYS, HashForm, atomic_write, can_write_in, code_differences,
    code_identity, comparable_dataset, config_hash, load_predictions, machine_identity, nearest_existing,
    non_standard_options, now, package_versions, read_json, read_run_config, registered_by,
    inference_options, method_class, remove_unfinished_writes, training_settings, run_config_problem, run_dir_for, save_predictions, test_dataset_name, training_hash,
    write_error, write_json, writing_to,
)
from .training.checkpoint import (
    LEGACY_FILES, STATE_FILE, WEIGHTS_FILE, CheckpointError, clear_training_state, load_weights, read_metadata,
    refuse_legacy,
)
from .training.engine import STEP_FILE, make_accelerator, train
from .training.episodes import EpisodeSampler
from .training.precision import precision_of, selects_cuda, with_resolved_precision
from .training.step import uncompile_method


def build_dataset(dataset_cfg: DictConfig | dict, data_root: str | None, key: str = "dataset") -> VolumeDataset:
    """A dataset plugin instance from its config group (``name`` + options).

    ``key`` names the config node (``dataset`` or ``test_dataset``) in the plugin's messages.
    """
    options = OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig) else dict(dataset_cfg)
    name = options.pop("name")
    if key != "dataset":
        options["config_key"] = key
    dataset = registries().datasets.build(name, data_root, **options)
    dataset.registered_name = name
    return dataset


def build_test_dataset(cfg: DictConfig, train_dataset: VolumeDataset | None = None) -> VolumeDataset:
    """The dataset a run is evaluated on: its ``test_dataset`` node (cross-domain), else the
    training dataset (``train_dataset`` when already built).

    Everything it needs is in the run's ``config.yaml``, so figures and ``export`` rebuild
    it from a finished run.
    """
    node = cfg.get("test_dataset")
    if node is not None:
        return build_dataset(node, cfg.get("data_root"), key="test_dataset")
    named = cfg.get("protocol", {}).get("test_dataset")
    if named and named != cfg.dataset.name:  # records written before test_dataset.* options existed
        return build_dataset({"name": str(named)}, cfg.get("data_root"), key="test_dataset")
    if train_dataset is not None:
        return train_dataset
    return build_dataset(cfg.dataset, cfg.get("data_root"))


def build_method(cfg: DictConfig) -> Method:
    """The method plugin instance for a resolved config (seeded by ``cfg.seed``)."""
    name = str(cfg.method.name)
    method_cls = registries().methods.get(name)
    if str(cfg.get("fidelity", "paper")) == "code" and not getattr(method_cls, "released_code_protocol", False):
        raise ConfigError(
            f"fidelity=code is the released SD-FSMIS code's protocol (ground-truth labels minus liver and spleen, pooled "
            f"Dice, every support slice per chunk, the legacy setting-2 exclusion, 4-step accumulation); it is not "
            f"{name}'s own code",
            hint=f"drop fidelity=code; {name}'s own code forms are options of configs/method/{name}.yaml"
                 + (" (ADNet's released code: method.init=imagenet)" if name == "adnet" else "")
                 + ", and each protocol option can be set alone (protocol.dice=pooled, ...)",
        )
    torch.manual_seed(int(cfg.seed))
    return registries().methods.build(name, cfg)


@dataclass
class RunIdentity:
    """Everything that decides a run's numbers, fixed before any work is done.

    Attributes:
        cfg: the resolved config.
        run_dir: the record directory (its name ends in the hash of config + inputs).
        inputs: ``{"train_data", "test_data", "weights", "checkpoint"}`` as recorded in
            ``run.json``: the datasets' :meth:`~fsmis_bench.data.base.VolumeDataset.identity`
            (``train_data`` is None when nothing is trained), the method's
            :meth:`~fsmis_bench.method.Method.weight_identity`, and an external checkpoint's
            path, SHA-256 and step (None without ``checkpoint=``).
        method: the method built for ``cfg`` (reused for the first evaluation group).
        supervoxels_generated: what :meth:`ensure_supervoxels` generated for this run.
        hash_form: how ``run_dir``'s hash was formed: ``current``, or that of a record
            made earlier (:data:`fsmis_bench.records.HashForm`), kept and resumed under it.
    """

    cfg: DictConfig
    run_dir: Path
    inputs: dict[str, Any]
    train_dataset: VolumeDataset
    test_dataset: VolumeDataset
    groups: list[EvalGroup]
    method: Method
    checkpoint: Path | None = None
    supervoxels_generated: dict | None = None
    hash_form: HashForm = "current"


@dataclass
class RunPlan:
    cfg: DictConfig
    run_dir: Path
    train_dataset: VolumeDataset
    test_dataset: VolumeDataset
    groups: list[EvalGroup]
    episodes: dict[str, list[OrganEpisodes]]
    identity: RunIdentity | None = None
    to_train: list[str] = field(default_factory=list)


def _trains_on_supervoxels(cfg: DictConfig, method: Method, checkpoint: Path | None) -> bool:
    return method.needs_training and checkpoint is None and cfg.protocol.train_labels == "supervoxels"


def _step_of(path: Path) -> int:
    metadata = read_metadata(path)  # a pickle is refused here, unread
    try:
        return int(metadata.get("step", 0))
    except ValueError:
        return 0


def _external_checkpoint(checkpoint: Path, groups: list[EvalGroup]) -> dict[str, Any]:
    """Path, content hash and step of an ``eval checkpoint=`` file, or of every group's
    weights in a finished run's directory (refused unless safetensors)."""
    if not checkpoint.is_dir():
        return {"path": str(checkpoint.resolve()), "sha256": file_sha256(checkpoint), "step": _step_of(checkpoint)}
    files = [_checkpoint_for(checkpoint, g.name) for g in groups]
    return {
        "path": str(checkpoint.resolve()),
        "sha256": files_sha256(files, checkpoint),
        "groups": {g.name: {"sha256": file_sha256(f), "step": _step_of(f)} for g, f in zip(groups, files)},
    }


def _checkpoint_for(checkpoint: Path, group: str) -> Path:
    """A weights file as given, or the group's ``final.safetensors`` in a finished run's directory."""
    if not checkpoint.is_dir():
        return checkpoint
    path = checkpoint / "checkpoints" / group / WEIGHTS_FILE
    refuse_legacy(path.parent)  # a run folder of an older version holds pickles
    if not path.is_file():
        found = sorted(p.parent.name for p in checkpoint.glob(f"checkpoints/*/{WEIGHTS_FILE}"))
        raise ConfigError(
            f"{checkpoint} holds no trained model for the evaluation group {group!r} (it has: {found or 'none'})",
            hint="evaluate with the setting and protocol.exclusion that run was trained with",
        )
    return path


def _check_checkpoint_source(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse a checkpoint whose run was trained with another method, backbone or dataset:
    the record would name the wrong training dataset, or the weights would not fit."""
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent.parent.parent
    if not (run_dir / "config.yaml").is_file():
        if checkpoint.is_dir():
            raise ConfigError(f"{checkpoint} is not a run directory (no config.yaml)",
                              hint=f"pass a finished run's directory or its checkpoints/<group>/{WEIGHTS_FILE}")
        return  # a checkpoint from elsewhere: nothing to compare with
    trained = read_run_config(run_dir)  # a damaged one is named, never read as "another method"

    def compared(config: DictConfig, key: str) -> Any:
        value = OmegaConf.select(config, key)
        if key == "dataset" and isinstance(value, DictConfig):  # options added since change nothing there
            return comparable_dataset(OmegaConf.to_container(value, resolve=True))
        if key == "method" and isinstance(value, DictConfig):  # options read when predicting may differ
            plain = OmegaConf.to_container(value, resolve=True)
            # An option added after a run (a late option) had its earlier value in a config
            # that lacks it, and a null one follows `fidelity`: both compared as they act.
            method_cls = method_class(config)
            if method_cls is not None and method_cls.late_options:
                resolved = method_cls.late_option_values(config)
                for name, earlier in method_cls.late_options.items():
                    plain[name] = resolved[name] if name in value else earlier
            return {k: v for k, v in plain.items() if k not in inference_options(config)}
        return value

    method_cls = method_class(cfg)
    # the null options of a method with a released-code form follow `fidelity`
    follows_fidelity = ("fidelity",) if getattr(method_cls, "released_code_protocol", False) else ()
    for key in (*follows_fidelity, "method", "backbone", "pretrained", "dataset"):  # the root cause first
        theirs, ours = compared(trained, key), compared(cfg, key)
        if theirs == ours:
            continue
        if isinstance(theirs, dict) and isinstance(ours, dict) and theirs.get("name") == ours.get("name"):
            # the same method or dataset with other options: say which
            changed = _changed_options(theirs, ours)
            if not changed:
                continue
            def shown(value: Any) -> str:  # a null option is the method's default (or follows fidelity)
                return "null (the default)" if value is None else str(value)

            message = (f"{checkpoint} was trained with "
                       + ", ".join(f"{key}.{name}={shown(was)}" for name, (was, _) in changed.items())
                       + "; this evaluation asks for "
                       + ", ".join(f"{key}.{name}={shown(asked)}" for name, (_, asked) in changed.items()))
        else:
            was = OmegaConf.select(trained, key)
            was = was.get("name", was) if isinstance(was, DictConfig) else was
            message = f"{checkpoint} was trained with another {key} ({key}={was}) than this evaluation asks for"
        if key == "dataset":
            hint = (f"keep dataset={trained.dataset.name} (the training data) and choose the data to test on with "
                    f"protocol.test_dataset=<name>, e.g. protocol.test_dataset=nifti_folder test_dataset.path=<folder>")
        elif key == "method":
            hint = ("evaluate it with the options it was trained with; only the options read when predicting "
                    f"({', '.join(inference_options(cfg))}) may differ")
        elif key == "fidelity":
            hint = (f"evaluate it with fidelity={trained.get('fidelity')}, the form of the method it was trained "
                    "in; the other fidelity's protocol options can still be given one by one (e.g. protocol.dice=pooled)")
        else:
            hint = f"evaluate it with the {key} it was trained with"
        raise ConfigError(message, hint=hint)
    # the training's own settings: another value would be recorded (and reported) as if the
    # weights had been trained with it
    try:
        theirs = training_settings(trained)
    except Exception:  # noqa: BLE001 - a config of an older layout: nothing to compare with
        return
    changed = _changed_options(theirs, training_settings(cfg))
    if changed:
        # said as each config has it (the hashed form leaves a switch at its default out)
        def shown(config: DictConfig, key: str) -> Any:
            return OmegaConf.select(config, key, default="(unset)")

        # a key that only the hashed form tells apart (left out under another rule) goes unsaid
        changed = [k for k in changed if shown(trained, k) != shown(cfg, k)] or list(changed)

        raise ConfigError(
            f"{checkpoint} was trained with " + ", ".join(f"{k}={shown(trained, k)}" for k in changed)
            + "; this evaluation asks for " + ", ".join(f"{k}={shown(cfg, k)}" for k in changed),
            hint="give the training options that run had (its config.yaml): the evaluation's record holds them "
            "as the weights' training; only evaluation options (protocol.dice, protocol.chunk_support, "
            "protocol.test_dataset, ...) and the method's options read when predicting may differ",
        )


def _changed_options(theirs: dict, ours: dict) -> dict[str, tuple[Any, Any]]:
    """``{option: (trained value, asked value)}`` for the options that differ. An option
    absent from the training's config and left null here is a switch added since, at the
    default every earlier run had (the method's late options come resolved, see
    :func:`_check_checkpoint_source`)."""
    changed = {}
    for name in sorted(set(theirs) | set(ours)):
        was, asked = theirs.get(name), ours.get(name)
        if was != asked and not (name not in theirs and asked is None):
            changed[name] = (was, asked)
    return changed


def identify(cfg: DictConfig, checkpoint: Path | None = None) -> RunIdentity:
    """Build datasets and method and fix the run's inputs, hash and record directory.

    Generates missing supervoxels first (announced, and recorded in the run), because
    their digest is part of the identity. Loads no volume.
    """
    if checkpoint is not None:
        _check_checkpoint_source(cfg, checkpoint)
    train_dataset = build_dataset(cfg.dataset, cfg.data_root)
    test_dataset = build_test_dataset(cfg, train_dataset)
    groups = eval_groups(train_dataset, test_dataset, int(cfg.setting), str(cfg.protocol.exclusion),
                         str(cfg.protocol.train_labels), str(cfg.protocol.get("gt_exclusion", "per_group")))
    method = build_method(cfg)
    generated = None
    if _trains_on_supervoxels(cfg, method, checkpoint):
        ensure = getattr(train_dataset, "ensure_supervoxels", None)
        if ensure is not None:
            generated = ensure()
    inputs: dict[str, Any] = {
        "train_data": (train_dataset.identity(with_supervoxels=_trains_on_supervoxels(cfg, method, checkpoint))
                       if method.needs_training and checkpoint is None else None),
        "test_data": test_dataset.identity(with_supervoxels=False),
        "weights": method.weight_identity(),
        "checkpoint": _external_checkpoint(checkpoint, groups) if checkpoint is not None else None,
    }
    if not selects_cuda(str(cfg.device)):
        # a CPU's float sums depend on how many threads share them: a joblib worker (one
        # thread) and a serial run (all cores) compute other numbers, so they are other runs
        inputs["cpu_threads"] = torch.get_num_threads()
    run_dir, form = _record_dir(cfg, inputs)
    return RunIdentity(cfg, run_dir, inputs, train_dataset, test_dataset, groups, method,
                       checkpoint, generated, form)


def _record_dir(cfg: DictConfig, inputs: dict[str, Any]) -> tuple[Path, HashForm]:
    """``(run_dir, hash form)``: today's folder, or that of an existing record made
    while the hash was formed otherwise (the weights' layout hashed; the cadence hashed; the
    weights' folders hashed).
    Such records stay where they are and are found, finished or to resume, under the
    settings they were made with."""
    current = run_dir_for(cfg, inputs)
    if current.exists():
        return current, "current"
    for form in HASH_FORMS[1:]:
        if form in ("weight_paths", "weight_layout") and not inputs.get("weights"):
            continue  # without weights these forms equal `cadence` and `current`
        earlier = run_dir_for(cfg, inputs, form)
        if earlier != current and earlier.exists():
            return earlier, form
    return current, "current"


def plan(cfg: DictConfig, identity: RunIdentity | None = None, *, allow_training: bool = True) -> RunPlan:
    """Resolve every test episode and check every volume the run reads; raises before
    anything is written or trained."""
    ident = identity or identify(cfg)
    method_cls = type(ident.method)
    test_dataset, groups = ident.test_dataset, ident.groups
    fold_cases = test_dataset.fold_cases(int(cfg.fold))
    supp_idx = _support_position(test_dataset, int(cfg.fold), fold_cases, int(cfg.protocol.supp_idx))
    # Smoke runs may evaluate a subset (marked non-standard in the record).
    only_organs = list(cfg.protocol.get("organs") or [])
    unknown = [o for o in only_organs if o not in test_dataset.test_organs]
    if unknown:
        raise ConfigError(
            f"protocol.organs names organs that {test_dataset.name} does not test: {unknown}",
            hint=f"its test organs are {list(test_dataset.test_organs)}",
        )
    max_queries = cfg.protocol.get("max_queries")
    episodes = {}
    for group in groups:
        episodes[group.name] = []
        for organ in group.organs:
            if only_organs and organ not in only_organs:
                continue
            support, queries = build_test_episodes(
                test_dataset, fold_cases, organ, supp_idx=supp_idx,
                n_part=int(cfg.protocol.n_part), n_shot=int(cfg.protocol.n_shot),
                norm=method_cls.input_norm,
            )
            seen = {*support.case_ids, *(q.case_id for q in queries)}
            absent = [c for c in fold_cases if c not in seen]
            episodes[group.name].append(OrganEpisodes(organ, support, queries[:max_queries], absent))
    groups = [g for g in groups if episodes[g.name]]  # as _evaluated_groups names them
    episodes = {g.name: episodes[g.name] for g in groups}
    supports = sorted({c for organ_eps in episodes.values() for e in organ_eps for c in e.support.case_ids})
    _warn_about_pairs(test_dataset, supports, [c for c in fold_cases if c not in supports])
    p = RunPlan(cfg, ident.run_dir, ident.train_dataset, test_dataset, groups, episodes, ident)
    if ident.checkpoint is not None and ident.method.needs_training:
        for group in groups:  # refuses a partial or foreign checkpoint now
            load_weights(ident.method, _checkpoint_for(ident.checkpoint, group.name))
    p.to_train = _groups_to_train(p, allow_training)
    if p.to_train:
        # Every training scan is read (and checked, e.g. for NaN) before the run folder exists.
        with_sv = str(cfg.protocol.train_labels) == "supervoxels"
        for case_id in _training_cases(p):
            p.train_dataset.load(case_id, with_supervoxels=with_sv)
    return p


def _fold_line(p: RunPlan) -> str:
    """One line naming the scans the run tests with, so a wrong support shows at a glance:
    ``abd_mri fold 4: support scan 37; query scans 1 36 38 39``."""
    every = [e for g in p.groups for e in p.episodes[g.name]]
    supports = list(dict.fromkeys(c for e in every for c in e.support.case_ids))
    queries = list(dict.fromkeys(q.case_id for e in every for q in e.queries))
    line = (f"{p.test_dataset.name} fold {int(p.cfg.fold)}: support scan{'s' if len(supports) > 1 else ''} "
            f"{' '.join(supports)}; query scans {' '.join(queries)}")
    absent = sorted({f"{c} ({e.organ})" for e in every for c in e.absent})
    return line + (f"; without the organ, not scored: {', '.join(absent)}" if absent else "")


def _evaluated_groups(cfg: DictConfig, groups: list[EvalGroup]) -> list[str]:
    """The names of the groups a run evaluates: those with an organ ``protocol.organs`` keeps."""
    only = list(cfg.protocol.get("organs") or [])
    return [g.name for g in groups if not only or any(organ in only for organ in g.organs)]


def _support_position(dataset: VolumeDataset, fold: int, fold_cases: list[str], supp_idx: int) -> int:
    """``protocol.supp_idx``, unless the dataset fixes the fold's support scan itself."""
    fixed = dataset.fold_support(fold)
    return supp_idx if fixed is None else fold_cases.index(fixed)


def _warn_about_pairs(dataset: VolumeDataset, supports: list[str], queries: list[str]) -> None:
    """Warn when a support and a query differ in modality or voxel size by a large factor,
    or share identical slices (the same patient twice makes a copy task, not a few-shot one);
    and whatever else the dataset finds about the pair (``pair_warnings``: e.g. ``nifti_folder``
    scans whose axes, as read, lie far apart)."""
    digests = getattr(dataset, "slice_digests", None) or (lambda case: slice_digests(dataset.load(case).image))
    pair_warnings = getattr(dataset, "pair_warnings", None)
    for support_id in supports:
        support = dataset.load(support_id)
        for query_id in queries:
            query = dataset.load(query_id)
            pair = f"{dataset.name}: support scan {support_id} and query scan {query_id}"
            if support.modality and query.modality and support.modality != query.modality:
                warnings.warn(f"{pair} differ in modality ({support.modality} vs {query.modality})", DataWarning, 2)
            mismatch = spacing_mismatch(support.spacing, query.spacing)
            if mismatch:
                warnings.warn(f"{pair} differ in voxel size: {mismatch}", DataWarning, 2)
            shared = shared_slices(digests(support_id), digests(query_id))
            if shared:
                warnings.warn(
                    f"{pair} share {shared} identical slices (the same patient stored twice?); their Dice "
                    "measures copying, not few-shot segmentation", DataWarning, 2,
                )
            for sentence in pair_warnings(support_id, query_id) if pair_warnings else ():
                warnings.warn(f"{pair} {sentence}", DataWarning, 2)


def _training_cases(p: RunPlan) -> list[str]:
    if p.train_dataset is p.test_dataset:
        return p.train_dataset.train_cases(int(p.cfg.fold))
    return p.train_dataset.case_ids()  # cross-domain: the whole source dataset


def _label(p: RunPlan, group: EvalGroup) -> str:
    return f"{p.cfg.method.name}/{p.test_dataset.name} s{p.cfg.setting} f{p.cfg.fold} [{group.name}]"


def _groups_to_train(p: RunPlan, allow_training: bool) -> list[str]:
    """Groups that still need training; raises when training is needed but not allowed."""
    ident = p.identity
    if ident is None or not ident.method.needs_training or ident.checkpoint is not None:
        return []
    wanted = []
    for group in p.groups:
        if (p.run_dir / "parts" / f"cases_{group.name}.csv").exists():
            continue
        if _find_checkpoint(p.cfg, ident.inputs, p.run_dir, group.name) is not None:
            continue
        if not allow_training:
            raise ConfigError(
                f"no trained checkpoint for {_label(p, group)}",
                hint="train it first with `fsmis-bench run` and the same overrides, or pass "
                "checkpoint=<a finished run's directory, or its final.safetensors>",
            )
        wanted.append(group.name)
    if wanted and not _training_cases(p):
        n = len(p.test_dataset.case_ids())
        raise ConfigError(
            f"fold {p.cfg.fold} holds all {n} scans of {p.test_dataset.name}: no scan is left to train on",
            hint=f"test a model trained on another dataset here (e.g. dataset=abd_mri "
            f"protocol.test_dataset={p.test_dataset.name} with this dataset's options under test_dataset.), "
            "or leave one scan out per fold with dataset.folds=loo",
        )
    return wanted


def _with_its_unhashed_options(cfg: DictConfig, inputs: dict, sibling: Path) -> set[str]:
    """The training hashes of earlier forms that ``cfg`` has with ``sibling``'s checkpoint and
    logging cadence and its inference-only method options (:func:`inference_options`), which
    those forms hashed although they change no trained weight (empty where the sibling's
    config cannot be read or has the same values)."""
    try:
        trained = OmegaConf.load(sibling / "config.yaml")
    except Exception:  # noqa: BLE001 - an unreadable sibling is no source of weights
        return set()
    if not isinstance(trained, DictConfig):
        return set()
    absent = object()  # a key its config lacks (added since): nothing to take over
    keys = [f"train.{key}" for key in ("checkpoint_every", "log_every")]
    keys += [f"method.{name}" for name in inference_options(cfg)]
    theirs_values = {key: OmegaConf.select(trained, key, default=absent) for key in keys}
    changed = {key: value for key, value in theirs_values.items()
               if value is not absent and OmegaConf.select(cfg, key, default=absent) != value}
    if not changed:
        return set()
    theirs = cfg.copy()
    with open_dict(theirs):
        for key, value in changed.items():
            OmegaConf.update(theirs, key, value, merge=False)
    return {training_hash(theirs, inputs, form, with_inference_options=True) for form in HASH_FORMS}


def _find_checkpoint(cfg: DictConfig, inputs: dict, run_dir: Path, group: str) -> Path | None:
    """A finished training with the same training config and inputs, in this or a sibling run."""
    own = run_dir / "checkpoints" / group
    for legacy in LEGACY_FILES:
        if (own / legacy).exists():
            raise CheckpointError(
                f"{own / legacy} is a pickle checkpoint; fsmis-bench never loads pickles, because "
                "unpickling a file can run arbitrary code",
                hint=f"delete {own / legacy} (training of this run then restarts from step 0)",
            )
    if (own / WEIGHTS_FILE).exists():
        return own / WEIGHTS_FILE
    # earlier records: as they formed it
    wanted = {training_hash(cfg, inputs, form, hashed) for form in HASH_FORMS for hashed in (False, True)}
    for info in sorted(run_dir.parent.glob("*/run.json")):
        candidate = info.parent / "checkpoints" / group / WEIGHTS_FILE
        try:
            recorded = read_json(info).get("training_hash")
            same = recorded in wanted or (
                candidate.exists() and recorded in _with_its_unhashed_options(cfg, inputs, info.parent))
        except (OSError, ValueError):
            continue  # a damaged sibling record is no source of weights
        if candidate.exists() and same:
            return candidate
    return None


def _prepare_dir(p: RunPlan, random_weights: bool, method_options: dict | None = None, device: str = "cpu") -> dict:
    cfg, run_dir, ident = p.cfg, p.run_dir, p.identity
    assert ident is not None
    full_hash = config_hash(cfg, ident.inputs, ident.hash_form)
    info_path = run_dir / "run.json"
    info = _record_or_none(info_path)
    kept: dict[str, Any] | None = None
    if info is None and info_path.exists():
        # An unfinished run's record holds nothing its rerun does not write again (its
        # checkpoints and parts are separate files), so it is rewritten rather than refused;
        # its history (start, resumptions) is kept where it can still be read.
        kept = _readable_history(info_path)
        lost = ("its history is kept" if {"resumed", "code", "machine"} <= kept.keys()
                else "what it said of the run's history is kept, the rest recorded as unknown")
        warnings.warn(f"{info_path} was damaged (unreadable JSON): written again ({lost}); the run resumes "
                      "from its checkpoints and parts", DataWarning, 2)
        info_path.unlink()
    if info is not None:
        if info.get("config_hash") != full_hash:
            raise ConfigError(
                f"{run_dir} holds a run with another config (hash prefix collision)",
                hint="move that directory away; fsmis-bench never overwrites a run",
            )
        if ident.supervoxels_generated:
            info.setdefault("supervoxels_generated", []).append({**ident.supervoxels_generated, "at": now()})
        info.setdefault("groups", [g.name for g in p.groups])  # records made before it was recorded
        # a resumed run may go on with other code or on another machine: each resumption says which
        info.setdefault("resumed", []).append({"at": now(), "code": code_identity(type(ident.method)),
                                               "machine": machine_identity(device)})
        write_json(info_path, info)
        return info
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    checkpoint = ident.inputs.get("checkpoint")
    info = {
        "method": str(cfg.method.name),
        "dataset": str(cfg.dataset.name),
        "test_dataset": test_dataset_name(cfg),
        "setting": int(cfg.setting),
        "fold": int(cfg.fold),
        "seed": int(cfg.seed),
        "backbone": str(cfg.backbone.name),
        "pretrained": bool(cfg.pretrained),
        "random_weights": random_weights,
        "fidelity": str(cfg.fidelity),
        "precision": precision_of(cfg).as_record(),
        "method_options": method_options or {},
        "protocol": OmegaConf.to_container(cfg.protocol, resolve=True),
        "non_standard": _marks(cfg, random_weights, checkpoint["sha256"] if checkpoint else None),
        "config_hash": full_hash,
        "training_hash": training_hash(cfg, ident.inputs, ident.hash_form),
        # Where the weights come from: trained by this run (or a sibling with the same
        # training hash), or an external checkpoint, which never counts as a `run`.
        "weights_from": "external_checkpoint" if checkpoint else ("training" if ident.method.needs_training else "none"),
        "inputs": ident.inputs,
        "evaluated": {e.organ: [q.case_id for q in e.queries] for g in p.groups for e in p.episodes[g.name]},
        # the support scans and slices each organ read, and fold scans left out for lacking it
        "supports": {e.organ: e.support_record() for g in p.groups for e in p.episodes[g.name]},
        "absent": {e.organ: e.absent for g in p.groups for e in p.episodes[g.name] if e.absent},
        # the evaluation groups, each recorded in parts/cases_<group>.csv (`runs` shows how many are done)
        "groups": [g.name for g in p.groups],
        "supervoxels_generated": [{**ident.supervoxels_generated, "at": now()}] if ident.supervoxels_generated else [],
        "versions": package_versions(),
        "code": code_identity(type(ident.method)),
        "machine": machine_identity(device),
        "registered_by": registered_by(cfg),
        "started_at": now(),
        "finished_at": None,
        "status": "running",
    }
    if kept is not None:  # a damaged record written again: this process resumes the run
        info["started_at"] = kept.get("started_at") or "unknown (run.json was damaged)"
        info["supervoxels_generated"] = kept.get("supervoxels_generated", []) + info["supervoxels_generated"]
        info.update({key: kept[key] for key in ("code", "machine") if key in kept})  # the start's
        lost = [what for key, what in (("resumed", "its earlier resumptions"), ("code", "the code that started it"),
                                       ("machine", "the machine that started it")) if key not in kept]
        earlier = kept.get("resumed", [])
        if lost:  # recorded as lost, not silently begun again (`code`/`machine` above are then this process's)
            earlier = [*earlier, {"at": now(), "lost": f"unknown (run.json was damaged): {', '.join(lost)}"}]
        info["resumed"] = [*earlier, {"at": now(), "code": code_identity(type(ident.method)),
                                      "machine": machine_identity(device)}]
    write_json(info_path, info)
    return info


def _marks(cfg: DictConfig, random_weights: bool, checkpoint_sha256: str | None) -> list[str]:
    """The run's departures from the standard setup (:func:`non_standard_options`), and for an
    external checkpoint its test-time options (:func:`_inference_marks`)."""
    marks = non_standard_options(cfg, random_weights, checkpoint_sha256)
    if checkpoint_sha256:
        marks += [mark for mark in _inference_marks(cfg) if mark not in marks]
    return marks


def _inference_marks(cfg: DictConfig) -> list[str]:
    """``method.<option>=<value>`` for each option read only when predicting that differs
    from the method's defaults: an evaluation of an external checkpoint is a report row of
    its own, and nothing else would tell its reader that, e.g., another threshold made its
    masks (beside another row, the report names such options itself)."""
    from .config import compose  # late: the config module is the CLI's

    try:
        defaults = compose([f"method={cfg.method.name}"]).method
    except FsmisError:  # a plugin method whose config cannot be composed alone
        return []
    return [f"method.{name}={cfg.method.get(name)}" for name in inference_options(cfg)
            if name != "predict_cuda_graph" and cfg.method.get(name) != defaults.get(name)]


def _readable_history(path: Path) -> dict[str, Any]:
    """What a damaged ``run.json`` (cut short, a bad byte) still says of the run's history:
    its top-level ``started_at``, ``code``, ``machine``, ``resumed`` and
    ``supervoxels_generated``, each where its value can be read whole; missing keys are lost."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    decoder, kept = json.JSONDecoder(), {}
    wanted = {"started_at": str, "code": dict, "machine": dict, "resumed": list, "supervoxels_generated": list}
    for key, kind in wanted.items():
        found = re.search(rf'^  "{key}": ', text, re.MULTILINE)  # write_json's top level (indent 2)
        if found is None:
            continue
        try:
            value = decoder.raw_decode(text, found.end())[0]
        except ValueError:
            continue
        if isinstance(value, kind) and (kind is not list or all(isinstance(v, dict) for v in value)):
            kept[key] = value
    return kept


def _warn_if_other_code(run_dir: Path, ident: RunIdentity) -> None:
    """Say so when a finished run kept as it is was computed by another version of its
    method's code (another plugin release, or an edited method module): the hash covers the
    config and the inputs, not the code, so a rerun does not compute it again."""
    info = _record_or_none(run_dir / "run.json")
    differences = _other_code(info, ident) if info is not None else []
    if differences:
        warnings.warn(
            f"{run_dir} was computed by other code of method {info.get('method')} ({'; '.join(differences)}); "
            "its record is kept and its numbers are the old code's. To compute it with this code, pass another "
            "results_dir= (or move that folder away)", DataWarning, 2,
        )


def _other_code(info: dict, ident: RunIdentity) -> list[str]:
    """How the code that made the record ``info`` differs from the method's code now."""
    then = ((info.get("registered_by") or {}).get("method") or {})
    now_entry = registered_by(ident.cfg).get("method", {})
    differences = []
    if then.get("version") and now_entry.get("version") and then["version"] != now_entry["version"]:
        differences.append(f"{now_entry.get('distribution') or 'its package'} {then['version']} then, "
                           f"{now_entry['version']} installed")
    return differences + code_differences(info.get("code") or {}, type(ident.method))


def _weights_trained_by(weights: Path, run_dir: Path, ident: RunIdentity) -> dict | None:
    """Which run trained the weights a run found in a sibling folder, for its ``run.json``
    (``weights_trained_by``: that run's folder, code and plugin release), with a warning
    where its code differs from the method's code now: the sibling's training is reused as
    it is (the hash covers config and inputs, not code), so this run evaluates the old
    code's weights with the new code. None for the run's own weights."""
    trainer = weights.parent.parent.parent  # <run>/checkpoints/<group>/final.safetensors
    if trainer == run_dir:
        return None
    info = _record_or_none(trainer / "run.json") or {}
    differences = _other_code(info, ident) if info else []
    if differences:
        warnings.warn(
            f"the trained weights {weights} were trained by other code of method {info.get('method')} "
            f"({'; '.join(differences)}); this run evaluates them with the code installed now and records "
            "which code trained them (weights_trained_by in run.json). To train with this code, pass another "
            "results_dir= (or move that training's folder away)", DataWarning, 2,
        )
    return {"run": trainer.name, "code": info.get("code"),
            "registered_by": (info.get("registered_by") or {}).get("method")}


def _record_or_none(path: Path) -> dict | None:
    """``run.json`` as a dict; None when it is missing or damaged (not JSON, not a mapping)."""
    try:
        info = read_json(path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _check_results_writable(cfg: DictConfig) -> None:
    """A results folder that cannot be written is refused before any data is read."""
    folder = Path(str(cfg.results_dir)).expanduser()
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"cannot write to {folder}: {existing} is a file, not a folder",
                          hint="choose another results_dir= (FSMIS_RESULTS_DIR)")
    if not can_write_in(existing):
        raise write_error(PermissionError(13, "Permission denied", str(existing / "x")), existing)


def execute(cfg: DictConfig, *, allow_training: bool = True, checkpoint: Path | None = None,
            status: dict[str, str] | None = None) -> Path:
    """Run (or resume) one configuration and return its record directory.

    Args:
        allow_training: False for ``eval``: use a finished training or ``checkpoint``.
        checkpoint: an external ``.safetensors`` checkpoint to evaluate; its content hash
            is part of the run's identity and the run is marked as evaluated from it.
        status: filled with ``outcome``: ``skipped`` (already complete), ``repaired``
            (complete, its damaged ``cases.csv`` rebuilt from its parts), ``resumed`` (a
            record was there) or ``completed`` (a new run), for a sweep's summary.
    """
    cfg = as_run_here(cfg)
    try:
        _check_results_writable(cfg)
        read_only = None
    except FsmisError as exc:  # enough to show a finished run there; refused for anything else
        folder = Path(str(cfg.results_dir)).expanduser()
        finished = f"{cfg.method.name}/*/setting{cfg.setting}/fold{cfg.fold}/seed{cfg.seed}-*/{COMPLETE}"
        if not (folder.is_dir() and any(folder.glob(finished))):
            raise  # no finished run of this method, fold and seed to show: refused before any data is read
        read_only = exc
    results = Path(str(cfg.results_dir)).expanduser()
    accelerator = make_accelerator(cfg, int(cfg.train.grad_accum))
    with writing_to(results):
        with accelerator.main_process_first():  # supervoxels, if they must be made, are made once
            ident = identify(cfg, checkpoint)
        run_dir = ident.run_dir
        if read_only is not None and not (run_dir / COMPLETE).exists():
            raise read_only
        if status is not None:
            status["outcome"] = ("skipped" if (run_dir / COMPLETE).exists()
                                 else "resumed" if (run_dir / "run.json").exists() else "completed")
        if (run_dir / COMPLETE).exists():
            if (accelerator.is_main_process and read_only is None and _check_finished(run_dir, ident)
                    and status is not None):
                status["outcome"] = "repaired"
            tqdm.write(f"already complete, not recomputed: {run_dir}", file=sys.stderr)
            try:
                tqdm.write(_dice_summary(pd.read_csv(run_dir / "cases.csv"), str(cfg.protocol.dice)), file=sys.stderr)
            except (OSError, ValueError, KeyError):  # a damaged cases.csv is named by `runs` and `report`
                pass
            if accelerator.is_main_process:
                _warn_if_other_code(run_dir, ident)
            return run_dir
        p = plan(cfg, ident, allow_training=allow_training)
        with _exclusive(run_dir, accelerator.is_main_process):
            return _execute(p, allow_training, accelerator)


def as_run_here(cfg: DictConfig) -> DictConfig:
    """The config as this machine runs it, which decides the run's hash and record.

    `auto` precision depends on the device, the process count on the launcher: both are
    resolved where the run runs.
    """
    return with_process_count(with_resolved_precision(cfg))


def with_process_count(cfg: DictConfig) -> DictConfig:
    """``cfg`` plus ``train.processes`` when several processes share the run (``accelerate launch``).

    The episodes do not depend on the process count (one stream, split), but randomness a
    loss draws (one stream per process) and batch statistics do, so the count is part of
    the run's identity; single-process configs, and their hashes, are unchanged.
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1 or cfg.train.get("processes") == processes:
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.train.processes = processes
    return cfg


@contextmanager
def _exclusive(run_dir: Path, main_process: bool = True) -> Iterator[None]:
    """One process per run directory; the OS drops the lock if the process dies.

    A run folder created here is removed again when the run fails before computing
    anything, with the folders above it that were created for it and stayed empty
    (``<method>/<dataset>/setting<k>/fold<f>/``), so a failed start leaves no "running"
    record and no empty folders behind. The other processes of a multi-process run
    (``accelerate launch``) work under their main process's lock and write nothing to the
    record.
    """
    if not main_process:
        yield
        return
    created = _missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    locked = False
    try:
        with open(run_dir / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{run_dir} is being computed by another process right now",
                    hint="let that process finish; rerunning afterwards reuses its result",
                ) from None
            locked = True
            for leftover in remove_unfinished_writes(run_dir, recursive=True):
                tqdm.write(f"removed {leftover.relative_to(run_dir)}, a write that an interrupted "
                           f"process left unfinished ({run_dir})", file=sys.stderr)
            yield
    except BaseException:
        # Only the lock's holder may remove the folder: a process refused here may have
        # seen it missing a moment before the holder created it, and the holder's run
        # holds nothing computed yet in its first steps.
        if locked and created and not _holds_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in created[1:]:
                try:
                    folder.rmdir()  # only when empty: another run may have started beside it
                except OSError:
                    break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _holds_work(run_dir: Path) -> bool:
    """Whether a run folder holds anything computed (a checkpoint, a part, a log)."""
    bookkeeping = {".lock", "config.yaml", "run.json"}
    return any(p.is_file() and p.name not in bookkeeping for p in run_dir.rglob("*"))


def _execute(p: RunPlan, allow_training: bool, accelerator) -> Path:
    cfg, run_dir, ident = p.cfg, p.run_dir, p.identity
    assert ident is not None
    if (run_dir / COMPLETE).exists():  # finished by another process while we planned
        return run_dir
    probe = ident.method
    info = (_prepare_dir(p, probe.uses_random_weights(), probe.resolved_options(), str(accelerator.device))
            if accelerator.is_main_process else {})
    if accelerator.is_main_process:
        tqdm.write(_fold_line(p), file=sys.stderr)
    image_size = int(cfg.train.image_size) if cfg.train.get("image_size") else None
    for group in p.groups:
        part_cases = run_dir / "parts" / f"cases_{group.name}.csv"
        if part_cases.exists():
            damage = _part_damage(p, group)
            if damage is None:
                continue
            if accelerator.is_main_process:
                tqdm.write(f"{damage}: evaluating {_label(p, group)} again (its trained weights are kept)",
                           file=sys.stderr)
        method = probe if group is p.groups[0] else build_method(cfg)
        label = _label(p, group)
        ckpt_dir = run_dir / "checkpoints" / group.name
        if method.needs_training:
            existing = (_checkpoint_for(ident.checkpoint, group.name) if ident.checkpoint
                        else _find_checkpoint(cfg, ident.inputs, run_dir, group.name))
            if existing is not None and not accelerator.is_main_process:
                continue  # nothing to train, and only the main process evaluates
            if existing is not None:
                # weights the user passed are judged as passed; weights found in a run folder
                # are the run's own, so the hint says what to delete to train them again
                hint = None if ident.checkpoint else _found_weights_hint(existing, ckpt_dir, allow_training)
                step = load_weights(method, existing, hint=hint)
                tqdm.write(f"using trained weights {existing} (step {step})", file=sys.stderr)
                if accelerator.is_main_process and not ident.checkpoint:
                    trained_by = _weights_trained_by(existing, run_dir, ident)
                    if trained_by is not None:
                        info.setdefault("weights_trained_by", {})[group.name] = trained_by
                        write_json(run_dir / "run.json", info)  # a stop before the end keeps it
            elif not allow_training:
                raise ConfigError(
                    f"no trained checkpoint for {label}",
                    hint="train it first with `fsmis-bench run` and the same overrides, or pass "
                    "checkpoint=<a finished run's directory, or its final.safetensors>",
                )
            else:
                sampler = EpisodeSampler(
                    p.train_dataset, _training_cases(p), group,
                    train_labels=str(cfg.protocol.train_labels), norm=method.input_norm,
                    min_fg_pixels=int(cfg.protocol.min_fg_pixels), augment=bool(cfg.train.augment),
                    image_size=image_size, seed=int(cfg.seed),  # one stream; each process takes its share
                    rule=str(cfg.protocol.episode_sampler), augment_form=method.augment_form(),
                    runs=str(cfg.protocol.get("episode_runs", "reference")),
                )
                train(method, sampler, cfg, ckpt_dir, description=f"train {label}", accelerator=accelerator)
                del sampler  # its index of every training scan; the next group builds its own
        if not accelerator.is_main_process:
            continue
        method.to(accelerator.device)
        uncompile_method(method)  # the plain modules, as `eval` and a resumed run evaluate
        if bool(cfg.train.get("channels_last", False)):
            # The layout training left the weights in. Weights read back from a checkpoint (a
            # resumed run, `eval`) come in NCHW, whose convolutions round differently: in it a
            # resumed run's masks differed from the uninterrupted run's by a few voxels.
            method.to(memory_format=torch.channels_last)
        rows, predictions = evaluate(
            method, p.episodes[group.name], device=accelerator.device, image_size=image_size,
            autocast=accelerator.autocast, keep_predictions=bool(cfg.protocol.save_predictions),
            description=f"eval {label}", chunk_support=str(cfg.protocol.chunk_support),
        )
        if predictions:
            save_predictions(run_dir / "parts" / f"predictions_{group.name}.npz", predictions)
        frame = pd.DataFrame(rows)
        for key, value in (("method", info["method"]), ("dataset", info["test_dataset"]),
                           ("train_dataset", info["dataset"]), ("setting", info["setting"]),
                           ("fold", info["fold"]), ("seed", info["seed"])):
            frame[key] = value
        atomic_write(part_cases, frame[CASE_COLUMNS].to_csv(index=False))
        del method
    if not accelerator.is_main_process:
        return run_dir
    _finish(run_dir, p, info)
    return run_dir


def _part_damage(p: RunPlan, group: EvalGroup) -> str | None:
    """What is wrong with an unfinished run's evaluation part of ``group`` (its
    ``parts/cases_<group>.csv``, or the ``parts/predictions_<group>.npz`` beside it), worded
    as one line naming the file; None when the part stands. Every process of a run decides
    the same from the same files, so they train and skip the same groups."""
    from .record_repair import part_problem

    parts = p.run_dir / "parts"
    cases = parts / f"cases_{group.name}.csv"
    evaluated = {e.organ: [q.case_id for q in e.queries] for e in p.episodes[group.name]}
    problem = part_problem(cases, evaluated)
    if problem is not None:
        return f"{cases} is damaged ({problem})"
    predictions = parts / f"predictions_{group.name}.npz"
    if predictions.exists():
        try:  # the zip's directory, at its end: a file cut short has none
            with np.load(predictions) as data:
                data.files  # noqa: B018
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            return f"{predictions} is damaged ({type(exc).__name__}: {exc})"
    return None


def _found_weights_hint(weights: Path, own: Path, trains: bool = True) -> str:
    """What to do about damaged weights found in a run folder (this run's or an identical
    training's): delete them, and the group is trained again. ``trains``: False under
    ``eval``, which never trains, so the training is ``fsmis-bench run``'s."""
    command = "rerun the same command" if trains else "run the same overrides with `fsmis-bench run`"
    if weights.parent != own:
        return (f"delete {weights} (the weights of an identical training, in {weights.parents[2]}) and {command} "
                "to train this group again from step 0")
    resume = own / STATE_FILE
    again = f"from its last checkpoint ({resume})" if resume.exists() else "from step 0"
    return f"delete {weights} and {command} to train this group again {again}"


def _check_finished(run_dir: Path, ident: RunIdentity) -> bool:
    """Check a finished run's record as ``report`` does; a damaged ``cases.csv`` is rebuilt
    from the run's evaluation parts (announced on stderr). True if it was rebuilt.

    Raises:
        DamagedRecordError: the record is damaged and the parts cannot rebuild it.
    """
    from .runs_command import record_problem  # the report's own check

    _rewrite_damaged_config(run_dir, ident)
    if record_problem(run_dir) is None:
        return False
    with _exclusive(run_dir):  # no other process rebuilds it at the same time
        problem = record_problem(run_dir)
        if problem is not None:  # (unless one did while we waited)
            rebuild_cases(run_dir, problem, default_groups=_evaluated_groups(ident.cfg, ident.groups))
            return True
    return False


def _rewrite_damaged_config(run_dir: Path, ident: RunIdentity) -> None:
    """Write a finished run's damaged ``config.yaml`` again from this command's config
    (announced on stderr). It is the run's config when ``run.json`` records this command's
    hash: the file only serves ``export``, ``eval checkpoint=`` and the report's
    fingerprints, so nothing is recomputed. Left as it is otherwise, for ``report`` and
    ``runs`` to name."""
    problem = run_config_problem(run_dir, RUN_CONFIG_KEYS)  # as `export` and `eval checkpoint=` read it
    if problem is None:
        return
    try:
        recorded = read_json(run_dir / "run.json").get("config_hash")
    except (OSError, ValueError, AttributeError):  # the record's own damage is named by the check after this
        return
    if recorded != config_hash(ident.cfg, ident.inputs, ident.hash_form):
        return
    with _exclusive(run_dir):
        if run_config_problem(run_dir, RUN_CONFIG_KEYS) is not None:
            atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(ident.cfg))
            tqdm.write(f"{run_dir}: {problem}; written again from this command's config", file=sys.stderr)


def _finish(run_dir: Path, p: RunPlan, info: dict) -> None:
    parts = run_dir / "parts"
    cases = _checked_parts(run_dir, p, info)  # never COMPLETE over a damaged part
    atomic_write(run_dir / "cases.csv", cases[CASE_COLUMNS].to_csv(index=False))
    predictions = {}
    for g in p.groups:
        part = parts / f"predictions_{g.name}.npz"
        if part.exists():
            predictions.update(load_predictions(part))
    if predictions:
        save_predictions(run_dir / "predictions.npz", predictions)
    logs = []
    for g in p.groups:
        log_path = run_dir / "checkpoints" / g.name / "train_log.csv"
        if log_path.exists() and (log := _group_log(log_path)) is not None:
            log.insert(0, "group", g.name)
            logs.append(log)
    if logs:
        atomic_write(run_dir / "train_log.csv", pd.concat(logs).to_csv(index=False))
    steps = {g.name: _step_record(f) for g in p.groups
             if (f := run_dir / "checkpoints" / g.name / STEP_FILE).exists()}
    if steps:  # which step trained (train.cuda_graph is not hashed: it does not change the numbers)
        info["training_step"] = steps
    for g in p.groups:
        folder = run_dir / "checkpoints" / g.name
        if (folder / WEIGHTS_FILE).exists() and (folder / STATE_FILE).exists():
            # left when a stop came between writing the final weights and clearing the
            # resume state (10 GB for SD-1.5); the final weights supersede it
            clear_training_state(folder)
    info.update(finished_at=now(), status="complete")
    write_json(run_dir / "run.json", info)
    atomic_write(run_dir / COMPLETE, now() + "\n")
    tqdm.write(f"done: {run_dir} " + _dice_summary(cases, str(p.cfg.protocol.dice)), file=sys.stderr)


def _checked_parts(run_dir: Path, p: RunPlan, info: dict) -> pd.DataFrame:
    """The run's evaluation parts put together, checked as ``report`` checks ``cases.csv``.

    :func:`_execute` evaluates a damaged part again, so this only fails when a part was
    damaged while the run evaluated the others.

    Raises:
        DamagedRecordError: a part cannot be read or fails the checks.
    """
    from .reporting.collect import check_cases

    files = [run_dir / "parts" / f"cases_{g.name}.csv" for g in p.groups]
    redo = (f"rerun the same command: a damaged part's group is evaluated again with its trained weights "
            f"({', '.join(str(f) for f in files)})")
    try:
        cases = pd.concat(part_cases(run_dir, [g.name for g in p.groups]))
    except (OSError, ValueError) as exc:
        raise DamagedRecordError(f"the evaluation parts of {run_dir} cannot be read ({type(exc).__name__}: {exc})",
                                 hint=redo) from None
    problem = check_cases(cases, info)
    if problem is not None:
        raise DamagedRecordError(f"the evaluation parts of {run_dir} are damaged (put together, "
                                 f"{problem}); the run is not marked complete", hint=redo)
    return cases


def _group_log(path: Path) -> pd.DataFrame | None:
    """A group's ``checkpoints/<group>/train_log.csv`` for the run's ``train_log.csv``; a
    damaged one is said so in one line and left out (None), or cut back to its whole rows."""
    try:
        text = path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            tqdm.write(f"{path} was cut short: its last, incomplete row is left out of train_log.csv",
                       file=sys.stderr)
        return pd.read_csv(io.StringIO(text))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        tqdm.write(f"{path} is damaged ({type(exc).__name__}: {exc}): this group's losses are left out of "
                   "train_log.csv (the trained weights do not depend on it)", file=sys.stderr)
        return None


def _step_record(path: Path) -> dict | str:
    """A group's ``train_step.json`` (which step trained) for ``run.json``; a damaged one is
    said so in one line and recorded as unknown (it changes no number)."""
    try:
        step = json.loads(path.read_text())
        if isinstance(step, dict):
            return step
        problem = "not a JSON object"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    tqdm.write(f"{path} is damaged ({problem}): run.json records this group's training step as unknown "
               "(it changes no number)", file=sys.stderr)
    return f"unknown ({STEP_FILE} was damaged)"


def _dice_summary(cases: pd.DataFrame, dice: str) -> str:
    """``(Dice, per_volume)`` and one line per organ: what a finished run prints."""
    summary = fold_organ_scores(cases, dice).set_index("organ")["dice"]
    return f"(Dice, {dice})\n" + summary.to_string(float_format=lambda v: f"{v:.4f}")
