"""Runs: compose -> datasets -> protocol episodes -> train (or resume, or reuse) -> evaluate -> record.

Everything a run computes is validated before training starts (data root, folds, that
each support scan shows each organ), so a bad input never costs a training run. Each
evaluation group is recorded as soon as it is done, so an interrupted run resumes where
it stopped, and a finished run is never recomputed or overwritten.
"""

from __future__ import annotations

import sys
import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .data.base import VolumeDataset
from .errors import ConfigError
from .evaluation import OrganEpisodes, evaluate
from .method import Method
from .plugins import registries
from .protocol.ep1 import build_test_episodes
from .protocol.metrics import fold_organ_scores
from .protocol.settings import EvalGroup, eval_groups
from .records import (
    CASE_COLUMNS, COMPLETE, atomic_write, config_hash, load_predictions, non_standard_options,
    now, package_versions, read_json, run_dir_for, save_predictions, test_dataset_name,
    training_hash, write_json,
)
from .training.engine import load_weights, make_accelerator, train
from .training.episodes import EpisodeSampler
from .training.precision import precision_of, with_resolved_precision


def build_dataset(dataset_cfg: DictConfig | dict, data_root: str | None) -> VolumeDataset:
    """A dataset plugin instance from its config group (``name`` + options)."""
    options = OmegaConf.to_container(dataset_cfg, resolve=True) if isinstance(dataset_cfg, DictConfig) else dict(dataset_cfg)
    name = options.pop("name")
    dataset = registries().datasets.build(name, data_root, **options)
    dataset.registered_name = name
    return dataset


def build_method(cfg: DictConfig) -> Method:
    """The method plugin instance for a resolved config (seeded by ``cfg.seed``)."""
    torch.manual_seed(int(cfg.seed))
    method_cls = registries().methods.get(str(cfg.method.name))
    return method_cls(cfg)


@dataclass
class RunPlan:
    cfg: DictConfig
    run_dir: Path
    train_dataset: VolumeDataset
    test_dataset: VolumeDataset
    groups: list[EvalGroup]
    episodes: dict[str, list[OrganEpisodes]]


def plan(cfg: DictConfig) -> RunPlan:
    """Resolve datasets, groups and every test episode; raises before anything is trained."""
    method_cls = registries().methods.get(str(cfg.method.name))
    train_dataset = build_dataset(cfg.dataset, cfg.data_root)
    test_name = test_dataset_name(cfg)
    if test_name == cfg.dataset.name:
        test_dataset = train_dataset
    else:
        test_dataset = build_dataset({"name": test_name}, cfg.data_root)
    groups = eval_groups(train_dataset, test_dataset, int(cfg.setting), str(cfg.protocol.exclusion),
                         str(cfg.protocol.train_labels), str(cfg.protocol.get("gt_exclusion", "per_group")))
    if method_cls.needs_training and cfg.protocol.train_labels == "supervoxels":
        ensure = getattr(train_dataset, "ensure_supervoxels", None)
        if ensure is not None:
            ensure()
    fold_cases = test_dataset.fold_cases(int(cfg.fold))
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
                test_dataset, fold_cases, organ, supp_idx=int(cfg.protocol.supp_idx),
                n_part=int(cfg.protocol.n_part), n_shot=int(cfg.protocol.n_shot),
                norm=method_cls.input_norm,
            )
            episodes[group.name].append(OrganEpisodes(organ, support, queries[:max_queries]))
    groups = [g for g in groups if episodes[g.name]]
    episodes = {g.name: episodes[g.name] for g in groups}
    return RunPlan(cfg, run_dir_for(cfg), train_dataset, test_dataset, groups, episodes)


def _training_cases(p: RunPlan) -> list[str]:
    if p.train_dataset is p.test_dataset:
        return p.train_dataset.train_cases(int(p.cfg.fold))
    return p.train_dataset.case_ids()  # cross-domain: the whole source dataset


def _find_checkpoint(cfg: DictConfig, run_dir: Path, group: str) -> Path | None:
    """A finished training with the same training config, in this or a sibling run."""
    own = run_dir / "checkpoints" / group / "final.pt"
    if own.exists():
        return own
    wanted = training_hash(cfg)
    for info in sorted(run_dir.parent.glob("*/run.json")):
        candidate = info.parent / "checkpoints" / group / "final.pt"
        if candidate.exists() and read_json(info).get("training_hash") == wanted:
            return candidate
    return None


def _prepare_dir(cfg: DictConfig, run_dir: Path, random_weights: bool, method_options: dict | None = None) -> dict:
    full_hash = config_hash(cfg)
    info_path = run_dir / "run.json"
    if info_path.exists():
        info = read_json(info_path)
        if info.get("config_hash") != full_hash:
            raise ConfigError(
                f"{run_dir} holds a run with another config (hash prefix collision)",
                hint="move that directory away; fsmis-bench never overwrites a run",
            )
        return info
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
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
        "non_standard": non_standard_options(cfg, random_weights),
        "config_hash": full_hash,
        "training_hash": training_hash(cfg),
        "versions": package_versions(),
        "started_at": now(),
        "finished_at": None,
        "status": "running",
    }
    write_json(info_path, info)
    return info


def execute(cfg: DictConfig, *, allow_training: bool = True, checkpoint: Path | None = None) -> Path:
    """Run (or resume) one configuration and return its record directory."""
    # `auto` precision depends on this machine's device: resolved here, where the run runs,
    # so that the concrete precision is part of the hash and the record.
    cfg = with_resolved_precision(cfg)
    run_dir = run_dir_for(cfg)
    if (run_dir / COMPLETE).exists():
        tqdm.write(f"already complete, not recomputed: {run_dir}", file=sys.stderr)
        return run_dir
    p = plan(cfg)
    with _exclusive(run_dir):
        return _execute(p, cfg, run_dir, allow_training, checkpoint)


@contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """One process per run directory; the OS drops the lock if the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir} is being computed by another process right now",
                hint="let that process finish; rerunning afterwards reuses its result",
            ) from None
        yield


def _execute(p: RunPlan, cfg: DictConfig, run_dir: Path, allow_training: bool, checkpoint: Path | None) -> Path:
    if (run_dir / COMPLETE).exists():  # finished by another process while we planned
        return run_dir
    accelerator = make_accelerator(cfg, int(cfg.train.grad_accum))
    probe = build_method(cfg)
    info = _prepare_dir(cfg, run_dir, probe.uses_random_weights(), probe.resolved_options())
    image_size = int(cfg.train.image_size) if cfg.train.get("image_size") else None
    for group in p.groups:
        part_cases = run_dir / "parts" / f"cases_{group.name}.csv"
        if part_cases.exists():
            continue
        method = probe if group is p.groups[0] else build_method(cfg)
        label = f"{cfg.method.name}/{p.test_dataset.name} s{cfg.setting} f{cfg.fold} [{group.name}]"
        ckpt_dir = run_dir / "checkpoints" / group.name
        if method.needs_training:
            existing = checkpoint or _find_checkpoint(cfg, run_dir, group.name)
            if existing is not None:
                step = load_weights(method, existing)
                tqdm.write(f"using trained weights {existing} (step {step})", file=sys.stderr)
            elif not allow_training:
                raise ConfigError(
                    f"no trained checkpoint for {label}",
                    hint="train it first with `fsmis-bench run` and the same overrides, or pass checkpoint=<final.pt>",
                )
            else:
                sampler = EpisodeSampler(
                    p.train_dataset, _training_cases(p), group,
                    train_labels=str(cfg.protocol.train_labels), norm=method.input_norm,
                    min_fg_pixels=int(cfg.protocol.min_fg_pixels), augment=bool(cfg.train.augment),
                    image_size=image_size, seed=int(cfg.seed) + accelerator.process_index,
                )
                train(method, sampler, cfg, ckpt_dir, description=f"train {label}", accelerator=accelerator)
        if not accelerator.is_main_process:
            continue
        method.to(accelerator.device)
        rows, predictions = evaluate(
            method, p.episodes[group.name], device=accelerator.device, image_size=image_size,
            autocast=accelerator.autocast, keep_predictions=bool(cfg.protocol.save_predictions),
            description=f"eval {label}",
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


def _finish(run_dir: Path, p: RunPlan, info: dict) -> None:
    parts = run_dir / "parts"
    cases = pd.concat([pd.read_csv(parts / f"cases_{g.name}.csv", dtype={"case_id": str}) for g in p.groups])
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
        if log_path.exists():
            log = pd.read_csv(log_path)
            log.insert(0, "group", g.name)
            logs.append(log)
    if logs:
        atomic_write(run_dir / "train_log.csv", pd.concat(logs).to_csv(index=False))
    info.update(finished_at=now(), status="complete")
    write_json(run_dir / "run.json", info)
    atomic_write(run_dir / COMPLETE, now() + "\n")
    summary = fold_organ_scores(cases, str(p.cfg.protocol.dice)).set_index("organ")["dice"]
    tqdm.write(f"done: {run_dir} (Dice, {p.cfg.protocol.dice})\n" + summary.to_string(float_format=lambda v: f"{v:.4f}"),
               file=sys.stderr)
