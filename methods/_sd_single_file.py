"""Original single-file Stable Diffusion checkpoints (``v1-5-pruned-emaonly.safetensors``,
``v2-1_512-ema-pruned.safetensors``, ``.ckpt``) read through diffusers' single-file loaders.

One original file holds three components under three key prefixes:

* ``model.diffusion_model.*``: the U-Net (LDM names: ``input_blocks``, ``middle_block``, ...);
* ``first_stage_model.*``: the KL-VAE (``encoder.down.<i>.block.<j>``, ``mid.attn_1``, ...);
* ``cond_stage_model.*``: the text encoder, CLIP ViT-L/14 under ``transformer.text_model.``
  (SD-1.x) or OpenCLIP ViT-H/14 under ``model.`` (SD-2.x; 24 blocks of which SD uses 23).

Each component reads only its own prefix (a ``.safetensors`` file is opened lazily), is built
from a config written here (no hub access), converted by diffusers' own key maps, and must
come out complete: a tensor the file lacks is an error naming the file, never a silently
initialised weight.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from fsmis_bench.errors import FsmisError

from ._sd_weights import LAYOUT_SINGLE_FILE, Located, WeightFiles, quiet_loading

#: key prefix of each component in an original checkpoint.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
LAYOUT_TEXT = (
    "an original Stable Diffusion checkpoint holds model.diffusion_model.* (U-Net), "
    "first_stage_model.* (VAE) and cond_stage_model.* (text encoder) of one SD version; "
    "a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or hub id also works"
)


def read_checkpoint(path: Path, prefix: str) -> dict[str, Tensor]:
    """The tensors of an original checkpoint whose keys start with ``prefix`` (prefix kept).

    ``.safetensors`` is opened lazily and only these tensors are read; other formats go
    through diffusers' ``load_single_file_checkpoint`` (``.ckpt``: ``state_dict`` unwrapped,
    memory-mapped where the file allows).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        state = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise FsmisError(
            f"cannot read the checkpoint {path}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            hint=f"re-download it; {LAYOUT_TEXT}",
        ) from None
    return {key: value for key, value in state.items() if isinstance(key, str) and key.startswith(prefix)}


def _write_config(folder: str, class_name: str, config: Mapping[str, Any]) -> None:
    Path(folder, "config.json").write_text(json.dumps({"_class_name": class_name, **dict(config)}))


def _state_for(path: Path, component: str, what: str) -> dict[str, Tensor]:
    prefix = PREFIXES[component]
    state = read_checkpoint(path, prefix)
    if not state:
        raise FsmisError(
            f"{what}: the single file {path} has no {prefix}* tensors, so it is not an original SD checkpoint",
            hint=LAYOUT_TEXT,
        )
    return state


def _check_complete(model: nn.Module, what: str, path: Path) -> None:
    """diffusers leaves tensors a checkpoint lacks on the meta device (or at their init): refuse."""
    missing = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise FsmisError(
            f"{what}: the single file {path} lacks {len(missing)} of the model's tensors (e.g. {', '.join(missing[:3])})",
            hint=f"pass the checkpoint of the matching SD version; {LAYOUT_TEXT}",
        )


def _fail(what: str, path: Path, exc: Exception) -> FsmisError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = message.split(" If you want")[0]  # diffusers' advice to load mismatched weights anyway
    if "meta tensor" in message:  # diffusers left the tensors the file lacks on the meta device
        message = "the file lacks some of the model's tensors"
    return FsmisError(
        f"could not load {what} from single file {path}: {type(exc).__name__}: {message}",
        hint=f"pass an original SD checkpoint of the matching version (sd15: v1-5-pruned-emaonly, sd21: v2-1_*-ema-pruned); {LAYOUT_TEXT}",
    )


def load_diffusers_model(cls: Any, located: Located, component: str, config: Mapping[str, Any], what: str) -> tuple[nn.Module, WeightFiles]:
    """``cls.from_single_file`` (``UNet2DConditionModel`` or ``AutoencoderKL``) on one
    component's tensors, with ``config`` written locally; strict."""
    path = located.path
    state = _state_for(path, component, what)
    with tempfile.TemporaryDirectory(prefix="fsmis_cfg_") as tmp:
        _write_config(tmp, cls.__name__, config)
        try:
            with quiet_loading():
                model = cls.from_single_file(state, config=tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - conversion errors are user-fixable: wrong checkpoint
            raise _fail(what, path, exc) from None
    _check_complete(model, what, path)
    return model, single_file_record(located, component)


def load_clip_text_model(located: Located, config: Mapping[str, Any], what: str) -> tuple[nn.Module, WeightFiles]:
    """The text encoder of an original checkpoint as ``transformers.CLIPTextModel`` through
    diffusers' ``create_diffusers_clip_model_from_ldm`` (CLIP or OpenCLIP keys); strict."""
    path = located.path
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    state = _state_for(path, "text_encoder", what)
    with tempfile.TemporaryDirectory(prefix="fsmis_cfg_") as tmp:
        Path(tmp, "config.json").write_text(json.dumps({"model_type": "clip_text_model", **dict(config)}))
        try:
            with quiet_loading():
                model = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, config=tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise _fail(what, path, exc) from None
    _check_complete(model, what, path)
    return model, single_file_record(located, "text_encoder")


def single_file_record(located: Located, component: str) -> WeightFiles:
    """Provenance of a component read from (a prefix of) one original checkpoint."""
    path = located.path
    return WeightFiles(located.source, str(path), f"{LAYOUT_SINGLE_FILE}, {PREFIXES[component]}*", (str(path),), str(path.parent))
