"""File helpers shared by preparation, supervoxels and checks: atomic NIfTI writes, ids."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import SimpleITK as sitk

#: Marker in the names of half-written files; a crashed run leaves only these behind.
PARTIAL_TAG = ".partial-"

_ID_PATTERN = re.compile(r"^(?:image|label|superpix-[A-Za-z]+)_(\d+)\.nii\.gz$")


def case_id_of(path: Path) -> str | None:
    """The numeric id in ``image_<id>.nii.gz`` / ``label_<id>`` / ``superpix-*_<id>``."""
    match = _ID_PATTERN.match(Path(path).name)
    return match.group(1) if match else None


def sorted_case_ids(image_dir: Path) -> list[str]:
    """Ids of every ``image_<id>.nii.gz`` in ``image_dir``, in numeric order."""
    ids = [case_id_of(p) for p in Path(image_dir).glob("image_*.nii.gz")]
    return sorted((i for i in ids if i is not None), key=int)


def not_a_folder(path: Path) -> str:
    """Why ``path``, which is not a folder, cannot be used as one, as the end of a sentence
    that names it: a file given for a folder is not a path that "does not exist"."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "is a link to something that does not exist"
    return "is a file, not a folder" if path.exists() else "does not exist"


def write_image_atomic(image: sitk.Image, path: Path) -> None:
    """Write ``image`` to ``path`` through a temporary file and a rename.

    An interrupted write leaves a ``*.partial-<pid>.nii.gz`` file, never a truncated
    ``path``, so "the file exists" always means "the file is complete".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:-7]}{PARTIAL_TAG}{os.getpid()}.nii.gz")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete half-written files a killed run left in ``folder``; returns what it removed."""
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for path in Path(folder).glob(f".*{PARTIAL_TAG}*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def gzip_problem(path: Path) -> str | None:
    """Why a ``.gz`` file is damaged (truncated or corrupt stream), or None when it is whole.

    SimpleITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels
    with zeros, so every reader here checks the stream first.
    """
    path = Path(path)
    if not path.name.endswith(".gz"):
        return None
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        return f"damaged gzip stream ({error})"
    return None


def read_image_checked(path: Path) -> sitk.Image:
    """``sitk.ReadImage`` that refuses truncated or corrupt files with a ``RuntimeError``."""
    problem = gzip_problem(path)
    if problem:
        raise RuntimeError(problem)
    return sitk.ReadImage(str(path))
