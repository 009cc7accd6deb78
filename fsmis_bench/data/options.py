"""Readers for dataset options given on the command line or in files.

A label map may be a mapping (``{liver: 1, spleen: 2}`` in Hydra's override syntax, or a
YAML mapping), or the path of a YAML or JSON file holding one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_LABEL_MAP_HINT = (
    "give a mapping, e.g. '+dataset.label_map={liver:1,spleen:2}', or the path of a YAML/JSON "
    "file holding one (organ name: label value)"
)


def parse_override_value(text: str) -> Any:
    """A value in Hydra's override grammar (``{liver:1,spleen:2}``, ``[1,2]``, ``ct``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(f"value={text}").value()
    except Exception as exc:  # noqa: BLE001 - Hydra raises its own grammar errors
        raise ConfigError(f"cannot read {text!r}: {exc}") from None


def read_label_map(value: Any) -> dict[str, int]:
    """``organ name -> label value`` from a mapping, mapping text, or a YAML/JSON file path.

    Raises:
        ConfigError: the value is none of these, a label value is not an integer, is 0
            (the background), or is given to two organs.
    """
    if value is None or value == "":
        return {}
    if hasattr(value, "items") and not isinstance(value, Mapping):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, Path)):
        text = str(value).strip()
        path = Path(text).expanduser()
        if text.startswith("{"):
            value = parse_override_value(text)
        elif path.is_file():
            import yaml

            try:
                value = yaml.safe_load(path.read_text())  # JSON is YAML
            except yaml.YAMLError as exc:
                raise ConfigError(f"label map file {path} is not YAML/JSON: {exc}", hint=_LABEL_MAP_HINT) from None
            if not isinstance(value, Mapping):
                raise ConfigError(f"label map file {path} holds no mapping", hint=_LABEL_MAP_HINT)
        else:
            raise ConfigError(f"label map {text!r} is neither a mapping nor an existing file", hint=_LABEL_MAP_HINT)
    if not isinstance(value, Mapping):
        raise ConfigError(f"label map {value!r} is not a mapping", hint=_LABEL_MAP_HINT)
    out = {}
    for organ, label in value.items():
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).lstrip("-").isdigit():
            raise ConfigError(f"label map: {organ!r} has the label value {label!r}, not an integer", hint=_LABEL_MAP_HINT)
        out[str(organ)] = int(label)
    background = [organ for organ, label in out.items() if label == 0]
    if background:
        raise ConfigError(
            f"label map: {background[0]!r} has the label value 0, which is the background",
            hint="give each organ the value its voxels hold in the label files (0 marks no organ); "
            + _LABEL_MAP_HINT,
        )
    by_value: dict[int, list[str]] = {}
    for organ, label in out.items():
        by_value.setdefault(label, []).append(organ)
    shared = {label: organs for label, organs in by_value.items() if len(organs) > 1}
    if shared:
        label, organs = next(iter(shared.items()))
        raise ConfigError(
            f"label map: {' and '.join(map(repr, organs))} share the label value {label}; one value marks one organ",
            hint="give each organ the value its own voxels hold in the label files",
        )
    return out
