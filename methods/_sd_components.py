"""Stable Diffusion building blocks shared by the diffusion-based methods (SD-FSMIS, DiffewS).

Everything a diffusion method needs from a backbone is built here, from a ``backbone``
config group (``configs/backbone/{sd15,sd21,tiny}.yaml``):

* :func:`build_vae` -> :class:`LatentCodec`, a frozen image <-> latent codec
  (the SD KL-VAE, TAESD, or an exact parameter-free codec for tests);
* :func:`build_unet` -> ``diffusers.UNet2DConditionModel`` (SD-1.5 / SD-2.1 architectures,
  PROTOCOL.md §8, or a tiny CPU variant with the same block types);
* :func:`build_image_encoder` -> :class:`ImageTokenEncoder` (frozen DINOv2 patch tokens, VTCT);
* :func:`expand_conv_in` (Marigold-style input-conv widening);
* :func:`load_text_embedding` (the empty-prompt text embedding, DiffewS).

``pretrained=False`` builds the same architectures with random weights (seeded by the
caller's torch seed) and marks the result ``random_weights = True`` so the run record says so.
``pretrained=True`` reads local weights (``weights_root``) or the Hugging Face hub (only from
the local cache when offline). Missing weights raise one :class:`FsmisError` that says where
the weights go and how to get them.

Heavy libraries (diffusers, transformers) are imported inside the functions so that importing
this module stays cheap.
"""

from __future__ import annotations

import functools
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# ---------------------------------------------------------------------------------------
# latent codecs
# ---------------------------------------------------------------------------------------
class LatentCodec(nn.Module):
    """A frozen image <-> latent codec.

    ``encode`` maps images ``(B, 3, H, W)`` in [-1, 1] to scaled latents
    ``(B, latent_channels, H / downsample, W / downsample)``; it runs without autograd (the
    codec is frozen and its inputs are data). ``decode`` is the inverse and is differentiable
    with respect to the latents. The codec stays in eval mode whatever ``train()`` says.

    Attributes:
        name: ``sd``, ``taesd`` or ``identity``.
        latent_channels: ``C`` of the latents.
        downsample: spatial factor ``d``.
        scaling_factor: multiplier applied after encoding (0.18215 for the SD VAE).
        random_weights: True when a codec that should be pretrained has random weights.
    """

    name: str = "codec"
    latent_channels: int = 4
    downsample: int = 8
    scaling_factor: float = 1.0

    def __init__(self, *, random_weights: bool) -> None:
        super().__init__()
        self.random_weights = bool(random_weights)

    def train(self, mode: bool = True) -> "LatentCodec":
        return super().train(False)

    def encode(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} codec expects (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"{self.name} codec needs H, W divisible by {self.downsample}, got {tuple(images.shape[-2:])}")

    def extra_repr(self) -> str:
        return f"name={self.name}, C={self.latent_channels}, d={self.downsample}, scaling={self.scaling_factor}, random_weights={self.random_weights}"


class KLCodec(LatentCodec):
    """The Stable Diffusion KL-VAE; ``encode`` returns the scaled posterior mean (deterministic)."""

    name = "sd"

    def __init__(self, vae: nn.Module, *, random_weights: bool) -> None:
        super().__init__(random_weights=random_weights)
        self.vae = _freeze(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor or SD_VAE_SCALING)

    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        with torch.no_grad():
            return self.vae.encode(images).latent_dist.mean * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


class TinyCodec(LatentCodec):
    """TAESD (``diffusers.AutoencoderTiny``): SD-compatible 4 x H/8 latents, scaling 1.0."""

    name = "taesd"

    def __init__(self, vae: nn.Module, *, random_weights: bool) -> None:
        super().__init__(random_weights=random_weights)
        self.vae = _freeze(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        with torch.no_grad():
            return self.vae.encode(images).latents * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


class IdentityCodec(LatentCodec):
    """Exact, parameter-free codec for tests: grey -> pixel-unshuffle by 2 -> ``(B, 4, H/2, W/2)``.

    ``decode(encode(x))`` equals the grey image replicated to 3 channels, exactly.
    """

    name = "identity"
    latent_channels = 4
    downsample = 2
    scaling_factor = 1.0

    def __init__(self) -> None:
        super().__init__(random_weights=False)

    def encode(self, images: Tensor) -> Tensor:
        self._check(images)
        first = images[:, :1]
        # replicated grey input (what the methods feed) stays bit-exact; RGB is averaged
        grey = first if torch.equal(first.expand_as(images), images) else images.mean(dim=1, keepdim=True)
        return F.pixel_unshuffle(grey, 2)

    def decode(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, 2).expand(-1, 3, -1, -1).contiguous()


def sd_vae_config() -> dict[str, Any]:
    """The SD-1.x/2.x KL-VAE architecture (PROTOCOL.md §8)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=SD_VAE_SCALING,
    )


def _taesd_from_original(encoder_file: Path, decoder_file: Path) -> nn.Module:
    """Load the original single-file TAESD release into ``AutoencoderTiny`` (strict).

    The original decoder's index 0 is a parameter-free clamp that ``AutoencoderTiny`` folds
    into its forward, so decoder index ``i`` becomes ``layers.<i-1>``.
    """
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for key, value in load_file(str(encoder_file)).items():
        state[f"encoder.layers.{key}"] = value.float()
    for key, value in load_file(str(decoder_file)).items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value.float()
    model = AutoencoderTiny()
    model.load_state_dict(state, strict=True)
    return model


def build_vae(kind: str, *, pretrained: bool, source: str | None, weights_root: str | None) -> LatentCodec:
    """Build a frozen :class:`LatentCodec`.

    Args:
        kind: ``"sd"`` (SD KL-VAE, 83,653,863 params, latents x 0.18215), ``"taesd"``
            (``AutoencoderTiny``, scaling 1.0) or ``"identity"`` (exact, parameter-free).
        pretrained: load weights; False builds the architecture with random weights
            (``random_weights=True``).
        source: for ``sd``: a diffusers pipeline dir (``vae/`` subfolder) or the VAE dir itself,
            a single-file checkpoint, or a hub id; for ``taesd``: a folder holding the original
            ``taesd_{encoder,decoder}.safetensors``, a diffusers-layout folder, or the hub id
            ``madebyollin/taesd`` (default: ``<weights_root>/taesd``). Relative paths are looked
            up under ``weights_root`` first.
        weights_root: root of local weights (``FSMIS_WEIGHTS_ROOT``).
    """
    if kind == "identity":
        return IdentityCodec()
    if kind == "sd":
        from diffusers import AutoencoderKL

        if not pretrained:
            return KLCodec(AutoencoderKL(**sd_vae_config()), random_weights=True)
        resolved = resolve_source(source, weights_root)
        if resolved.kind == "file":
            vae = _single_file(AutoencoderKL, resolved.location, sd_vae_config(), "Stable Diffusion VAE")
        else:
            vae = _from_pretrained(AutoencoderKL, "Stable Diffusion VAE", source, weights_root, _hub_hint(source, "sd15"), subfolder="vae")
        return KLCodec(vae.float(), random_weights=False)
    if kind == "taesd":
        from diffusers import AutoencoderTiny

        if not pretrained:
            return TinyCodec(AutoencoderTiny(), random_weights=True)
        source = source or "taesd"
        resolved = resolve_source(source, weights_root)
        if resolved.kind == "dir":
            base = Path(resolved.location)
            enc, dec = base / "taesd_encoder.safetensors", base / "taesd_decoder.safetensors"
            if enc.is_file() and dec.is_file():
                return TinyCodec(_taesd_from_original(enc, dec), random_weights=False)
            if not (base / "config.json").is_file() and not (base / "vae" / "config.json").is_file():
                raise _missing_weights(
                    "TAESD", source, weights_root, HUB_IDS["taesd"], resolved.tried,
                    detail=f"{base} holds neither taesd_encoder/decoder.safetensors nor a diffusers config.json",
                )
        vae = _from_pretrained(AutoencoderTiny, "TAESD", source, weights_root, HUB_IDS["taesd"], subfolder="vae")
        return TinyCodec(vae.float(), random_weights=False)
    raise ConfigError(f"unknown VAE kind {kind!r}", hint="backbone.vae must be one of: sd, taesd, identity")


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


# ---------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------
UNET_DEFAULT_CROSS_DIM = {"sd15": 768, "sd21": 1024, "tiny": 64}
#: parameter counts with 4 input channels (PROTOCOL.md §8), checked by the tests.
UNET_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724}


def unet_config(kind: str, cross_attention_dim: int | None = None) -> dict[str, Any]:
    """``UNet2DConditionModel`` config of a U-Net kind (``sd15``, ``sd21``, ``tiny``)."""
    down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    common = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )
    # Both SD versions share the block layout (PROTOCOL.md §8); they differ in attention.
    sd_layout = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, norm_num_groups=32)
    if kind == "sd15":
        cfg = dict(
            common,
            **sd_layout,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            use_linear_projection=False,
            upcast_attention=False,
        )
    elif kind == "sd21":
        cfg = dict(
            common,
            **sd_layout,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
        )
    elif kind == "tiny":
        # Same block types and nesting as SD (every transformer hook the methods patch
        # exists), ~2 M parameters so a training step takes well under a second on a CPU.
        cfg = dict(
            common,
            sample_size=32,
            block_out_channels=[32, 64, 64, 64],
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=64,
            attention_head_dim=4,
            use_linear_projection=False,
            upcast_attention=False,
        )
    else:
        raise ConfigError(f"unknown U-Net kind {kind!r}", hint="backbone.unet must be one of: sd15, sd21, tiny")
    if cross_attention_dim is not None:
        if kind != "tiny" and int(cross_attention_dim) != cfg["cross_attention_dim"]:
            raise ConfigError(
                f"backbone {kind} has cross_attention_dim {cfg['cross_attention_dim']}, not {cross_attention_dim}",
                hint=f"remove the backbone.cross_attention_dim override or set it to {cfg['cross_attention_dim']}",
            )
        cfg["cross_attention_dim"] = int(cross_attention_dim)
    return cfg


def build_unet(
    kind: str,
    *,
    pretrained: bool,
    source: str | None,
    weights_root: str | None,
    cross_attention_dim: int | None = None,
) -> nn.Module:
    """Build a ``diffusers.UNet2DConditionModel`` with 4 input channels, trainable (requires_grad).

    Args:
        kind: ``sd15`` / ``sd21`` (architecture-identical to the released models, PROTOCOL.md
            §8) or ``tiny`` (~2 M params, same block types, no pretrained weights exist).
        pretrained: load ``source``; False (and always for ``tiny``) gives random weights and
            ``random_weights=True``. Random weights follow the caller's torch seed.
        source: a diffusers pipeline dir (``unet/`` subfolder) or the U-Net dir itself, a
            single-file checkpoint (``.safetensors``/``.ckpt``), or a hub id (local cache only
            when offline). Relative paths are looked up under ``weights_root`` first.
        weights_root: root of local weights.
        cross_attention_dim: ``d_text``; must match sd15/sd21, free for ``tiny``.

    Building under ``with torch.device("meta"):`` gives a weightless model (parameter counts).
    """
    from diffusers import UNet2DConditionModel

    cfg = unet_config(kind, cross_attention_dim)
    if not pretrained or kind == "tiny":
        return _mark(UNet2DConditionModel(**cfg), True)
    resolved = resolve_source(source, weights_root)
    what = f"Stable Diffusion U-Net ({kind})"
    if resolved.kind == "file":
        unet = _single_file(UNet2DConditionModel, resolved.location, cfg, what)
    else:
        unet = _from_pretrained(UNet2DConditionModel, what, source, weights_root, _hub_hint(source, kind), subfolder="unet")
    unet = unet.float()
    unet.requires_grad_(True)
    unet.train()
    loaded_dim = int(unet.config.cross_attention_dim)
    if loaded_dim != cfg["cross_attention_dim"] or list(unet.config.block_out_channels) != cfg["block_out_channels"]:
        raise ConfigError(
            f"weights at {source!r} are not a {kind} U-Net (cross_attention_dim {loaded_dim})",
            hint=f"point backbone.source at {HUB_IDS[kind]} weights, or pick the backbone that matches them",
        )
    return _mark(unet, False)


def expand_conv_in(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Widen an input conv Marigold-style: the weights repeated over the new input channels
    and scaled by ``old / new``, bias copied.

    With ``in_channels = k * conv.in_channels``, feeding ``x`` repeated ``k`` times along the
    channel axis gives exactly ``conv(x)``.

    Args:
        conv: the pretrained ``conv_in`` (``C_in -> C_out``); left untouched.
        in_channels: new input channels, a multiple of ``conv.in_channels``.
    Returns:
        a new ``nn.Conv2d(in_channels, C_out, ...)`` on the same device/dtype.
    """
    old = conv.in_channels
    if conv.groups != 1:
        raise ValueError("expand_conv_in supports groups=1 convolutions only")
    if in_channels % old:
        raise ValueError(f"in_channels={in_channels} is not a multiple of {old}")
    repeats = in_channels // old
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.detach().repeat(1, repeats, 1, 1) * (old / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    return new


# ---------------------------------------------------------------------------------------
# image encoder (VTCT)
# ---------------------------------------------------------------------------------------
def dinov2_config(kind: str) -> dict[str, Any]:
    """``transformers.Dinov2Config`` arguments of an encoder kind (PROTOCOL.md §8)."""
    common = dict(patch_size=14, image_size=518, mlp_ratio=4, num_hidden_layers=12, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
    if kind == "dinov2_small":
        return dict(common, hidden_size=384, num_attention_heads=6)
    if kind == "dinov2_base":
        return dict(common, hidden_size=768, num_attention_heads=12)
    if kind == "tiny":
        return dict(patch_size=8, image_size=64, mlp_ratio=2, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
    raise ConfigError(f"unknown image encoder {kind!r}", hint="backbone.image_encoder must be one of: dinov2_small, dinov2_base, tiny (or null)")


#: input resolution of each encoder kind (224 px -> a 16 x 16 patch grid for DINOv2).
ENCODER_INPUT_SIZE = {"dinov2_small": 224, "dinov2_base": 224, "tiny": 64}


class ImageTokenEncoder(nn.Module):
    """Frozen ViT patch-token encoder.

    ``forward(images (B, 3, H, W) in [-1, 1]) -> (B, gh * gw, dim)`` patch tokens (CLS
    dropped), after resizing to ``input_size`` and ImageNet normalisation. Runs without
    autograd and stays in eval mode.

    Attributes:
        name: encoder kind.
        dim: token width ``d``.
        grid: patch grid ``(gh, gw)``.
        input_size: side of the square input.
        random_weights: True when an encoder that should be pretrained has random weights.
    """

    def __init__(self, name: str, model: nn.Module, input_size: int, *, random_weights: bool) -> None:
        super().__init__()
        self.name = name
        self.model = _freeze(model)
        self.input_size = int(input_size)
        patch = int(model.config.patch_size)
        self.dim = int(model.config.hidden_size)
        self.grid = (self.input_size // patch, self.input_size // patch)
        self.random_weights = bool(random_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageTokenEncoder":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image encoder expects (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            x = (images.float() + 1.0) / 2.0
            if x.shape[-2:] != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
            x = (x - self.mean) / self.std
            hidden = self.model(pixel_values=x).last_hidden_state
            return hidden[:, 1:]  # DINOv2 small/base have no register tokens

    def extra_repr(self) -> str:
        return f"name={self.name}, dim={self.dim}, grid={self.grid}, input_size={self.input_size}, random_weights={self.random_weights}"


def build_image_encoder(kind: str, *, pretrained: bool, source: str | None, weights_root: str | None) -> ImageTokenEncoder:
    """Build the frozen VTCT image encoder.

    Args:
        kind: ``dinov2_small`` (paper, d = 384, 22,056,576 params), ``dinov2_base`` (released
            code, d = 768) or ``tiny`` (random 2-layer ViT, d = 32, for CPU tests).
        pretrained: load weights (``tiny`` has none: always random, flagged).
        source: a local ``transformers`` model dir or a hub id (default: the facebook/ id);
            relative paths under ``weights_root`` first.
        weights_root: root of local weights.
    """
    from transformers import Dinov2Config, Dinov2Model

    cfg = dinov2_config(kind)
    size = ENCODER_INPUT_SIZE[kind]
    if not pretrained or kind == "tiny":
        return ImageTokenEncoder(kind, Dinov2Model(Dinov2Config(**cfg)), size, random_weights=True)
    source = source or HUB_IDS[kind]
    resolved = resolve_source(source, weights_root)
    if resolved.kind == "file":
        raise ConfigError(
            f"image encoder source {source!r} is a single file",
            hint="point backbone.image_encoder_source at a transformers model folder or a hub id",
        )
    model = _from_pretrained(Dinov2Model, f"DINOv2 ({kind})", source, weights_root, HUB_IDS[kind], subfolder=None)
    if int(model.config.hidden_size) != cfg["hidden_size"]:
        raise ConfigError(
            f"weights at {source!r} have hidden size {model.config.hidden_size}, not {cfg['hidden_size']} ({kind})",
            hint=f"point backbone.image_encoder_source at {HUB_IDS[kind]} weights",
        )
    return ImageTokenEncoder(kind, model.float(), size, random_weights=False)


# ---------------------------------------------------------------------------------------
# text embedding (DiffewS)
# ---------------------------------------------------------------------------------------
def load_text_embedding(
    unet_kind: str,
    *,
    pretrained: bool,
    source: str | None,
    weights_root: str | None,
    cross_attention_dim: int,
    prompt: str = "",
) -> Tensor:
    """The CLIP text embedding of ``prompt`` (default: the empty prompt, DiffewS' null text).

    With ``pretrained=True`` and an sd15/sd21 backbone, loads the backbone's ``tokenizer/``
    and ``text_encoder/`` (transformers ``CLIPTokenizer`` / ``CLIPTextModel``), pads the prompt
    to 77 tokens and returns ``last_hidden_state``. For ``pretrained=False`` or the ``tiny``
    backbone no text encoder exists, and the embedding is a fixed **zero** tensor: a constant
    conditioning that the trained U-Net learns around, as the real null-text embedding is.

    Returns:
        ``(1, 77, cross_attention_dim)`` float32 on the CPU (register it as a buffer).
    """
    if not pretrained or unet_kind == "tiny":
        return torch.zeros(1, TEXT_TOKENS, int(cross_attention_dim))
    from transformers import CLIPTextModel, CLIPTokenizer

    resolved = resolve_source(source, weights_root)
    if resolved.kind == "file":
        raise ConfigError(
            f"the text encoder cannot be read from the single file {source!r}",
            hint="point backbone.source at a diffusers pipeline folder (with text_encoder/ and tokenizer/)",
        )
    hub = _hub_hint(source, unet_kind)
    if resolved.kind == "dir" and not (Path(resolved.location) / "tokenizer").is_dir():
        raise _missing_weights("CLIP text encoder", source, weights_root, hub, resolved.tried, detail=f"{resolved.location} has no tokenizer/ subfolder")
    tokenizer = _from_pretrained(CLIPTokenizer, "CLIP tokenizer", source, weights_root, hub, subfolder="tokenizer")
    encoder = _from_pretrained(CLIPTextModel, "CLIP text encoder", source, weights_root, hub, subfolder="text_encoder")
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = encoder.float().eval()(ids).last_hidden_state
    if embedding.shape[-1] != int(cross_attention_dim):
        raise ConfigError(
            f"text encoder width {embedding.shape[-1]} does not match cross_attention_dim {cross_attention_dim}",
            hint="the U-Net and text encoder must come from the same backbone",
        )
    return embedding.detach().cpu()


def count_parameters(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Number of parameters (all, or only those with ``requires_grad == trainable``)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


__all__ = [
    "BackboneSources",
    "HUB_IDS",
    "IdentityCodec",
    "ImageTokenEncoder",
    "KLCodec",
    "LatentCodec",
    "SD_VAE_SCALING",
    "TinyCodec",
    "UNET_PARAMS",
    "backbone_sources",
    "build_image_encoder",
    "build_unet",
    "build_vae",
    "count_parameters",
    "dinov2_config",
    "expand_conv_in",
    "hub_offline",
    "load_text_embedding",
    "resolve_source",
    "sd_vae_config",
    "unet_config",
]
