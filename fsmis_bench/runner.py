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

The run folder and its record are :mod:`fsmis_bench.run_folder`'s; weights a run reuses
or is given, :mod:`fsmis_bench.run_checkpoints`'s.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from .data.base import VolumeDataset
from .data.consistency import shared_slices, slice_digests, spacing_mismatch
from .errors import ConfigError, DataWarning, FsmisError
from .evaluation import OrganEpisodes, evaluate
from .method import Method
from .plugins import registries
from .protocol.ep1 import build_test_episodes
from .protocol.settings import EvalGroup, eval_groups
from .record_repair import DamagedRecordError  # noqa: F401 (DamagedRecordError re-exported)
from .records import (
    CASE_COLUMNS, COMPLETE, HASH_FORMS, HashForm, atomic_write, run_dir_for, save_predictions, write_json,
    writing_to,
)
from .run_checkpoints import (
    _check_checkpoint_source, _checkpoint_for, _external_checkpoint, _find_checkpoint, _found_weights_hint,
    _weights_trained_by,
)
from .run_folder import (
    _check_finished, _check_results_writable, _dice_summary, _exclusive, _finish, _part_damage, _prepare_dir,
    _warn_if_other_code,
)
from .training.checkpoint import load_weights
from .training.engine import make_accelerator, train
from .training.episodes import EpisodeSampler
from .training.precision import selects_cuda, with_resolved_precision
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
        if method.needs_training:
            _reuse_or_train(p, group, method, allow_training, accelerator, info, image_size)
        if not accelerator.is_main_process:
            continue
        _evaluate_group(p, group, method, accelerator, info, image_size)
        del method
    if not accelerator.is_main_process:
        return run_dir
    _finish(run_dir, p, info)
    return run_dir


def _reuse_or_train(p: RunPlan, group: EvalGroup, method: Method, allow_training: bool, accelerator,
                    info: dict, image_size: int | None) -> None:
    """Give ``method`` the group's trained weights: an external checkpoint's, a finished
    training's found in this or a sibling run folder (recorded in ``run.json`` when another
    run trained them), or a training of its own, resumed where it stopped.

    The other processes of a multi-process run only share the training: with weights found,
    they leave them unread (only the main process evaluates).
    """
    cfg, run_dir, ident = p.cfg, p.run_dir, p.identity
    assert ident is not None
    label = _label(p, group)
    ckpt_dir = run_dir / "checkpoints" / group.name
    existing = (_checkpoint_for(ident.checkpoint, group.name) if ident.checkpoint
                else _find_checkpoint(cfg, ident.inputs, run_dir, group.name))
    if existing is not None and not accelerator.is_main_process:
        return  # nothing to train, and only the main process evaluates
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


def _evaluate_group(p: RunPlan, group: EvalGroup, method: Method, accelerator, info: dict,
                    image_size: int | None) -> None:
    """Evaluate ``method`` on the group's test episodes and write the group's part of the
    record (``parts/cases_<group>.csv``, and ``parts/predictions_<group>.npz`` when kept).
    The main process's work."""
    cfg, run_dir = p.cfg, p.run_dir
    label = _label(p, group)
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
    atomic_write(run_dir / "parts" / f"cases_{group.name}.csv", frame[CASE_COLUMNS].to_csv(index=False))
