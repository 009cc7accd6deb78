"""``fsmis-bench describe``: what a method is made of, what trains, and how big each part is.

For every component of :meth:`Method.components` one row gives the parameter count, how
many of them train (``requires_grad``) and whether the component carries random weights
where pretrained ones were expected. A diffusers U-Net gets extra rows for the layers a
method *added* to the stock architecture (a support ``conv_in``, the SII attention layers,
...) and for stock layers whose shape the method changed (an 8-channel ``conv_in``), found by
comparing its parameters with a weightless U-Net built from its own config. Parameters that
belong to no listed component are reported as ``(other)``, so the component rows always add
up to the ``total`` row.

Example::

    fsmis-bench describe method=sdfsmis backbone=sd15 pretrained=false --format table
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

#: ``kind`` of each row in :func:`describe_method`'s output.
ROW_COMPONENT = "component"
ROW_ADDED = "added"
ROW_MODIFIED = "modified"
ROW_REMOVED = "removed"
ROW_OTHER = "other"
ROW_TOTAL = "total"


def _trained_label(params: int, trainable: int) -> str:
    if params == 0:
        return "-"
    if trainable == 0:
        return "no"
    if trainable == params:
        return "yes"
    return "partial"


def _row(name: str, kind: str, cls: str, params: list[nn.Parameter], random_weights: bool | None, parent: str | None = None) -> dict[str, Any]:
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {
        "component": name,
        "kind": kind,
        "class": cls,
        "params": int(total),
        "trainable_params": int(trainable),
        "trained": _trained_label(total, trainable),
        "random_weights": random_weights,
        "parent": parent,
    }


def _added_category(name: str) -> str:
    lowered = name.lower()
    if "conv_in" in lowered:
        return "added input conv"
    if "attn" in lowered or "sii" in lowered or "attention" in lowered:
        return "added attention"
    return "added (other)"


def _unet_changes(unet: nn.Module) -> tuple[dict[str, list[tuple[str, nn.Parameter]]], list[tuple[str, nn.Parameter]], dict[str, int]]:
    """Parameters of ``unet`` absent from the stock architecture of its config, grouped by
    category; stock layers whose shape differs from that architecture; and stock layers the
    method removed (e.g. a ``conv_in`` moved out of the U-Net), with their stock counts."""
    from diffusers import UNet2DConditionModel

    # weightless reference: no allocation, ~1 s for the SD-sized architectures
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(unet.config)
    stock = {name: tuple(p.shape) for name, p in reference.named_parameters()}
    stock_modules = {name for name, _ in reference.named_modules()}
    added: dict[str, list[tuple[str, nn.Parameter]]] = {}
    modified: list[tuple[str, nn.Parameter]] = []
    named = list(unet.named_parameters())
    # a reshaped layer is reported whole (weight and bias), not only its reshaped tensors
    reshaped_owners = {n.rsplit(".", 1)[0] for n, p in named if n in stock and tuple(p.shape) != stock[n]}
    for name, param in named:
        if name not in stock:
            root = _added_root(name, stock_modules)
            added.setdefault(_added_category(root), []).append((root, param))
        elif name.rsplit(".", 1)[0] in reshaped_owners:
            modified.append((name, param))
    present = {n for n, _ in named}
    removed: dict[str, int] = {}
    for name, param in reference.named_parameters():
        if name not in present:
            owner = name.rsplit(".", 1)[0]
            removed[owner] = removed.get(owner, 0) + param.numel()
    return added, modified, removed


def _added_root(param_name: str, stock_modules: set[str]) -> str:
    """The outermost module on the path to ``param_name`` that the stock U-Net lacks."""
    parts = param_name.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if prefix not in stock_modules:
            return prefix
    return param_name  # a bare parameter added to a stock module


def _describe_modules(unet: nn.Module, roots: list[str]) -> str:
    """``"Attention x16 + LayerNorm x16"`` for the distinct added modules ``roots``."""
    counts: dict[str, int] = {}
    for root in dict.fromkeys(roots):
        try:
            cls = type(unet.get_submodule(root)).__name__
        except AttributeError:
            cls = "Parameter"
        counts[cls] = counts.get(cls, 0) + 1
    return " + ".join(f"{cls} x{n}" for cls, n in sorted(counts.items()))


def _is_unet(module: nn.Module) -> bool:
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(module, UNet2DConditionModel)


def describe_method(method: nn.Module) -> list[dict[str, Any]]:
    """One row per component (+ U-Net added/modified layers, ``(other)``, and ``total``).

    Each row: ``component``, ``kind`` (component | added | modified | removed | other | total),
    ``class``, ``params``, ``trainable_params``, ``trained`` (yes | no | partial | -),
    ``random_weights`` (bool, or None when the component does not say), ``parent`` (the
    component an added/modified/removed row belongs to). Those rows detail their parent and
    are not counted again (a ``removed`` row gives the stock count of layers the method took
    out of the U-Net): the ``component`` and ``other`` rows sum to ``total``.
    """
    components = method.components() if hasattr(method, "components") else dict(method.named_children())
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, module in components.items():
        if module is None:
            continue
        # a parameter shared by two components is counted with the first one only
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        flag = getattr(module, "random_weights", None)
        rows.append(_row(name, ROW_COMPONENT, type(module).__name__, params, None if flag is None else bool(flag)))
        unets = [(name, module)] if _is_unet(module) else [
            (f"{name}.{sub}", m) for sub, m in module.named_modules() if sub and _is_unet(m)
        ]
        for unet_name, unet in unets:
            added, modified, removed = _unet_changes(unet)
            for category, named in sorted(added.items()):
                rows.append(_row(f"{unet_name}: {category}", ROW_ADDED, _describe_modules(unet, [n for n, _ in named]), [p for _, p in named], None, parent=name))
            if modified:
                labels = sorted({n.rsplit(".", 1)[0] for n, _ in modified})
                rows.append(_row(f"{unet_name}: modified {', '.join(labels)}", ROW_MODIFIED, "reshaped", [p for _, p in modified], None, parent=name))
            if removed:
                # stock layers the method took out (not part of any count below)
                row = _row(f"{unet_name}: removed {', '.join(sorted(removed))}", ROW_REMOVED, "stock layer", [], None, parent=name)
                row["params"] = int(sum(removed.values()))
                row["trained"] = "-"
                rows.append(row)
    rest = [p for p in method.parameters() if id(p) not in seen]
    if rest:
        rows.append(_row("(other)", ROW_OTHER, "-", rest, None))
    all_params = list(method.parameters())
    uses_random = bool(method.uses_random_weights()) if hasattr(method, "uses_random_weights") else False
    uses_random = uses_random or any(r["random_weights"] for r in rows if r["kind"] == ROW_COMPONENT)
    rows.append(_row("total", ROW_TOTAL, type(method).__name__, all_params, uses_random))
    return rows


def describe_report(method: nn.Module, overrides: list[str] | None = None) -> dict[str, Any]:
    """The JSON document of ``describe --format json``."""
    rows = describe_method(method)
    total = rows[-1]
    cfg = getattr(method, "cfg", None)

    def cfg_get(key: str, default: Any = None) -> Any:
        try:
            return cfg.get(key, default) if cfg is not None else default
        except Exception:  # pragma: no cover - odd configs
            return default

    backbone = cfg_get("backbone")
    method_cfg = cfg_get("method")
    registered = method_cfg.get("name") if hasattr(method_cfg, "get") else None
    return {
        # the name the method is registered and run under (`method=<name>`), not its class
        "method": str(registered) if registered else type(method).__name__,
        "class": type(method).__name__,
        "overrides": list(overrides or []),
        "backbone": None if backbone is None else backbone.get("name"),
        "pretrained": cfg_get("pretrained"),
        "fidelity": cfg_get("fidelity"),
        "components": rows[:-1],
        "total_params": total["params"],
        "trainable_params": total["trainable_params"],
        "frozen_params": total["params"] - total["trainable_params"],
        "random_weights": bool(total["random_weights"]),
    }


def format_table(report: dict[str, Any]) -> str:
    """An aligned plain-text table of a :func:`describe_report`."""
    header = ("component", "class", "params", "trainable", "trained", "random weights")
    lines: list[tuple[str, ...]] = []
    for row in report["components"]:
        indent = "  " if row["kind"] in (ROW_ADDED, ROW_MODIFIED, ROW_REMOVED) else ""
        rw = row["random_weights"]
        lines.append((
            indent + row["component"],
            row["class"],
            f"{row['params']:,}",
            f"{row['trainable_params']:,}",
            row["trained"],
            "-" if rw is None else ("yes" if rw else "no"),
        ))
    lines.append((
        "total",
        report.get("class", report["method"]),
        f"{report['total_params']:,}",
        f"{report['trainable_params']:,}",
        _trained_label(report["total_params"], report["trainable_params"]),
        "yes" if report["random_weights"] else "no",
    ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    numeric = {2, 3}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [fmt(line) for line in lines[:-1]]
    # `pretrained` only means something where a component has pretrained weights to load
    loads_weights = any(row["random_weights"] is not None for row in report["components"])
    if loads_weights:
        weights = f"pretrained={report['pretrained']}"
    else:
        weights = "no weights" if report["total_params"] == 0 else "no pretrained weights (trained from scratch)"
    title = f"{report['method']}  backbone={report['backbone']}  {weights}  fidelity={report['fidelity']}"
    origin = report.get("registered_by") or {}
    if origin.get("plugin"):
        release = f"{origin.get('distribution', '')} {origin.get('version', '')}".strip()
        title += f"  plugin={origin['plugin']}" + (f" ({release})" if release else "")
    out = [title, fmt(header), rule, *body, rule, fmt(lines[-1])]
    if report.get("meta"):
        out.append("note: built on the meta device (--meta): architecture and counts only, no weights loaded")
    if report["random_weights"] and not report.get("meta"):
        if report["backbone"] == "tiny":
            out.append("note: the tiny backbone has no pretrained weights: random by design, for CPU runs "
                       "(results are not comparable with the paper's)")
        else:
            out.append("note: random weights where pretrained ones are expected (smoke run; results are not comparable)")
    return "\n".join(out)


def _run(args: argparse.Namespace) -> int:
    from fsmis_bench.api import build_method
    from fsmis_bench.errors import ConfigError

    overrides = list(args.overrides)
    if args.meta:
        if any(o.split("=", 1)[0].lstrip("+") == "pretrained" and o.split("=", 1)[1].lower() != "false" for o in overrides if "=" in o):
            raise ConfigError("--meta builds the architecture only and cannot load pretrained weights",
                              hint="drop --meta, or use pretrained=false")
        if not any(o.split("=", 1)[0].lstrip("+") == "pretrained" for o in overrides):
            overrides.append("pretrained=false")
        # weightless build: exact parameter counts in seconds, no memory for the weights
        with torch.device("meta"):
            method = build_method(overrides)
    else:
        method = build_method(overrides)
    report = describe_report(method, overrides)
    report["meta"] = bool(args.meta)
    from fsmis_bench.records import registered_by

    # which plugin and package release the method comes from, as run.json records it
    report["registered_by"] = registered_by(method.cfg)["method"]
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``describe`` subcommand."""
    parser = subparsers.add_parser(
        "describe",
        help="parameter counts of a method's components and what trains",
        description=(
            "Build a method from Hydra-style overrides (e.g. method=sdfsmis backbone=sd15 "
            "pretrained=false) and print each component's parameter count, what trains, the "
            "layers a method added to the U-Net, totals and the random-weights flag."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (method=..., backbone=..., pretrained=false)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    parser.add_argument(
        "--meta",
        action="store_true",
        help="count parameters without allocating weights (meta device, implies pretrained=false); "
        "fast for the SD backbones",
    )
    parser.set_defaults(func=_run)
