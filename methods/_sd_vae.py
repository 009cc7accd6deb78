"""Frozen image <-> latent codecs: the SD KL-VAE, TAESD (original single-file release
or diffusers layout), and an exact parameter-free codec for tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmis_bench.errors import ConfigError, FsmisError
from ._sd_single_file import load_diffusers_model
from ._sd_weights import (
    HUB_IDS,
    LAYOUT_TAESD,
    SD_VAE_SCALING,
    WeightFiles,
    WeightsNotFound,
    _freeze,
    _hub_hint,
    _mark,
    expected_layout,
    load_folder,
    locate,
    missing_weights,
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

    #: True for a codec with a posterior to sample from (``encode(sample=True)`` differs)
    samples: bool = False

    def encode(self, images: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        """``sample``: draw from the posterior instead of taking its mean (codecs with a
        posterior only; deterministic codecs return the same latents either way);
        ``noise``: the standard normal draw to use, from :meth:`posterior_noise`."""
        raise NotImplementedError

    def posterior_noise(self, images_shape: torch.Size | tuple[int, ...]) -> Tensor | None:
        """The standard normal draw ``encode(sample=True)`` makes for images of this shape,
        ``(N, C, H/d, W/d)`` on the CPU, drawn now; None for a codec without a posterior."""
        return None

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
    """The Stable Diffusion KL-VAE; ``encode`` returns the scaled posterior mean, or a draw
    from the posterior with ``sample=True`` (the released SD-FSMIS training script's
    ``latent_dist.sample()``). The noise comes from torch's CPU generator, whose state the
    engine checkpoints, so a resumed run draws the same latents on any device. A training
    step draws it before the step (:meth:`posterior_noise`, through ``Method.host_draws``)
    and passes it in; drawing it inside is refused while a CUDA graph is recorded, which
    would replay one draw forever."""

    name = "sd"
    samples = True

    def __init__(self, vae: nn.Module, *, random_weights: bool) -> None:
        super().__init__(random_weights=random_weights)
        self.vae = _freeze(vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor or SD_VAE_SCALING)

    def posterior_noise(self, images_shape: torch.Size | tuple[int, ...]) -> Tensor:
        n, _, height, width = images_shape
        shape = (n, self.latent_channels, height // self.downsample, width // self.downsample)
        # in the dtype of the posterior it perturbs (autocast's where autocast runs the VAE):
        # torch's CPU generator gives other values in another dtype for some sizes
        device = self.vae.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.vae.dtype
        return torch.randn(shape, dtype=dtype)  # the CPU generator, checkpointed by the engine

    def encode(self, images: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        self._check(images)
        with torch.no_grad():
            posterior = self.vae.encode(images).latent_dist
            latents = posterior.mean
            if sample:
                if noise is None:
                    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                        # a CUDA graph runs this host code once: every replay would reuse one draw
                        raise RuntimeError("posterior samples drawn inside the step cannot be recorded in a "
                                           "CUDA graph; draw them before it (Method.host_draws)")
                    noise = self.posterior_noise(images.shape)
                if noise.shape != latents.shape:
                    raise ValueError(f"posterior noise {tuple(noise.shape)} for latents {tuple(latents.shape)}")
                latents = latents + posterior.std * noise.to(device=latents.device, dtype=latents.dtype)
            return latents * self.scaling_factor

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

    def encode(self, images: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        self._check(images)  # TAESD is deterministic: no posterior to sample from
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

    def encode(self, images: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
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


#: the original TAESD release: one file per half, as ``_load_taesd`` looks for them.
TAESD_FILES = ("taesd_encoder.safetensors", "taesd_decoder.safetensors")


def _taesd_shapes(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """The tensors each original TAESD file must hold, ``{"encoder"|"decoder": {key: shape}}``,
    under the original keys (see :func:`_taesd_from_original` for the mapping)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"encoder": {}, "decoder": {}}
    for key, value in model.state_dict().items():
        half, _, index, rest = key.split(".", 3)
        original = f"{index}.{rest}" if half == "encoder" else f"{int(index) + 1}.{rest}"
        shapes[half][original] = tuple(value.shape)
    return shapes


def _read_taesd_half(path: Path, half: str, shapes: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, Tensor]:
    """One original TAESD file, checked to be the ``half`` it is named as: one error naming
    the file for a damaged file, the other half (swapped files) or other tensors."""
    from safetensors.torch import load_file

    source = f"re-download {path.name} from the {HUB_IDS['taesd']} repo into {path.parent}"
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors' errors on a damaged file are its own Rust types
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FsmisError(f"TAESD: cannot read {path}: it is truncated or not a safetensors file ({type(exc).__name__}: {text})",
                         hint=source) from None
    got = {key: tuple(value.shape) for key, value in state.items()}
    if got == shapes[half]:
        return state
    other = "decoder" if half == "encoder" else "encoder"
    if got == shapes[other]:
        raise FsmisError(f"TAESD: {path} holds the tensors of a TAESD {other}, so it is not a TAESD {half} file",
                         hint=f"did you swap encoder and decoder? {TAESD_FILES[0]} must hold the encoder, "
                              f"{TAESD_FILES[1]} the decoder")
    missing = sorted(set(shapes[half]) - set(got))
    extra = sorted(set(got) - set(shapes[half]))
    reshaped = sorted(k for k in set(got) & set(shapes[half]) if got[k] != shapes[half][k])
    counts = [f"{len(keys)} {label}" for keys, label in ((reshaped, "of another shape"), (extra, "not TAESD's"), (missing, "missing"))
              if keys]
    example = (f"{reshaped[0]} is {list(got[reshaped[0]])}, not {list(shapes[half][reshaped[0]])}" if reshaped
               else f"e.g. {(extra + missing)[0]}")
    raise FsmisError(
        f"TAESD: {path} is not a TAESD {half} file: of the {len(shapes[half])} tensors it should hold, {', '.join(counts)} ({example})",
        hint=f"{source}; did you swap encoder and decoder?",
    )


def _taesd_from_original(encoder_file: Path, decoder_file: Path) -> nn.Module:
    """Load the original single-file TAESD release into ``AutoencoderTiny`` (strict).

    The original decoder's index 0 is a parameter-free clamp that ``AutoencoderTiny`` folds
    into its forward, so decoder index ``i`` becomes ``layers.<i-1>``. Each file is checked to
    hold exactly its half's tensors first, so that a damaged or swapped file gives one error
    naming it.
    """
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny()
    shapes = _taesd_shapes(model)
    state: dict[str, Tensor] = {}
    for key, value in _read_taesd_half(encoder_file, "encoder", shapes).items():
        state[f"encoder.layers.{key}"] = value.float()
    for key, value in _read_taesd_half(decoder_file, "decoder", shapes).items():
        index, rest = key.split(".", 1)
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = value.float()
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
        what = "Stable Diffusion VAE"
        config = sd_vae_config()
        located = locate(what, source, weights_root, hub_id=_hub_hint(source, "sd15"), subfolder="vae", library="diffusers")
        if located.kind == "file":
            vae, record = load_diffusers_model(AutoencoderKL, located, "vae", config, what)
        else:
            vae, record = load_folder(AutoencoderKL, what, located, "diffusers", expected_layout(what, "vae", "diffusers", True))
        got = (list(vae.config.block_out_channels), int(vae.config.latent_channels))
        if got != (config["block_out_channels"], config["latent_channels"]):
            raise ConfigError(
                f"the VAE at {located.path} has block_out_channels {got[0]} and {got[1]} latent channels, not the SD VAE's",
                hint="point backbone.vae_source at the SD-1.x/2.x VAE (the vae/ of the backbone's weights)",
            )
        return _mark(KLCodec(vae.float(), random_weights=False), False, record)
    if kind == "taesd":
        from diffusers import AutoencoderTiny

        if not pretrained:
            return TinyCodec(AutoencoderTiny(), random_weights=True)
        return _load_taesd(source or "taesd", weights_root)
    raise ConfigError(f"unknown VAE kind {kind!r}", hint="backbone.vae must be one of: sd, taesd, identity")


def _load_taesd(source: str, weights_root: str | None) -> TinyCodec:
    """TAESD from the original release (``taesd_{encoder,decoder}.safetensors``), a diffusers
    folder (``config.json`` + weights, or its ``vae/``) or the hub id ``madebyollin/taesd``."""
    from diffusers import AutoencoderTiny

    what = "TAESD"
    expected = ("TAESD is read from a folder holding the original taesd_encoder.safetensors + taesd_decoder.safetensors, "
                "a diffusers folder (config.json + diffusion_pytorch_model.safetensors) or the hub id madebyollin/taesd")
    text = os.path.expanduser(source)
    candidates = [Path(text)] if os.path.isabs(text) else ([Path(os.path.expanduser(str(weights_root))) / text] if weights_root else []) + [Path.cwd() / text]
    for base in candidates:
        enc, dec = base / TAESD_FILES[0], base / TAESD_FILES[1]
        if enc.is_file() and dec.is_file():
            base = base.resolve()
            record = WeightFiles(source, str(base), LAYOUT_TAESD, (str(base / enc.name), str(base / dec.name)), str(base))
            return _mark(TinyCodec(_taesd_from_original(enc, dec), random_weights=False), False, record)
        if base.is_dir() and not any((base / sub / "config.json").is_file() for sub in ("", "vae")):
            present = sorted(p.name for p in base.iterdir())[:6]
            raise missing_weights(what, source, weights_root, HUB_IDS["taesd"], [str(c) for c in candidates],
                                  detail=f"{base} holds neither taesd_encoder/decoder.safetensors nor a diffusers config.json (it holds {present})",
                                  expected=expected)
    try:
        located = locate(what, source, weights_root, hub_id=HUB_IDS["taesd"], subfolder="vae", library="diffusers", single_file=False)
    except WeightsNotFound as exc:  # locate knows the diffusers layout only: name the original files too
        raise WeightsNotFound(exc.message.replace(exc.expected, expected) if exc.expected else exc.message, exc.hint or "",
                              searched=exc.searched, expected=expected, reason=exc.reason) from None
    vae, record = load_folder(AutoencoderTiny, what, located, "diffusers", expected)
    return _mark(TinyCodec(vae.float(), random_weights=False), False, record)
