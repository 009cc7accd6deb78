"""Content digests of data and weight files, for run identities.

A run's identity names the bytes it read (supervoxel files, images, an external
checkpoint), so that a changed file gives a new run instead of a stale cached one.
Hashing the same multi-GB files before every run would be slow, so a file's SHA-256 is
kept in a small cache keyed by its absolute path, size and modification time: a file that
was rewritten (new mtime or size) is hashed again; an unchanged one costs a ``stat``.

The cache lives in ``$FSMIS_CACHE_DIR`` (default ``~/.cache/fsmis_bench``) as
``file_digests.json``. It is advisory: a missing, damaged or read-only cache only costs
time, and concurrent writers at worst drop each other's new entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import DataError

_CACHE_FILE = "file_digests.json"
_memory: dict[str, tuple[int, int, str]] = {}
_loaded_from: Path | None = None


def cache_dir() -> Path:
    """Where the digest cache lives (``$FSMIS_CACHE_DIR`` or ``~/.cache/fsmis_bench``, beside
    the weight digests of ``fsmis_methods._weight_digest``)."""
    configured = os.environ.get("FSMIS_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fsmis_bench"


def _load_cache() -> None:
    global _loaded_from
    where = cache_dir() / _CACHE_FILE
    if _loaded_from == where:
        return
    _memory.clear()
    _loaded_from = where
    try:
        stored = json.loads(where.read_text())
        for path, (size, mtime_ns, digest) in stored.items():
            _memory[str(path)] = (int(size), int(mtime_ns), str(digest))
    except (OSError, ValueError, TypeError):
        pass  # no cache yet, or a damaged one: start empty


def _save_cache() -> None:
    where = cache_dir() / _CACHE_FILE
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where.parent, prefix=f".{_CACHE_FILE}.")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump({k: list(v) for k, v in _memory.items()}, handle)
            os.replace(tmp, where)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only home only makes the next run hash again


def _hash_bytes(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def file_sha256(path: str | Path, *, _save: bool = True) -> str:
    """SHA-256 (hex) of one file's bytes, from the cache when size and mtime are unchanged.

    Raises:
        DataError: the file is missing or unreadable.
    """
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", hint="check that the file exists") from None
    _load_cache()
    key = str(path)
    cached = _memory.get(key)
    if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
        return cached[2]
    try:
        digest = _hash_bytes(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions") from None
    _memory[key] = (stat.st_size, stat.st_mtime_ns, digest)
    if _save:
        _save_cache()
    return digest


def files_sha256(paths: Iterable[str | Path], root: str | Path) -> str:
    """One SHA-256 over several files: their names relative to ``root`` and their digests.

    Moving the whole folder keeps the digest; renaming, adding, removing or changing a
    file changes it. The order of ``paths`` matters (pass them in a canonical order).
    """
    root = Path(root).expanduser().resolve()
    lines = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        try:
            name = str(resolved.relative_to(root))
        except ValueError:
            name = str(resolved)
        lines.append(f"{name}\t{file_sha256(resolved, _save=False)}\n")
    _save_cache()
    return hashlib.sha256("".join(lines).encode()).hexdigest()
