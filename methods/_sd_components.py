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

# The pieces live in one module each; this module is the one import point for methods.
from ._sd_weights import (  # noqa: F401
    UNET_DEFAULT_CROSS_DIM,
    BackboneSources,
    HUB_IDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResolvedSource,
    SD_VAE_SCALING,
    SINGLE_FILE_SUFFIXES,
    TEXT_TOKENS,
    _env_flag,
    _freeze,
    _from_pretrained,
    _hub_hint,
    _load_resolved,
    _looks_like_hub_id,
    _mark,
    _missing_weights,
    _single_file,
    _write_config,
    backbone_sources,
    hub_offline,
    resolve_source,
)
from ._sd_vae import (  # noqa: F401
    IdentityCodec,
    KLCodec,
    LatentCodec,
    TinyCodec,
    _taesd_from_original,
    build_vae,
    sd_vae_config,
)
from ._sd_unet import (  # noqa: F401
    UNET_PARAMS,
    Float32Conv2d,
    float32_output_layer,
    build_unet,
    count_parameters,
    expand_conv_in,
    load_text_embedding,
    unet_config,
)
from ._image_encoders import (  # noqa: F401
    ENCODER_INPUT_SIZE,
    ImageTokenEncoder,
    build_image_encoder,
    dinov2_config,
)

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
    "float32_output_layer",
    "hub_offline",
    "load_text_embedding",
    "resolve_source",
    "sd_vae_config",
    "unet_config",
]
