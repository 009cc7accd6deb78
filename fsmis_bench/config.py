"""Hydra composition of run configs, from the built-in ``configs/`` and plugin config dirs.

The command line takes Hydra overrides (``method=prototype dataset=abd_mri fold=3``).
Names of methods, datasets, backbones and settings are checked against the plugin
registries first, so an unknown name lists the known ones instead of a Hydra trace.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from ._registry import closest
from .errors import ConfigError, FsmisError, UnknownNameError
from .plugins import origin_of, registries

_GROUPS = {"method": "methods", "dataset": "datasets", "backbone": "backbones"}
_CHOICES = {
    "protocol.dice": ("per_volume", "pooled"),
    "protocol.exclusion": ("any", "all"),
    "protocol.train_labels": ("supervoxels", "gt"),
    "protocol.gt_exclusion": ("per_group", "liver_spleen"),
    "protocol.episode_sampler": ("reference", "uniform_pairs", "same_slice"),
    "protocol.episode_runs": ("reference", "sorted"),
    "protocol.chunk_support": ("matched", "all"),
    "fidelity": ("paper", "code"),
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.schedule": ("constant", "linear", "cosine", "step"),
    "tf32": ("auto", True, False),
}


def _engine_choices() -> dict[str, tuple]:
    """The compute switches' values, from the modules that implement them (imported late:
    they load torch)."""
    from .training.optim import OPTIMIZERS, WEIGHT_DTYPES
    from .training.step import ACCUMULATION, COMPILE_MODES, COMPILE_SCOPES

    return {
        "train.optimizer": OPTIMIZERS,
        "train.accumulation": ACCUMULATION,
        "train.compile": (False, *COMPILE_MODES),
        "train.compile_scope": COMPILE_SCOPES,
        "train.weight_dtype": tuple(WEIGHT_DTYPES),
        "train.fused_optimizer": ("auto", True, False),
        "train.channels_last": (True, False),
        "train.cuda_graph": ("auto", True, False),
        "train.async_checkpoint": ("auto", True, False),
        "train.fused_clip": ("auto", True, False),
        "train.cudnn_benchmark": (True, False),
    }
# Integer options and their least allowed value (None: any; supp_idx is checked against the
# fold size, -1 being the last scan); those in _NULLABLE may also be null.
_INTEGERS = {
    "fold": 0, "seed": 0, "setting": 1,
    "protocol.supp_idx": None, "protocol.n_part": 1, "protocol.n_shot": 1, "protocol.min_fg_pixels": 0,
    "protocol.max_queries": 1,
    "train.steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "train.checkpoint_every": 1,
    "train.log_every": 1, "train.warmup_steps": 0, "train.num_workers": 0, "train.image_size": 8,
    "train.lr_step_every": 1,
}
_NULLABLE = ("protocol.max_queries", "train.image_size")
# Integer options with a greatest allowed value: torch and numpy take 64-bit signed seeds.
_MOST = {"seed": 2**63 - 1}
# Non-negative real options.
_REALS = ("train.grad_clip", "train.weight_decay", "train.momentum", "train.lr_gamma")
_BOOLEANS = ("pretrained", "train.augment", "protocol.save_predictions")


def config_dir() -> Path:
    """The built-in configs, wherever the package is installed.

    Raises:
        ConfigError: ``fsmis_bench`` was imported from a checkout over an installed wheel.
            The wheel installs the repository's ``configs/`` as ``fsmis_bench.configs``;
            Python started in a checkout's root imports that checkout's ``fsmis_bench/``
            first, which has no such subpackage, while ``fsmis_methods`` and
            ``fsmis_datasets`` still come from the wheel: two versions of the code in one
            run, so it is refused (a lent H100 ran into it with ``python -m``).
    """
    try:
        found = Path(str(resources.files("fsmis_bench.configs")))
    except ModuleNotFoundError:
        package = Path(__file__).resolve().parent
        raise ConfigError(
            f"fsmis_bench was imported from {package}, a checkout, over an installed fsmis-bench: "
            "its configs and methods would come from two versions of the code",
            hint="start Python with -P (python -P -m fsmis_bench ...) or from another folder, "
                 "or install the checkout itself (pip install -e .)",
        ) from None
    _check_one_tree()
    return found


@functools.lru_cache(maxsize=1)
def _check_one_tree() -> None:
    """``fsmis_bench`` and the built-in methods and datasets from one installation: in a
    checkout they lie side by side (``methods/``, ``datasets/``), in a wheel likewise in
    site-packages. Python started in a second checkout's root imports that checkout's
    ``fsmis_bench`` while ``pip install -e`` of the first still serves the methods."""
    import importlib.util

    harness = Path(__file__).resolve().parent.parent
    for name in ("fsmis_methods", "fsmis_datasets"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin).resolve().parent.parent if spec is not None and spec.origin else None
        if origin is not None and origin != harness:
            raise ConfigError(
                f"fsmis_bench was imported from {harness} but the built-in {name} from {origin}: "
                "two copies of the code in one run",
                hint=f"run from a folder outside {harness} (or with python -P), or install this copy "
                     f"(pip install -e {harness})",
            )


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
            try:
                values = list(override.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - Hydra's own errors name its internals, not the value
                raise ConfigError(
                    f"{override.input_line}: fsmis-bench cannot enumerate this sweep",
                    hint="list the values (`key=a,b,c`), or use range(start,stop[,step]) or choice(a,b); "
                         "glob() and interval() need Hydra's config search or a sweeper plugin",
                ) from None
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


def _declared(overrides: list[str], extra: list[str]) -> dict[str, Any]:
    """The config that the group choices in ``overrides`` select, without any value
    override (unresolved): every key fsmis-bench and the chosen plugins declare, with the
    value their config files give it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    given = _split(overrides)
    groups = [f"{k}={v}" for k, v in given.items() if k in (*_GROUPS, "fidelity", "memory", "speed")]
    test_name = given.get("protocol.test_dataset")
    if test_name not in (None, "", "null"):  # a cross-domain test dataset's own options
        groups.append(f"+dataset@test_dataset={test_name}")
    with _beside_running_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        cfg = hydra_compose("config", overrides=groups + extra)
        default_backbone = cfg.method.get("default_backbone")
        if not any(o.startswith("backbone=") for o in groups) and default_backbone:
            cfg = hydra_compose("config", overrides=groups + extra + [f"backbone={default_backbone}"])
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return plain  # type: ignore[return-value]


def _base_keys(overrides: list[str], extra: list[str]) -> set[str]:
    """The keys of the config that the group choices in ``overrides`` select, without any
    value override: every key fsmis-bench and the chosen plugins read."""
    return set(_dotted_keys(_declared(overrides, extra)))


def _close_key(key: str, known: set[str]) -> str | None:
    """The known key ``key`` is most likely a typo of. In a section that exists only its own
    keys are candidates, compared by their last part: over whole keys the shared
    ``method.`` would make ``method.foo`` a typo of ``method.lr``."""
    parent, _, leaf = key.rpartition(".")
    if parent and parent in known:
        siblings = {k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent}
        found = closest(leaf, siblings)
        return f"{parent}.{found}" if found else None
    return closest(key, {k for k in known if not key.startswith(k + ".")})


def _unknown_key(key: str, known: set[str], added: bool, overrides: list[str] | None = None) -> ConfigError:
    close = _close_key(key, known)
    suggestion = f"did you mean {close}? " if close else ""
    group = key.split(".", 1)[0]
    chosen = (_split(overrides or []).get(group) or _default_choice(group)) if group in ("method", "dataset") else None
    where = _config_file(group, str(chosen)) if chosen else None
    if group == "method" and not added and "." in key:
        others = _methods_declaring(key.split(".", 1)[1])
        if others:  # another method's option: a typo suggestion from this method's keys would mislead
            return ConfigError(
                f"unknown option {key!r} for method={chosen}",
                hint=f"{key} is an option of " + ", ".join(f"method={m}" for m in others)
                + (f"; method={chosen} declares its options in {where}" if where is not None else ""),
            )
    if where is not None and not added:  # the file that declares this method's (dataset's) options
        return ConfigError(f"unknown option {key!r}",
                           hint=suggestion + f"{group}={chosen} declares its options in {where}")
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
def is_sweep(overrides: list[str]) -> bool:
    """Whether any override describes several values (``fold=0,1``, ``range(5)``).

    Read with Hydra's grammar, so a dict value (``{liver:1,spleen:2}``) is one value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - unreadable overrides get compose()'s clearer message
        return False
    return any(o.is_sweep_override() for o in parsed)


def _add_or_replace(override: str) -> str:
    """``+a.b=v`` -> ``++a.b=v``: adding a value key works whether or not the config has it.

    Hydra refuses ``+key=`` for a key that already exists (``dataset.label_map`` does, as
    null); config group additions (``+group=option``, no dot) keep Hydra's meaning.
    """
    key = override.split("=", 1)[0]
    if key.startswith("+") and not key.startswith("++") and "." in key and "@" not in key:
        return "+" + override
    return override


def _split(overrides: list[str]) -> dict[str, str]:
    pairs = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"cannot read the argument {item!r}",
                hint="arguments are key=value overrides, e.g. method=prototype dataset=abd_mri fold=0",
            )
        key, value = item.split("=", 1)
        if not key.lstrip("+~"):
            raise ConfigError(f"cannot read the argument {item!r}: it names no key",
                              hint="arguments are key=value overrides, e.g. fold=0")
        pairs[key.lstrip("+~")] = value
    return pairs


_GENERIC_HINT = "check the override names (`fsmis-bench list`)"


def names_a_path(override: str) -> bool:
    """Whether an override sets a path (``dataset.path``, ``results_dir``, ``data_root``, ...)."""
    key = override.partition("=")[0].lstrip("+~")
    last = key.rsplit(".", 1)[-1]
    return last in ("path", "results_dir", "data_root", "weights_root", "checkpoint") or last.endswith(("_dir", "_path"))


def _group_options(group: str) -> list[str]:
    """The configs of a config group (``memory`` -> ``["low"]``), empty for a key that is no group."""
    names = set()
    for folder in (config_dir(), *registries().config_dirs):
        if (Path(folder) / group).is_dir():
            names |= {p.stem for p in (Path(folder) / group).glob("*.y*ml")}
    return sorted(names)


def _not_a_config_name(overrides: list[str], exc: Exception) -> ConfigError:
    """Hydra's ``Config group override must be a string`` (``memory=true``, ``fidelity=1``),
    as one error naming the override and the group's configs."""
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        options = _group_options(key)
        if options and value not in options:
            return ConfigError(f"{key}={value}: {key} is a config group, and {value!r} is none of its configs",
                               hint=f"{key} is one of: {', '.join(options)}")
    return ConfigError(f"invalid configuration: {exc}", hint="check the override names (`fsmis-bench run --help`)")


@functools.lru_cache(maxsize=1)
def _base_config() -> DictConfig:
    """``config.yaml`` as written (its sections, before any group is composed in)."""
    return OmegaConf.load(Path(config_dir()) / "config.yaml")


def _check_sections(cfg: DictConfig, given: dict[str, str]) -> None:
    """A section of keys (``protocol``, ``train``) replaced by one value (``protocol=null``)
    would fail later in some unrelated check; refused here with what to do instead."""
    for key, value in given.items():
        if "." not in key and key in cfg and not OmegaConf.is_dict(cfg[key]) and not _group_options(key):
            if OmegaConf.is_dict(OmegaConf.select(_base_config(), key)):
                raise ConfigError(f"{key}={value} replaces the whole section {key} with one value",
                                  hint=f"set its keys instead, e.g. {key}.<key>=<value> "
                                       "(`fsmis-bench run --help` lists the main ones)")


def _methods_declaring(option: str) -> list[str]:
    """The methods whose config declares ``method.<option>``, itself or through the method
    configs its defaults list builds on (``sdfsmis_qe`` on ``sdfsmis``)."""
    files: dict[str, Path] = {}
    for folder in (config_dir(), *registries().config_dirs):
        for path in sorted((Path(folder) / "method").glob("*.y*ml")):
            files.setdefault(path.stem, path)
    absent = object()

    def declares(name: str, seen: frozenset[str]) -> bool:
        if name not in files or name in seen:
            return False
        try:
            raw = OmegaConf.load(files[name])
        except Exception:  # noqa: BLE001 - a plugin's unreadable file is reported where it is used
            return False
        if not isinstance(raw, DictConfig):
            return False
        if OmegaConf.select(raw, f"method.{option}", default=absent) is not absent:
            return True
        bases = [item for item in raw.get("defaults") or [] if isinstance(item, str) and item != "_self_"]
        return any(declares(base.lstrip("/").rsplit("/", 1)[-1], seen | {name}) for base in bases)

    return [name for name in sorted(files) if declares(name, frozenset())]


def _config_file(group: str, name: str) -> Path | None:
    """``<group>/<name>.yaml`` as Hydra finds it: the built-in configs first, then each
    plugin's config folder in order; None where none has it."""
    for folder in (config_dir(), *registries().config_dirs):
        for suffix in (".yaml", ".yml"):
            path = Path(folder) / group / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def _unregistered(group: str, name: str, unknown: UnknownNameError) -> FsmisError:
    """An unknown name whose config a plugin ships nevertheless: its plugin most likely
    forgot to register it, which the list of known names alone would not say."""
    path = _config_file(group, name)
    if path is None or Path(path).parent.parent == config_dir():
        return unknown
    origin = registries().config_dir_plugins.get(Path(path).parent.parent)
    shipped = f"{origin} ships {path}" if origin is not None else f"{path} exists"
    hook = {"method": "fsmis_register_methods", "dataset": "fsmis_register_datasets",
            "backbone": "fsmis_register_backbones"}[group]
    return ConfigError(
        f"{unknown.message}; {shipped}, but no plugin registers a {group} named {name!r}",
        hint=f"register it in the plugin's {hook} hook: registry.register({name!r}, <its class or "
             "'module:Class'>, description=...)",
    )


def _require_config(group: str, name: str) -> Path:
    """The config file of a registered name; a plugin that registered the name but ships no
    ``<group>/<name>.yaml`` where Hydra looks is named, with what it must ship."""
    path = _config_file(group, name)
    if path is not None:
        return path
    regs = registries()
    entry = getattr(regs, _GROUPS[group]).entry(name)
    dirs = regs.dirs_of(entry.plugin)
    if dirs:
        where = ("its plugin's fsmis_config_dirs hook returns "
                 + ", ".join(str(d) + ("" if d.is_dir() else " (missing)") for d in dirs))
    else:
        where = "its plugin returns no folder from an fsmis_config_dirs hook"
    raise ConfigError(
        f"{entry.described()} has no config: no {group}/{name}.yaml in the built-in configs or a plugin's "
        f"config folder ({where})",
        hint=f"the plugin must ship {group}/{name}.yaml (with {group}.name: {name}) as package data, in a folder "
        "that its fsmis_config_dirs hook returns (README, 'Adding a method')",
    )


def _default_choice(group: str) -> str | None:
    """The option of ``group`` that configs/config.yaml's defaults list selects."""
    for item in OmegaConf.load(config_dir() / "config.yaml").get("defaults", []):
        if isinstance(item, DictConfig) and group in item:
            return str(item[group])
    return None


def _check_group_name(cfg: DictConfig, given: dict[str, str], group: str) -> None:
    """``<group>.name`` must exist and equal the ``<group>=`` choice (``method``, ``dataset``):
    the name picks the class that runs, the choice the config file, and the two must be the
    same plugin."""
    choice = given.get(group) or _default_choice(group)
    key = f"{group}.name"
    if key in given and given[key] != str(choice):
        raise ConfigError(
            f"{key}={given[key]} overrides the name that {group}={choice} set",
            hint=f"choose the {group} with {group}=<name> only, e.g. {group}={given[key]}",
        )
    path = _config_file(group, str(choice))
    shown = str(path) if path is not None else f"{group}/{choice}.yaml"
    node = cfg.get(group)
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name is None:
        if group != "method":  # dataset configs are packaged under their group: a top-level key
            hint = f"add the line `name: {choice}` to that file"
        elif path is not None and "@package _global_" in path.read_text(errors="replace"):
            hint = f"add `name: {choice}` under `method:` in that file (README, 'Adding a method')"
        else:
            hint = (f"start the file with the line `# @package _global_` and put its options under `method:`, "
                    f"beginning with `name: {choice}` (README, 'Adding a method')")
        raise ConfigError(f"{shown} ({group}={choice}) does not set {key}", hint=hint)
    if str(name) != str(choice):
        raise ConfigError(
            f"{shown} ({group}={choice}) sets {key}={name!r}, so {group}={choice} would run {name!r}",
            hint=f"{key} must equal the file's name: set `name: {choice}` in {shown}",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _option_kind(declared: Any) -> tuple[str, Callable[[Any], bool]] | None:
    """What values a key declared as ``declared`` takes: ``(words for them, test)``;
    None for a key that takes anything (declared ``null``)."""
    if declared is None:
        return None
    if declared == "auto":
        return "auto, true or false", lambda v: v == "auto" or isinstance(v, bool)
    if isinstance(declared, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(declared, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    for kind, words in ((float, "a number"), (str, "text"), (list, "a list"), (dict, "a mapping")):
        if isinstance(declared, kind):
            return words, (_is_number if kind is float else lambda v, kind=kind: isinstance(v, kind))
    return None


def _check_method_option_types(cfg: DictConfig, overrides: list[str], extra: list[str]) -> None:
    """Every ``method.*`` override must have the type of the value the method's config
    declares (int, float, bool, str, list, mapping; a key declared ``null`` takes anything)."""
    given = _split(overrides)
    keys = [k for k in given if k.startswith("method.") and k != "method.name"]
    if not keys:
        return
    declared_cfg = OmegaConf.create(_declared(overrides, extra))
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in keys:
        try:
            declared = OmegaConf.select(declared_cfg, key, throw_on_resolution_failure=False)
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - an odd key: Hydra's own checks answer for it
            continue
        declared = OmegaConf.to_container(declared, resolve=True) if OmegaConf.is_config(declared) else declared
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        option_kind = _option_kind(declared)
        if option_kind is None or option_kind[1](value) or isinstance(_pick(plain, key), str) and "${" in _pick(plain, key):
            continue
        kind = option_kind[0]
        name = str(cfg.method.name)
        shown = "true" if declared is True else "false" if declared is False else declared
        hint = f"e.g. {key}={shown} (the default)"
        if kind == "text":
            hint += f"; quote text that reads as a number or boolean: {key}='{value}'"
        raise ConfigError(
            f"{key}={value!r} is not allowed: {origin_of('method', name)} declares {key} as {kind} "
            f"in method/{name}.yaml",
            hint=hint,
        )


def _pick(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _check_learning_rates(cfg: DictConfig) -> None:
    """``method.lr`` and every ``method.lr_*`` must be a finite number > 0 (an ``lr_*`` may
    be null, which a method reads as "the default")."""
    node = cfg.get("method")
    if not isinstance(node, DictConfig):
        return
    for key in node:
        key = str(key)
        if key != "lr" and not key.startswith("lr_"):
            continue
        value = OmegaConf.select(cfg, f"method.{key}", throw_on_resolution_failure=False)
        if value is None and key != "lr":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"method.{key}={value!r} is not allowed",
                              hint=f"method.{key} is a learning rate: a finite number > 0, e.g. method.{key}=1e-4")


def _check_predict_batch_size(cfg: DictConfig) -> None:
    """``method.predict_batch_size`` (the base class's inference option, where a method
    declares it) must be a whole number >= 1: 0 would stop a run after its training."""
    node = cfg.get("method")
    if not isinstance(node, DictConfig) or "predict_batch_size" not in node:
        return
    value = OmegaConf.select(cfg, "method.predict_batch_size", throw_on_resolution_failure=False)
    if value is None:
        return  # a plugin that declares it null reads null as its own default (types: _check_method_option_types)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"method.predict_batch_size={value!r} is not allowed",
                          hint="method.predict_batch_size is how many query slices are predicted at once: "
                          "a whole number >= 1, e.g. method.predict_batch_size=8")


def searchpath_override() -> list[str]:
    """The ``hydra.searchpath`` override that adds the plugins' config dirs (empty if none)."""
    dirs = registries().config_dirs
    return ["hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"] if dirs else []


@contextmanager
def _beside_running_hydra() -> Iterator[None]:
    """Compose even inside a Hydra job (a sweep's launcher has initialised Hydra's global state)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime

    running = GlobalHydra.instance().hydra
    name = JobRuntime.instance().conf.get("name")
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().hydra = running
        if running is not None:
            JobRuntime.instance().set("name", name)


def compose(overrides: list[str] | None = None, *, resolve_datasets: bool = True) -> DictConfig:
    """The resolved run config for a list of overrides (one run, no sweeps).

    With ``resolve_datasets`` (the default) the dataset nodes must be complete (no ``???``)
    and are resolved by their plugins (:func:`_resolve_dataset_options`).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [_add_or_replace(o) for o in overrides or []]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.endswith("label_map") and value.strip().startswith("{"):
            # Hydra's parser keeps the last of two equal keys without a word: an organ named
            # twice (a typo for another) would score one organ's voxels under another's name
            from .data.options import read_label_map

            read_label_map(value)
    given = _split(overrides)
    regs = registries()
    for key, attr in _GROUPS.items():
        if key in given:
            try:
                getattr(regs, attr).entry(given[key])  # raises with the known names
            except UnknownNameError as exc:
                raise _unregistered(key, given[key], exc) from None
            _require_config(key, given[key])  # a plugin that registered the name but ships no config
    if "setting" in given:
        regs.settings.entry(given["setting"])
    # `test_dataset.*` options exist only once `protocol.test_dataset` has put the test
    # dataset's config group under `test_dataset`, so they are applied in a second pass.
    test_options = [o for o in overrides if o.lstrip("+~").startswith("test_dataset.")]
    overrides = [o for o in overrides if o not in test_options]

    extra = searchpath_override()
    try:
        with _beside_running_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=overrides + extra)
            _check_sections(cfg, given)
            _check_group_name(cfg, given, "method")
            _check_group_name(cfg, given, "dataset")
            more = _test_dataset_overrides(cfg, test_options)
            default_backbone = cfg.method.get("default_backbone")
            if "backbone" not in given and default_backbone:
                more.append(f"backbone={default_backbone}")
            if more:
                cfg = hydra_compose("config", overrides=overrides + extra + more)
    except yaml.YAMLError as exc:  # a config file (a plugin's, or one edited by hand) that is no YAML
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a config file"
        raise ConfigError(f"cannot read {where}: {getattr(exc, 'problem', None) or exc}",
                          hint="fix the YAML syntax there (brackets, quotes, indentation)") from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise _hydra_error(exc, overrides, test_options, extra) from None
    except ValueError as exc:  # after OmegaConf's own errors, which are ValueErrors too
        if "Config group override must be a string" not in str(exc):
            raise
        raise _not_a_config_name(overrides, exc) from None
    # Hydra puts its own node in composed configs; runs record only ours.
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    cfg = OmegaConf.create(with_hydra)
    _refuse_added_or_deleted(overrides + test_options, extra)
    try:
        _check_method_option_types(cfg, overrides, extra)
        if resolve_datasets:
            _resolve_dataset_options(cfg)
        validate(cfg)
    except OmegaConfBaseException as exc:  # a key read before validate() resolves the whole config
        raise _unresolvable(exc) from None
    return cfg


def _hydra_error(exc: Exception, overrides: list[str], test_options: list[str], extra: list[str]) -> ConfigError:
    """One clear error for what Hydra or OmegaConf raised while composing: an unknown key or
    config group (with the closest name), a key added twice, an interpolation that names
    nothing, an unquoted path read as an expression."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    unknown = re.match(r"Could not override '([^']+)'", lines[0]) if lines else None
    if unknown:
        return _unknown_key(unknown.group(1), _base_keys(overrides + test_options, extra), added=False,
                            overrides=overrides)
    hint = _GENERIC_HINT
    present = re.search(r"An item is already at '([^']+)'", lines[0]) if lines else None
    if present:
        hint = f"{present.group(1)} exists: set it without the '+'"
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[start + 1:] if not line.startswith(("Config search path", "provider="))]
        hint = f"{lines[start].rstrip(':')}: {', '.join(options)}"
        missing = re.search(r"Could not find '(.+)/([^/']+)'", lines[0])
        if missing:  # a config group (fidelity, memory, speed, hydra/launcher...): say it as the others do
            group, name = missing.groups()
            guess = closest(name, options)
            return ConfigError(f"unknown {group} {name!r}" + (f"; did you mean {guess!r}?" if guess else ""),
                               hint=f"{group} is one of: {', '.join(options)}")
    interpolated = [o for o in overrides + test_options if "${" in o.partition("=")[2]]
    if interpolated and "interpolation" in str(exc).lower() and hint == _GENERIC_HINT:
        hint = (f"{interpolated[0]}: its ${{...}} names something that does not exist (an unset environment "
                "variable, a key that is not there); set it, or give the value itself")
    odd = [o for o in overrides + test_options
           if names_a_path(o) and not o.partition("=")[2].startswith(("'", '"')) and "${" not in o
           and re.search(r"[^A-Za-z0-9_/.\-~+:@%]", o.partition("=")[2])]
    if odd and hint == _GENERIC_HINT:  # "scans(1)", "scän": an unquoted path read as an expression
        key, _, value = odd[0].partition("=")
        hint = f"quote the path: \"{key}='{value}'\" (quotes inside the shell's own)"
    return ConfigError(f"invalid configuration: {lines[0]}", hint=hint)


def _refuse_added_or_deleted(overrides: list[str], extra: list[str]) -> None:
    """``+key=`` that adds a key no config declares would be silently ignored (a typo
    trains the defaults), and ``~key`` would remove one the code reads: both are refused."""
    # "+group@package=option" (a config group added under another name) is not a key
    added = [o.lstrip("+").split("=", 1)[0] for o in overrides if o.startswith("+") and "@" not in o.split("=", 1)[0]]
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
def _test_dataset_overrides(cfg: DictConfig, test_options: list[str]) -> list[str]:
    """The overrides that build the ``test_dataset`` node of a cross-domain run.

    ``protocol.test_dataset=<name>`` selects the config group ``dataset/<name>`` a second
    time, under ``test_dataset``, so the test dataset takes the same options as the
    training dataset (``test_dataset.path=...``).
    """
    test_name = cfg.protocol.get("test_dataset")
    if test_name in (None, "", "null") or test_name == cfg.dataset.name:
        if test_options:
            raise ConfigError(
                f"{test_options[0].split('=', 1)[0].lstrip('+~')} is an option of a cross-domain test "
                "dataset, and none is set" if test_name in (None, "", "null") else
                f"training and testing on two {test_name} datasets with different options is not supported",
                hint="name the test dataset with protocol.test_dataset=<name> (e.g. nifti_folder), "
                "and train on another one (dataset=abd_mri)",
            )
        return []
    registries().datasets.entry(str(test_name))  # raises with the known names
    _require_config("dataset", str(test_name))
    return [f"+dataset@test_dataset={test_name}", *test_options]


def _resolve_dataset_options(cfg: DictConfig) -> None:
    """Each dataset node checked for missing values, then resolved by its plugin
    (:meth:`~fsmis_bench.data.base.VolumeDataset.resolve_options`), so the run's config
    holds everything that rebuilds the datasets (e.g. a label map read from its file)."""
    for key in ("dataset", "test_dataset"):
        node = cfg.get(key)
        if node is None:
            continue
        missing = sorted(k for k in node if OmegaConf.is_missing(node, k))
        if missing:
            prefix = "dataset" if key == "dataset" else "protocol.test_dataset"
            raise ConfigError(
                f"{prefix}={node.name} needs {key}.{missing[0]}",
                hint=f"add {key}.{missing[0]}=<value>" + (
                    " (a folder of image_<id>.nii.gz and label_<id>.nii.gz)" if missing[0] == "path" else ""),
            )
        dataset_cls = registries().datasets.get(str(node.name))
        resolve = getattr(dataset_cls, "resolve_options", None)
        if resolve is None:
            continue
        options = OmegaConf.to_container(node, resolve=True)
        resolved = resolve(options, cfg.get("data_root"))
        if resolved != options:
            cfg[key] = OmegaConf.create(resolved)


def _check_cuda_graph(cfg: DictConfig) -> None:
    """``train.cuda_graph=true`` where it cannot hold fails now, not after the data is read."""
    if OmegaConf.select(cfg, "train.cuda_graph") is not True:
        return
    import torch

    from .training.cuda_graph import uses_cuda_graph
    from .training.step import ComputeOptions

    device = str(cfg.get("device", "auto"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    uses_cuda_graph(ComputeOptions.from_config(cfg.train), torch.device("cuda" if cuda else "cpu"), processes=1)


def _check_fused_clip(cfg: DictConfig) -> None:
    """``train.fused_clip=true`` without an optimiser that can apply it fails now, not after
    the data is read (the step checks the optimiser it gets as well)."""
    if OmegaConf.select(cfg, "train.fused_clip") is not True:
        return
    from .training.precision import precision_of, selects_cuda

    fused = OmegaConf.select(cfg, "train.fused_optimizer")
    reasons = []
    if OmegaConf.select(cfg, "train.optimizer") != "adamw":
        reasons.append(f"train.optimizer={OmegaConf.select(cfg, 'train.optimizer')} (use adamw)")
    elif fused is False or (fused == "auto" and not selects_cuda(str(cfg.get("device", "auto")))):
        reasons.append("AdamW is not fused here (add train.fused_optimizer=true)")
    if precision_of(cfg).mixed_precision == "fp16":
        reasons.append("mixed_precision=fp16, whose gradient scaler uses the same input (use bf16 or no)")
    if reasons:
        raise ConfigError(f"train.fused_clip=true cannot be used here: {'; '.join(reasons)}",
                          hint="fix the above, or set train.fused_clip=false")


def validate(cfg: DictConfig) -> None:
    """Fail early, with one clear message, on values the protocol does not define."""
    regs = registries()
    regs.methods.entry(str(cfg.method.name))
    regs.datasets.entry(str(cfg.dataset.name))
    test = cfg.protocol.get("test_dataset")
    if test:
        regs.datasets.entry(str(test))
        node = cfg.get("test_dataset")
        if node is not None and node.get("name") != test:
            raise ConfigError(
                f"test_dataset.name={node.get('name')!r} contradicts protocol.test_dataset={test!r}",
                hint="choose the test dataset with protocol.test_dataset only",
            )
    regs.settings.entry(str(cfg.setting))
    for key, allowed in {**_CHOICES, **_engine_choices()}.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key not in _CHOICES:
            continue  # an engine switch a config leaves out is off
        if value not in allowed:
            shown = (str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)  # true, not True
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"use one of: {', '.join(shown)}")
    _check_cuda_graph(cfg)
    _check_fused_clip(cfg)
    for key, least in _INTEGERS.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key in _NULLABLE:
            continue
        if key == "train.num_workers" and value == "auto":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}",
                              hint=f"e.g. {key}={max(least or 0, 1)}" + (" (or null)" if key in _NULLABLE else ""))
        if least is not None and value < least:
            if key == "fold":
                raise ConfigError(f"fold={value} does not exist", hint="use fold=0..4 (five folds, PROTOCOL.md §2)")
            raise ConfigError(f"{key}={value} is not allowed", hint=f"{key} must be at least {least}")
        if key in _MOST and value > _MOST[key]:
            raise ConfigError(f"{key}={value} is not allowed", hint=f"{key} must be at most {_MOST[key]}")
    for key in _REALS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"{key} must be a finite number >= 0")
    _check_learning_rates(cfg)
    _check_predict_batch_size(cfg)
    for key in _BOOLEANS:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed", hint=f"use {key}=true or {key}=false")
    organs = cfg.protocol.get("organs")
    if organs is not None and (not OmegaConf.is_list(organs) or not all(isinstance(o, str) for o in organs)):
        raise ConfigError(f"protocol.organs={organs!r} is not a list of organ names", hint="e.g. protocol.organs=[liver]")
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        try:  # resolve() does not say which key; resolving into a container does
            OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as keyed:
            exc = keyed
        raise _unresolvable(exc) from None
    results = cfg.get("results_dir")
    if results is None or not str(results).strip():  # `results_dir=$OUT` with OUT unset
        raise ConfigError(
            f"results_dir={'null' if results is None else repr(str(results))} names no folder: the records would "
            "land in the working directory, where `runs` and `report` do not look",
            hint="give a folder (results_dir=results), or leave it out for $FSMIS_RESULTS_DIR or ./results",
        )


def _unresolvable(exc: Exception) -> ConfigError:
    """A ``${...}`` in some config file naming a key that does not exist (or another value
    OmegaConf cannot resolve), as one error naming the key."""
    key = getattr(exc, "full_key", "") or "a config key"
    reason = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    return ConfigError(f"{key} cannot be resolved: {reason}",
                       hint=f"fix the ${{...}} interpolation that sets {key} in its config file "
                            "(`fsmis-bench run ... --cfg job` prints the config), or set the key yourself")
