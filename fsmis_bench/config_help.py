"""``fsmis-bench run --help``: the config groups and main keys, read from the configs themselves."""

from __future__ import annotations

from omegaconf import OmegaConf

# The keys worth a line in --help (all keys: `fsmis-bench run --cfg job`).
_SHOWN = (
    "setting", "fold", "seed", "results_dir", "data_root", "weights_root", "pretrained", "device",
    "mixed_precision", "protocol.test_dataset", "protocol.supp_idx", "protocol.n_part", "protocol.n_shot",
    "protocol.dice", "protocol.exclusion", "protocol.train_labels", "protocol.organs", "protocol.max_queries",
    "train.steps", "train.batch_size", "train.grad_accum", "train.schedule", "train.image_size",
    "train.checkpoint_every",
)


def group_options(group: str) -> list[str]:
    """The options of a config group (``fidelity``, ``hydra/launcher`` ...) as Hydra sees them."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import _beside_running_hydra, config_dir

    with _beside_running_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def main_keys() -> str:
    """A plain-text table: config groups with their names, then the main keys with defaults."""
    from .config import _CHOICES, compose
    from .plugins import registries

    regs = registries()
    groups = [
        ("method", ", ".join(e.name for e in regs.methods)),
        ("dataset", ", ".join(e.name for e in regs.datasets)),
        ("backbone", ", ".join(e.name for e in regs.backbones)),
        ("setting", ", ".join(e.name for e in regs.settings)),
        ("fidelity", ", ".join(group_options("fidelity")) + "  (code: the SD-FSMIS code's protocol; SD methods)"),
        ("speed", ", ".join(group_options("speed")) + "  (fast: bf16 autocast + NHWC + compiled GroupNorms)"),
        ("memory", ", ".join(group_options("memory")) + "  (low: gradient checkpointing + 8-bit AdamW)"),
        ("hydra/launcher", ", ".join(group_options("hydra/launcher"))
         + "  (with -m; joblib/submitit: pip install 'fsmis-bench[launchers]')"),
    ]
    lines = ["config groups (key=name):"]
    width = max(len(k) for k, _ in groups)
    lines += [f"  {key.ljust(width)}  {names}" for key, names in groups]
    cfg = compose([])
    lines += ["", "main keys (default of the default run; a method's config sets its own train.*):"]
    width = max(len(k) for k in _SHOWN)
    for key in _SHOWN:
        value = OmegaConf.select(cfg, key)
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if key in _CHOICES:
            shown += f"  ({' | '.join(_CHOICES[key])})"
        lines.append(f"  {key.ljust(width)}  {shown}")
    lines += ["", "every key of a resolved config: fsmis-bench run [overrides] --cfg job"]
    return "\n".join(lines)
