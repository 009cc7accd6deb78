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
initialised weight. Pickle files (``.ckpt``, ...) are read weights-only: one holding other
Python objects is refused, never run.

EMA: the full releases (``v1-5-pruned.safetensors`` / ``.ckpt``) hold the U-Net twice, the
trained weights under ``model.diffusion_model.*`` and their exponential moving average under
``model_ema.*``, named as LDM's ``LitEma`` stores them: ``model_ema.`` + the parameter's path
after ``model.`` with its dots removed (``model.diffusion_model.input_blocks.0.0.weight`` ->
``model_ema.diffusion_modelinput_blocks000weight``). The EMA set is what the ``-emaonly``
files and the diffusers ``unet/`` folder hold, so it is the one read (said once on stderr, and
``"ema": true`` in the weights' identity); an EMA set lacking some tensors is an error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from fsmis_bench.errors import FsmisError

from ._pickle_safety import read_pickle
from ._sd_weights import LAYOUT_SINGLE_FILE, Located, WeightFiles, announce, quiet_loading

#: key prefix of each component in an original checkpoint.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
#: key prefix of the U-Net's EMA copy (``model_ema.decay`` / ``num_updates`` are not tensors of it).
EMA_PREFIX = "model_ema.diffusion_model"
LAYOUT_TEXT = (
    "an original Stable Diffusion checkpoint holds model.diffusion_model.* (U-Net), "
    "first_stage_model.* (VAE) and cond_stage_model.* (text encoder) of one SD version; "
    "a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) or hub id also works"
)


def read_checkpoint(path: Path, prefixes: tuple[str, ...], what: str) -> dict[str, Tensor]:
    """The tensors of an original checkpoint whose keys start with one of ``prefixes`` (kept);
    ``what`` names the component in errors.

    ``.safetensors`` is opened lazily and only these tensors are read; other formats are
    unpickled weights-only (``state_dict`` unwrapped, memory-mapped where the file allows).
    """
    hint = f"re-download it; {LAYOUT_TEXT}"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise FsmisError(f"{what}: cannot read the checkpoint {path}, it is truncated or not a safetensors file: "
                             f"{type(exc).__name__}: {text}", hint=hint) from None
    state = read_pickle(path, what, hint)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FsmisError(f"{what}: the checkpoint {path} holds a {type(state).__name__}, not a state dict", hint=hint)
    return {key: value for key, value in state.items() if isinstance(key, str) and key.startswith(prefixes)}


def ema_key(key: str) -> str:
    """Where ``LitEma`` keeps the EMA of ``model.<path>``: ``model_ema.<path without dots>``."""
    return "model_ema." + key[len("model."):].replace(".", "")


def _unet_state(state: dict[str, Tensor], path: Path, what: str) -> tuple[dict[str, Tensor], bool | None]:
    """The U-Net tensors to load, under ``model.diffusion_model.*`` names: the EMA set where the
    file holds one (True), else the only set there is (None)."""
    ema = {key: value for key, value in state.items() if key.startswith(EMA_PREFIX)}
    regular = {key: value for key, value in state.items() if key.startswith(PREFIXES["unet"])}
    if not ema or not regular:
        return regular, None
    lacking = [key for key in regular if ema_key(key) not in ema]
    if lacking:
        raise FsmisError(
            f"{what}: {path} holds an EMA copy of the U-Net (model_ema.*) that lacks {len(lacking)} of its "
            f"{len(regular)} tensors (e.g. {ema_key(lacking[0])} for {lacking[0]}), so neither set can be trusted to be the released one",
            hint="re-download the checkpoint, or use the EMA-only release (v1-5-pruned-emaonly.safetensors, "
                 "v2-1_*-ema-pruned.safetensors) or the diffusers folder",
        )
    announce(f"ema:{path}", f"{what}: {path.name} holds EMA and non-EMA U-Net weights; reading the EMA ones (model_ema.*), "
                            "as the -emaonly files and the diffusers unet/ folder hold")
    return {key: ema[ema_key(key)] for key in regular}, True


def _write_config(folder: str, class_name: str, config: Mapping[str, Any]) -> None:
    Path(folder, "config.json").write_text(json.dumps({"_class_name": class_name, **dict(config)}))


def _state_for(path: Path, component: str, what: str) -> tuple[dict[str, Tensor], bool | None]:
    """One component's tensors, and for the U-Net whether they are the EMA set (see the module docstring)."""
    prefix = PREFIXES[component]
    state = read_checkpoint(path, (prefix, EMA_PREFIX) if component == "unet" else (prefix,), what)
    ema = None
    if component == "unet":
        state, ema = _unet_state(state, path, what)
    if not state:
        raise FsmisError(
            f"{what}: the single file {path} has no {prefix}* tensors, so it is not an original SD checkpoint",
            hint=LAYOUT_TEXT,
        )
    return state, ema


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
    state, ema = _state_for(path, component, what)
    with tempfile.TemporaryDirectory(prefix="fsmis_cfg_") as tmp:
        _write_config(tmp, cls.__name__, config)
        try:
            with quiet_loading():
                model = cls.from_single_file(state, config=tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - conversion errors are user-fixable: wrong checkpoint
            raise _fail(what, path, exc) from None
    _check_complete(model, what, path)
    return model, single_file_record(located, component, ema)


def load_clip_text_model(located: Located, config: Mapping[str, Any], what: str) -> tuple[nn.Module, WeightFiles]:
    """The text encoder of an original checkpoint as ``transformers.CLIPTextModel`` through
    diffusers' ``create_diffusers_clip_model_from_ldm`` (CLIP or OpenCLIP keys); strict."""
    path = located.path
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    state, _ = _state_for(path, "text_encoder", what)
    with tempfile.TemporaryDirectory(prefix="fsmis_cfg_") as tmp:
        Path(tmp, "config.json").write_text(json.dumps({"model_type": "clip_text_model", **dict(config)}))
        try:
            with quiet_loading():
                model = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, config=tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise _fail(what, path, exc) from None
    _check_complete(model, what, path)
    return model, single_file_record(located, "text_encoder")


def single_file_record(located: Located, component: str, ema: bool | None = None) -> WeightFiles:
    """Provenance of a component read from (a prefix of) one original checkpoint; ``ema``: the
    set read where the file holds two (see the module docstring)."""
    path = located.path
    return WeightFiles(located.source, str(path), f"{LAYOUT_SINGLE_FILE}, {PREFIXES[component]}*", (str(path),), str(path.parent), ema)
