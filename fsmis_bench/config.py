"""Hydra composition of run configs, from the built-in ``configs/`` and plugin config dirs.

The command line takes Hydra overrides (``method=prototype dataset=abd_mri fold=3``).
Names of methods, datasets, backbones and settings are checked against the plugin
registries first, so an unknown name lists the known ones instead of a Hydra trace.
"""

from __future__ import annotations

import itertools
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ._registry import closest
from .errors import ConfigError
from .plugins import registries

_GROUPS = {"method": "methods", "dataset": "datasets", "backbone": "backbones"}
_CHOICES = {
    "protocol.dice": ("per_volume", "pooled"),
    "protocol.exclusion": ("any", "all"),
    "protocol.train_labels": ("supervoxels", "gt"),
    "fidelity": ("paper", "code"),
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.schedule": ("constant", "linear", "cosine"),
}
# Integer options and their least allowed value; those in _NULLABLE may also be null.
_INTEGERS = {
    "fold": 0, "seed": 0, "setting": 1,
    "protocol.supp_idx": 0, "protocol.n_part": 1, "protocol.n_shot": 1, "protocol.min_fg_pixels": 0,
    "protocol.max_queries": 1,
    "train.steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "train.checkpoint_every": 1,
    "train.log_every": 1, "train.warmup_steps": 0, "train.num_workers": 0, "train.image_size": 8,
}
_NULLABLE = ("protocol.max_queries", "train.image_size")
# Non-negative real options.
_REALS = ("train.grad_clip", "train.weight_decay")
_BOOLEANS = ("pretrained", "train.augment", "protocol.save_predictions")


def config_dir() -> Path:
    """The built-in configs, wherever the package is installed."""
    return Path(str(resources.files("fsmis_bench.configs")))


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Expand ``-m`` sweep overrides (``fold=0,1,2 method=a,b``) into single runs.

    Uses Hydra's own override grammar, so ``range(0,5)`` and quoted values work too.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from None
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            values = [override.get_value_element_as_str()]
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)]


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a config as ``a.b.c`` (containers and leaves)."""
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(_dotted_keys(value, dotted + "."))
    return keys


def _base_keys(overrides: list[str], extra: list[str]) -> set[str]:
    """The keys of the config that the group choices in ``overrides`` select, without any
    value override: every key fsmis-bench and the chosen plugins read."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    groups = [o for o in overrides if not o.startswith(("+", "~")) and o.split("=", 1)[0] in (*_GROUPS, "fidelity")]
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = hydra_compose("config", overrides=groups + extra)
        default_backbone = cfg.method.get("default_backbone")
        if not any(o.startswith("backbone=") for o in groups) and default_backbone:
            cfg = hydra_compose("config", overrides=groups + extra + [f"backbone={default_backbone}"])
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return set(_dotted_keys(plain))


def _unknown_key(key: str, known: set[str], added: bool) -> ConfigError:
    close = closest(key, known)
    suggestion = f"did you mean {close}? " if close else ""
    if added:
        return ConfigError(
            f"+{key} adds a key that nothing reads: no config declares {key!r}, so the value would be ignored",
            hint=suggestion + "every option that fsmis-bench or a plugin reads is declared in a config file "
            "(configs/config.yaml, configs/method/<name>.yaml, ...); a plugin declares its own options there",
        )
    return ConfigError(
        f"unknown option {key!r}",
        hint=suggestion + "see configs/config.yaml and the method's configs/method/<name>.yaml for the options",
    )


def _split(overrides: list[str]) -> dict[str, str]:
    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read the argument {item!r}",
                hint="arguments are key=value overrides, e.g. method=prototype dataset=abd_mri fold=0",
            )
        key, value = item.split("=", 1)
        pairs[key.lstrip("+~")] = value
    return pairs


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The resolved run config for a list of overrides (one run, no sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides or [])
    given = _split(overrides)
    regs = registries()
    for key, attr in _GROUPS.items():
        if key in given:
            getattr(regs, attr).entry(given[key])  # raises with the known names
    if "setting" in given:
        regs.settings.entry(given["setting"])

    extra = []
    if regs.config_dirs:
        extra.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in regs.config_dirs) + "]")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=overrides + extra)
            default_backbone = cfg.method.get("default_backbone")
            if "backbone" not in given and default_backbone:
                cfg = hydra_compose("config", overrides=overrides + extra + [f"backbone={default_backbone}"])
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        unknown = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
        if unknown:
            raise _unknown_key(unknown.group(1), _base_keys(overrides, extra), added=False) from None
        hint = "check the override names (`fsmis-bench list`)"
        present = re.search(r"An item is already at '([^']+)'", lines[0]) if lines else None
        if present:
            hint = f"{present.group(1)} exists: set it without the '+'"
        if any(line.startswith("Available options") for line in lines):
            start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
            options = [line for line in lines[start + 1:] if not line.startswith(("Config search path", "provider="))]
            hint = f"{lines[start].rstrip(':')}: {', '.join(options)}"
        raise ConfigError(f"invalid configuration: {lines[0]}", hint=hint) from None
    # Hydra puts its own node in composed configs; runs record only ours.
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    cfg = OmegaConf.create(with_hydra)
    _refuse_added_or_deleted(overrides, extra)
    validate(cfg)
    return cfg


def _refuse_added_or_deleted(overrides: list[str], extra: list[str]) -> None:
    """``+key=`` that adds a key no config declares would be silently ignored (a typo
    trains the defaults), and ``~key`` would remove one the code reads: both are refused."""
    added = [o.lstrip("+").split("=", 1)[0] for o in overrides if o.startswith("+")]
    deleted = [o.lstrip("~").split("=", 1)[0] for o in overrides if o.startswith("~")]
    if deleted:
        raise ConfigError(
            f"~{deleted[0]} would delete an option that fsmis-bench or the method reads",
            hint=f"set it instead, e.g. {deleted[0]}=null where null is allowed",
        )
    if not added:
        return
    known = _base_keys(overrides, extra)
    for key in added:
        if key not in known and not key.startswith("hydra."):
            raise _unknown_key(key, known, added=True)


def validate(cfg: DictConfig) -> None:
    """Fail early, with one clear message, on values the protocol does not define."""
    regs = registries()
    regs.methods.entry(str(cfg.method.name))
    regs.datasets.entry(str(cfg.dataset.name))
    test = cfg.protocol.get("test_dataset")
    if test:
        regs.datasets.entry(str(test))
    regs.settings.entry(str(cfg.setting))
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"use one of: {', '.join(allowed)}")
    for key, least in _INTEGERS.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in _NULLABLE:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}",
                              hint=f"e.g. {key}={max(least, 1)}" + (" (or null)" if key in _NULLABLE else ""))
        if value < least:
            if key == "fold":
                raise ConfigError(f"fold={value} does not exist", hint="use fold=0..4 (five folds, PROTOCOL.md §2)")
            raise ConfigError(f"{key}={value} is not allowed", hint=f"{key} must be at least {least}")
    for key in _REALS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"{key} must be a finite number >= 0")
    for key in _BOOLEANS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"use {key}=true or {key}=false")
    organs = cfg.protocol.get("organs")
    if organs is not None and (not OmegaConf.is_list(organs) or not all(isinstance(o, str) for o in organs)):
        raise ConfigError(f"protocol.organs={organs!r} is not a list of organ names", hint="e.g. protocol.organs=[liver]")
    OmegaConf.resolve(cfg)
