"""Where backbone weights come from: local folders, single files, the hub (cache only when
offline), and the one error that says how to get them. Shared by the backbone builders."""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from fsmis_bench.errors import ConfigError, FsmisError


#: latent scaling of the SD-1.x/2.x KL-VAE.
SD_VAE_SCALING = 0.18215
#: tokens of a CLIP text prompt (SD text encoders).
TEXT_TOKENS = 77
#: ImageNet statistics, used by DINOv2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: where to download each backbone's weights from (hint text of the missing-weights error).
HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "taesd": "madebyollin/taesd",
    "dinov2_small": "facebook/dinov2-small",
    "dinov2_base": "facebook/dinov2-base",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: cross-attention (text) width of each U-Net kind.
UNET_DEFAULT_CROSS_DIM = {"sd15": 768, "sd21": 1024, "tiny": 64}


# ---------------------------------------------------------------------------------------
# weight sources
# ---------------------------------------------------------------------------------------
def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` or unreachable)."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=1.5):
            return False
    except OSError:
        return True


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not source.endswith(SINGLE_FILE_SUFFIXES)
    )


@dataclass(frozen=True)
class ResolvedSource:
    """Where a component's weights come from.

    Attributes:
        kind: ``"dir"`` (local folder), ``"file"`` (single-file checkpoint) or ``"hub"``.
        location: the absolute path, or the hub id.
        tried: the local paths that were looked at (for error messages).
    """

    kind: str
    location: str
    tried: tuple[str, ...] = ()


def resolve_source(source: str | os.PathLike[str] | None, weights_root: str | os.PathLike[str] | None) -> ResolvedSource:
    """Resolve a weight source: a relative path is looked up under ``weights_root`` first,
    then the working directory; anything not found locally that looks like ``owner/name`` is
    a hub id. Returns a ``ResolvedSource`` whose ``kind`` is ``"missing"`` when nothing fits."""
    if source is None or str(source).strip() == "":
        return ResolvedSource("missing", "", ())
    text = os.path.expanduser(str(source))
    candidates: list[Path] = []
    if os.path.isabs(text):
        candidates.append(Path(text))
    else:
        if weights_root:
            candidates.append(Path(os.path.expanduser(str(weights_root))) / text)
        candidates.append(Path.cwd() / text)
    for path in candidates:
        if path.is_dir():
            return ResolvedSource("dir", str(path.resolve()), tuple(map(str, candidates)))
        if path.is_file():
            return ResolvedSource("file", str(path.resolve()), tuple(map(str, candidates)))
    if _looks_like_hub_id(text):
        return ResolvedSource("hub", text, tuple(map(str, candidates)))
    return ResolvedSource("missing", text, tuple(map(str, candidates)))


def _missing_weights(what: str, source: Any, weights_root: Any, hub_id: str | None, tried: tuple[str, ...] = (), detail: str = "") -> FsmisError:
    root = str(weights_root) if weights_root else "<weights_root>"
    where = f" (looked in: {', '.join(tried)})" if tried else ""
    extra = f"; {detail}" if detail else ""
    if hub_id:
        local = str(source) if source and not os.path.isabs(str(source)) else hub_id
        get = f"download them with `hf download {hub_id} --local-dir {root}/{local}` (and set FSMIS_WEIGHTS_ROOT={root})"
    else:
        get = f"put them under {root}"
    return FsmisError(
        f"{what} weights not found for source {str(source)!r}{where}{extra}",
        hint=f"{get}, or run with pretrained=false for a smoke run with random weights",
    )


def _from_pretrained(cls: Any, what: str, source: str | None, weights_root: Any, hub_id: str | None, *, subfolder: str | None, **kwargs: Any) -> Any:
    """Load a diffusers/transformers model from a local dir (with or without ``subfolder``) or the hub.

    Single files are handled by the callers (each model class needs its own treatment).
    """
    import warnings

    resolved = resolve_source(source, weights_root)
    if resolved.kind == "missing":
        raise _missing_weights(what, source, weights_root, hub_id, resolved.tried)
    with warnings.catch_warnings():
        # transformers still passes a deprecated argument to huggingface_hub: not the user's business
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return _load_resolved(cls, what, resolved, source, weights_root, hub_id, subfolder=subfolder, **kwargs)


def _load_resolved(cls: Any, what: str, resolved: ResolvedSource, source: Any, weights_root: Any, hub_id: str | None, *, subfolder: str | None, **kwargs: Any) -> Any:
    if resolved.kind == "dir":
        base = Path(resolved.location)
        extra: dict[str, Any] | None = None
        if subfolder and (base / subfolder / "config.json").is_file():
            extra = {"subfolder": subfolder}
        elif (base / "config.json").is_file():
            extra = {}
        if extra is not None:
            try:
                return cls.from_pretrained(str(base), local_files_only=True, **extra, **kwargs)
            except (OSError, ValueError) as exc:  # config present, weights missing or broken
                raise _missing_weights(
                    what, source, weights_root, hub_id, resolved.tried,
                    detail=f"{base}: {type(exc).__name__}: {exc}".splitlines()[0],
                ) from None
        raise _missing_weights(
            what, source, weights_root, hub_id, resolved.tried,
            detail=f"{base} has neither {subfolder}/config.json nor config.json",
        )
    if resolved.kind == "hub":
        offline = hub_offline()
        # a pipeline repo keeps the model in `subfolder`; a single-model repo (madebyollin/taesd,
        # facebook/dinov2-small) at its root
        attempts = [{"subfolder": subfolder}, {}] if subfolder else [{}]
        error: Exception | None = None
        for extra in attempts:
            try:
                return cls.from_pretrained(resolved.location, local_files_only=offline, **extra, **kwargs)
            except (OSError, ValueError) as exc:
                error = exc
        detail = "the hub is unreachable and the id is not in the local cache" if offline else f"hub load failed: {type(error).__name__}: {error}".splitlines()[0]
        raise _missing_weights(what, source, weights_root, hub_id or resolved.location, resolved.tried, detail) from None
    raise _missing_weights(what, source, weights_root, hub_id, resolved.tried, detail="a single file is not supported here")


def _mark(module: nn.Module, random_weights: bool) -> nn.Module:
    # plain attribute: the lead's run record reads it; never silently pretend to be pretrained
    object.__setattr__(module, "random_weights", bool(random_weights))
    return module


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


@dataclass(frozen=True)
class BackboneSources:
    """Everything :func:`build_vae` / :func:`build_unet` / ... need, read from a ``backbone`` config.

    Attributes:
        name: backbone name (``sd15``, ``sd21``, ``tiny``).
        unet: U-Net kind for :func:`build_unet`.
        vae: codec kind for :func:`build_vae`.
        cross_attention_dim: ``d_text``.
        image_encoder: encoder kind for :func:`build_image_encoder`, after applying ``fidelity``.
        source: U-Net (and text encoder) source.
        vae_source: VAE source (``source`` when the config leaves it null, ``taesd`` for TAESD).
        image_encoder_source: encoder source (the DINOv2 hub id by default).
        prediction_type: ``epsilon`` or ``v_prediction`` (the backbone's native parameterisation).
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


def backbone_sources(backbone_cfg: Mapping[str, Any], fidelity: str = "paper") -> BackboneSources:
    """Read a ``backbone`` config group into :class:`BackboneSources`.

    ``image_encoder: null`` follows ``fidelity``: the paper's DINOv2-small, or the released
    code's DINOv2-base (PROTOCOL.md §6, VTCT).
    """
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
    return BackboneSources(
        name=name,
        unet=str(get("unet")),
        vae=vae,
        cross_attention_dim=int(get("cross_attention_dim") or UNET_DEFAULT_CROSS_DIM[str(get("unet"))]),
        image_encoder=str(encoder),
        source=None if source is None else str(source),
        vae_source=None if vae_source is None else str(vae_source),
        image_encoder_source=None if enc_source is None else str(enc_source),
        prediction_type=str(get("prediction_type", "epsilon")),
    )


def _hub_hint(source: str | None, default_key: str) -> str:
    if source and _looks_like_hub_id(str(source)):
        return str(source)
    return HUB_IDS[default_key]


def _single_file(cls: Any, path: str, config: Mapping[str, Any], what: str) -> Any:
    """``from_single_file`` with a locally written config, so that no hub access is needed."""
    with tempfile.TemporaryDirectory(prefix="fsmis_cfg_") as tmp:
        _write_config(cls, config, tmp)
        try:
            return cls.from_single_file(path, config=tmp, local_files_only=True)
        except Exception as exc:  # conversion errors are user-fixable: wrong checkpoint
            raise FsmisError(
                f"could not load {what} from single file {path}: {type(exc).__name__}: {exc}".splitlines()[0],
                hint="pass an original SD checkpoint of the matching version, or a diffusers folder",
            ) from None


def _write_config(cls: Any, config: Mapping[str, Any], folder: str) -> None:
    import json

    payload = {"_class_name": cls.__name__, **dict(config)}
    Path(folder, "config.json").write_text(json.dumps(payload))
