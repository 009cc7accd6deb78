"""Content digests of weight files, cheap to ask for on every run.

A run records the SHA-256 of every pretrained file it loaded, so that two runs with
different weights are never merged in a report. Multi-GB checkpoints must not be re-hashed
on every run, so a digest is found, in this order:

1. the Hugging Face hub cache names each large (LFS) file's blob by its SHA-256
   (``models--owner--name/blobs/<64 hex>``), checked by ``huggingface_hub`` when it was
   downloaded: the name is the digest;
2. a digest computed earlier for the same real path, size and modification time, kept in
   ``$FSMIS_CACHE_DIR/weight_digests.json`` (default ``~/.cache/fsmis_bench``);
3. hashing the file (then kept in that cache).

A file rewritten in place with the same size *and* the same nanosecond mtime would keep a
stale digest; tools that write weights do not do that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOCK = threading.Lock()
#: in-process copy of the on-disk cache: realpath -> (size, mtime_ns, sha256)
_MEMO: dict[str, tuple[int, int, str]] = {}
_CHUNK = 16 * 1024 * 1024


def cache_file() -> Path:
    """Where computed digests are kept between runs."""
    root = os.environ.get("FSMIS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fsmis_bench")
    return Path(root) / "weight_digests.json"


def _hub_blob_digest(real: Path) -> str | None:
    if real.parent.name == "blobs" and real.parent.parent.name.startswith("models--") and _HEX64.match(real.name):
        return real.name
    return None


def _read_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict[str, tuple[int, int, str]]) -> None:
    """Merge ``entries`` into the cache file; a read-only home only costs re-hashing later."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data.update({key: list(value) for key, value in entries.items()})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests_", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """``"sha256:<hex>"`` of a file's content (symlinks followed), cached as described above."""
    real = Path(os.path.realpath(path))
    blob = _hub_blob_digest(real)
    if blob:
        return f"sha256:{blob}"
    stat = real.stat()
    key = str(real)
    with _LOCK:
        known = _MEMO.get(key)
        if known is None:
            cached = _read_cache(cache_file()).get(key)
            if isinstance(cached, list) and len(cached) == 3:
                known = (int(cached[0]), int(cached[1]), str(cached[2]))
                _MEMO[key] = known
        if known is not None and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return f"sha256:{known[2]}"
        value = sha256_of(real)
        _MEMO[key] = (stat.st_size, stat.st_mtime_ns, value)
        _write_cache(cache_file(), {key: _MEMO[key]})
    return f"sha256:{value}"


def combined_digest(files: dict[str, str]) -> str:
    """One digest for a component read from several files: SHA-256 over ``name digest`` lines
    (names relative to the component's folder, sorted). A single file keeps its own digest."""
    if len(files) == 1:
        return next(iter(files.values()))
    lines = "".join(f"{name} {files[name]}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def forget_memo() -> None:
    """Drop the in-process copy (tests that change ``FSMIS_CACHE_DIR``)."""
    with _LOCK:
        _MEMO.clear()
