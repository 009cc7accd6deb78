"""Trained weights a run does not train itself.

An external checkpoint (``eval checkpoint=``: a weights file, or a finished run's directory),
checked against the config of the run that trained it; and a finished training found in
the run's own folder or in a sibling's with the same training hash (:func:`_find_checkpoint`),
with which run trained it (:func:`_weights_trained_by`). Used by :mod:`fsmis_bench.runner`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from .data.digest import file_sha256, files_sha256
from .errors import ConfigError, DataWarning
from .protocol.settings import EvalGroup
from .records import (
    HASH_FORMS, comparable_dataset, inference_options, method_class, read_json, read_run_config, training_hash,
    training_settings,
)
from .run_folder import _other_code, _record_or_none
from .training.checkpoint import (
    LEGACY_FILES, STATE_FILE, WEIGHTS_FILE, CheckpointError, read_metadata, refuse_legacy,
)

if TYPE_CHECKING:
    from .runner import RunIdentity


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
