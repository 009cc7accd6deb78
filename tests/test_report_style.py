"""Publication style: no overlapping text, stable colours, names, footnotes, honest statistics,
radiological orientation, the measured-vs-published comparison."""

from __future__ import annotations

import colorsys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402

from fsmis_bench import plugins  # noqa: E402
from fsmis_bench.errors import FsmisError  # noqa: E402
from fsmis_bench.plugins import Display, hookimpl  # noqa: E402
from fsmis_bench.reporting import figures, style  # noqa: E402
from fsmis_bench.reporting.collect import load_results  # noqa: E402
from fsmis_bench.reporting.commands import _parse_names  # noqa: E402
from fsmis_bench.reporting.comparison import comparison_frame, published_values  # noqa: E402
from fsmis_bench.reporting.qualitative import (  # noqa: E402
    RecordedDatasetLoader,
    crop_box,
    display_orientation,
    qualitative_figure,
    write_qualitative,
)
from fsmis_bench.reporting.synthetic import (  # noqa: E402
    LONG_DATASET,
    LONG_PLUGIN_METHOD,
    SyntheticDataset,
    counts_for_dice,
    make_long_name_results,
    write_run,
)

WIDTHS = [style.DOUBLE_COLUMN_IN, style.SINGLE_COLUMN_IN]


@pytest.fixture(scope="module")
def long_names(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("long_names")
    datasets = make_long_name_results(root)
    return load_results(root), datasets


# -- the overlap detector -------------------------------------------------------------

def test_overlap_detector_sees_overlaps_and_cut_off_text() -> None:
    fig = plt.figure(figsize=(3, 2))
    fig.text(0.1, 0.5, "first label")
    fig.text(0.15, 0.5, "second label")  # on top of the first
    fig.text(0.1, 0.1, "alone")
    fig.text(0.9, 0.9, "sticks out of the figure")
    problems = style.text_problems(fig)
    assert "overlap: 'first label' and 'second label'" in problems
    assert "outside the figure: 'sticks out of the figure'" in problems
    assert not any("alone" in p for p in problems)
    plt.close(fig)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(figures.FIGURES))
def test_no_text_overlaps_in_figures_with_long_names(long_names, name: str, width: float) -> None:
    results, _ = long_names
    fig = figures.FIGURES[name](results, width=width)
    assert fig is not None
    assert fig.get_size_inches()[0] == pytest.approx(width)
    with style.paper_style():
        assert style.text_problems(fig) == []
    plt.close(fig)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("train,test", [("abd_mri", "abd_mri"), (LONG_DATASET, LONG_DATASET), (LONG_DATASET, "abd_mri")])
def test_no_text_overlaps_in_qualitative_figures(long_names, train: str, test: str, width: float) -> None:
    results, datasets = long_names
    fig = qualitative_figure(results, test, 1, datasets[test], train_dataset=train, width=width, zoom=width < 5)
    assert fig is not None
    assert fig.get_size_inches()[0] == pytest.approx(width)
    with style.paper_style():
        assert style.text_problems(fig) == []
    texts = " ".join(t.get_text() for t in fig.texts)
    assert "Ground" in texts  # the ground-truth row or column
    assert ("¹" in texts) == (test == train == "abd_mri")  # only there are runs incomplete
    plt.close(fig)


# -- colours --------------------------------------------------------------------------

def _legend_colours(fig: plt.Figure) -> dict[str, tuple]:
    """Legend entry (without its footnote marks) -> the colour of its handle."""
    colours = {}
    for legend in fig.findobj(Legend):
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            label = text.get_text().split("\u00a0")[0].replace("\n", " ")
            colour = handle.get_facecolor() if hasattr(handle, "get_facecolor") and not isinstance(
                handle, matplotlib.lines.Line2D) else handle.get_color()
            colours[label] = tuple(round(c, 4) for c in to_rgb(colour))
    return colours


def _one_report(root: Path, methods: list[tuple[str, dict]]) -> dict[str, dict[str, tuple]]:
    """Records of ``methods`` (name, write_run options); figure -> legend colours."""
    dataset = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(6, 24, 24))
    for i, (method, options) in enumerate(methods):
        for setting in (1, 2):
            for fold in range(2):
                queries = [c for k, c in enumerate(dataset.fold_cases(fold)) if k != 2]
                cases = [(o, c, *counts_for_dice(0.3 + 0.1 * i)) for o in ("liver", "spleen") for c in queries]
                log = pd.DataFrame({"step": [0, 10, 20], "loss": [1.0, 0.8, 0.6], "lr": 1e-4, "elapsed_s": [0, 1, 2]})
                write_run(root, method, "abd_mri", setting, fold, 0, cases, train_log=log, **options)
    results = load_results(root)
    out = {}
    for name, build in figures.FIGURES.items():
        fig = build(results)
        if fig is not None:
            out[name] = _legend_colours(fig)
            plt.close(fig)
    return out


def test_colours_are_identical_across_reports_with_different_methods(tmp_path: Path) -> None:
    first = _one_report(tmp_path / "a", [
        ("support_copy", {}), ("sdfsmis", {"backbone": "sd15"}), (LONG_PLUGIN_METHOD, {}),
    ])
    second = _one_report(tmp_path / "b", [  # other methods, another order, a variant, an ablation
        ("adnet", {}), (LONG_PLUGIN_METHOD, {}), ("sdfsmis_qe", {"backbone": "sd15"}), ("prototype", {}),
        ("sdfsmis", {"backbone": "sd15"}), ("sdfsmis", {"backbone": "tiny", "random_weights": True}),
        ("support_copy", {}),
    ])
    shared = {"Support copy", "SD-FSMIS [SD-1.5]", LONG_PLUGIN_METHOD}
    for name in ("organ_dice", "volume_distribution", "train_loss", "published_comparison"):
        a, b = first[name], second[name]
        assert shared <= set(a) and shared <= set(b), name
        for label in shared:
            assert a[label] == b[label], (name, label)
    # and the same colour in every figure of a report
    for label in shared:
        assert len({colours[label] for colours in [*first.values(), *second.values()] if label in colours}) == 1
    assert second["organ_dice"]["SD-FSMIS [SD-1.5]"] == tuple(round(c, 4) for c in style.method_colour("sdfsmis"))
    assert second["organ_dice"]["SD-FSMIS (SII+QE) [SD-1.5]"] != second["organ_dice"]["SD-FSMIS [SD-1.5]"]
    # a variant (random weights, another backbone) has its method's colour
    assert second["organ_dice"]["SD-FSMIS [tiny]"] == second["organ_dice"]["SD-FSMIS [SD-1.5]"]


def _hls(colour) -> tuple[float, float, float]:
    return colorsys.rgb_to_hls(*to_rgb(colour))


def test_palette_families_and_shades() -> None:
    # built-ins: the fixed, colourblind-safe table
    for method, colour in style.METHOD_COLOURS.items():
        assert style.method_colour(method) == pytest.approx(to_rgb(colour))
    for method in ("ssl_alpnet", "adnet", "qnet"):  # the classic methods have their own colours too
        assert style.method_style(method).colour == style.METHOD_COLOURS[method]
    assert len(set(style.METHOD_COLOURS.values())) == len(style.METHOD_COLOURS)
    # ablations: the family's hue, lighter with fewer components, in steps that stay apart
    base = _hls(style.method_colour("sdfsmis"))
    lightness = [_hls(style.method_colour(m))[1] for m in ("sdfsmis", "sdfsmis_qe", "sdfsmis_vtct", "sdfsmis_sii")]
    assert lightness == sorted(lightness) and min(b - a for a, b in zip(lightness, lightness[1:])) > 0.05
    assert _hls(style.method_colour("sdfsmis_sii"))[0] == pytest.approx(base[0], abs=0.02)
    assert lightness[-1] < 0.9  # the palest member is still a colour on white
    # unknown plugins: stable, from the extra colours
    colour = style.method_colour(LONG_PLUGIN_METHOD)
    assert colour == style.method_colour(LONG_PLUGIN_METHOD)
    assert any(colour == pytest.approx(to_rgb(c)) for c in style.EXTRA_COLOURS)


# -- names and footnotes --------------------------------------------------------------

class _Plugin:
    @hookimpl
    def fsmis_register_methods(self, registry) -> None:
        registry.register("window_plugin", object, description="test",
                          display=Display(name="Intensity window", colour="#123456", published_names=("PANet",)))

    @hookimpl
    def fsmis_register_datasets(self, registry) -> None:
        registry.register("my_scans", object, description="test",
                          display=Display(name="My scans", organ_names={"ivc": "Inferior vena cava"}))


@pytest.fixture
def plugin():
    plugins.register_plugin(_Plugin(), "display_test")
    yield
    plugins.unregister_plugin("display_test")


def test_every_organ_of_the_vocabulary_has_a_display_name() -> None:
    from fsmis_bench.data.base import ORGANS

    assert set(ORGANS) <= set(style.ORGAN_NAMES)


@pytest.mark.parametrize("method,variant,label", [
    ("sdfsmis", "", "SD-FSMIS"),
    ("sdfsmis", "sd15", "SD-FSMIS [SD-1.5]"),
    ("sdfsmis_qe", "tiny,random_weights", "SD-FSMIS (SII+QE) [tiny]"),
    ("diffews", "sd21,fidelity=code", "DiffewS [SD-2.1, code fidelity]"),
    ("support_copy", "dice=pooled", "Support copy [dice=pooled]"),
    ("ssl_alpnet", "", "SSL-ALPNet"),
    ("somebody_elses", "", "somebody_elses"),
])
def test_method_labels(method: str, variant: str, label: str) -> None:
    assert style.method_label(method, variant) == label


def test_plugins_bring_their_own_display(plugin) -> None:
    assert style.method_label("window_plugin") == "Intensity window"
    assert style.method_colour("window_plugin") == pytest.approx(to_rgb("#123456"))
    assert style.method_style("window_plugin").published_names == ("PANet",)
    assert style.dataset_display("my_scans") == "My scans"
    assert style.organ_display("ivc") == "IVC"  # the built-in name wins for the shared vocabulary
    with style.renamed({"my_scans": "Hospital B", "window_plugin": "IW"}):
        assert style.dataset_display("my_scans") == "Hospital B" and style.method_label("window_plugin") == "IW"
    assert style.dataset_display("my_scans") == "My scans"
    assert style.dataset_display("nifti_folder") == "NIfTI folder"


class _BadColourPlugin:
    @hookimpl
    def fsmis_register_methods(self, registry) -> None:
        registry.register("bluish_plugin", object, description="test", display=Display(colour="bluish"))


def test_a_colour_matplotlib_cannot_draw_is_named_once_and_replaced() -> None:
    from fsmis_bench.errors import DataWarning

    plugins.register_plugin(_BadColourPlugin(), "bad_colour_test")
    try:
        with pytest.warns(DataWarning, match=r"method 'bluish_plugin' \(plugin 'bad_colour_test'\) registers the "
                                             r"colour 'bluish', which matplotlib cannot draw"):
            colour = style.method_colour("bluish_plugin")
        assert any(colour == pytest.approx(to_rgb(c)) for c in style.EXTRA_COLOURS)  # the palette's
    finally:
        plugins.unregister_plugin("bad_colour_test")


def test_plugins_that_cannot_be_loaded_are_said_once(monkeypatch) -> None:
    from fsmis_bench.errors import DataWarning
    from fsmis_bench.plugins import PluginError

    def broken():
        raise PluginError("plugin 'audit' of fsmis-audit 0.1.0 failed to load")

    monkeypatch.setattr(plugins, "registries", broken)
    with pytest.warns(DataWarning, match="without display names or colours, because the plugins cannot be loaded: "
                                         "plugin 'audit' of fsmis-audit 0.1.0 failed to load"):
        assert style.method_label("prototype") == "prototype"


class _TypoPlugin:
    @hookimpl
    def fsmis_register_methods(self, registry) -> None:
        registry.register("typo_plugin", object, description="test", display=Display(published_names=("PANNet",)))


def test_a_published_name_no_published_row_has_is_said() -> None:
    from fsmis_bench.errors import DataWarning

    plugins.register_plugin(_TypoPlugin(), "typo_test")
    try:
        with pytest.warns(DataWarning, match=r"method 'typo_plugin' names 'PANNet' in its Display\(published_names="
                                             r"\.\.\.\), but the published tables hold no method of that name, .*"
                                             r"\(did you mean 'PANet'\?\)"):
            assert published_values("typo_plugin", "none", "abd_mri", "abd_mri", 1) == {}
    finally:
        plugins.unregister_plugin("typo_test")


def test_footnotes_are_numbered_and_never_split_from_the_name() -> None:
    notes = style.Footnotes()
    first = notes.mark("SD-FSMIS [tiny]", ["random weights", "incomplete"])
    second = notes.mark("DiffewS", ["incomplete"])
    assert first == "SD-FSMIS [tiny]\u00a0¹\u202f²" and second == "DiffewS\u00a0²"
    assert notes.lines() == ["¹ random weights", "² incomplete"]
    assert notes.mark("Support copy", []) == "Support copy"
    wrapped = style.wrap(first, 1.0)
    assert wrapped.split("\n")[-1].endswith("[tiny]\u00a0¹\u202f²")
    assert all(style.text_width_in(line) <= 1.0 for line in style.wrap(LONG_PLUGIN_METHOD + " and more", 1.0).split("\n"))


def test_rename_option_parsing() -> None:
    assert _parse_names(["nifti_folder=Hospital CT", " a = b "]) == {"nifti_folder": "Hospital CT", "a": "b"}
    with pytest.raises(FsmisError, match="--rename"):
        _parse_names(["no_equals_sign"])


def test_pdf_embeds_truetype_fonts(tmp_path: Path) -> None:
    with style.paper_style():
        fig, ax = plt.subplots(figsize=(style.SINGLE_COLUMN_IN, 1.5))
        ax.set_title("Dice (%) · SD-FSMIS\u00a0¹")
    png = figures.save_figure(fig, tmp_path, "fonts")  # saved outside the style block, as reports do
    pdf = png.with_suffix(".pdf").read_bytes()
    assert b"/FontFile2" in pdf  # TrueType (Type 42) embedded
    assert b"/Subtype /Type3" not in pdf


# -- honest statistics ----------------------------------------------------------------

def test_error_bars_boxes_and_zeros_only_where_the_data_allow(long_names) -> None:
    results, _ = long_names
    fig = figures.organ_dice_figure(results)
    panel = next(ax for ax in fig.get_axes() if ax.get_title() == "Abd-MRI · setting 1")
    # sdfsmis, ssl_alpnet, the plugin: 5 folds; sdfsmis_qe: 2 folds; support_copy: 1 fold -> no error bars
    assert sum(isinstance(c, ErrorbarContainer) for c in panel.containers) == 4 * 4
    zero_markers = [line for line in panel.get_lines() if line.get_marker() == "^"]
    assert len(zero_markers) == 4 and all(line.get_ydata()[0] == 0 and not line.get_clip_on() for line in zero_markers)
    plt.close(fig)

    fig = figures.volume_distribution_figure(results)
    panel = next(ax for ax in fig.get_axes() if ax.get_title() == "Abd-MRI · setting 1")
    boxes = [p for p in panel.patches if type(p).__name__ == "PathPatch"]
    # 4 organs x 4 methods with >= 5 volumes; support_copy (4 volumes of one fold): points only
    assert len(boxes) == 4 * 4
    plt.close(fig)

    caption = figures.caption("organ_dice", results)
    assert "standard deviation across folds" in caption and "at least 2 folds" in caption


def test_one_fold_gets_no_error_bars_and_the_caption_says_so(tmp_path: Path) -> None:
    write_run(tmp_path, "support_copy", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.5))])
    results = load_results(tmp_path)
    fig = figures.organ_dice_figure(results)
    assert not any(isinstance(c, ErrorbarContainer) for ax in fig.get_axes() for c in ax.containers)
    plt.close(fig)
    assert "no error bars" in figures.caption("organ_dice", results)


# -- radiological orientation ---------------------------------------------------------

def _affine(rows, cols, normal) -> np.ndarray:
    """voxel (z, y, x) -> world: columns are the world directions of z, y and x indices."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = normal, rows, cols
    return affine


def _rotation(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


R, A, S = np.eye(3)  # RAS+: +x right, +y anterior, +z superior
CASES = {
    # name: affine, (world direction that must point to the screen's left, ... to its top)
    "axial LAS (CHAOS)": (_affine(A * 1.25, -R * 1.25, S * 7.7), R, A),
    "axial RAS": (_affine(A, R, S), R, A),
    "axial LPS (DICOM)": (_affine(-A, -R, S), R, A),
    "axial, rows along x": (_affine(R, A, S), R, A),
    "coronal": (_affine(-S, R, A), R, S),
    "sagittal": (_affine(S, A, R), A, S),
    "axial, rotated 25 degrees": (_affine(_rotation(25) @ A, _rotation(25) @ -R, S), R, A),
    "oblique cardiac short axis": (_affine(np.array([-0.633, 0.145, 1.068]), np.array([-0.785, -0.911, -0.342]),
                                           np.array([4.72, -5.394, 3.531])), A, S),
}


@pytest.mark.parametrize("name", list(CASES))
def test_radiological_orientation(name: str) -> None:
    affine, screen_left, screen_top = CASES[name]
    orientation = display_orientation(affine)
    assert orientation.plane != "stored"
    # the world position of every pixel of slice 0, then displayed as the figure shows it
    rows, cols = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    world = affine[:3, 1:3] @ np.stack([rows.ravel(), cols.ravel()])
    shown_left = orientation.apply((world.T @ screen_left).reshape(9, 9))
    shown_top = orientation.apply((world.T @ screen_top).reshape(9, 9))
    assert shown_left[:, 0].mean() > shown_left[:, -1].mean()  # further that way on the left than on the right
    assert shown_top[0, :].mean() > shown_top[-1, :].mean()


def test_orientation_without_affine_is_as_stored() -> None:
    orientation = display_orientation(None, spacing=(5.0, 2.0, 1.0))
    image = np.arange(6).reshape(2, 3)
    assert np.array_equal(orientation.apply(image), image) and orientation.aspect == 2.0


def test_crop_box_is_a_square_in_mm_around_the_organ() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:50, 120:140] = True
    rows, cols = crop_box(mask, aspect=2.0)  # rows twice as tall as columns
    assert mask[rows, cols].sum() == mask.sum()
    assert (rows.stop - rows.start) * 2.0 == pytest.approx(cols.stop - cols.start, abs=2)
    assert crop_box(np.zeros((8, 8), bool)) == (slice(0, 8), slice(0, 8))


# -- measured vs published ------------------------------------------------------------

@pytest.mark.parametrize("method,backbone,train,test,setting,table,name", [
    ("sdfsmis", "sd15", "abd_mri", "abd_mri", 1, 1, "SD-FSMIS"),
    ("sdfsmis", "tiny", "abd_mri", "abd_mri", 2, 1, "SD-FSMIS"),  # the paper's default configuration
    ("sdfsmis", "sd21", "abd_ct", "abd_ct", 1, 4, "SD-FSMIS"),  # the paper measured SD-2.1 here
    ("sdfsmis_qe", "sd15", "abd_ct", "abd_ct", 1, 3, "SD-FSMIS (SII+QE)"),
    ("ssl_alpnet", "none", "abd_ct", "abd_mri", 1, 2, "SSL-ALPNet"),
    ("diffews", "sd15", "abd_mri", "abd_ct", 1, 2, "DiffewS"),
    ("qnet", "none", "abd_mri", "abd_mri", 1, 1, "Q-Net"),
])
def test_published_counterparts(method, backbone, train, test, setting, table, name) -> None:
    values = published_values(method, backbone, train, test, setting)
    assert {v.table for v in values.values()} == {table} and {v.name for v in values.values()} == {name}
    assert {"spleen", "liver", "left_kidney", "right_kidney", "mean"} == set(values)


def test_no_counterpart_no_published_value() -> None:
    assert published_values("prototype", "none", "abd_mri", "abd_mri", 1) == {}
    assert published_values("sdfsmis", "sd15", "card_mri", "card_mri", 1) == {}
    assert published_values("qnet", "none", "abd_ct", "abd_ct", 1) == {}  # Q-Net has no Abd-CT number


def test_comparison_frame_and_figure(long_names) -> None:
    results, _ = long_names
    frame = comparison_frame(results)
    row = frame[(frame["method"] == "sdfsmis") & (frame["dataset"] == "abd_mri") & (frame["train_dataset"] == "abd_mri")
                & (frame["setting"] == 1) & (frame["organ"] == "liver")].iloc[0]
    assert row["published"] == pytest.approx(published_values("sdfsmis", "sd15", "abd_mri", "abd_mri", 1)["liver"].dice)
    assert row["difference"] == pytest.approx(row["measured"] - row["published"]) and row["n_folds"] == 5
    assert frame.loc[frame["method"] == LONG_PLUGIN_METHOD, "published"].isna().all()
    fig = figures.FIGURES["published_comparison"](results)
    diamonds = [line for ax in fig.get_axes() for line in ax.get_lines() if line.get_marker() == "D"]
    # sdfsmis and ssl_alpnet, in-domain abd_mri settings 1 and 2, four organs and the mean
    assert len(diamonds) == 2 * 2 * 5
    plt.close(fig)
    caption = figures.caption("published_comparison", results)
    # a method whose figure name is its published name needs no "X = “X”"
    assert "Table 1" in caption and "“SD-FSMIS”" not in caption and "“SSL-ALPNet”" not in caption


# -- custom folders: the test dataset as the run built it -----------------------------

def test_qualitative_rebuilds_a_custom_folder_from_the_run_config(tmp_path: Path) -> None:
    source = SyntheticDataset("mine", ("liver", "spleen"), n_cases=6, shape=(6, 24, 24))
    folder = tmp_path / "scans"
    folder.mkdir()
    for case_id in source.case_ids():
        volume = source.load(case_id)
        for kind, array in (("image", volume.image), ("label", volume.label.astype(np.int16))):
            nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.eye(4)), folder / f"{kind}_{case_id}.nii.gz")
    results_dir = tmp_path / "results"
    fold_cases = ["1", "2", "3", "4", "5"]
    truth = {(organ, c): source.load(c).label == source.label_map[organ] for organ in ("liver", "spleen") for c in fold_cases}
    predictions = {key: (np.flatnonzero(t.any(axis=(1, 2))), t[t.any(axis=(1, 2))]) for key, t in truth.items()}
    run_dir = write_run(results_dir, "support_copy", "nifti_folder", 1, 0, 0,
                        [(o, c, *counts_for_dice(0.9)) for o, c in truth], predictions=predictions)
    # the run's config as `fsmis-bench run` writes it, with the dataset's own options
    (run_dir / "config.yaml").write_text(
        "setting: 1\nfold: 0\ndata_root: null\nprotocol:\n  test_dataset: null\n"
        f"dataset:\n  name: nifti_folder\n  path: {folder}\n  label_map: {{liver: 1, spleen: 2}}\n"
        "  test_organs: null\n  setting2_groups: null\n  supervoxels: null\n  folds: [[0, 1, 2, 3, 4]]\n")
    loader = RecordedDatasetLoader()
    dataset = loader("nifti_folder", run_dir)
    assert dataset.label_map == {"liver": 1, "spleen": 2} and dataset.case_ids() == source.case_ids()
    notes: list[str] = []
    written = write_qualitative(load_results(results_dir), tmp_path / "figures", loader, log=notes.append)
    assert list(written) == ["qualitative_nifti_folder"] and written["qualitative_nifti_folder"].is_file(), notes


def test_cross_domain_test_dataset_comes_from_the_run_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        "data_root: null\nprotocol:\n  test_dataset: phantom\ndataset:\n  name: nifti_folder\n  path: /nowhere\n")
    dataset = RecordedDatasetLoader()("phantom", run_dir)
    assert dataset.name == "phantom"


def test_report_command_width_zoom_and_names(tmp_path: Path) -> None:
    from fsmis_bench.cli import main
    from PIL import Image

    dataset = SyntheticDataset("abd_mri", ("liver",), n_cases=20, shape=(6, 24, 24))
    truth = {c: dataset.load(c).label == 1 for c in ("1", "2", "4", "5")}
    for method in ("support_copy", "sdfsmis"):
        write_run(tmp_path / "results", method, "abd_mri", 1, 0, 0, [("liver", c, *counts_for_dice(0.7)) for c in truth],
                  predictions={("liver", c): (np.flatnonzero(t.any(axis=(1, 2))), t[t.any(axis=(1, 2))])
                               for c, t in truth.items()})
    out = tmp_path / "report"
    assert main(["report", "--results", str(tmp_path / "results"), "--out", str(out), "--n-boot", "20",
                 "--width", "single", "--rename", "support_copy=Copy of the support", "--rename", "liver=Hepar"]) == 0
    with Image.open(out / "figures" / "organ_dice.png") as image:
        assert image.size[0] == 700  # 3.5 in at 200 dpi
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Hepar" in page  # table headers use the display names too
    assert (out / "tables" / "published_comparison.csv").is_file()
    other = tmp_path / "other"
    assert main(["report", "--results", str(tmp_path / "results"), "--out", str(other), "--rename", "oops"]) == 2
    assert not other.exists()  # a bad option writes nothing
