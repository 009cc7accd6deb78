"""Checkpoints that load without running code: tensors in safetensors, the rest in JSON.

Two kinds of checkpoint, both written through temporary files and renames:

- **Resume state** (``last.json`` + ``last-<step>.safetensors`` in a run's
  ``checkpoints/<group>/``): everything training changes at a step boundary: trainable
  weights and buffers, optimiser moments, the schedule, the sampler's random stream, the
  torch RNG states, the loss log and the elapsed time. Every tensor (RNG states as uint8
  tensors) goes into the safetensors file; the small state into the JSON file, which is
  written last and names its tensor file. A crash between the two writes therefore leaves
  the previous complete pair in place. The JSON file also keeps a checksum of each tensor,
  taken from the live state, so a tensor file that does not hold the saved values (a faulty
  copy, a damaged disk) is refused at resume.
- **Weights** (``final.safetensors``): the trained parameters and buffers under
  ``model/<name>``, with the step in the file's metadata. ``eval checkpoint=`` takes such
  a file (or the tensor file of a resume state).

Nothing here unpickles: ``torch.load`` is never called. A pickle checkpoint (``.pt``,
``.pth``, ``.ckpt`` from older versions or other code) is refused with
:class:`CheckpointError` before any of it is interpreted, because unpickling can run
arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import FsmisError
from ..method import Method
from ..records import UNFINISHED_MARK, durable_replace, new_file_mode

FORMAT = "fsmis-bench"
WEIGHTS_KIND = "weights"
STATE_KIND = "training-state"
VERSION = 1

STATE_FILE = "last.json"
WEIGHTS_FILE = "final.safetensors"
#: checkpoint files of fsmis-bench < 0.2 (pickles); found in a run folder they are refused
LEGACY_FILES = ("last.pt", "final.pt")

_MODEL_PREFIX = "model/"


class CheckpointError(FsmisError):
    """A checkpoint is missing, damaged, of another model, or not in a safe format."""


# -- nested state <-> (JSON, tensors) ----------------------------------------------------
class HostStaging:
    """Host buffers that a background save copies a state's device tensors into, kept from
    one save to the next (a save waits for the write before it, so they are free again).

    Page-locked where the tensors are on CUDA: the copies then run at the link's rate, all
    queued at once, with one wait at the end. A copy into ordinary (pageable) memory goes
    through the driver's small pinned bounce buffer, one tensor after another: an SD-1.5
    resume state (10.3 GB) held the step for 5.2 s that way on an H100 machine
    (``docs/measurements/gpu_async_checkpoint_h100.json``). Where page-locked memory cannot be
    had (a host short of it), ordinary buffers serve, as before.

    The page-locked buffers are views into chunks of ``chunk_bytes`` (1 GiB), filled in
    order: torch's pinned-memory allocator rounds every allocation up to a power of two, so
    one allocation per tensor (an SD-1.5 state has hundreds, many 20-25 % over a power of
    two) would lock about a fifth more memory than the state holds, and a few large
    allocations cost less time than hundreds. A chunk wastes at most its tail.

    Args:
        pinned: page-lock the buffers of CUDA tensors (``False``: ordinary buffers, reused).
        chunk_bytes: the size of a page-locked chunk (a power of two); a larger tensor gets
            a chunk of its own.
    """

    ALIGN = 256  # bytes: every buffer starts at a multiple, whatever its dtype

    def __init__(self, pinned: bool = True, chunk_bytes: int = 1 << 30) -> None:
        self.pinned = pinned
        self.chunk_bytes = chunk_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self._streams: set[torch.cuda.Stream] = set()
        self._chunks: list[torch.Tensor] = []
        self._free_from = 0  # the first free byte of the last chunk

    def copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` in the buffer for ``key`` (made or remade to fit); a CUDA
        tensor's copy is queued, and valid after :meth:`synchronize`."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._buffers[key] = self._empty(tensor)
        on_cuda = tensor.device.type == "cuda"
        buffer.copy_(tensor, non_blocking=on_cuda and buffer.is_pinned())
        if on_cuda:
            self._streams.add(torch.cuda.current_stream(tensor.device))
        return buffer

    def _empty(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pinned and tensor.device.type == "cuda":
            try:
                return self._carve(tensor.shape, tensor.dtype)
            except RuntimeError:  # no page-locked memory to be had: an ordinary buffer
                self.pinned = False
        return torch.empty(tensor.shape, dtype=tensor.dtype)

    def _carve(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A ``shape``/``dtype`` view into the page-locked chunks (a new chunk where the last
        one has no room left)."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:  # nothing is copied into it: no chunk is locked for it
            return torch.empty(shape, dtype=dtype)
        start = -(-self._free_from // self.ALIGN) * self.ALIGN
        if not self._chunks or start + nbytes > self._chunks[-1].numel():
            size = max(self.chunk_bytes, 1 << max(nbytes - 1, 0).bit_length())
            self._chunks.append(self._allocate(size))
            start = 0
        self._free_from = start + nbytes
        return self._chunks[-1][start:start + nbytes].view(dtype).view(shape)

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def synchronize(self) -> None:
        """Until every queued copy has landed."""
        for stream in self._streams:
            stream.synchronize()
        self._streams.clear()

    @property
    def page_locked(self) -> bool:
        """Whether any buffer is page-locked (only CUDA tensors get such buffers)."""
        return any(b.is_pinned() for b in self._buffers.values())

    @property
    def nbytes(self) -> int:
        """Host memory the buffers take up."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @property
    def reserved_bytes(self) -> int:
        """Host memory held: the page-locked chunks and the ordinary buffers."""
        ordinary = sum(b.numel() * b.element_size() for b in self._buffers.values() if not b.is_pinned())
        return sum(c.numel() for c in self._chunks) + ordinary

    def release(self) -> None:
        self._buffers.clear()
        self._chunks.clear()
        self._free_from = 0


#: integer views of each element size: a checksum of a tensor's bits needs no float rounding
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A checksum of ``tensor``'s values: the sum of its elements' bit patterns as integers
    (int64, wrapping), a 0-d tensor on its device. Integer sums are exact, so the order of
    the additions (a device's reduction, a host's, an NHWC layout's) does not change it."""
    bits = tensor.detach()
    if bits.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=bits.device)
    if bits.dtype is torch.bool:
        bits = bits.to(torch.uint8)
    return bits.view(_BITS[bits.element_size()]).sum(dtype=torch.int64)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], copy: bool = False,
            staging: HostStaging | None = None, sums: dict[str, torch.Tensor] | None = None) -> Any:
    """``obj`` as JSON data, with every tensor / array moved into ``tensors`` under ``path``
    (``copy``: host copies even of CPU tensors, which ``.cpu()`` would return as they are;
    ``staging``: those copies in its buffers, still being filled until it synchronises;
    ``sums``: each tensor's :func:`bit_sum`, taken where the tensor lies, under its key).

    Nothing here reads a staged buffer: its copy may not have landed yet. Tensors that share
    memory (tied weights, the views of one page-locked chunk) are fine, since
    :func:`write_tensor_file` writes each tensor's own bytes."""
    if isinstance(obj, torch.Tensor):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        if sums is not None:
            sums[key] = bit_sum(obj)
        if staging is not None:
            tensors[key] = staging.copy(key, obj.detach())
        else:
            tensors[key] = obj.detach().to("cpu", copy=True) if copy else obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    more = (tensors, copy, staging, sums)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", *more) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", *more) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", *more) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{path}/key", *more), _encode(v, f"{path}/{k}", *more)]
                              for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint")


def _decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [_decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if set(data) == {"__tensor__"}:
        return tensors[data["__tensor__"]]
    if set(data) == {"__ndarray__"}:
        return tensors[data["__ndarray__"]].numpy()
    if set(data) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in data["__tuple__"])
    if set(data) == {"__items__"}:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in data["__items__"]}
    return {k: _decode(v, tensors) for k, v in data.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# -- safe reading ------------------------------------------------------------------------
def _looks_like_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    # protocol >= 2 pickles start with PROTO (0x80); torch.save writes a zip archive
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _refuse_unsafe(path: Path, hint: str | None = None) -> CheckpointError:
    """The error for a file that is not safetensors. ``hint``: what to do about it where the
    caller knows better than "pass another file" (a file found in a run folder)."""
    if _looks_like_pickle(path):
        return CheckpointError(
            f"{path} is a pickle (torch.save) checkpoint; fsmis-bench never loads pickles, because "
            "unpickling a file can run arbitrary code",
            hint=hint or "use a final.safetensors written by fsmis-bench; to convert a file you trust, load it "
            "yourself and save its state dict with safetensors.torch.save_file under 'model/<name>' keys",
        )
    return CheckpointError(
        f"{path} is not a safetensors checkpoint (damaged, truncated, or another format)",
        hint=hint or "pass a final.safetensors written by fsmis-bench",
    )


def read_safetensors(path: Path, *, hint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a safetensors file; pickles are refused.

    Args:
        hint: the hint of the error for a missing or damaged file, in place of "pass a
            final.safetensors" (for files the user did not pass, e.g. found in a run folder).
    Raises:
        CheckpointError: the file is missing, not safetensors, or damaged.
    """
    return _read(Path(path), with_tensors=True, hint=hint)


def read_metadata(path: Path, *, hint: str | None = None) -> dict[str, str]:
    """The metadata of a safetensors file, reading only its header; pickles are refused.

    Raises:
        CheckpointError: the file is missing, not safetensors, or damaged.
    """
    return _read(Path(path), with_tensors=False, hint=hint)[1]


def _read(path: Path, with_tensors: bool, hint: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", hint=hint or "pass the path of a final.safetensors")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise _refuse_unsafe(path, hint) from None
    return tensors, metadata


#: safetensors' names of the dtypes a checkpoint holds
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    **{getattr(torch, f"uint{bits}"): f"U{bits}" for bits in (16, 32, 64) if hasattr(torch, f"uint{bits}")},
}


def write_tensor_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (on the CPU) as a safetensors file, each tensor's bytes streamed
    from where it lies.

    ``safetensors.torch.save_file`` refuses tensors that share a storage, which the views of
    :class:`HostStaging`'s page-locked chunks all do, and first builds a copy of every tensor
    in memory (10 GB more for an SD-1.5 resume state). The format is small: an 8-byte
    little-endian header length, a JSON header (``dtype``, ``shape``, ``data_offsets`` per
    tensor, ``__metadata__``) padded with spaces to 8 bytes, then the tensors' bytes back to
    back, widest dtype first so that every tensor is aligned. ``safe_open`` reads it back.

    Raises:
        OSError: the write failed (a full disk: errno ENOSPC).
        TypeError: a tensor of a dtype safetensors has no name for, metadata that is not
            text to text, or a tensor named ``__metadata__`` (nothing is written then).
    """
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata maps text to text, not {metadata!r}")
    if "__metadata__" in tensors:
        raise TypeError("a tensor cannot be named '__metadata__' in a safetensors file")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in order:
        tensor = tensors[key]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"cannot store {key!r} of dtype {tensor.dtype} in a checkpoint")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(filename, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for key in order:
            tensor = tensors[key]
            if tensor.numel():
                file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write through a temporary file and a rename; a failed write removes the temporary
    file and raises an OSError naming ``path`` (a full disk: errno ENOSPC)."""
    tmp = path.with_name(f".{path.name}{UNFINISHED_MARK}{os.getpid()}")
    try:
        write_tensor_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())
        durable_replace(tmp, path)
    except OSError as exc:
        renamed = _naming(exc, path)
        if renamed is None:
            raise
        raise renamed from exc
    finally:
        tmp.unlink(missing_ok=True)


def _naming(exc: OSError, path: Path) -> OSError | None:
    """``exc`` as an error naming ``path`` (None: it does already, or has no errno). A failed
    write() names no file, a failed open() or chmod() the hidden temporary file, which means
    nothing to the user."""
    if exc.errno is None and exc.filename is None:
        exc.filename = str(path)
    if exc.filename == str(path) or exc.errno is None:
        return None
    return OSError(exc.errno, exc.strerror, str(path))  # the errno's subclass (PermissionError, ...)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{UNFINISHED_MARK}{os.getpid()}")
    try:
        tmp.write_text(text)
        durable_replace(tmp, path)
    except OSError as exc:
        renamed = _naming(exc, path)
        if renamed is None:
            raise
        raise renamed from exc
    finally:
        tmp.unlink(missing_ok=True)


# -- weights -----------------------------------------------------------------------------
def trainable_state(method: Method) -> dict[str, torch.Tensor]:
    """What training changes in ``method``: trainable parameters and all buffers (CPU)."""
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in method.named_buffers()}
    return {k: v.detach().cpu() for k, v in method.state_dict().items() if k in trainable | buffers}


def save_weights(path: Path, method: Method, step: int) -> None:
    """Write ``final.safetensors``: the trainable state of ``method`` after ``step`` steps."""
    tensors: dict[str, torch.Tensor] = {}
    _encode({k: v for k, v in trainable_state(method).items()}, "model", tensors)
    metadata = {"format": FORMAT, "kind": WEIGHTS_KIND, "version": str(VERSION), "step": str(int(step)),
                "method": type(method).__name__,
                # each tensor's bit_sum, checked on every load: a flipped bit in finished
                # weights is refused, not evaluated (files written before have none)
                "checksums": json.dumps({k: int(bit_sum(v)) for k, v in tensors.items()}, sort_keys=True)}
    _write_safetensors(Path(path), tensors, metadata)


def load_weights(method: Method, checkpoint: Path, *, hint: str | None = None) -> int:
    """Load trained weights (``final.safetensors`` or a resume tensor file) into ``method``.

    Every trainable parameter and buffer of ``method`` must be in the file, with its
    shape, so a partial or foreign checkpoint never evaluates random weights.

    Args:
        hint: the hint of every refusal, in place of the ones for a file the user passed
            (for weights found in a run folder: what to delete to train again).
    Returns:
        the training step the weights come from (0 when the file does not say).
    Raises:
        CheckpointError: not safetensors, no ``model/`` weights, missing or unexpected keys,
            or shapes that do not fit.
    """
    tensors, metadata = read_safetensors(checkpoint, hint=hint)
    _check_weight_sums(checkpoint, tensors, metadata, hint)
    state = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    if not state:
        raise CheckpointError(
            f"{checkpoint} holds no fsmis-bench weights (no 'model/<name>' tensors)",
            hint=hint or "pass a final.safetensors written by fsmis-bench",
        )
    name = type(method).__name__
    wanted = set(trainable_state(method))
    missing = sorted(wanted - set(state))
    own = set(method.state_dict())
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        problem = (f"lacks {len(missing)} trainable tensors, e.g. {missing[:3]}" if missing
                   else f"has tensors {name} does not have, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit {name}: it {problem}",
            hint=hint or "evaluate it with the method, backbone and options it was trained with",
        )
    try:
        method.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit {name}: {first}",
            hint=hint or "evaluate it with the method, backbone and options it was trained with",
        ) from None
    try:
        return int(metadata.get("step", 0))
    except ValueError:
        return 0


def _check_weight_sums(checkpoint: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       hint: str | None) -> None:
    """Refuse weights whose values are not the ones written (the checksums that
    :func:`save_weights` put in the file's metadata; a file without them is not checked)."""
    fix = hint or f"delete {checkpoint} (or copy it again from where it came from) and train it again"
    if "checksums" not in metadata:
        return
    try:
        sums = json.loads(metadata["checksums"])
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise CheckpointError(f"{checkpoint} is damaged: the checksums in its header cannot be read",
                              hint=fix) from None
    for key, tensor in tensors.items():
        if key in sums and int(bit_sum(tensor)) != sums[key]:
            raise CheckpointError(
                f"{checkpoint} does not hold the weights that were written: {key} differs from its checksum "
                "(a damaged file, e.g. a flipped bit on disk or a faulty copy)", hint=fix)


# -- resume state ------------------------------------------------------------------------
def refuse_legacy(directory: Path) -> None:
    """Refuse a run folder that holds pickle checkpoints of an older version (or planted ones)."""
    for name in LEGACY_FILES:
        legacy = Path(directory) / name
        if legacy.exists():
            raise CheckpointError(
                f"{legacy} is a pickle checkpoint; fsmis-bench never loads pickles, because unpickling "
                "a file can run arbitrary code",
                hint=f"delete {legacy} (training of this run then restarts from step 0)",
            )


@dataclass(frozen=True)
class EncodedState:
    """A resume state taken apart for writing: its tensors (on the host) and its JSON data."""

    step: int
    tensors: dict[str, torch.Tensor]
    document: Any
    checksums: dict[str, int] | None = None  # each tensor's bit_sum, taken from the live state


def encode_training_state(state: dict[str, Any], *, copy: bool = False,
                          staging: HostStaging | None = None) -> EncodedState:
    """``state`` (needs an int ``step``) ready for :func:`write_training_state`; with
    ``copy``, nothing in it shares memory with ``state`` (training may go on meanwhile), and
    with ``staging`` too, its tensors are in those buffers, every copy landed."""
    tensors: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    document = _encode(state, "state", tensors, copy, staging, sums)
    if staging is not None:
        staging.synchronize()
    return EncodedState(int(state["step"]), tensors, document, _to_ints(sums))


def _to_ints(sums: dict[str, torch.Tensor]) -> dict[str, int]:
    """The checksums as Python ints: one host transfer per device, not one per tensor."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in sums.items():
        by_device.setdefault(value.device, []).append(key)
    ints: dict[str, int] = {}
    for keys in by_device.values():
        ints.update(zip(keys, torch.stack([sums[k] for k in keys]).tolist()))
    return ints


def save_training_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write the resume state ``state`` (needs an int ``step``) into ``directory``.

    Returns:
        the path of the JSON file, ``directory/last.json``.
    """
    return write_training_state(directory, encode_training_state(state))


def write_training_state(directory: Path, state: EncodedState) -> Path:
    """Write an encoded resume state into ``directory``: the tensor file, then ``last.json``
    naming it, then the older tensor files go. Returns ``directory/last.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step, tensors, encoded = state.step, state.tensors, state.document
    tensor_file = f"last-{step:08d}.safetensors"
    new_file = not (directory / tensor_file).exists()
    _write_safetensors(directory / tensor_file, tensors,
                       {"format": FORMAT, "kind": STATE_KIND, "version": str(VERSION), "step": str(step)})
    document = {"format": FORMAT, "kind": STATE_KIND, "version": VERSION, "tensors": tensor_file, "state": encoded}
    if state.checksums is not None:
        document["checksums"] = state.checksums
    try:
        _write_text(directory / STATE_FILE, json.dumps(document) + "\n")
    except BaseException:
        if new_file:  # no last.json names it: the previous pair stays the resume state
            (directory / tensor_file).unlink(missing_ok=True)
        raise
    for old in directory.glob("last-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return directory / STATE_FILE


def load_training_state(directory: Path) -> dict[str, Any] | None:
    """The resume state saved in ``directory``, or None when there is none.

    Raises:
        CheckpointError: a legacy pickle is there, or the state is damaged.
    """
    directory = Path(directory)
    refuse_legacy(directory)
    path = directory / STATE_FILE
    if not path.exists():
        return None
    hint = f"delete {path} and the last-*.safetensors beside it to restart this training from step 0"
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"resume state {path} is damaged: {exc}", hint=hint) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("kind") != STATE_KIND:
        raise CheckpointError(f"{path} is not an fsmis-bench resume state", hint=hint)
    tensor_file = str(document.get("tensors", ""))
    if Path(tensor_file).name != tensor_file or not tensor_file.endswith(".safetensors"):
        raise CheckpointError(f"{path} names an unexpected tensor file {tensor_file!r}", hint=hint)
    tensors, _ = read_safetensors(
        directory / tensor_file,
        hint=f"delete {directory / tensor_file} and {path}, then rerun the same command: this training "
             "restarts from step 0",
    )
    checksums = document.get("checksums")
    if isinstance(checksums, dict):  # states written before checksums have none
        for key, tensor in tensors.items():
            if key in checksums and int(bit_sum(tensor)) != checksums[key]:
                raise CheckpointError(
                    f"resume state {directory / tensor_file} does not hold the state that was saved: {key} "
                    "differs from the training's values (a damaged file, or a faulty write)", hint=hint)
    try:
        return _decode(document["state"], tensors)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"resume state {path} does not match {tensor_file}: {exc}", hint=hint) from None


def clear_training_state(directory: Path) -> None:
    """Remove the resume state (after the final weights are written)."""
    directory = Path(directory)
    (directory / STATE_FILE).unlink(missing_ok=True)
    for old in directory.glob("last-*.safetensors"):
        old.unlink(missing_ok=True)


class CheckpointWriter:
    """Writes a training's resume states into ``directory``; with ``background``, in a thread.

    A background save takes host copies of the state at the step boundary (into
    :class:`HostStaging`'s buffers, page-locked for CUDA tensors unless ``pinned=False``),
    then training goes on while a thread writes them: the step waits for the device-to-host
    copies, not for the disk (an SD-1.5 resume state is 10.3 GB: 10-18 s to write on an H100
    machine, every ``train.checkpoint_every`` steps). One write at a time: a save first waits for the one
    before, and :meth:`wait` raises a failed write's error (a full disk, say) in the caller,
    so the engine reports it as it reports a synchronous one. ``last.json`` is written after
    its tensor file, so a process that dies mid-write resumes from the state before.
    """

    def __init__(self, directory: Path, *, background: bool = False, pinned: bool = True) -> None:
        self.directory = Path(directory)
        self.background = background
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fsmis-checkpoint") if background else None
        self._pending: Future | None = None
        # the host copies go into buffers kept between saves, page-locked for CUDA tensors
        self.staging = HostStaging(pinned) if background else None

    def save(self, state: dict[str, Any]) -> None:
        if self._pool is None:
            save_training_state(self.directory, state)
            return
        self.wait()  # before copying: never two states in host memory at once, buffers free
        encoded = encode_training_state(state, copy=True, staging=self.staging)
        self._pending = self._pool.submit(write_training_state, self.directory, encoded)

    def wait(self) -> None:
        """Until the last save is on disk; raises its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for a pending write (on a path that is already raising: its error is dropped,
        the state before it stays the resume state) and stop the thread."""
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the error already propagating is the one to report
            pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self.staging is not None:
                self.staging.release()


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU, and every CUDA device when present) as uint8 tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
