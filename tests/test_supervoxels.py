"""Supervoxels: the 3-D Felzenszwalb kernel, the ADNet/SSL-ALPNet recipes, caching, CLI."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fsmis_bench.errors import DataError
from fsmis_bench.preparation._felzenszwalb import HAVE_NUMBA, direction_weights, felzenszwalb_3d
from fsmis_bench.preparation.commands import register
from fsmis_bench.preparation.supervoxels import (
    best_match_iou,
    body_mask,
    compare_supervoxels,
    ensure_supervoxels,
    generate_supervoxels,
    supervoxel_stats,
    supervoxels_2d,
    supervoxels_3d,
)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def phantom(shape=(6, 40, 40), seed=0) -> np.ndarray:
    """(Z, Y, X) body disc with two organs of distinct brightness on a dark background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    image = rng.normal(0, 1.0, size=shape)
    body = (y - 20) ** 2 + (x - 20) ** 2 < 17**2
    image[body] += 80
    image[body & (x < 20)] += 60
    image[:, 5:12, 15:25] += 120  # inside the body, brighter still
    return np.clip(image, 0, None)


def write_dataset(folder: Path, ids=(1, 2, 3), shape=(6, 40, 40)) -> Path:
    folder.mkdir(parents=True)
    for i in ids:
        image = sitk.GetImageFromArray(phantom(shape, seed=i))
        image.SetSpacing((1.25, 1.25, 7.7))
        sitk.WriteImage(image, str(folder / f"image_{i}.nii.gz"))
        sitk.WriteImage(image, str(folder / f"label_{i}.nii.gz"))
    return folder


def test_direction_weights_grow_with_edge_length():
    w = direction_weights((7.7, 1.25, 1.25))
    ratio = 7.7 / 1.25
    assert np.allclose(w**2, [1.0, ratio**2, (1 + ratio**2) / 2, (2 + ratio**2) / 3])
    assert np.allclose(direction_weights((1, 1, 1)), 1.0)


def test_felzenszwalb_3d_follows_edges_and_min_size():
    image = np.zeros((4, 12, 12))
    image[:, :, 6:] = 200.0
    image += np.random.default_rng(0).uniform(0, 1, image.shape)
    segments = felzenszwalb_3d(image, min_size=20, spacing_zyx=(3.0, 1.0, 1.0))
    assert segments.dtype == np.int32 and segments.shape == image.shape
    # the sharp step is a segment boundary: no segment spans both halves
    left, right = set(np.unique(segments[:, :, :6])), set(np.unique(segments[:, :, 6:]))
    assert not left & right
    assert np.bincount(segments.ravel()).min() >= 20
    assert segments.min() == 0 and segments.max() == len(np.unique(segments)) - 1


def test_felzenszwalb_3d_min_size_merges_everything_small():
    image = np.random.default_rng(1).uniform(0, 255, (3, 8, 8))
    segments = felzenszwalb_3d(image, min_size=3 * 8 * 8, spacing_zyx=(1, 1, 1))
    assert np.unique(segments).tolist() == [0]


def test_felzenszwalb_3d_is_deterministic():
    image = phantom()
    a = felzenszwalb_3d(image, 50, (7.7, 1.25, 1.25))
    b = felzenszwalb_3d(image.copy(), 50, (7.7, 1.25, 1.25))
    assert np.array_equal(a, b)


def test_supervoxels_3d_respects_body_and_organs():
    image = phantom()
    sv = supervoxels_3d(image, (7.7, 1.25, 1.25), n_sv=200)
    assert sv.dtype == np.int32
    scaled = 255 * (image - image.min()) / np.ptp(image)
    mask = body_mask(scaled)
    assert np.array_equal(sv > 0, mask)
    # the bright organ and the body background never share a supervoxel
    organ = np.unique(sv[:, 6:11, 16:24])
    far = np.unique(sv[:, 25:33, 25:33])
    assert not set(organ) & set(far)


def test_body_mask_fills_holes_and_keeps_largest_component():
    image = np.zeros((1, 30, 30))
    image[0, 5:25, 5:25] = 100
    image[0, 12:16, 12:16] = 0  # a dark hole (e.g. air in the bowel)
    image[0, 0:2, 0:2] = 100  # a small separate blob (e.g. an arm)
    mask = body_mask(image, threshold=10)
    assert mask[0, 13, 13] and not mask[0, 0, 0] and mask.sum() == 400


def test_supervoxels_2d_ids_unique_per_slice():
    sv = supervoxels_2d(phantom(), min_size=30, sigma=1.0)
    assert sv.dtype == np.int32
    ids_per_slice = [set(np.unique(s[s > 0])) for s in sv]
    for i, a in enumerate(ids_per_slice):
        for b in ids_per_slice[i + 1 :]:
            assert not a & b


def test_generate_caches_and_force(tmp_path):
    images = write_dataset(tmp_path / "DS" / "imgs", ids=(1, 2))
    out = tmp_path / "DS" / "supervoxels_100"
    run = generate_supervoxels(images, out, 100, workers=1, progress=False)
    assert run.written == ["1", "2"] and run.ok
    written = sitk.ReadImage(str(out / "superpix-MIDDLE_1.nii.gz"))
    assert written.GetPixelID() == sitk.sitkInt32
    assert written.GetSize() == (40, 40, 6)
    # the reference files carry no geometry of their own
    assert written.GetSpacing() == (1.0, 1.0, 1.0)
    stamp = (out / "superpix-MIDDLE_1.nii.gz").stat().st_mtime_ns
    again = generate_supervoxels(images, out, 100, workers=1, progress=False)
    assert again.written == [] and again.skipped == ["1", "2"]
    assert (out / "superpix-MIDDLE_1.nii.gz").stat().st_mtime_ns == stamp
    forced = generate_supervoxels(images, out, 100, workers=1, force=True, progress=False)
    assert forced.written == ["1", "2"]


def test_parallel_workers_match_serial_and_report_bad_volume(tmp_path):
    images = write_dataset(tmp_path / "DS" / "imgs", ids=(1, 2, 3))
    (images / "image_3.nii.gz").write_bytes(b"broken")
    serial = generate_supervoxels(images, tmp_path / "serial", 100, workers=1, progress=False)
    parallel = generate_supervoxels(images, tmp_path / "parallel", 100, workers=2, progress=False)
    assert parallel.written == serial.written == ["1", "2"]
    assert parallel.failed and parallel.failed[0][0] == "3" and "image_3.nii.gz" in parallel.failed[0][1]
    for i in ("1", "2"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "serial" / f"superpix-MIDDLE_{i}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "parallel" / f"superpix-MIDDLE_{i}.nii.gz")))
        assert np.array_equal(a, b)


def test_ensure_supervoxels_fills_only_the_gaps(tmp_path):
    images = write_dataset(tmp_path / "DS" / "imgs", ids=(4, 5))
    out = ensure_supervoxels(tmp_path / "DS", n_sv=100, workers=1)
    assert out == tmp_path / "DS" / "supervoxels_100"
    assert sorted(p.name for p in out.iterdir()) == ["superpix-MIDDLE_4.nii.gz", "superpix-MIDDLE_5.nii.gz"]
    (out / "superpix-MIDDLE_5.nii.gz").unlink()
    stamp = (out / "superpix-MIDDLE_4.nii.gz").stat().st_mtime_ns
    assert ensure_supervoxels(images, n_sv=100, spacing=(7.7, 1.25, 1.25)) == out
    assert (out / "superpix-MIDDLE_5.nii.gz").exists()
    assert (out / "superpix-MIDDLE_4.nii.gz").stat().st_mtime_ns == stamp
    (images / "image_6.nii.gz").write_bytes(b"broken")
    with pytest.raises(DataError, match="image_6.nii.gz"):
        ensure_supervoxels(images, n_sv=100)


def test_compare_table_of_identical_folders(tmp_path, capsys):
    images = write_dataset(tmp_path / "root" / "CHAOST2" / "chaos_MR_T2_normalized", ids=(1, 2))
    ref = tmp_path / "reference"
    generate_supervoxels(images, ref, 100, progress=False)
    code = run_cli(
        "supervoxels",
        "abd_mri",
        "--root",
        str(tmp_path / "root"),
        "--n-sv",
        "100",
        "--workers",
        "1",
        "--compare-to",
        str(ref),
        "--no-progress",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| scan |" in out and "| mean |" in out
    rows = compare_supervoxels(tmp_path / "root" / "CHAOST2" / "supervoxels_100", ref)
    assert [r["case"] for r in rows] == ["1", "2"]
    assert all(r["ours_n"] == r["ref_n"] and r["best_iou"] == 1.0 and r["body_agree"] == 1.0 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--n-sv", "0"], "--n-sv must be a positive integer (the smallest supervoxel, in voxels), got 0"),
    (["--n-sv", "-5"], "--n-sv must be a positive integer"),
    (["--spacing", "0", "1.25", "1.25"], "three positive voxel sizes in mm (z, y, x), got 0 1.25 1.25"),
    (["--spacing", "7.7", "-1", "1.25"], "got 7.7 -1 1.25"),
    (["--spacing", "nan", "1.25", "1.25"], "got nan 1.25 1.25"),
])
def test_supervoxels_refuses_a_size_or_spacing_that_is_not_positive(tmp_path, monkeypatch, flags, message):
    """--n-sv 0 fell back to the default unsaid, --spacing 0 1 1 segmented with a 0 mm slice
    spacing: both are refused before anything is read or computed."""
    from fsmis_bench.errors import ConfigError, FsmisError
    from fsmis_bench.preparation import supervoxels as recipe

    write_dataset(tmp_path / "root" / "CMR" / "cmr_MR_normalized", ids=(1,))
    monkeypatch.setattr(recipe, "_one_volume", lambda job: pytest.fail("a volume was computed"))
    with pytest.raises(FsmisError, match=re.escape(message)) as error:
        run_cli("supervoxels", "card_mri", "--root", str(tmp_path / "root"), "--workers", "1", "--no-progress", *flags)
    assert isinstance(error.value, (ConfigError, DataError)) and error.value.hint
    assert not (tmp_path / "root" / "CMR" / "supervoxels_1000").exists()
    with pytest.raises(DataError, match="three positive voxel sizes"):  # the library refuses it too
        generate_supervoxels(tmp_path / "root" / "CMR" / "cmr_MR_normalized", tmp_path / "sv", 100,
                             spacing_zyx=(7.7, 0.0, 1.25), progress=False)


def test_supervoxels_out_a_file_or_a_read_only_folder_is_one_error_before_any_volume(tmp_path, monkeypatch):
    """--out naming a file raised FileExistsError; a read-only --out computed every volume
    first and then failed each with the NIfTI writer's lines."""
    from fsmis_bench import records
    from fsmis_bench.preparation import supervoxels as recipe

    root = tmp_path / "root"
    images = write_dataset(root / "CMR" / "cmr_MR_normalized", ids=(1, 2))
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("keep me")
    computed = []
    real_one_volume = recipe._one_volume
    monkeypatch.setattr(recipe, "_one_volume", lambda job: computed.append(job[0]) or real_one_volume(job))
    base = ["supervoxels", "card_mri", "--root", str(root), "--n-sv", "100", "--workers", "1", "--no-progress"]
    for out in (blocker, blocker / "sub"):
        with pytest.raises(DataError, match=f"cannot write supervoxels to {re.escape(str(out))}: "
                                            f"{re.escape(str(blocker))} is a file, not a folder") as error:
            run_cli(*base, "--out", str(out))
        assert "--out" in error.value.hint
    assert blocker.read_text() == "keep me"
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_check = records.can_write_in  # root may write anywhere: the check itself stands in for a read-only mount
    monkeypatch.setattr(records, "can_write_in", lambda folder: Path(folder) != read_only and real_check(folder))
    for out in (read_only, read_only / "sv"):
        with pytest.raises(DataError, match=f"{re.escape(str(read_only))} is not writable") as error:
            run_cli(*base, "--out", str(out))
        assert "--out <a writable folder>" in error.value.hint
    assert computed == [] and not list(read_only.iterdir())
    # a complete folder is only read, so a read-only one is fine
    generate_supervoxels(images, tmp_path / "done", 100, workers=1, progress=False)
    monkeypatch.setattr(records, "can_write_in", lambda folder: False)
    assert run_cli(*base, "--out", str(tmp_path / "done")) == 0
    assert computed == ["1", "2"]  # made by generate_supervoxels above, none by the command


def test_best_match_iou_and_stats():
    ref = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    ours = np.array([[3, 3, 3, 4], [3, 3, 3, 4]])
    # ref 1: IoU 4/6 with ours 3; ref 2: best IoU 2/4 with ours 4
    assert np.isclose(best_match_iou(ref, ours), (4 * 4 / 6 + 4 * 0.5) / 8)
    stats = supervoxel_stats(np.array([0, 1, 1, 5, 5, 5]))
    assert (stats.count, stats.min_size, stats.max_size, stats.body_voxels) == (2, 2, 3, 5)


@pytest.mark.realdata
@pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed: a real scan takes minutes in pure Python")
def test_supervoxels_on_one_real_cmr_scan_resemble_the_reference(real_data_root):
    image = sitk.ReadImage(str(real_data_root / "CMR" / "cmr_MR_normalized" / "image_4.nii.gz"))
    reference = sitk.GetArrayFromImage(
        sitk.ReadImage(str(real_data_root / "CMR" / "supervoxels_1000" / "superpix-MIDDLE_4.nii.gz"))
    )
    ours = supervoxels_3d(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1], n_sv=1000)
    assert ours.shape == reference.shape
    assert np.array_equal(ours > 0, reference > 0)  # same body mask
    n_ours, n_ref = supervoxel_stats(ours).count, supervoxel_stats(reference).count
    assert abs(n_ours - n_ref) <= max(3, 0.2 * n_ref)
    assert best_match_iou(reference, ours) > 0.6


GiB = 2**30


@pytest.mark.parametrize("requested, scans, free_gib, expected, said", [
    (4, 10, None, 4, None),  # the system says nothing: as asked
    (4, 2, 64, 2, None),  # never more workers than scans
    (4, 10, 64, 4, None),  # 4 x 2.8 GiB fit
    (4, 10, 6, 2, "2 scan(s) at a time instead of 4"),
    (4, 10, 1, 1, "more than the 1.0 GiB free"),  # tried alone all the same: swap may carry it
])
def test_as_many_scans_are_segmented_at_once_as_their_graphs_fit(monkeypatch, capsys, requested, scans, free_gib,
                                                                  expected, said):
    from fsmis_bench.preparation import supervoxels

    monkeypatch.setattr(supervoxels, "free_memory", lambda: None if free_gib is None else free_gib * GiB)
    voxels = 10_000_000  # about 2.8 GiB of graph at 300 bytes per voxel
    assert supervoxels.segmentation_workers(requested, scans, voxels, "supervoxels") == expected
    err = capsys.readouterr().err
    assert (said in err) if said else err == ""


def test_a_worker_ended_by_the_system_is_one_error_and_keeps_the_scans_written(tmp_path, monkeypatch):
    """An out-of-memory kill of a worker process breaks the pool: one error naming what is
    kept and how to go on, never a wait for ever (multiprocessing.Pool's behaviour)."""
    from concurrent.futures import Future, ThreadPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from fsmis_bench.preparation import supervoxels

    class KilledAfterTwo(ThreadPoolExecutor):
        """Runs the first two scans; the third one's worker is 'killed'."""

        def __init__(self, max_workers, mp_context, initializer=None):
            super().__init__(max_workers=1)
            self.started: list[Future] = []

        def submit(self, fn, *args):
            if len(self.started) < 2:
                self.started.append(super().submit(fn, *args))
                return self.started[-1]
            wait(self.started)  # the kill comes after the first two scans were written
            broken: Future = Future()
            broken.set_exception(BrokenProcessPool("a child process terminated abruptly"))
            return broken

    monkeypatch.setattr(supervoxels, "ProcessPoolExecutor", KilledAfterTwo)
    images = write_dataset(tmp_path / "DS" / "imgs", ids=(1, 2, 3))
    with pytest.raises(DataError) as caught:
        generate_supervoxels(images, tmp_path / "sv", 100, workers=2, progress=False)
    assert "ended from outside" in str(caught.value) and "of 3 scans were written" in str(caught.value)
    assert "--workers 1" in caught.value.hint
    written = sorted(p.name for p in (tmp_path / "sv").iterdir())
    assert written == ["superpix-MIDDLE_1.nii.gz", "superpix-MIDDLE_2.nii.gz"]
    rerun = generate_supervoxels(images, tmp_path / "sv", 100, workers=1, progress=False)
    assert rerun.skipped == ["1", "2"] and rerun.written == ["3"]


def test_a_stop_ends_the_workers_at_once_and_runs_no_queued_scan(tmp_path, monkeypatch):
    """Ctrl-C while scans are queued: the command stops now, not after every queued scan
    (minutes each on real scans), and leaves no worker process behind."""
    import psutil

    from fsmis_bench.preparation import supervoxels

    real_as_completed = supervoxels.as_completed

    def stopped_after_the_first(futures):
        for done in real_as_completed(futures):
            yield done
            raise KeyboardInterrupt

    monkeypatch.setattr(supervoxels, "as_completed", stopped_after_the_first)
    images = write_dataset(tmp_path / "DS" / "imgs", ids=tuple(range(1, 13)), shape=(12, 40, 40))
    with pytest.raises(KeyboardInterrupt):
        generate_supervoxels(images, tmp_path / "sv", 100, workers=2, progress=False)
    written = list((tmp_path / "sv").glob("superpix-MIDDLE_*.nii.gz"))
    assert 1 <= len(written) <= 4  # the first, perhaps those in flight; never the queue of 12
    workers = [p for p in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    assert workers == []


def test_free_memory_is_capped_by_the_cgroup_limit(tmp_path):
    from fsmis_bench.preparation.supervoxels import _cgroup_room

    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{8 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{3 * GiB}\n")
    assert _cgroup_room(tmp_path) == 5 * GiB
