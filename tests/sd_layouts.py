"""Tiny random SD-1.5 / SD-2.1 / DINOv2 models with the real configs' structure, written in
every layout a user may have: a diffusers ``save_pretrained`` folder, a Hugging Face hub cache
tree, and an original single-file checkpoint (LDM key names).

The tiny models keep every structural choice of the real ones (block types and counts,
layers per block, attention heads, linear vs conv projections, CLIP quick-GELU vs OpenCLIP
GELU, 12 vs 23 text layers, the 24th OpenCLIP block SD-2 skips, the byte-level BPE vocabulary
layout and each version's pad token); only the widths shrink.

The original-key writer maps diffusers names back to the original Stable Diffusion names
(``model.diffusion_model.input_blocks.<i>.<j>``, ``first_stage_model.encoder.down.<i>.block.<j>``,
``cond_stage_model.transformer.text_model.*`` / ``cond_stage_model.model.transformer.resblocks.<i>``);
loading such a file through diffusers' converters and getting the saved tensors back checks
both directions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fsmis_methods import _image_encoders, _sd_unet, _sd_vae, _text_encoder

REAL_UNET_CONFIG = _sd_unet.unet_config
REAL_VAE_CONFIG = _sd_vae.sd_vae_config
REAL_TEXT_CONFIG = _text_encoder.clip_text_config
REAL_DINOV2_CONFIG = _image_encoders.dinov2_config
TEXT_WIDTH = 32
PAD_TOKEN = {"sd15": "<|endoftext|>", "sd21": "!"}


# -- tiny configs ------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    """CLIP's byte-level alphabet in its vocabulary order: printable bytes first (so '!' is id 0)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


MERGES = ["d o", "d o</w>", "c a", "ca t</w>"]


def tiny_vocab() -> dict[str, int]:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def tiny_unet_config(kind: str, cross_attention_dim: int | None = None) -> dict[str, Any]:
    cfg = REAL_UNET_CONFIG(kind)
    if kind == "sd15":  # 8 heads per block, conv projections
        cfg.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=4)
    elif kind == "sd21":  # 5/10/20/20 heads, linear projections, upcast attention
        cfg.update(block_out_channels=[20, 40, 80, 80], norm_num_groups=4)
    if kind != "tiny":
        cfg["cross_attention_dim"] = TEXT_WIDTH
    return cfg


def tiny_vae_config() -> dict[str, Any]:
    return dict(REAL_VAE_CONFIG(), block_out_channels=[8, 16, 16, 16], norm_num_groups=4)


def tiny_text_config(kind: str) -> dict[str, Any]:
    return dict(REAL_TEXT_CONFIG(kind), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_attention_heads=2,
                projection_dim=TEXT_WIDTH, vocab_size=len(tiny_vocab()),
                bos_token_id=len(tiny_vocab()) - 2, eos_token_id=len(tiny_vocab()) - 1, pad_token_id=len(tiny_vocab()) - 1)


def tiny_dinov2_config(kind: str) -> dict[str, Any]:
    cfg = REAL_DINOV2_CONFIG(kind)
    if kind in ("dinov2_small", "dinov2_base"):
        cfg.update(hidden_size=16 if kind == "dinov2_small" else 24, num_attention_heads=2)
    return cfg


def use_tiny_architectures(monkeypatch: Any) -> None:
    """Make the builders expect the tiny widths (the only thing that differs from the real models)."""
    monkeypatch.setattr(_sd_unet, "unet_config", tiny_unet_config)
    monkeypatch.setattr(_sd_vae, "sd_vae_config", tiny_vae_config)
    monkeypatch.setattr(_text_encoder, "clip_text_config", tiny_text_config)
    monkeypatch.setattr(_image_encoders, "dinov2_config", tiny_dinov2_config)


# -- tiny models -------------------------------------------------------------------------
def build_components(kind: str, seed: int = 0) -> dict[str, nn.Module]:
    """Random ``unet``, ``vae``, ``text_encoder`` with the tiny configs of ``kind``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return {
        "unet": UNet2DConditionModel(**tiny_unet_config(kind)).eval(),
        "vae": AutoencoderKL(**tiny_vae_config()).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**tiny_text_config(kind))).eval(),
    }


def build_dinov2(kind: str, seed: int = 0) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(**tiny_dinov2_config(kind))).eval()


# -- layout 1: diffusers save_pretrained ------------------------------------------------
def write_tokenizer(folder: Path, kind: str) -> None:
    """A CLIP tokenizer folder as the SD repos ship it (vocab.json, merges.txt, two JSON configs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tiny_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": PAD_TOKEN[kind]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")))


def save_pipeline(folder: Path, kind: str, components: dict[str, nn.Module]) -> Path:
    """``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``."""
    for name, module in components.items():
        module.save_pretrained(folder / name)
    write_tokenizer(folder / "tokenizer", kind)
    prediction = "epsilon" if kind == "sd15" else "v_prediction"
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "prediction_type": prediction}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


# -- layout 2: the hub cache -------------------------------------------------------------
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_cache_tree(cache: Path, repo_id: str, source: Path, revision: str | None = None) -> Path:
    """Copy ``source`` into ``cache`` exactly as ``huggingface_hub`` lays a download out:
    ``models--owner--name/blobs/<etag>`` (SHA-256 for LFS weights, the git blob SHA-1 for small
    text files), ``snapshots/<commit>/<path>`` relative symlinks to the blobs, ``refs/main``
    holding the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lfs = path.suffix in (".safetensors", ".bin", ".ckpt") or len(data) > 10_000_000
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / etag, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


# -- layout 3: the original single file --------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return f"{_RESNET[head]}.{tail}"


def unet_to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers U-Net keys -> ``model.diffusion_model.*`` (LDM ``openaimodel`` names)."""
    per = int(config["layers_per_block"]) + 1
    with_attention = {i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")}
    out = {}
    for key, value in state.items():
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            group, block, part, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if group == "down_blocks":
                i = 1 + block * per + index
                new = {"resnets": f"input_blocks.{i}.0.{_resnet(rest) if part == 'resnets' else ''}",
                       "attentions": f"input_blocks.{i}.1.{rest}",
                       "downsamplers": f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"}[part]
            else:
                i = block * per + index
                new = {"resnets": f"output_blocks.{i}.0.{_resnet(rest) if part == 'resnets' else ''}",
                       "attentions": f"output_blocks.{i}.1.{rest}",
                       "upsamplers": f"output_blocks.{block * per + per - 1}.{2 if block in with_attention else 1}.{rest}"}[part]
        elif key.startswith("mid_block."):
            part, index, rest = key.split(".", 3)[1:]
            new = f"middle_block.{2 * int(index)}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
        else:
            stem, leaf = key.rsplit(".", 1)
            new = f"{_UNET_TOP[stem]}.{leaf}"
        out["model.diffusion_model." + new] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` keys -> ``first_stage_model.*`` (LDM names; attention as 1x1 convs)."""
    blocks = len(config["block_out_channels"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", new)
        if m:
            side, group, block, part, index, rest = m.groups()
            level = int(block) if group == "down_blocks" else blocks - 1 - int(block)
            stage = "down" if group == "down_blocks" else "up"
            new = (f"{side}.{stage}.{level}.block.{index}.{rest}" if part == "resnets"
                   else f"{side}.{stage}.{level}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}")
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", new)
        if m:
            side, part, index, rest = m.groups()
            if part == "resnets":
                new = f"{side}.mid.block_{int(index) + 1}.{rest}"
            else:
                stem, leaf = rest.rsplit(".", 1)
                new = f"{side}.mid.attn_1.{_VAE_ATTENTION[stem]}.{leaf}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` -> ``cond_stage_model.transformer.text_model.*`` (SD-1.x)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def openclip_to_original(state: dict[str, Tensor], layers: int, seed: int = 1) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` (23 layers) -> ``cond_stage_model.model.*`` (OpenCLIP, SD-2.x):
    fused q/k/v ``in_proj``, ``c_fc``/``c_proj``, ``ln_1``/``ln_2``, plus the 24th block and the
    ``text_projection`` that SD-2 never reads (random here, as they would be irrelevant)."""
    prefix = "cond_stage_model.model."
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, Tensor] = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    width = state["final_layer_norm.weight"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    for i in range(layers + 1):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"{prefix}transformer.resblocks.{i}."
        block = {k[len(src):]: v for k, v in state.items() if k.startswith(src)}
        if i == layers:  # the unused last block: same shapes, other values
            block = {k: torch.randn(v.shape, generator=generator) for k, v in block.items()}
        out[dst + "attn.in_proj_weight"] = torch.cat([block[f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([block[f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for leaf in ("weight", "bias"):
                out[dst + f"{theirs}.{leaf}"] = block[f"{ours}.{leaf}"]
    out[prefix + "text_projection"] = torch.randn(width, width, generator=generator)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def original_state(kind: str, components: dict[str, nn.Module]) -> dict[str, Tensor]:
    state = unet_to_original(components["unet"].state_dict(), dict(components["unet"].config))
    state.update(vae_to_original(components["vae"].state_dict(), dict(components["vae"].config)))
    text = components["text_encoder"].state_dict()
    text = {k: v for k, v in text.items() if not k.endswith("position_ids")}
    if kind == "sd15":
        state.update(clip_to_original(text))
    else:
        state.update(openclip_to_original(text, components["text_encoder"].config.num_hidden_layers))
    # what else the released files carry beside the three models (the loaders must skip it)
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    state["alphas_cumprod"] = torch.cumprod(1 - state["betas"], 0)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    if kind == "sd15":
        state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(path: Path, kind: str, components: dict[str, nn.Module]) -> Path:
    """An original-layout checkpoint: ``.safetensors`` flat, ``.ckpt`` as ``{"state_dict": ...}``."""
    return _write_original(path, original_state(kind, components))


def _write_original(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, str(path))
    return path


def save_single_file_with_ema(path: Path, kind: str, components: dict[str, nn.Module], ema_unet: nn.Module,
                              drop_ema: int = 0) -> Path:
    """The full original release (``v1-5-pruned.safetensors`` / ``.ckpt``): the trained U-Net under
    ``model.diffusion_model.*`` (``components["unet"]``) and its EMA (``ema_unet``) under
    ``model_ema.*``, named as LDM's ``LitEma`` registers them: ``model_ema.`` + the parameter's
    path in ``LatentDiffusion.model`` (``diffusion_model.<...>``) with its dots removed.
    ``drop_ema``: leave out the EMA copy of that many tensors (an incomplete file)."""
    state = original_state(kind, components)
    ema = unet_to_original(ema_unet.state_dict(), dict(ema_unet.config))
    kept = sorted(ema)[drop_ema:]
    state.update({"model_ema." + key.removeprefix("model.").replace(".", ""): ema[key].contiguous() for key in kept})
    return _write_original(path, state)


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """All parameters and persistent buffers equal, by name."""
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k.removeprefix("text_model."): v for k, v in sa.items() if not k.endswith("position_ids")}
    sb = {k.removeprefix("text_model."): v for k, v in sb.items() if not k.endswith("position_ids")}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def go_offline(tmp_path: Path, monkeypatch, tiny: bool = True):
    """The hub offline with an empty cache, digests cached under ``tmp_path`` and (``tiny``)
    the tiny architectures; a generator for an autouse fixture (clears the caches after)."""
    from fsmis_methods import _sd_components as sdc
    from fsmis_methods import _weight_digest

    if tiny:
        use_tiny_architectures(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("FSMIS_CACHE_DIR", str(tmp_path / "fsmis_cache"))
    sdc.hub_offline.cache_clear()
    _weight_digest.forget_memo()
    yield
    sdc.hub_offline.cache_clear()
    _weight_digest.forget_memo()
