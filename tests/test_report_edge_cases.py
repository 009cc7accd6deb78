"""Report edge cases found by the figure audit: bugs are not taken for missing data, the
qualitative figure fits the page with its footnotes, the comparison CSV says why a row is not
like-for-like, a missing figure or an empty folder is said plainly, a named slice outside its
volume is refused, duplicate runs that disagree are noted, long names break with a hyphen,
and the caption of oblique (cardiac) slices says what is shown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fsmis_bench._registry import PluginError  # noqa: E402
from fsmis_bench.data.base import Volume  # noqa: E402
from fsmis_bench.errors import DataError, FsmisError  # noqa: E402
from fsmis_bench.reporting import figures, style, write_report  # noqa: E402
from fsmis_bench.reporting.collect import load_results  # noqa: E402
from fsmis_bench.reporting.comparison import comparison_frame  # noqa: E402
from fsmis_bench.reporting.qualitative import (  # noqa: E402
    display_orientation,
    qualitative_caption,
    qualitative_figure,
    write_qualitative,
)
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run  # noqa: E402
from fsmis_bench.reporting.tables import main_table, published_gap  # noqa: E402

ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")
DATASET = SyntheticDataset("abd_mri", ORGANS, n_cases=20, shape=(6, 24, 24))


def _write(root: Path, method: str, fold: int, score: float, *, predictions: bool = True, **options) -> Path:
    queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
    cases, masks = [], {}
    for organ in ORGANS:
        for case in queries:
            cases.append((organ, case, *counts_for_dice(score)))
            truth = DATASET.load(case).label == DATASET.label_map[organ]
            slices = np.flatnonzero(truth.any(axis=(1, 2)))
            masks[(organ, case)] = (slices, truth[slices])
    return write_run(root, method, "abd_mri", 1, fold, 0, cases, predictions=masks if predictions else None, **options)


@pytest.fixture(scope="module")
def one_fold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prototype on fold 0 with predictions: no published counterpart."""
    root = tmp_path_factory.mktemp("one_fold")
    _write(root, "prototype", 0, 0.5)
    return root


# -- finding 3: a bug in loading is not "data not available" ---------------------------------

@pytest.mark.parametrize("error", [NameError("name 'field' is not defined"), PluginError("abd_mri failed to build")])
def test_a_bug_while_loading_the_dataset_surfaces(one_fold: Path, tmp_path: Path, error: Exception) -> None:
    def loader(name: str):
        raise error

    with pytest.raises(type(error)):
        write_qualitative(load_results(one_fold), tmp_path, loader, log=lambda _: None)


@pytest.mark.parametrize("error", [DataError("no data root"), FileNotFoundError(2, "No such file", "image_1.nii.gz")])
def test_missing_data_skips_the_figure_with_a_note(one_fold: Path, tmp_path: Path, error: Exception) -> None:
    def loader(name: str):
        raise error

    notes: list[str] = []
    assert write_qualitative(load_results(one_fold), tmp_path, loader, log=notes.append) == {}
    assert "data not available" in notes[-1]


# -- finding 4: the qualitative figure, footer included, fits the page -----------------------

@pytest.fixture(scope="module")
def many_marked(tmp_path_factory: pytest.TempPathFactory):
    """Five methods with predictions, four of them with random weights and a reduced budget:
    five rows and a long footer."""
    root = tmp_path_factory.mktemp("many_marked")
    recipe = {"backbone": "tiny", "random_weights": True,
              "non_standard": ["method.lr=0.001", "train.image_size=64", "train.steps=30"]}
    for method in ("sdfsmis", "sdfsmis_sii", "diffews", "sdfsmis_qe"):
        _write(root, method, 0, 0.3, **recipe)
    _write(root, "prototype", 0, 0.5)
    return load_results(root)


@pytest.mark.parametrize(("width", "slices", "zoom"), [
    (style.SINGLE_COLUMN_IN, [(None, "liver", "1", 3)], False),  # one column, five tall rows (was 10.72 in)
    (style.SINGLE_COLUMN_IN, [], True),
    (style.DOUBLE_COLUMN_IN, [], True),  # was 10.05 in
])
def test_the_whole_qualitative_figure_fits_the_page(many_marked, width: float, slices: list, zoom: bool) -> None:
    fig = qualitative_figure(many_marked, "abd_mri", 1, DATASET, slices, width=width, zoom=zoom)
    assert fig.get_size_inches()[1] <= style.MAX_HEIGHT_IN + 1e-9
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "trained from scratch" in texts  # the footnotes are in it, not left out
    with style.paper_style():
        assert style.text_problems(fig) == []
    plt.close(fig)


# -- finding 6: the comparison CSV says why a row is not like-for-like -----------------------

def test_the_comparison_caveat_names_random_weights_budget_and_folds(tmp_path: Path) -> None:
    _write(tmp_path, "sdfsmis", 0, 0.5, predictions=False, backbone="tiny", random_weights=True,
           non_standard=["train.steps=30"])
    for fold in range(5):
        _write(tmp_path, "adnet", fold, 0.7, predictions=False)
    results = load_results(tmp_path)
    frame = comparison_frame(results)
    sdfsmis = frame[(frame["method"] == "sdfsmis") & (frame["organ"] == "mean")].iloc[0]
    assert sdfsmis["published"] == 83.16
    for words in ("random weights: the tiny CPU backbone", "non-standard: train.steps=30", "1 of 5 folds"):
        assert words in sdfsmis["caveat"]
    assert (frame.loc[frame["method"] == "adnet", "caveat"] == "").all()  # like-for-like: nothing to say
    gap = published_gap(main_table(results)).set_index("published_as")
    assert "train.steps=30" in gap.loc["SD-FSMIS", "caveat"] and gap.loc["ADNet", "caveat"] == ""


# -- finding 7: what is not there is said -----------------------------------------------------

def test_a_report_without_published_counterparts_says_so(one_fold: Path, tmp_path: Path) -> None:
    logged: list[str] = []
    out = write_report(one_fold, tmp_path / "out", dataset_loader=lambda name: DATASET, n_boot=20,
                       log=logged.append)
    assert not (out / "figures" / "published_comparison.png").exists()
    assert not (out / "tables" / "published_comparison.csv").exists()
    assert any("published_comparison figure and table not written" in line for line in logged)
    assert "published_comparison figure and table not written" in (out / "report.html").read_text(encoding="utf-8")


def test_an_empty_results_folder_says_so_first(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    logged: list[str] = []
    out = write_report(tmp_path / "results", tmp_path / "out", dataset_loader=lambda name: DATASET, n_boot=20,
                       log=logged.append)
    assert logged and logged[0].startswith(f"note: no finished runs under {tmp_path / 'results'}")
    assert not any("qualitative" in line or "published_comparison" in line for line in logged)
    assert "No finished runs under" in (out / "report.html").read_text(encoding="utf-8")


def test_a_slice_outside_its_volume_is_refused_like_a_typo(one_fold: Path, tmp_path: Path) -> None:
    """A case typo was refused (rc=2) while an out-of-range slice dropped the dataset's whole
    figure with a note: both are refused now, every problem in one message, nothing written."""
    with pytest.raises(FsmisError) as info:
        write_report(one_fold, tmp_path / "out", dataset_loader=lambda name: DATASET, n_boot=20,
                     slices="liver:1:999,spleen:1:2,spleen:1:6", log=lambda _: None)
    message = str(info.value)
    assert "liver:1:999: case 1 of Abd-MRI has slices 0-5" in message and "spleen:1:6" in message
    assert "spleen:1:2" not in message  # inside: not a problem
    assert not (tmp_path / "out").exists()


def _copy_run(run: Path, name: str, finished_at: str, dice_from: str | None = None, dice_to: str | None = None,
              config_hash: str | None = None) -> Path:
    copy = run.with_name(name)
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["finished_at"] = finished_at
    if config_hash is not None:
        info["config_hash"] = config_hash
    (copy / "run.json").write_text(json.dumps(info))
    if dice_from is not None:
        (copy / "cases.csv").write_text((copy / "cases.csv").read_text().replace(dice_from, dice_to))
    return copy


def test_duplicate_runs_that_disagree_are_noted(tmp_path: Path) -> None:
    run = write_run(tmp_path, "adnet", "abd_mri", 1, 0, 0, [("liver", "1", 25, 25, 25)])
    later = _copy_run(run, "seed0-ffffffff", "2026-02-01T00:00:00", ",0.5,25,25,25", ",0.7,35,15,15",
                      config_hash="ffffffff")
    (note,) = [n for n in load_results(tmp_path).notes if "superseded" in n]
    assert str(run) in note and f"kept {later}" in note
    assert "their Dice differ (mean over cases.csv 0.5000 superseded, 0.7000 kept)" in note
    assert not any("folder name" in n for n in load_results(tmp_path).notes)


def test_a_folder_name_that_is_not_its_config_hash_is_noted(tmp_path: Path) -> None:
    run = write_run(tmp_path, "adnet", "abd_mri", 1, 0, 0, [("liver", "1", 25, 25, 25)])
    copy = _copy_run(run, "seed0-deadbeef", "2026-02-01T00:00:00")  # copied, same numbers
    notes = load_results(tmp_path).notes
    assert any(f"{copy}: the folder name's hash deadbeef is not its run.json config_hash" in n for n in notes)
    assert not any("Dice differ" in n for n in notes)


# -- finding 8: long names break at words or with a hyphen; oblique slices captioned ---------

def _unwrapped(wrapped: str) -> list[str]:
    """The words of a wrapped text, hyphenated breaks joined again: a word broken without a
    hyphen comes back as two words."""
    return "".join(line[:-1] if line.endswith("-") else line + " " for line in wrapped.split("\n")).split()


def test_a_word_too_long_for_its_line_breaks_with_a_hyphen() -> None:
    text = "Liver parenchyma including vessels"
    wrapped = style.wrap(text, 0.6)
    assert all(style.text_width_in(line) <= 0.6 for line in wrapped.split("\n"))
    assert "-\n" in wrapped and _unwrapped(wrapped) == text.split()
    assert style.wrap("Support copy baseline", 0.6) == "Support\ncopy\nbaseline"  # words that fit stay whole


def test_long_organ_names_on_the_axis_are_hyphenated(many_marked) -> None:
    with style.renamed({"liver": "Liver parenchyma including vessels"}):
        fig = figures.organ_dice_figure(many_marked, width=style.SINGLE_COLUMN_IN)
    (ax,) = [ax for ax in fig.get_axes() if ax.get_visible() and ax.patches]
    label = next(t.get_text() for t in ax.get_xticklabels() if t.get_text().startswith("Liver"))
    assert _unwrapped(label) == ["Liver", "parenchyma", "including", "vessels"], label  # was "parenchym" / "a"
    plt.close(fig)


#: a cardiac short-axis affine of the CMR release (z, y, x order; cf. test_report_style.CASES)
SHORT_AXIS = np.array([[4.72, -0.633, -0.785, 0], [-5.394, 0.145, -0.911, 0], [3.531, 1.068, -0.342, 0], [0, 0, 0, 1]])


class _ObliqueDataset(SyntheticDataset):
    def load(self, case_id: str) -> Volume:
        volume = super().load(case_id)
        return Volume(volume.case_id, volume.image, volume.label, affine=SHORT_AXIS)


def test_oblique_slices_are_not_captioned_as_radiological(tmp_path: Path) -> None:
    assert display_orientation(SHORT_AXIS).oblique
    axial = np.array([[0, 0, -1.25, 0], [0, 1.25, 0, 0], [7.7, 0, 0, 0], [0, 0, 0, 1]])  # CHAOS, LAS
    assert not display_orientation(axial).oblique
    _write(tmp_path / "results", "prototype", 0, 0.5)
    results = load_results(tmp_path / "results")
    dataset = _ObliqueDataset("abd_mri", ORGANS, n_cases=20, shape=(6, 24, 24))
    orientations: dict = {}
    written = write_qualitative(results, tmp_path / "figures", lambda name: dataset, log=lambda _: None,
                                orientations=orientations)
    caption = qualitative_caption(results, "qualitative_abd_mri", orientations=orientations["qualitative_abd_mri"])
    assert written and "oblique" in caption and "nearest standard plane" in caption
    plane = orientations["qualitative_abd_mri"][0].plane
    assert plane in caption and "radiological orientation (patient's right" not in caption
    if plane == "sagittal":
        assert "anterior on the viewer's left" in caption and "patient's right on the viewer's left" not in caption


def test_a_finished_run_without_its_record_is_named_not_skipped_silently(tmp_path):
    from fsmis_bench.reporting.collect import load_results
    from fsmis_bench.reporting.synthetic import write_run

    root = tmp_path / "results"
    kept = write_run(root, "prototype", "abd_mri", 1, 0, 0, [("liver", "1", 80, 20, 20)])
    lost = write_run(root, "prototype", "abd_mri", 1, 1, 0, [("liver", "8", 80, 20, 20)])
    (lost / "run.json").unlink()
    results = load_results(root)
    assert list(results.runs["run_dir"]) == [str(kept)]
    assert any(f"skipped {lost}: finished, but its run.json is missing" in note for note in results.notes)
