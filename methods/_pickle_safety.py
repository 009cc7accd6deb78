"""Reading pickled checkpoints (``.ckpt`` / ``.bin`` / ``.pt``) without ever running them.

Every pickle goes through ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers. A file that holds anything else is refused, and the error says so in those
terms (a safety stop, with the callables it would have run), apart from a file that is merely
damaged (truncated, foreign), which gets a re-download hint.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

from fsmis_bench.errors import FsmisError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


#: modules whose names a torch checkpoint's pickle calls on loading, all allowed weights-only
_TENSOR_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def pickled_callables(path: Path, limit: int = 3) -> list[str]:
    """The first ``limit`` names outside :data:`_TENSOR_MODULES` that unpickling ``path`` would
    import and call (``posix.system``, ...), read from the opcodes with ``pickletools``: nothing
    is unpickled. Best effort: module and name of protocol-4 ``STACK_GLOBAL`` come from the
    strings pushed (or memo-fetched) just before it."""
    import pickletools

    found: list[str] = []
    strings: list[str] = []  # the strings pushed, in order
    memo: dict[int, str | None] = {}
    top: str | None = None  # the string on top of the stack, when the last push was one
    try:
        with open(path, "rb") as handle:
            for op, arg, _ in pickletools.genops(handle):
                name = op.name
                if name == "MEMOIZE" or name.endswith("PUT"):  # memoizes the top, leaves the stack as it is
                    memo[len(memo) if name == "MEMOIZE" else int(arg)] = top
                    continue
                pushed = None
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                    pushed = arg
                elif name.endswith("GET"):
                    pushed = memo.get(int(arg))
                if pushed is not None:
                    strings.append(pushed)
                top = pushed
                if name == "STOP":
                    break
    except Exception:  # noqa: BLE001 - a truncated stream: what was read so far is the answer
        pass
    unsafe = [name for name in dict.fromkeys(found) if name.split(".")[0] not in _TENSOR_MODULES]
    return unsafe[:limit]


def weights_only_refusal(exc: BaseException, path: Path | None = None) -> str | None:
    """Why torch's weights-only unpickler refused ``path``, found anywhere in ``exc``'s chain (the
    libraries re-raise it as ``OSError``): ``"holds non-tensor Python objects (posix.system)"``
    or similar; None when the file was not refused but is unreadable (truncated, foreign)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        if isinstance(current, pickle.UnpicklingError) and "weights only load failed" in text.lower():
            found = re.search(r"GLOBAL ([\w.]+)", text)
            names = [found.group(1)] if found else (pickled_callables(path) if path is not None else [])
            if names:
                return f"holds non-tensor Python objects ({', '.join(names)})"
            # e.g. a plain pickle.dump file (protocol 4 framing is not torch.save's format)
            return "is a pickle that weights-only loading cannot read (not a plain torch.save state dict)"
        stack += [current.__cause__, current.__context__]
    return None


def refused_pickle_error(what: str, path: Path, refused: str) -> FsmisError:
    """The error for a pickle file that weights-only loading refused: not damage, a safety stop."""
    return FsmisError(
        f"{what}: {path} {refused}, so it was refused: unpickling it could run code, and only plain tensors "
        "are read (nothing in the file was run)",
        hint="use the .safetensors release of these weights; or, only if you trust the file, convert it once "
             "(torch.load(path, weights_only=False), then safetensors.torch.save_file(state_dict, 'model.safetensors'))",
    )


def read_pickle(path: Path, what: str, hint: str) -> Any:
    """A ``.ckpt`` / ``.bin`` / ``.pt`` file through ``torch.load(weights_only=True)``
    (memory-mapped where it is a zip); refused objects and damage give distinct errors."""
    import zipfile

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the error below says what matters
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unsafe files are the user's to fix
        refused = weights_only_refusal(exc, path)
        if refused:
            raise refused_pickle_error(what, path, refused) from None
        raise FsmisError(f"{what}: cannot read the checkpoint {path}, it is truncated or not a torch checkpoint: "
                         f"{type(exc).__name__}: {first_line(exc) or 'the file ends too early'}", hint=hint) from None
