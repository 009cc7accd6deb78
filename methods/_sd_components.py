"""Stable Diffusion building blocks shared by the diffusion-based methods (SD-FSMIS, DiffewS).

Everything a diffusion method needs from a backbone is built here, from a ``backbone``
config group (``configs/backbone/{sd15,sd21,tiny}.yaml``):

* :func:`build_vae` -> :class:`LatentCodec`, a frozen image <-> latent codec
  (the SD KL-VAE, TAESD, or an exact parameter-free codec for tests);
* :func:`build_unet` -> ``diffusers.UNet2DConditionModel`` (SD-1.5 / SD-2.1 architectures,
  PROTOCOL.md §8, or a tiny CPU variant with the same block types);
* :func:`build_image_encoder` -> :class:`ImageTokenEncoder` (frozen DINOv2 patch tokens, VTCT);
* :func:`expand_conv_in` (Marigold-style input-conv widening);
* :func:`load_prompt_embedding` (the empty-prompt text embedding from the real CLIP/OpenCLIP
  text encoder and tokenizer, DiffewS and the SD-FSMIS variants without VTCT).

``pretrained=False`` builds the same architectures with random weights (seeded by the
caller's torch seed) and marks the result ``random_weights = True`` so the run record says so.
``pretrained=True`` reads each component from any layout a user has (``_sd_weights``: a
``save_pretrained`` folder, a hub cache offline, an original single-file checkpoint through
diffusers' single-file loaders) and records the files it read (``module.weight_files``, digests
for the run record). Missing weights raise one :class:`FsmisError` that names the places
searched and how to get the weights (``fsmis-bench weights check|download``).

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
    Located,
    SD_VAE_SCALING,
    SINGLE_FILE_SUFFIXES,
    TEXT_TOKENS,
    WeightFiles,
    WeightsNotFound,
    _env_flag,
    _freeze,
    _hub_hint,
    _looks_like_hub_id,
    _mark,
    backbone_sources,
    hub_cache_dirs,
    hub_offline,
    locate,
    missing_weights,
    weight_identity_of,
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
    unet_config,
)
from ._text_encoder import (  # noqa: F401
    PromptEmbedding,
    clip_text_config,
    load_prompt_embedding,
    load_text_embedding,
)
from ._image_encoders import (  # noqa: F401
    ENCODER_INPUT_SIZE,
    VTCT_PREPROCESSING,
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
    "PromptEmbedding",
    "SD_VAE_SCALING",
    "TinyCodec",
    "UNET_PARAMS",
    "VTCT_PREPROCESSING",
    "WeightFiles",
    "WeightsNotFound",
    "backbone_sources",
    "build_image_encoder",
    "build_unet",
    "build_vae",
    "clip_text_config",
    "count_parameters",
    "dinov2_config",
    "expand_conv_in",
    "float32_output_layer",
    "hub_offline",
    "load_prompt_embedding",
    "load_text_embedding",
    "locate",
    "sd_vae_config",
    "unet_config",
    "weight_identity_of",
]
