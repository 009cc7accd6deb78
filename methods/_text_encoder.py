"""The empty-prompt ("null text") embedding from the backbone's real text encoder.

SD-1.5 conditions on CLIP ViT-L/14's last hidden state; SD-2.1 on OpenCLIP ViT-H/14's
penultimate layer followed by the final layer norm, which is exactly the last hidden state
of the 23-layer ``CLIPTextModel`` in its diffusers folder. The tokenizer matters too: SD-1.5's
``tokenizer/special_tokens_map.json`` pads with ``<|endoftext|>`` (id 49407, as OpenAI's CLIP),
SD-2.x's with ``!`` (id 0, as the ``open_clip`` tokenizer SD-2 was trained with pads with 0;
diffusers issues #1388, #2201), so the two give different token ids for the same empty prompt
and 75 of its 77 embeddings differ. The vocabularies are the same, so the other version's
tokenizer would load without complaint: its pad token is checked against :data:`PAD_TOKENS`.

Layouts: the ``text_encoder/`` + ``tokenizer/`` of a diffusers folder or a hub id (local
folder, hub cache); or an original single-file checkpoint (its ``cond_stage_model.*``), whose
tokenizer comes from ``tokenizer_source``, else a ``tokenizer/`` folder beside the file,
else the backbone's hub repo (``weights_root/<hub id>/tokenizer`` or a hub cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fsmis_bench.errors import ConfigError, FsmisError

from ._sd_single_file import load_clip_text_model
from ._sd_weights import (
    HUB_IDS,
    TEXT_TOKENS,
    Located,
    WeightFiles,
    WeightsNotFound,
    _hub_hint,
    expected_layout,
    load_folder,
    locate,
    weight_files,
)


#: the pad token of each SD version's tokenizer (see the module docstring).
PAD_TOKENS = {"sd15": "<|endoftext|>", "sd21": "!"}


def clip_text_config(kind: str) -> dict[str, Any]:
    """``transformers.CLIPTextConfig`` arguments of a backbone's text encoder.

    ``sd15``: CLIP ViT-L/14 text tower (768 wide, 12 layers, quick-GELU); ``sd21``: OpenCLIP
    ViT-H/14 text tower (1024 wide, 16 heads, GELU) cut to the 23 layers SD-2 reads.
    """
    common = dict(vocab_size=49408, max_position_embeddings=TEXT_TOKENS, layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    if kind == "sd15":
        return dict(common, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu", projection_dim=768)
    if kind == "sd21":
        return dict(common, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    hidden_act="gelu", projection_dim=512)
    raise ConfigError(f"no text encoder is defined for the {kind!r} U-Net", hint="text encoders exist for sd15 and sd21")


@dataclass
class PromptEmbedding:
    """A prompt's text embedding and the files it was computed from.

    Attributes:
        embedding: ``(1, 77, d_text)`` float32 on the CPU.
        weight_files: ``{"text_encoder": ..., "tokenizer": ...}`` (empty when no encoder was read).
    """

    embedding: Tensor
    weight_files: dict[str, WeightFiles] = field(default_factory=dict)


def locate_tokenizer(kind: str, text_source: str | None, text_located: Located | None, tokenizer_source: str | None,
                     weights_root: Any) -> Located:
    """Where the tokenizer is read from (see the module docstring for the order).

    Args:
        text_source: the text encoder's source; ``text_located``: where it was found (None
            when unknown).
    """
    what = f"tokenizer ({kind})"
    hub = HUB_IDS[kind]
    if tokenizer_source:
        return locate(what, tokenizer_source, weights_root, hub_id=_hub_hint(tokenizer_source, kind),
                      subfolder="tokenizer", library="tokenizer", single_file=False)
    if text_located is None or text_located.kind == "dir":
        # a diffusers folder or hub id: its tokenizer/ beside text_encoder/
        return locate(what, text_source, weights_root, hub_id=_hub_hint(text_source, kind),
                      subfolder="tokenizer", library="tokenizer", single_file=False)
    beside = text_located.path.parent / "tokenizer"
    if beside.is_dir():
        return locate(what, str(beside), None, hub_id=hub, subfolder=None, library="tokenizer", single_file=False)
    try:
        return locate(what, hub, weights_root, hub_id=hub, subfolder="tokenizer", library="tokenizer", single_file=False)
    except WeightsNotFound as exc:
        raise WeightsNotFound(
            f"{exc.message}; an original checkpoint holds no tokenizer: it is read from {beside} or the {hub} repo's tokenizer/",
            f"`hf download {hub} --include 'tokenizer/*' --local-dir <weights_root>/{hub}`, or set backbone.tokenizer_source",
            searched=[str(beside), *exc.searched], expected=exc.expected, reason=exc.reason,
        ) from None


def load_tokenizer(located: Located, what: str, kind: str | None = None) -> tuple[Any, WeightFiles]:
    """The ``CLIPTokenizer`` at ``located`` and its files; with ``kind`` (``sd15``/``sd21``),
    refused unless it pads as that SD version's tokenizer does (:data:`PAD_TOKENS`)."""
    from transformers import CLIPTokenizer

    files = weight_files(located.path, "tokenizer")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(located.path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FsmisError(
            f"could not load {what} from {located.path}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint=expected_layout(what, "tokenizer", "tokenizer", False),
        ) from None
    want = PAD_TOKENS.get(kind or "")
    if want is not None and tokenizer.pad_token != want:
        other = next((k for k, pad in PAD_TOKENS.items() if pad == tokenizer.pad_token), None)
        looks = f"the {other} tokenizer's" if other else "no SD version's"
        raise ConfigError(
            f"{what}: the tokenizer at {located.path} pads with {tokenizer.pad_token!r}, {looks} pad token; {kind}'s "
            f"pads with {want!r}, so the empty prompt would be tokenized as {kind} never saw it",
            hint=f"point backbone.tokenizer_source at the tokenizer/ of {HUB_IDS[kind]} (for a single-file checkpoint: "
                 "the tokenizer/ beside it must come from the same SD version)",
        )
    return tokenizer, WeightFiles(located.source, str(located.path), located.layout, tuple(map(str, files)), str(located.path))


def load_text_encoder(kind: str, source: str | None, weights_root: Any) -> tuple[nn.Module, WeightFiles, Located]:
    """The backbone's text encoder (``CLIPTextModel``, float32, eval) from any layout."""
    from transformers import CLIPTextModel

    what = f"text encoder ({kind})"
    located = locate(what, source, weights_root, hub_id=_hub_hint(source, kind), subfolder="text_encoder", library="transformers")
    expected_cfg = clip_text_config(kind)
    if located.kind == "file":
        model, record = load_clip_text_model(located, expected_cfg, what)
    else:
        model, record = load_folder(CLIPTextModel, what, located, "transformers",
                                    expected_layout(what, "text_encoder", "transformers", True))
    got = (int(model.config.hidden_size), int(model.config.num_hidden_layers))
    want = (expected_cfg["hidden_size"], expected_cfg["num_hidden_layers"])
    if got != want:
        raise ConfigError(
            f"the text encoder at {located.path} is {got[0]} wide with {got[1]} layers; {kind} reads {want[0]} wide with {want[1]}",
            hint=f"point backbone.source (or text_encoder_source) at {HUB_IDS[kind]} weights",
        )
    return model.float().eval(), record, located


def load_prompt_embedding(
    unet_kind: str,
    *,
    pretrained: bool,
    source: str | None,
    weights_root: str | None,
    cross_attention_dim: int,
    prompt: str = "",
    tokenizer_source: str | None = None,
) -> PromptEmbedding:
    """The text embedding of ``prompt`` (default: the empty prompt, DiffewS' null text).

    With ``pretrained=True`` and an sd15/sd21 backbone: the backbone's tokenizer pads the
    prompt to 77 tokens and the text encoder's ``last_hidden_state`` is returned. For
    ``pretrained=False`` or the ``tiny`` backbone no text encoder exists, and the embedding is
    a fixed **zero** tensor: a constant conditioning the trained U-Net learns around, as it
    does around the real null-text embedding.

    Returns:
        :class:`PromptEmbedding` with ``embedding`` ``(1, 77, cross_attention_dim)``.
    """
    if not pretrained or unet_kind == "tiny":
        return PromptEmbedding(torch.zeros(1, TEXT_TOKENS, int(cross_attention_dim)))
    encoder, encoder_record, located = load_text_encoder(unet_kind, source, weights_root)
    tokenizer_located = locate_tokenizer(unet_kind, source, located, tokenizer_source, weights_root)
    tokenizer, tokenizer_record = load_tokenizer(tokenizer_located, f"tokenizer ({unet_kind})", unet_kind)
    ids = tokenizer([prompt], padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = encoder(ids).last_hidden_state
    if embedding.shape[-1] != int(cross_attention_dim):
        raise ConfigError(
            f"text encoder width {embedding.shape[-1]} does not match cross_attention_dim {cross_attention_dim}",
            hint="the U-Net and text encoder must come from the same backbone",
        )
    return PromptEmbedding(embedding.detach().float().cpu(), {"text_encoder": encoder_record, "tokenizer": tokenizer_record})


def load_text_embedding(unet_kind: str, **kwargs: Any) -> Tensor:
    """:func:`load_prompt_embedding` without the provenance: ``(1, 77, d_text)``."""
    return load_prompt_embedding(unet_kind, **kwargs).embedding


__all__ = ["PromptEmbedding", "clip_text_config", "load_prompt_embedding", "load_text_embedding", "load_text_encoder", "locate_tokenizer"]
