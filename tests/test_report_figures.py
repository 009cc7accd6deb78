"""Report figures and the qualitative figure, from small synthetic records."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from fsmis_bench.errors import DataError, FsmisError  # noqa: E402
from fsmis_bench.reporting import figures, style  # noqa: E402
from fsmis_bench.reporting.collect import load_results  # noqa: E402
from fsmis_bench.reporting.qualitative import (  # noqa: E402
    choose_slices,
    load_predictions,
    parse_slices,
    qualitative_figure,
    write_qualitative,
)
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run  # noqa: E402

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(8, 32, 32))


@pytest.fixture(scope="module")
def results_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fig_results")
    quality = {"m1": 0.8, "m2": 0.6}
    for method, q in quality.items():
        for setting in (1, 2):
            for fold in range(5):
                queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
                cases, predictions = [], {}
                for organ in ("liver", "spleen"):
                    for case_id in queries:
                        cases.append((organ, case_id, *counts_for_dice(q - 0.1 * (setting - 1))))
                        if fold == 0:
                            truth = DATASET.load(case_id).label == DATASET.label_map[organ]
                            slices = np.flatnonzero(truth.any(axis=(1, 2)))
                            predictions[(organ, case_id)] = (slices, truth[slices])
                log = pd.DataFrame({"step": np.arange(0, 100, 10), "loss": np.linspace(1, 0.2, 10), "lr": 1e-5,
                                    "elapsed_s": np.arange(10.0)})
                write_run(root, method, "abd_mri", setting, fold, 0, cases, train_log=log,
                          predictions=predictions or None)
    return root


def _texts_at_least(fig: plt.Figure, points: float) -> None:
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= points


@pytest.mark.parametrize("width", [style.DOUBLE_COLUMN_IN, style.SINGLE_COLUMN_IN])
def test_figures_are_paper_sized_and_readable(results_root: Path, tmp_path: Path, width: float) -> None:
    results = load_results(results_root)
    written = {}
    for name, build in figures.FIGURES.items():
        fig = build(results, width=width)
        if name == "published_comparison":  # m1 and m2 have no published counterpart
            assert fig is None
            continue
        assert fig is not None, name
        assert fig.get_size_inches()[0] == pytest.approx(width), name
        _texts_at_least(fig, 8)
        written[name] = figures.save_figure(fig, tmp_path, name)
    for png in written.values():
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"
        with Image.open(png) as image:
            assert image.size[0] == round(width * 200)  # saved at its exact size, 200 dpi


def _panels(fig: plt.Figure) -> list[plt.Axes]:
    return [ax for ax in fig.get_axes() if ax.get_visible() and (ax.get_title() or ax.get_title(loc="left"))]


def test_organ_dice_bars_show_fold_means(results_root: Path) -> None:
    fig = figures.organ_dice_figure(load_results(results_root))
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["Abd-MRI · setting 1", "Abd-MRI · setting 2"]
    heights = sorted(round(p.get_height(), 1) for p in panels[0].patches if p.get_height() > 0)
    assert heights == [60.0, 60.0, 80.0, 80.0]  # m2 and m1, liver and spleen, setting 1
    # five folds each: one error bar per bar (the std is 0 here: every fold scores the same)
    assert sum(isinstance(c, ErrorbarContainer) for c in panels[0].containers) == 4
    plt.close(fig)


def test_setting_drop_values(results_root: Path, tmp_path: Path) -> None:
    fig = figures.setting_drop_figure(load_results(results_root))
    widths = sorted(round(p.get_width(), 3) for p in _panels(fig)[0].patches if p.get_width() != 0)
    assert widths == [10.0, 10.0]  # both methods lose 0.1 Dice in setting 2
    plt.close(fig)
    only_setting1 = tmp_path / "s1"
    write_run(only_setting1, "m1", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.8))])
    assert figures.setting_drop_figure(load_results(only_setting1)) is None
    assert figures.train_loss_figure(load_results(only_setting1)) is None


def test_smoothing_is_bias_corrected_ema() -> None:
    assert figures.smooth(np.array([1.0, 0.0]), 0.5) == pytest.approx([1.0, 0.25 / 0.75])
    assert figures.smooth(np.array([2.0, 2.0, 2.0]), 0.9) == pytest.approx([2.0, 2.0, 2.0])


def test_default_slice_is_largest_area_of_first_query_case(results_root: Path) -> None:
    results = load_results(results_root)
    chosen = choose_slices(results, "abd_mri", 1, DATASET)
    # fold 0 = cases 1..5, support at position 2 -> first query case "1"
    label = DATASET.load("1").label
    for choice, organ in zip(chosen, ("spleen", "liver")):
        assert (choice.organ, choice.case_id) == (organ, "1")
        areas = (label == DATASET.label_map[organ]).sum(axis=(1, 2))
        assert areas[choice.z] == areas.max()


def test_default_slice_is_of_a_case_every_row_evaluated(tmp_path: Path) -> None:
    """A row run with protocol.supp_idx=0 has case "1" (fold 0's first) as its support and
    no prediction for it: the default case is the first one both rows evaluated."""
    fold = DATASET.fold_cases(0)
    for supp_idx, non_standard in ((2, ()), (0, ("supp_idx=0",))):
        queries = [case for i, case in enumerate(fold) if i != supp_idx]
        write_run(tmp_path, "support_copy", "abd_mri", 1, 0, 0,
                  [(organ, case, *counts_for_dice(0.5)) for organ in ("liver", "spleen") for case in queries],
                  non_standard=non_standard)
    chosen = choose_slices(load_results(tmp_path), "abd_mri", 1, DATASET)
    assert {choice.case_id for choice in chosen} == {fold[1]}


def test_parse_slices() -> None:
    assert parse_slices("liver:1:4, abd_mri:spleen:3:5") == [(None, "liver", "1", 4), ("abd_mri", "spleen", "3", 5)]
    assert parse_slices(None) == []
    with pytest.raises(FsmisError, match="cannot read slice"):
        parse_slices("liver:4")


def test_predictions_roundtrip_and_qualitative_panels(results_root: Path, tmp_path: Path) -> None:
    results = load_results(results_root)
    run = results.runs[(results.runs["method"] == "m1") & (results.runs["fold"] == 0) & (results.runs["setting"] == 1)]
    predictions = load_predictions(run["run_dir"].item())
    slices, masks = predictions[("liver", "2")]
    truth = DATASET.load("2").label == DATASET.label_map["liver"]
    assert slices.dtype.kind == "i" and masks.dtype == bool
    np.testing.assert_array_equal(masks, truth[slices])

    fig = qualitative_figure(results, "abd_mri", 1, DATASET, parse_slices("liver:2:4,spleen:1:0"))
    texts = [t.get_text() for t in fig.texts]
    # methods as rows (ground truth first), the chosen slices as columns
    assert texts[:3] == ["Ground truth", "Liver\ncase 2, slice 4", "Spleen\ncase 1, slice 0"]
    assert {"m1", "m2"} <= set(texts)
    panels = [ax for ax in fig.get_axes() if ax.images]
    assert len(panels) == 3 * 2
    # row 1 (m1), column 2 (spleen, z=0): z=0 holds no spleen, nothing was predicted there
    assert any(t.get_text() in ("no\nprediction", "n/a") for t in panels[3].texts)
    assert panels[2].collections  # m1's liver contour drawn
    plt.close(fig)

    notes: list[str] = []
    assert write_qualitative(results, tmp_path, None, log=notes.append) == {}
    assert "skipped" in notes[0]

    def broken(name: str):
        raise DataError("no data root")

    assert write_qualitative(results, tmp_path, broken, log=notes.append) == {}
    assert "data not available" in notes[-1]
    written = write_qualitative(results, tmp_path, lambda name: DATASET, log=notes.append)
    assert written["qualitative_abd_mri"].is_file()


def test_a_damaged_predictions_file_is_named_and_its_run_left_out_of_the_figure(results_root: Path,
                                                                               tmp_path: Path) -> None:
    import shutil

    from fsmis_bench.records import DamagedPredictionsError

    root = tmp_path / "results"
    shutil.copytree(results_root, root)
    results = load_results(root)
    run = results.runs[(results.runs["method"] == "m1") & (results.runs["fold"] == 0) & (results.runs["setting"] == 1)]
    damaged = Path(run["run_dir"].item()) / "predictions.npz"
    damaged.write_bytes(damaged.read_bytes()[:200])  # truncated
    with pytest.raises(DamagedPredictionsError, match="cannot be read .*a damaged or foreign predictions file"):
        load_predictions(damaged.parent)
    notes: list[str] = []
    written = write_qualitative(results, tmp_path / "out", lambda name: DATASET, log=notes.append)
    assert written["qualitative_abd_mri"].is_file()  # the other runs are still drawn
    (said,) = [n for n in notes if str(damaged) in n]
    assert said.startswith("note: qualitative figure: a run's predictions are left out: ") and "hint: delete it" in said


def test_a_prediction_touching_or_filling_the_frame_is_outlined_within_the_image() -> None:
    from fsmis_bench.reporting.qualitative import _contour

    for mask in (np.ones((40, 50), bool), np.pad(np.ones((20, 20), bool), ((0, 20), (0, 30)))):
        fig, ax = plt.subplots()
        ax.imshow(np.zeros((40, 50)))
        limits = ax.get_xlim(), ax.get_ylim()
        _contour(ax, mask, "orange")
        assert ax.collections, "no outline drawn"  # before, a full mask drew nothing
        assert (ax.get_xlim(), ax.get_ylim()) == limits  # the frame is the image's
        plt.close(fig)
