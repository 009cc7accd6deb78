"""Hydra composition of run configs, from the built-in ``configs/`` and plugin config dirs.

The command line takes Hydra overrides (``method=prototype dataset=abd_mri fold=3``).
Names of methods, datasets, backbones and settings are checked against the plugin
registries first, so an unknown name lists the known ones instead of a Hydra trace.
"""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .plugins import registries

_GROUPS = {"method": "methods", "dataset": "datasets", "backbone": "backbones"}
_CHOICES = {
    "protocol.dice": ("per_volume", "pooled"),
    "protocol.exclusion": ("any", "all"),
    "protocol.train_labels": ("supervoxels", "gt"),
    "protocol.gt_exclusion": ("per_group", "liver_spleen"),
    "fidelity": ("paper", "code"),
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "tf32": ("auto", True, False),
}


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
        hint = "check the override names (`fsmis-bench list`); new keys need a leading '+'"
        if any(line.startswith("Available options") for line in lines):
            start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
            options = [line for line in lines[start + 1:] if not line.startswith(("Config search path", "provider="))]
            hint = f"{lines[start].rstrip(':')}: {', '.join(options)}"
        raise ConfigError(f"invalid configuration: {lines[0]}", hint=hint) from None
    # Hydra puts its own node in composed configs; runs record only ours.
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    cfg = OmegaConf.create(with_hydra)
    validate(cfg)
    return cfg


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
            shown = (str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)  # true, not True
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"use one of: {', '.join(shown)}")
    for key in ("fold", "seed", "setting", "protocol.supp_idx", "protocol.n_part", "protocol.n_shot", "train.steps"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
    if cfg.fold < 0:
        raise ConfigError(f"fold={cfg.fold} does not exist", hint="use fold=0..4 (five folds, PROTOCOL.md §2)")
    OmegaConf.resolve(cfg)
