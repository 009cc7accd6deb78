"""The Hugging Face hub side of weight loading: offline detection, the hub caches searched,
the cache layout, and fetching exactly the files the loaders read."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any, Iterable

from fsmis_bench.errors import FsmisError

#: the files a library reads from a model folder, in its order of preference.
WEIGHT_NAMES = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                  "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
    "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
}
TOKENIZER_NAMES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=1)
def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` or unreachable)."""
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=1.5):
            return False
    except OSError:
        return True


def hub_cache_dirs(weights_root: Any) -> list[Path]:
    """The hub caches searched for a hub id, in order (read at call time, not import time)."""
    dirs: list[Path] = []
    if weights_root:
        root = Path(os.path.expanduser(str(weights_root)))
        dirs.append(root)
    env = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    if env:
        dirs.append(Path(env))
    else:
        from huggingface_hub import constants

        dirs.append(Path(constants.HF_HUB_CACHE))
    return list(dict.fromkeys(dirs))


def repo_folder_name(repo_id: str) -> str:
    """``owner/name`` -> ``models--owner--name`` (the hub cache's folder of a model repo)."""
    return "models--" + repo_id.replace("/", "--")


def cached_snapshot(cache: Path, repo_id: str) -> tuple[Path | None, str]:
    """The snapshot ``refs/main`` points at in one hub cache, through ``huggingface_hub``.

    Returns:
        ``(snapshot, "")``; ``(None, "")`` when the cache has no folder for ``repo_id``; or
        ``(None, problem)`` when it has one that cannot be used, ``problem`` saying what was
        found there and what is missing (a download interrupted, or made for one revision only).
    """
    repo = cache / repo_folder_name(repo_id)
    if not repo.is_dir():
        return None, ""
    snapshots = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    found = f"snapshots/ holds {', '.join(s[:12] for s in snapshots[:3])}{' ...' if len(snapshots) > 3 else ''}" if snapshots else "snapshots/ is empty or absent"
    ref = repo / "refs" / "main"
    if not ref.is_file():
        refs = sorted(p.name for p in (repo / "refs").iterdir()) if (repo / "refs").is_dir() else []
        other = f" (refs/ holds {', '.join(refs)})" if refs else ""
        fix = (f"write the commit of the snapshot to use into {ref}, or point the source at {repo / 'snapshots' / snapshots[0]}"
               if snapshots else "download it again")
        return None, f"{repo} has no refs/main naming the snapshot to read{other}; {found}: {fix}"
    revision = ref.read_text().strip()
    if not (repo / "snapshots" / revision).is_dir():
        return None, f"{ref} names the snapshot {revision} but {repo / 'snapshots' / revision} is missing ({found}): download it again"
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True)), ""
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's own reasons for refusing a snapshot
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"huggingface_hub cannot read the snapshot {revision} in {repo}: {type(exc).__name__}: {text}"


def select_repo_files(repo_files: Iterable[str], components: Iterable[tuple[str | None, str]]) -> list[str]:
    """The exact files of a hub repo that the loaders read for ``(subfolder, library)`` components:
    config + the preferred weights (no fp16/EMA variants, no duplicate .bin), or the tokenizer files."""
    present = set(repo_files)
    chosen: list[str] = []
    for subfolder, library in components:
        prefix = f"{subfolder}/" if subfolder else ""
        if prefix and not any(f.startswith(prefix) for f in present):
            prefix = ""  # a single-model repo (TAESD, DINOv2) keeps its files at the root
        if library == "tokenizer":
            chosen += [prefix + n for n in TOKENIZER_NAMES if prefix + n in present]
            continue
        if prefix + "config.json" in present:
            chosen.append(prefix + "config.json")
        for name in WEIGHT_NAMES[library]:
            if prefix + name in present:
                chosen.append(prefix + name)
                if name.endswith(".index.json"):
                    stem = name.split(".")[0]
                    chosen += sorted(f for f in present if f.startswith(prefix + stem + "-") and f.endswith(name.split(".")[1]))
                break
    return list(dict.fromkeys(chosen))


def download_repo(repo_id: str, components: Iterable[tuple[str | None, str]], local_dir: Path | None, extra: Iterable[str] = ()) -> Path:
    """Fetch what the loaders read from a hub repo with ``huggingface_hub``: into ``local_dir``
    (``fsmis-bench weights download``) or the hub cache (``local_dir=None``). Returns the folder."""
    from huggingface_hub import HfApi, snapshot_download

    repo_files = list(HfApi().list_repo_files(repo_id))
    files = select_repo_files(repo_files, components) + [name for name in extra if name in repo_files]
    if not files:
        raise FsmisError(f"the hub repo {repo_id} holds none of the files the loaders read",
                         hint="check the repo id in the backbone config")
    folder = snapshot_download(repo_id, allow_patterns=files, local_dir=str(local_dir) if local_dir else None)
    return Path(folder)
