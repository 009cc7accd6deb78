"""``fsmis-bench weights check|download``: which pretrained weights a configuration needs,
where each was found, whether it loads, and fetching what is missing.

    fsmis-bench weights check backbone=sd15 [fidelity=code] [method=diffews]
    fsmis-bench weights download backbone=sd15 [--dry-run]

``check`` loads every component through the same builders a run uses, so "loaded" here means
a run will load it too; it exits 0 only when all load. Without ``method=`` it checks what any
diffusion method may need on that backbone (U-Net, VAE, text encoder + tokenizer, the
fidelity's image encoder); the classic methods (SSL-ALPNet, ADNet, Q-Net) need torchvision's
ResNet checkpoint instead, checked the same way. ``download`` fetches, with
``huggingface_hub``, exactly the files the loaders read into ``FSMIS_WEIGHTS_ROOT/<source>``,
where ``check`` and runs find them (torchvision's files are not on the hub: it says where to
put them).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fsmis_bench.errors import ConfigError, FsmisError

from . import _sd_components as sdc
from ._sd_weights import (
    HUB_IDS,
    SINGLE_FILE_SUFFIXES,
    WeightFiles,
    WeightsNotFound,
    _looks_like_hub_id,
    download_repo,
    hub_cache_dirs,
    hub_offline,
    locate,
)
from ._hub import _env_flag
from ._text_encoder import load_text_encoder, load_tokenizer, locate_tokenizer


@dataclass
class Need:
    """One component a configuration needs.

    Attributes:
        name: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``image_encoder``, or
            ``encoder`` (a classic method's ResNet).
        kind: the architecture (``sd15``, ``taesd``, ``dinov2_small``, ``resnet101``, ...).
        source: the configured source.
        random_reason: why no weights are read (random or weight-free by design), else None.
        repo: the hub repo ``download`` fetches it from; ``subfolder``/``library``: which files.
    """

    name: str
    kind: str
    source: str | None
    random_reason: str | None = None
    repo: str | None = None
    subfolder: str | None = None
    library: str = "diffusers"
    status: str = "?"
    detail: str = ""
    hint: str = ""
    searched: list[str] = field(default_factory=list)
    expected: str = ""
    record: WeightFiles | None = field(default=None, repr=False)
    #: a classic method's encoder: ``(init, torchvision file name or None)``
    torchvision: tuple[str, str | None] | None = None


def uses_backbone(method: str | None) -> bool:
    """Whether ``method`` (None: any) is a diffusion method that reads the backbone's weights."""
    if method is None:
        return True
    from fsmis_bench.plugins import registries

    from .sdfsmis import SDFSMIS

    cls = registries().methods.get(method)
    return isinstance(cls, type) and issubclass(cls, SDFSMIS)


def resnet_method(method: str | None) -> bool:
    """Whether ``method`` builds a ResNet from torchvision's checkpoints (SSL-ALPNet, ADNet, Q-Net)."""
    if method is None:
        return False
    from fsmis_bench.plugins import registries

    from ._resnet_encoders import ResNetEncoderMethod

    cls = registries().methods.get(method)
    return isinstance(cls, type) and issubclass(cls, ResNetEncoderMethod)


def _encoder_need(cfg: Any) -> Need:
    """The torchvision checkpoint a classic method's builder reads (``method.init``: null is the
    paper's COCO start for all three; ``fidelity=code`` is refused for them by the run itself)."""
    from ._resnet_encoders import ENCODERS, TORCHVISION_FILES

    encoder = str(cfg.method.get("encoder") or "resnet101")
    init = str(cfg.method.get("init") or "coco")
    file_name = TORCHVISION_FILES.get((init, ENCODERS.get(encoder, 0)))
    source = cfg.method.get("encoder_source")
    off = "pretrained=false: random weights" if not bool(cfg.get("pretrained", True)) else None
    return Need("encoder", encoder, str(source) if source else file_name, off, library="torchvision", torchvision=(init, file_name))


def _uses(cfg: Any, method: str | None, fidelity: str, backbone: sdc.BackboneSources) -> tuple[bool, str | None]:
    """(needs the text embedding, image encoder kind or None) for ``method``; both without one."""
    if method is None:
        return True, backbone.image_encoder
    from fsmis_bench.plugins import registries

    opts = registries().methods.get(method).resolve_options(cfg.method, fidelity)
    return (not opts.vtct), ((opts.vtct_encoder or backbone.image_encoder) if opts.vtct else None)


def _repo(source: str | None, default_key: str) -> str | None:
    """The hub repo a component is fetched from: its source when that is a hub id, else the default."""
    return source if source and _looks_like_hub_id(source) else HUB_IDS.get(default_key)


def needed(cfg: Any, method: str | None = None) -> list[Need]:
    """The components ``cfg`` (its backbone, fidelity, pretrained) needs, in build order: a
    classic method's ResNet checkpoint; empty for a method that reads no pretrained weights."""
    if resnet_method(method):
        return [_encoder_need(cfg)]
    if not uses_backbone(method):
        return []
    fidelity = str(cfg.get("fidelity", "paper"))
    backbone = sdc.backbone_sources(cfg.backbone, fidelity)
    pretrained = bool(cfg.get("pretrained", True))
    text, encoder = _uses(cfg, method, fidelity, backbone)
    off = "pretrained=false: random weights" if not pretrained else None
    needs = [Need("unet", backbone.unet, backbone.source, off or ("no pretrained tiny U-Net exists: random by design" if backbone.unet == "tiny" else None),
                  _repo(backbone.source, backbone.unet), "unet")]
    if backbone.vae == "identity":
        needs.append(Need("vae", "identity", None, "the identity codec has no weights"))
    elif backbone.vae == "taesd":
        needs.append(Need("vae", "taesd", backbone.vae_source or "taesd", off, HUB_IDS["taesd"], "vae"))
    else:
        needs.append(Need("vae", "sd", backbone.vae_source, off, _repo(backbone.vae_source, backbone.unet), "vae"))
    if text:
        reason = off or ("no text encoder on the tiny backbone: a fixed zero embedding" if backbone.unet == "tiny" else None)
        needs.append(Need("text_encoder", backbone.unet, backbone.text_encoder_source, reason,
                          _repo(backbone.text_encoder_source, backbone.unet), "text_encoder", "transformers"))
        needs.append(Need("tokenizer", backbone.unet, backbone.tokenizer_source or backbone.text_encoder_source, reason,
                          _repo(backbone.tokenizer_source or backbone.text_encoder_source, backbone.unet), "tokenizer", "tokenizer"))
    if encoder:
        source = (backbone.image_encoder_source if encoder == backbone.image_encoder else None) or HUB_IDS.get(encoder)
        needs.append(Need("image_encoder", encoder, source, off or ("tiny random ViT: random by design" if encoder == "tiny" else None),
                          _repo(source, encoder), None, "transformers"))
    return needs


# ---------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------
def _check_encoder(need: Need, cfg: Any) -> None:
    """Find and load a classic method's torchvision checkpoint as its builder does; fill ``need``."""
    from ._resnet_encoders import build_resnet_encoder, find_weight_file

    root = cfg.get("weights_root")
    init, file_name = need.torchvision or ("coco", None)
    source = cfg.method.get("encoder_source")
    need.expected = (f"torchvision's {file_name} ({init} {need.kind}) in weights_root, weights_root/torchvision or the torch hub "
                     "cache, or method.encoder_source=<path>") if file_name else "a torchvision checkpoint at method.encoder_source"
    try:
        # without a file name or source there is no such release: the builder says so below
        path = find_weight_file(file_name or "", source, root) if (file_name or source) else None
    except FsmisError as exc:
        need.status, need.detail, need.hint = "MISSING", exc.message, exc.hint or ""
        return
    try:
        # the checkpoint loads strictly into the whole DeepLabv3 (coco) or classifier (imagenet)
        # whatever the method's dilation and fc: these two do not decide whether it fits
        built = build_resnet_encoder(need.kind, init, pretrained=True, dilation=(False, True, True), with_fc=False,
                                     source=source, weights_root=root)
    except FsmisError as exc:
        need.status, need.detail, need.hint = "FAILED", exc.message, exc.hint or ""
        return
    path = Path(built.weights.path) if built.weights is not None else path
    assert path is not None
    need.record = WeightFiles(str(need.source), str(path), "torchvision checkpoint", (str(path),), str(path.parent))
    need.status, need.detail = "loaded", f"{path}  [torchvision checkpoint, init={init}]"


def _check_one(need: Need, cfg: Any, backbone: sdc.BackboneSources | None, text: dict) -> None:
    """Load one component through the builders a run uses; fill ``need``'s status."""
    if need.name == "encoder":
        _check_encoder(need, cfg)
        return
    assert backbone is not None
    root = cfg.get("weights_root")
    loaders: dict[str, Callable[[], Any]] = {
        "unet": lambda: sdc.build_unet(need.kind, pretrained=True, source=need.source, weights_root=root,
                                       cross_attention_dim=backbone.cross_attention_dim,
                                       prediction_type=backbone.prediction_type).weight_files,
        "vae": lambda: sdc.build_vae(need.kind, pretrained=True, source=need.source, weights_root=root).weight_files,
        "image_encoder": lambda: sdc.build_image_encoder(need.kind, pretrained=True, source=need.source, weights_root=root).weight_files,
    }
    try:
        if need.name == "text_encoder":
            _, record, text["located"] = load_text_encoder(need.kind, need.source, root)
        elif need.name == "tokenizer":
            located = locate_tokenizer(need.kind, backbone.text_encoder_source, text.get("located"), backbone.tokenizer_source, root)
            _, record = load_tokenizer(located, f"tokenizer ({need.kind})", need.kind)
        else:
            record = loaders[need.name]()
        ema = ", EMA weights" if record.ema else ""
        need.status, need.record, need.detail = "loaded", record, f"{record.location}  [{record.layout}{ema}]"
    except WeightsNotFound as exc:
        need.status, need.detail, need.hint = "MISSING", exc.reason or "not found", exc.hint or ""
        need.searched, need.expected = exc.searched, exc.expected
    except FsmisError as exc:
        need.status, need.detail, need.hint = "FAILED", exc.message, exc.hint or ""


def check(cfg: Any, method: str | None, overrides: list[str], digests: bool, as_json: bool) -> int:
    """Print where each needed component was found and whether it loads; 0 only if all do."""
    needs = needed(cfg, method)
    if not needs and not uses_backbone(method):
        print(f"method={method} reads no pretrained weights")
        return 0
    fidelity = str(cfg.get("fidelity", "paper"))
    backbone = sdc.backbone_sources(cfg.backbone, fidelity) if uses_backbone(method) else None
    text_cache: dict = {}
    for need in needs:
        if need.random_reason:
            need.status, need.detail = "random", need.random_reason
        else:
            _check_one(need, cfg, backbone, text_cache)
    bad = [n for n in needs if n.status in ("MISSING", "FAILED")]
    if as_json:
        rows = [{"component": n.name, "kind": n.kind, "source": n.source, "status": n.status, "detail": n.detail,
                 "searched": n.searched, "expected": n.expected, "hint": n.hint,
                 "identity": n.record.identity() if (digests and n.record) else None} for n in needs]
        print(json.dumps({"ok": not bad, "components": rows}, indent=2))
        return 2 if bad else 0
    root = cfg.get("weights_root")
    scope = f"method={method}" if method else "(what any diffusion method needs)"
    of = f"backbone={backbone.name} " if backbone else ""
    print(f"weights for {of}fidelity={fidelity} pretrained={str(cfg.get('pretrained', True)).lower()} {scope}")
    print(f"  weights_root  {root or '(unset: set FSMIS_WEIGHTS_ROOT)'}")
    print(f"  hub caches    {', '.join(map(str, hub_cache_dirs(root)))} (hub {'offline' if hub_offline() else 'online'})")
    pad = " " * 17
    shown: dict[tuple[str, ...], str] = {}
    for n in needs:
        print(f"  {n.name:<14} {n.status:<8} {n.source or '-'} ({n.kind})")
        if n.status == "MISSING":
            print(f"{pad}expected  {n.expected}")
            if tuple(n.searched) in shown:
                print(f"{pad}searched  the same places as {shown[tuple(n.searched)]}")
            for index, place in enumerate(n.searched if tuple(n.searched) not in shown else []):
                print(f"{pad}{'searched' if index == 0 else '':<8}  {place}")
            shown.setdefault(tuple(n.searched), n.name)
            print(f"{pad}why       {n.detail}")
            if n.torchvision:  # not on the hub: `weights download` cannot fetch it, the hint says how
                print(f"{pad}hint      {n.hint}")
        elif n.status == "FAILED":
            print(f"{pad}error     {n.detail}")
            print(f"{pad}hint      {n.hint}")
        else:
            print(f"{pad}{n.detail}")
        if digests and n.record:
            for name, digest in n.record.identity()["files"].items():
                print(f"{pad}{digest}  {name}")
    if bad and backbone is None:  # a classic method: torchvision's file, not the hub
        print(f"{len(bad)} of {len(needs)} components did not load ({', '.join(n.name for n in bad)}); see the hint above, "
              "or point method.encoder_source at the checkpoint, then rerun this check.")
        return 2
    if bad:
        print(f"{len(bad)} of {len(needs)} components did not load ({', '.join(n.name for n in bad)}). Download them into "
              "FSMIS_WEIGHTS_ROOT (on a machine with network) with")
        print(f"  fsmis-bench weights download {' '.join(overrides)}")
        print("or point backbone.source / vae_source / text_encoder_source / tokenizer_source / image_encoder_source "
              "at where they are, then rerun this check.")
        return 2
    print("all components load")
    return 0


# ---------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------
@dataclass
class Fetch:
    """One ``snapshot_download``: a repo, the components read from it, where it goes."""

    repo: str
    local_dir: Path
    components: list[tuple[str | None, str]]
    extra: list[str]
    names: list[str]


def download_plan(cfg: Any, method: str | None, force: bool = False) -> tuple[list[Fetch], list[str]]:
    """What ``download`` fetches (grouped by repo) and what it skips because it is already found."""
    root = cfg.get("weights_root")
    if not root:
        raise ConfigError("weights download needs a destination", hint="set FSMIS_WEIGHTS_ROOT (or pass weights_root=/path)")
    backbone = sdc.backbone_sources(cfg.backbone, str(cfg.get("fidelity", "paper")))
    fetches: dict[str, Fetch] = {}
    skipped: list[str] = []
    for need in needed(cfg, method):
        if need.random_reason or not need.repo:
            continue
        if not force and _found(need, cfg, backbone):
            skipped.append(need.name)
            continue
        source = need.source or ""
        # where the config's relative source is looked up; a path or single file keeps the repo's name
        relative = source and not os.path.isabs(source) and not source.endswith(SINGLE_FILE_SUFFIXES) and not source.startswith(("~", "."))
        local = Path(os.path.expanduser(str(root))) / (source if relative else need.repo)
        fetch = fetches.setdefault(need.repo, Fetch(need.repo, local, [], [], []))
        fetch.components.append((need.subfolder, need.library))
        fetch.names.append(need.name)
        if need.name == "unet":
            fetch.extra += ["model_index.json", "scheduler/scheduler_config.json"]
    return list(fetches.values()), skipped


def _found(need: Need, cfg: Any, backbone: sdc.BackboneSources) -> bool:
    """Located on disk (not loaded): ``download`` leaves it alone."""
    root = cfg.get("weights_root")
    try:
        if need.name == "tokenizer":
            try:
                text = locate("text encoder", backbone.text_encoder_source, root, hub_id=need.repo, subfolder="text_encoder", library="transformers")
            except FsmisError:
                text = None
            locate_tokenizer(need.kind, backbone.text_encoder_source, text, backbone.tokenizer_source, root)
        elif need.kind == "taesd":
            sdc.build_vae("taesd", pretrained=True, source=need.source, weights_root=root)
        else:
            locate(need.name, need.source, root, hub_id=need.repo, subfolder=need.subfolder, library=need.library,
                   single_file=need.name != "image_encoder")
        return True
    except FsmisError:
        return False


def download(cfg: Any, method: str | None, overrides: list[str], dry_run: bool, force: bool) -> int:
    """Fetch what is missing, then run :func:`check`."""
    if resnet_method(method):  # torchvision's checkpoints are not on the hub
        status = check(cfg, method, overrides, digests=False, as_json=False)
        if status:
            print("torchvision's checkpoints are served by download.pytorch.org, not the Hugging Face hub: "
                  "`weights download` does not fetch them; the hint above says where to put the file")
        return status
    fetches, skipped = download_plan(cfg, method, force)
    for name in skipped:
        print(f"  {name}: already found, not downloaded (--force to fetch anyway)")
    if not fetches:
        print("nothing to download")
        return 0
    # at once, not after huggingface_hub's retries (half a minute); a proxy or a mirror
    # (HF_ENDPOINT) may reach the hub where the direct probe cannot, so then the download tries
    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"))
    if not dry_run and hub_offline() and (not proxied or _env_flag("HF_HUB_OFFLINE")):
        raise FsmisError(
            f"cannot download {', '.join(f.repo for f in fetches)}: the hub is unreachable from here (or "
            "HF_HUB_OFFLINE=1 is set)",
            hint="download on a machine with network access to huggingface.co (fsmis-bench weights download "
                 f"{' '.join(overrides)}) and copy $FSMIS_WEIGHTS_ROOT here; --dry-run lists what goes where",
        )
    for fetch in fetches:
        print(f"  {fetch.repo} ({', '.join(fetch.names)}) -> {fetch.local_dir}")
        if dry_run:
            continue
        try:
            download_repo(fetch.repo, fetch.components, fetch.local_dir, fetch.extra)
        except FsmisError:
            raise
        except Exception as exc:  # noqa: BLE001 - network, authentication, removed repos
            raise FsmisError(
                f"downloading {fetch.repo} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                hint="this needs network access to huggingface.co (`hf auth login` for gated repos); "
                     "a repo that left the hub can be replaced by a mirror with backbone.source=<owner/name>",
            ) from None
    if dry_run:
        return 0
    print(f"downloaded; checking: fsmis-bench weights check {' '.join(overrides)}")
    return check(cfg, method, overrides, digests=False, as_json=False)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    from fsmis_bench.config import compose

    overrides = list(args.overrides)
    method = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "method"), None)
    if not any(o.split("=", 1)[0] == "backbone" for o in overrides) and method is None:
        raise ConfigError("which backbone?", hint="e.g. fsmis-bench weights check backbone=sd15 (or backbone=sd21, backbone=tiny)")
    cfg = compose(overrides)
    if args.action == "check":
        return check(cfg, method, overrides, args.digests, args.format == "json")
    return download(cfg, method, overrides, args.dry_run, args.force)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` subcommand."""
    parser = subparsers.add_parser(
        "weights",
        help="check which pretrained weights a configuration needs and whether they load; download them",
        description=__doc__.split("\n\n")[0].replace("``", "`") if __doc__ else None,  # no reST markup in --help
    )
    parser.add_argument("action", choices=("check", "download"))
    parser.add_argument("overrides", nargs="*", help="config overrides: backbone=sd15|sd21|tiny [fidelity=code] [method=...]")
    parser.add_argument("--digests", action="store_true", help="check: print the SHA-256 of every file read (cached)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="check: output format")
    parser.add_argument("--dry-run", action="store_true", help="download: print what would be fetched, fetch nothing")
    parser.add_argument("--force", action="store_true", help="download: fetch components that are already found")
    parser.set_defaults(func=_run)


__all__ = ["Need", "check", "download", "download_plan", "needed", "register"]

