"""Readers for dataset options given on the command line or in files.

A label map may be a mapping (``{liver: 1, spleen: 2}`` in Hydra's override syntax, or a
YAML mapping), or the path of a YAML or JSON file holding one, or an nnU-Net
``dataset.json`` (its ``labels``). Forms that look like a label map but are not one (an
organ named twice, ``{1: liver}`` inverted, nnU-Net's region lists) are refused with what
was seen and what is expected: a wrong map records one organ's Dice under another's name.
"""

from __future__ import annotations

import codecs
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_LABEL_MAP_HINT = (
    "give a mapping, e.g. '+dataset.label_map={liver:1,spleen:2}', or the path of a YAML/JSON "
    "file holding one (organ name: label value)"
)


#: keys of an nnU-Net ``dataset.json`` besides ``labels`` (v1 and v2)
_NNUNET_KEYS = {"channel_names", "modality", "file_ending", "numTraining", "numTest", "name", "description",
                "tensorImageSize", "reference", "licence", "release", "training", "test", "regions_class_order",
                "overwrite_image_reader_writer", "dataset_name"}


#: byte-order marks, the codec that reads past them and the encoding's name; UTF-32's
#: first, as UTF-16's starts it
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
                     (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
                     (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))


def _read_text(path: Path) -> str:
    """The text of a label-map file: UTF-8, with or without a byte-order mark, or UTF-16
    (or UTF-32) with one, as PowerShell's ``>`` and Notepad's "Unicode" write it.

    Without a mark the bytes must be UTF-8: a guess at another 8-bit encoding (Latin-1,
    Windows-1252) could read an organ name wrong without a word.

    Raises:
        ConfigError: the file cannot be read, or is not text in one of these encodings.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"label map file {path} cannot be read: {exc.strerror or exc}",
                          hint="make it readable, or give the mapping itself, e.g. '{liver:1,spleen:2}'") from None
    codec, name = next(((c, n) for mark, c, n in _BYTE_ORDER_MARKS if data.startswith(mark)), ("utf-8", None))
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        if name is None:
            line = data[:exc.start].count(b"\n") + 1
            what = (f"is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}): it was saved in another "
                    "encoding (Latin-1, Windows-1252), or is not a text file")
        else:
            what = f"starts with a {name} byte-order mark but is not {name} text from byte {exc.start} on (cut short?)"
        raise ConfigError(
            f"label map file {path} {what}",
            hint="save it as UTF-8 (an editor's 'save with encoding', or `iconv -f latin1 -t utf-8`); UTF-16 with a "
            "byte-order mark, as PowerShell and Notepad write it, is read as well",
        ) from None


def _load_unique_yaml(path: Path) -> Any:
    """YAML/JSON from ``path``, refusing a mapping that names a key twice (a YAML or JSON
    reader keeps the last value without a word)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(
                        f"label map file {path} names {key!r} twice (lines {lines[key]} and {line}): a YAML/JSON "
                        "reader keeps the last value, so one organ's voxels would be scored under another's name",
                        hint="give each organ once, with the label value its voxels hold",
                    )
                lines[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(_read_text(path), Loader=UniqueKeys)  # noqa: S506 - a SafeLoader subclass


def _top_level_keys(text: str) -> list[str]:
    """The keys of a flat ``{a:1,b:2}`` mapping in Hydra's override syntax, in order and
    with repeats (Hydra's parser keeps only the last of two equal keys)."""
    inner = text.strip()[1:-1] if text.strip().endswith("}") else text.strip()[1:]
    keys, depth, quote, part = [], 0, "", ""
    for char in inner + ",":
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 0:
            if ":" in part:
                keys.append(part.split(":", 1)[0].strip().strip("'\""))
            part = ""
            continue
        part += char
    return keys


def organ_suggestions(names: Iterable[str], vocabulary: Iterable[str]) -> dict[str, str]:
    """``name -> organ of the vocabulary`` for names that are near one (``Liver``,
    ``kidney_right``, ``left kidney``, ``R_Kidney``): for a "did you mean"."""
    vocabulary = list(vocabulary)
    sides = {"l": "left", "r": "right", "lt": "left", "rt": "right"}

    def tokens(name: str) -> tuple[str, ...]:
        parts = [t for t in re.split(r"[\s_\-().]+", name.lower()) if t]
        return tuple(sorted(sides.get(t, t) for t in parts))

    by_tokens = {tokens(organ): organ for organ in vocabulary}
    found = {}
    for name in names:
        match = by_tokens.get(tokens(str(name)))
        if match is None:
            close = difflib.get_close_matches("_".join(tokens(str(name))), vocabulary, n=1, cutoff=0.75)
            match = close[0] if close else None
        if match is not None and match != name:
            found[str(name)] = match
    return found


def _integer_text(value: Any) -> bool:
    """An int, or a string of digits (JSON keys are strings)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())


def _hydra_text(mapping: Mapping) -> str:
    """``{liver:1,spleen:2}``: a mapping as the command line takes it."""
    return "{" + ",".join(f"{k}:{v}" for k, v in mapping.items()) + "}"


def _refuse_inverted(value: Mapping, where: str) -> None:
    """``{1: liver}`` (label value: organ name) instead of ``{liver: 1}``: say so, with the
    map turned round (the background, value 0, left out)."""
    if value and all(_integer_text(k) for k in value) and all(isinstance(v, str) and not _integer_text(v)
                                                                for v in value.values()):
        turned = {str(v): int(str(k)) for k, v in value.items() if int(str(k)) != 0}
        raise ConfigError(
            f"{where} is inverted: it maps label values to organ names ({_hydra_text(dict(list(value.items())[:3]))}"
            f"{', ...' if len(value) > 3 else ''}); a label map gives each organ name its label value",
            hint=f"turn it round: {_hydra_text(turned)} (organ names from the benchmark's vocabulary, "
            "lower case with underscores)",
        )


def _from_nnunet(value: Mapping, where: str) -> Mapping:
    """The ``labels`` of an nnU-Net ``dataset.json``: v2's ``name: value`` map, or v1's (and the
    Medical Segmentation Decathlon's) ``value: name`` map, turned round; the background
    (value 0) is left out. Region lists are refused with the map to give instead."""
    if not (isinstance(value.get("labels"), Mapping) and set(value) - {"labels"} <= _NNUNET_KEYS):
        return value
    labels = value["labels"]
    if labels and all(_integer_text(k) for k in labels) and all(isinstance(v, str) for v in labels.values()):
        # nnU-Net v1 (and the Medical Segmentation Decathlon) write value -> name: read as such
        names = [str(v) for k, v in labels.items() if int(str(k)) != 0]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # turned round, one of the values would be dropped
            raise ConfigError(f"the nnU-Net dataset.json {where} names {twice[0]!r} for two label values",
                              hint="give each organ once (one label value per organ)")
        labels = {v: int(str(k)) for k, v in labels.items()}
    regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple))}
    if regions:
        name = next(iter(regions))
        raise ConfigError(
            f"the nnU-Net dataset.json {where} gives regions ({name}: {regions[name]}), not one label value per organ",
            hint="give a label map of one value per organ instead, e.g. '{liver:1,spleen:2}'",
        )
    return {k: v for k, v in labels.items() if not (_integer_text(v) and int(str(v)) == 0)}


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
        ConfigError: the value is none of these, names an organ twice, is inverted (label
            value: organ), a label value is not an integer, is 0 (the background), or is
            given to two organs.
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
            keys = _top_level_keys(text)
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise ConfigError(
                    f"label map {text!r} names {', '.join(map(repr, twice))} twice: only the last value would be "
                    "kept, so one organ's voxels would be scored under another's name",
                    hint="give each organ once, with the label value its voxels hold",
                )
            value = parse_override_value(text)
        elif path.is_file():
            import yaml

            try:
                value = _load_unique_yaml(path)  # JSON is YAML
            except yaml.YAMLError as exc:
                raise ConfigError(f"label map file {path} is not YAML/JSON: {exc}", hint=_LABEL_MAP_HINT) from None
            if not isinstance(value, Mapping):
                raise ConfigError(f"label map file {path} holds no mapping", hint=_LABEL_MAP_HINT)
            value = _from_nnunet(value, str(path))
        elif path.is_dir():
            raise ConfigError(f"label map {text!r} is a folder, not a file",
                              hint="give the YAML/JSON file in it, not the folder; or " + _LABEL_MAP_HINT)
        else:
            raise ConfigError(f"label map {text!r} is neither a mapping nor an existing file", hint=_LABEL_MAP_HINT)
    if not isinstance(value, Mapping):
        raise ConfigError(f"label map {value!r} is not a mapping", hint=_LABEL_MAP_HINT)
    _refuse_inverted(value, "the label map")
    out = {}
    for organ, label in value.items():
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, (int, str)) or not str(label).lstrip("-").isdigit():
            nested = " (a nested mapping: a file of another kind? nnU-Net's dataset.json is read by its labels)" \
                if isinstance(label, Mapping) else ""
            raise ConfigError(f"label map: {organ!r} has the label value {label!r}, not an integer{nested}",
                              hint=_LABEL_MAP_HINT)
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
