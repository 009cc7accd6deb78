"""Supervoxel pseudo-labels for self-supervised training.

Two recipes, both writing ``<dataset>/supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz`` as
int32 volumes in the ``(Z, Y, X)`` array order of the image (0 = outside the body):

- ``felzenszwalb3d`` (ADNet, default): 3-D Felzenszwalb graph segmentation with
  ``min_size = n_sv``, no smoothing, spacing-aware edge weights, on the image rescaled to
  0..255; segments are then cut to a per-slice body mask (intensity > 10, largest
  connected component, holes filled).
- ``felzenszwalb2d`` (SSL-ALPNet): ``skimage.segmentation.felzenszwalb`` per slice with
  ``min_size = n_sv`` (400 in SSL-ALPNet) and ``sigma = 1`` inside the same body mask;
  ids are offset per slice so every id is unique in the volume.

Like the reference files, the written volumes carry no geometry of their own (unit
spacing, zero origin): only the array matters and it matches the image voxel for voxel.
"""

from __future__ import annotations

import multiprocessing
import numbers
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage.measure import label as connected_components

from ..errors import DataError
from ._felzenszwalb import HAVE_NUMBA, felzenszwalb_3d
from ._io import read_image_checked, remove_stale_partials, sorted_case_ids, write_image_atomic

METHODS: tuple[str, ...] = ("felzenszwalb3d", "felzenszwalb2d")
#: Body-mask threshold on the 0..255 image (ADNet's ``fg_thresh``).
FOREGROUND_THRESHOLD: float = 10.0
SUPERVOXEL_PREFIX = "superpix-MIDDLE_"
#: peak memory of the 3-D segmentation per voxel of a scan: its graph's 13 edges per voxel,
#: each with a float32 cost, an int64 place in the sort order and its sorted cost
#: (benchmarks/supervoxel_memory.py: 256-272 bytes on scans of 2.6 and 6.6 M voxels; a
#: 512 x 512 x 200 CT needs about 15 GiB)
SEGMENTATION_BYTES_PER_VOXEL = 300


def free_memory() -> int | None:
    """Bytes of memory a new computation can take now; None where the system does not say.

    Linux's ``MemAvailable`` (free memory plus the page cache it can reclaim: a server with
    a warm file cache has little strictly free memory), capped by the room left under the
    cgroup's limit (a container or a Slurm job may be given less than the machine has).
    """
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    room = _cgroup_room()
    return available if room is None else min(available, room)


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit; None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def segmentation_workers(requested: int, scans: int, largest_voxels: int, who: str) -> int:
    """Scans to segment at once (3-D): at most ``requested`` and ``scans``, and only as many
    as their graphs fit the free memory. A scan larger than the free memory is said on
    stderr (by ``who``): it is still tried, one at a time, as swap may carry it."""
    workers = max(1, min(requested, scans))
    free = free_memory()
    if free is None:
        return workers
    need = SEGMENTATION_BYTES_PER_VOXEL * largest_voxels
    fits = free // max(1, need)
    if fits < 1:
        print(f"{who}: a scan of {largest_voxels} voxels needs about {need / 2**30:.1f} GiB to segment, more "
              f"than the {free / 2**30:.1f} GiB free; trying one scan at a time (crop or resample the scans "
              "if the system ends it)", file=sys.stderr, flush=True)
    elif fits < workers:
        print(f"{who}: {fits} scan(s) at a time instead of {workers}: each needs about {need / 2**30:.1f} GiB "
              f"and {free / 2**30:.1f} GiB are free", file=sys.stderr, flush=True)
    return max(1, min(workers, fits))


def _voxel_count(image_path: Path) -> int:
    """Voxels of a NIfTI file, from its header (0 where it cannot be read: the worker names it)."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(image_path))
        reader.ReadImageInformation()
        return int(np.prod(reader.GetSize()))
    except RuntimeError:
        return 0


def supervoxel_path(out_dir: Path, case_id: str) -> Path:
    return Path(out_dir) / f"{SUPERVOXEL_PREFIX}{case_id}.nii.gz"


def remake_command(dataset: str, root: Path, n_sv: int | None = None) -> str:
    """The ``fsmis-bench supervoxels`` command that makes the missing supervoxel files of a
    prepared dataset again (``--n-sv`` only when not the dataset's own size)."""
    from .facts import dataset_facts

    size = f" --n-sv {n_sv}" if n_sv is not None and n_sv != dataset_facts(dataset).n_sv else ""
    return f"fsmis-bench supervoxels {dataset} --root {root}{size}"


def damaged_file_advice(path: Path, dataset: str, root: Path, n_sv: int | None = None) -> str:
    """What to do about the damaged (truncated, not NIfTI) supervoxel file ``path`` of a
    prepared dataset. ``prepare`` is not it: it makes no supervoxels; and the supervoxels
    command keeps every file that exists unless ``--force``, which remakes them all."""
    return (f"delete {path} and make it again with `{remake_command(dataset, root, n_sv)}` (it makes the "
            "missing files only; with --force it remakes every scan's)")


def scale_to_255(image: np.ndarray) -> np.ndarray:
    """``(Z, Y, X)`` intensities -> float64 in 0..255 (min-max over the volume)."""
    image = np.asarray(image, dtype=np.float64)
    value_range = float(np.ptp(image))
    if value_range <= 0 or not np.isfinite(value_range):
        raise DataError(
            "cannot make supervoxels of a constant or non-finite image",
            hint="check the prepared image file",
        )
    return 255.0 * (image - image.min()) / value_range


def body_mask(image255: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Per-slice body mask: above ``threshold``, largest 8-connected component, holes filled.

    Args:
        image255: ``(Z, Y, X)`` image scaled to 0..255.
    Returns:
        ``(Z, Y, X)`` bool.
    """
    mask = np.zeros(image255.shape, dtype=bool)
    for z, plane in enumerate(image255):
        above = plane > threshold
        if not above.any():
            continue
        components = connected_components(above, connectivity=2)
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        mask[z] = ndimage.binary_fill_holes(components == largest)
    return mask


def mask_segments(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep segment ids inside ``mask`` and make 0 mean "outside".

    Segment 0 is renumbered to ``max + 1`` first, so no real segment is lost; ids are not
    compacted (as in the reference files, some ids vanish with the background).
    """
    segments = segments.astype(np.int32, copy=True)
    segments[segments == 0] = segments.max() + 1
    segments[~mask] = 0
    return segments


def supervoxels_3d(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    n_sv: int,
    fg_threshold: float = FOREGROUND_THRESHOLD,
) -> np.ndarray:
    """ADNet's 3-D supervoxels of one volume.

    Args:
        image: ``(Z, Y, X)`` intensities as stored.
        spacing_zyx: voxel size ``(z, y, x)`` in mm.
        n_sv: minimum supervoxel size in voxels.
    Returns:
        ``(Z, Y, X)`` int32, 0 outside the body.
    """
    image255 = scale_to_255(image)
    segments = felzenszwalb_3d(image255, min_size=n_sv, spacing_zyx=spacing_zyx)
    return mask_segments(segments, body_mask(image255, fg_threshold))


def supervoxels_2d(
    image: np.ndarray,
    min_size: int = 400,
    sigma: float = 1.0,
    fg_threshold: float = FOREGROUND_THRESHOLD,
) -> np.ndarray:
    """SSL-ALPNet's per-slice superpixels, with ids made unique across slices.

    Args:
        image: ``(Z, Y, X)`` intensities as stored.
    Returns:
        ``(Z, Y, X)`` int32, 0 outside the body.
    """
    from skimage.segmentation import felzenszwalb

    image255 = scale_to_255(image)
    mask = body_mask(image255, fg_threshold)
    out = np.zeros(image255.shape, dtype=np.int32)
    next_id = 1
    for z, plane in enumerate(image255):
        if not mask[z].any():
            continue
        segments = felzenszwalb(plane, scale=1, sigma=sigma, min_size=min_size, channel_axis=None)
        kept = np.unique(segments[mask[z]])
        lookup = np.zeros(int(segments.max()) + 1, dtype=np.int32)
        lookup[kept] = np.arange(next_id, next_id + len(kept), dtype=np.int32)
        out[z] = np.where(mask[z], lookup[segments], 0)
        next_id += len(kept)
    return out


# -- whole datasets ------------------------------------------------------------------------


@dataclass
class SupervoxelRun:
    """What :func:`generate_supervoxels` did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def resolve_image_dir(dataset_dir: Path) -> Path:
    """The folder holding ``image_<id>.nii.gz``: ``dataset_dir`` itself or its one subfolder.

    Accepts ``<root>/CHAOST2/chaos_MR_T2_normalized`` or ``<root>/CHAOST2``.
    """
    dataset_dir = Path(dataset_dir)
    if any(dataset_dir.glob("image_*.nii.gz")):
        return dataset_dir
    candidates = [d for d in sorted(dataset_dir.glob("*")) if d.is_dir() and any(d.glob("image_*.nii.gz"))]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(
        f"no image_<id>.nii.gz files in {dataset_dir}"
        + (f" (several candidate folders: {[c.name for c in candidates]})" if candidates else ""),
        hint="point at the folder of prepared images, e.g. <root>/CHAOST2/chaos_MR_T2_normalized",
    )


def _one_volume(job: tuple) -> tuple[str, str, str, float]:
    """Worker: make and write the supervoxels of one case. Returns (id, status, msg, s)."""
    case_id, image_path, out_path, n_sv, method, spacing_zyx = job
    start = time.perf_counter()
    try:
        image = read_image_checked(Path(image_path))
        array = sitk.GetArrayFromImage(image)
        if method == "felzenszwalb3d":
            spacing = spacing_zyx or tuple(float(s) for s in image.GetSpacing()[::-1])
            segments = supervoxels_3d(array, spacing, n_sv)
        else:
            segments = supervoxels_2d(array, min_size=n_sv)
        write_image_atomic(sitk.GetImageFromArray(segments.astype(np.int32)), Path(out_path))
    except Exception as error:  # noqa: BLE001 - one bad volume must not stop the others
        return case_id, "failed", f"{Path(image_path).name}: {error}", time.perf_counter() - start
    return case_id, "written", "", time.perf_counter() - start


def generate_supervoxels(
    image_dir: Path,
    out_dir: Path,
    n_sv: int,
    method: str = "felzenszwalb3d",
    workers: int = 1,
    force: bool = False,
    spacing_zyx: tuple[float, float, float] | None = None,
    progress: bool = True,
) -> SupervoxelRun:
    """Supervoxels for every ``image_<id>.nii.gz`` in ``image_dir``, in parallel, cached.

    Args:
        image_dir: folder of prepared images.
        out_dir: where ``superpix-MIDDLE_<id>.nii.gz`` go.
        n_sv: ``min_size`` of the segmentation (voxels for 3-D, pixels for 2-D).
        method: ``felzenszwalb3d`` or ``felzenszwalb2d``.
        workers: processes working on different volumes at once.
        force: recompute cases whose output exists (otherwise they are skipped).
        spacing_zyx: override the spacing read from each image header.
        progress: show a progress bar (never when ``FSMIS_NO_PROGRESS=1``).
    Raises:
        DataError: an unknown method, ``n_sv`` or a spacing that is not positive, no images,
            or an ``out_dir`` that is (or lies under) a file or cannot be written, the last
            before any volume is computed.
    """
    if method not in METHODS:
        raise DataError(f"unknown supervoxel method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    if isinstance(n_sv, bool) or not isinstance(n_sv, numbers.Integral) or n_sv < 1:
        raise DataError(f"n_sv must be a positive voxel count, got {n_sv}", hint="e.g. --n-sv 5000")
    if spacing_zyx is not None:
        check_spacing(spacing_zyx)
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    ids = sorted_case_ids(image_dir)
    if not ids:
        raise DataError(f"no image_<id>.nii.gz files in {image_dir}", hint="prepare the dataset first")
    _check_folder(out_dir, writable=False)
    run = SupervoxelRun(out_dir=out_dir)
    jobs = []
    for case_id in ids:
        target = supervoxel_path(out_dir, case_id)
        if target.exists() and not force:
            run.skipped.append(case_id)
            continue
        jobs.append((case_id, image_dir / f"image_{case_id}.nii.gz", target, n_sv, method, spacing_zyx))
    if jobs:  # a complete folder is only read: it may be read-only
        _check_folder(out_dir, writable=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
    if method == "felzenszwalb3d" and not HAVE_NUMBA and jobs:
        print(
            "warning: numba is not installed; 3-D supervoxels run in pure Python and take "
            "hours per scan (pip install numba)",
            file=sys.stderr,
        )
    start = time.perf_counter()
    results = []
    from tqdm import tqdm

    bar = tqdm(
        total=len(jobs),
        desc=f"supervoxels {method} n={n_sv}",
        unit="vol",
        disable=not progress or not jobs or os.environ.get("FSMIS_NO_PROGRESS") == "1",
        file=sys.stderr,
    )
    if method == "felzenszwalb3d" and workers > 1 and len(jobs) > 1:
        largest = max(_voxel_count(Path(job[1])) for job in jobs)
        workers = segmentation_workers(workers, len(jobs), largest, "supervoxels")
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_one_volume(job))
            bar.update()
    else:
        # spawn, not fork: the caller may hold threads (torch, BLAS) that fork would copy. An
        # executor, not a Pool: a worker the system ends (out of memory) breaks it with an
        # error, where a Pool would wait for that worker's result for ever.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                   initializer=_leave_ctrl_c_to_the_main_process)
        try:
            for done in as_completed([pool.submit(_one_volume, job) for job in jobs]):
                results.append(done.result())
                bar.update()
        except BrokenProcessPool:
            _stop(pool)
            bar.close()
            written = sum(1 for r in results if r[1] == "written")
            raise DataError(
                f"a supervoxel worker process was ended from outside (most likely by the system, for "
                f"lack of memory) after {written} of {len(jobs)} scans were written to {out_dir}",
                hint="the written scans are kept; run the same command again with --workers 1 to make the "
                "rest one at a time",
            ) from None
        except BaseException:
            # Ctrl-C or an error: stop now, not after every queued scan (minutes each). The
            # scans being made are lost (their files are written whole or not at all).
            _stop(pool)
            raise
        pool.shutdown(wait=True)
    bar.close()
    run.seconds = time.perf_counter() - start
    for case_id, status, message, _ in sorted(results, key=lambda r: int(r[0])):
        if status == "written":
            run.written.append(case_id)
        else:
            run.failed.append((case_id, message))
    return run


def _leave_ctrl_c_to_the_main_process() -> None:
    """A worker's initializer: a terminal's Ctrl-C reaches the whole process group, and the
    main process ends the workers itself (:func:`_stop`); a worker that took it too would
    print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(pool: ProcessPoolExecutor) -> None:
    """End a process pool's workers and drop its queued jobs without waiting for them."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle on them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def check_spacing(spacing_zyx) -> tuple[float, float, float]:
    """``(z, y, x)`` voxel sizes in mm that the 3-D segmentation can weigh its edges by.

    Raises:
        DataError: not three finite, positive numbers (the edge costs are weighed by the
            ratio of the slice spacing to the in-plane one: a 0 mm slice spacing makes
            every edge across slices free, and a 0 mm in-plane one divides by zero).
    """
    values = tuple(spacing_zyx)
    numeric = [isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values]
    if len(values) != 3 or not all(ok and np.isfinite(v) and v > 0 for ok, v in zip(numeric, values, strict=True)):
        raise DataError(f"a spacing must be three positive voxel sizes in mm (z, y, x), got "
                        f"{' '.join(f'{v:g}' if ok else repr(v) for ok, v in zip(numeric, values, strict=True))}",
                        hint="e.g. --spacing 7.7 1.25 1.25, or leave it out to use each image header's spacing")
    return tuple(float(v) for v in values)


def _check_folder(out_dir: Path, *, writable: bool) -> None:
    """Refuse an ``out_dir`` that is (or lies under) a file, or, with ``writable``, one whose
    nearest existing folder cannot be written: said once, before any volume is computed,
    instead of once per volume after it was."""
    from ..records import can_write_in, nearest_existing  # late: spawned workers import this module

    existing = nearest_existing(out_dir)
    if not existing.is_dir():
        raise DataError(f"cannot write supervoxels to {out_dir}: {existing} is a file, not a folder",
                        hint="give a folder with --out (it is created if needed), or move the file away")
    if writable and not can_write_in(existing):
        raise DataError(f"cannot write supervoxels to {out_dir}: {existing} is not writable",
                        hint="make it writable, or write them elsewhere with --out <a writable folder>")


def ensure_supervoxels(
    dataset_dir: Path,
    n_sv: int,
    spacing: tuple[float, float, float] | None = None,
    workers: int = 1,
    method: str = "felzenszwalb3d",
) -> Path:
    """Make sure ``<dataset>/supervoxels_<n_sv>/`` has one file per image; generate the rest.

    Args:
        dataset_dir: ``<root>/<DATASET>`` (e.g. ``<root>/CHAOST2``) or its image folder.
        n_sv: supervoxel ``min_size`` (5000 abdomen, 1000 cardiac).
        spacing: ``(z, y, x)`` mm to use instead of each image header's spacing.
        workers: volumes processed in parallel.
        method: ``felzenszwalb3d`` (ADNet) or ``felzenszwalb2d`` (SSL-ALPNet).
    Returns:
        The supervoxel folder.
    Raises:
        DataError: when a volume cannot be processed (named in the message).
    """
    image_dir = resolve_image_dir(Path(dataset_dir))
    out_dir = image_dir.parent / f"supervoxels_{n_sv}"
    run = generate_supervoxels(image_dir, out_dir, n_sv, method=method, workers=workers, spacing_zyx=spacing)
    if run.failed:
        names = "; ".join(f"case {cid}: {msg}" for cid, msg in run.failed)
        raise DataError(
            f"supervoxel generation failed for {len(run.failed)} scan(s): {names}",
            hint="run `fsmis-bench check-data` on the root",
        )
    return out_dir


# -- comparison with reference supervoxels ------------------------------------------------


@dataclass
class SupervoxelStats:
    """Count and size distribution (voxels) of one supervoxel volume's non-zero ids."""

    count: int
    median_size: float
    min_size: int
    max_size: int
    body_voxels: int


def supervoxel_stats(segments: np.ndarray) -> SupervoxelStats:
    sizes = np.bincount(segments.ravel().astype(np.int64))[1:]
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return SupervoxelStats(0, 0.0, 0, 0, 0)
    return SupervoxelStats(
        int(sizes.size), float(np.median(sizes)), int(sizes.min()), int(sizes.max()), int(sizes.sum())
    )


def best_match_iou(reference: np.ndarray, ours: np.ndarray) -> float:
    """Size-weighted mean over reference supervoxels of their best IoU with one of ours."""
    ref = reference.ravel().astype(np.int64)
    our = ours.ravel().astype(np.int64)
    keep = (ref > 0) | (our > 0)
    ref, our = ref[keep], our[keep]
    n_our = int(our.max()) + 1
    pair, counts = np.unique(ref * n_our + our, return_counts=True)
    pair_ref, pair_our = pair // n_our, pair % n_our
    size_ref = np.bincount(ref)
    size_our = np.bincount(our, minlength=n_our)
    valid = (pair_ref > 0) & (pair_our > 0)
    iou = counts[valid] / (size_ref[pair_ref[valid]] + size_our[pair_our[valid]] - counts[valid])
    best = np.zeros(size_ref.size)
    np.maximum.at(best, pair_ref[valid], iou)
    weights = size_ref[1:]
    return float((best[1:] * weights).sum() / max(weights.sum(), 1))


def compare_supervoxels(ours_dir: Path, reference_dir: Path) -> list[dict]:
    """Per-scan comparison of two supervoxel folders (ids present in both)."""
    ours_dir, reference_dir = Path(ours_dir), Path(reference_dir)
    ours_ids = {p.name[len(SUPERVOXEL_PREFIX) : -7] for p in ours_dir.glob(f"{SUPERVOXEL_PREFIX}*.nii.gz")}
    ref_ids = {
        p.name[len(SUPERVOXEL_PREFIX) : -7] for p in reference_dir.glob(f"{SUPERVOXEL_PREFIX}*.nii.gz")
    }
    common = sorted(ours_ids & ref_ids, key=lambda s: int(s) if s.isdigit() else s)
    if not common:
        raise DataError(
            f"no scan has supervoxels in both {ours_dir} and {reference_dir}", hint="generate them first"
        )
    rows = []
    for case_id in common:
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(supervoxel_path(ours_dir, case_id))))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(supervoxel_path(reference_dir, case_id))))
        if ours.shape != ref.shape:
            rows.append({"case": case_id, "error": f"shape {ours.shape} vs reference {ref.shape}"})
            continue
        o, r = supervoxel_stats(ours), supervoxel_stats(ref)
        rows.append(
            {
                "case": case_id,
                "shape": "x".join(str(s) for s in ours.shape),
                "ours_n": o.count,
                "ref_n": r.count,
                "ours_median": o.median_size,
                "ref_median": r.median_size,
                "ours_min": o.min_size,
                "ref_min": r.min_size,
                "ours_max": o.max_size,
                "ref_max": r.max_size,
                "body_agree": float(np.mean((ours > 0) == (ref > 0))),
                "best_iou": best_match_iou(ref, ours),
            }
        )
    return rows


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_supervoxels` rows plus a mean row."""
    header = (
        "| scan | shape (Z,Y,X) | n ours | n ref | median size ours | median size ref "
        "| min ours | min ref | max ours | max ref | body mask agreement | ref best-match IoU |"
    )
    lines = [header, "|" + "---|" * 12]
    good = [r for r in rows if "error" not in r]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} |" + " |" * 10)
            continue
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['ours_n']} | {r['ref_n']} | {r['ours_median']:.0f} | "
            f"{r['ref_median']:.0f} | {r['ours_min']} | {r['ref_min']} | {r['ours_max']} | {r['ref_max']} | "
            f"{r['body_agree']:.4f} | {r['best_iou']:.3f} |"
        )
    if good:
        mean = lambda key: float(np.mean([r[key] for r in good]))  # noqa: E731
        lines.append(
            f"| mean | | {mean('ours_n'):.1f} | {mean('ref_n'):.1f} | {mean('ours_median'):.0f} | "
            f"{mean('ref_median'):.0f} | {mean('ours_min'):.0f} | {mean('ref_min'):.0f} | {mean('ours_max'):.0f} | "
            f"{mean('ref_max'):.0f} | {mean('body_agree'):.4f} | {mean('best_iou'):.3f} |"
        )
    return "\n".join(lines)
