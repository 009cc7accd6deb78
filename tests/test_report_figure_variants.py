"""Figures: variants of a method stay apart in greyscale, random weights are described as
what they are, each method's loss has its own axis, the qualitative grid transposes when
that gives larger panels."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from fsmis_bench.reporting import figures, style  # noqa: E402
from fsmis_bench.reporting.collect import load_results  # noqa: E402
from fsmis_bench.reporting.comparison import published_comparison_figure  # noqa: E402
from fsmis_bench.reporting.qualitative import qualitative_figure  # noqa: E402
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run  # noqa: E402

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen", "left_kidney", "right_kidney"), n_cases=20,
                           shape=(6, 24, 24))
LOG = pd.DataFrame({"step": [0, 10, 20, 30], "loss": [1.0, 0.8, 0.7, 0.6], "lr": 1e-4, "elapsed_s": [0, 1, 2, 3]})


def _write(root: Path, method: str, fold: int, score: float, *, predictions: bool = False, **options) -> Path:
    queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
    cases, masks = [], {}
    for organ in DATASET.label_map:
        for case in queries:
            cases.append((organ, case, *counts_for_dice(score)))
            if predictions:
                truth = DATASET.load(case).label == DATASET.label_map[organ]
                slices = np.flatnonzero(truth.any(axis=(1, 2)))
                masks[(organ, case)] = (slices, truth[slices])
    return write_run(root, method, "abd_mri", 1, fold, 0, cases, train_log=options.pop("train_log", LOG),
                     predictions=masks or None, **options)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory):
    """Prototype plain and with pooled Dice (the auditor's near-identical pair), SD-FSMIS on
    SD-1.5 and on the tiny backbone, DiffewS with pretrained=false."""
    root = tmp_path_factory.mktemp("variants")
    for fold in (0, 1):
        _write(root, "prototype", fold, 0.5)
        _write(root, "prototype", fold, 0.55, dice="pooled", non_standard=["dice=pooled"])
        _write(root, "sdfsmis", fold, 0.7, backbone="sd15")
        _write(root, "sdfsmis", fold, 0.3, backbone="tiny", random_weights=True)
        _write(root, "diffews", fold, 0.2, backbone="sd21", random_weights=True)
    return load_results(root)


def _all_text(fig: plt.Figure) -> str:
    """Every text of the figure (subfigures included), wrapped lines joined."""
    return " ".join(" ".join(t.get_text().split()) for t in fig.findobj(Text))


def _legend(fig: plt.Figure) -> dict[str, object]:
    """Legend label (without footnote marks) -> its handle."""
    out = {}
    for legend in fig.findobj(Legend):
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            out[text.get_text().split("\u00a0")[0].replace("\n", " ")] = handle
    return out


# -- 8a: variants of one method -------------------------------------------------------------

@pytest.mark.parametrize("name", ["organ_dice", "published_comparison"])
def test_variants_of_a_method_have_different_hatches(variants, name: str) -> None:
    fig = figures.organ_dice_figure(variants) if name == "organ_dice" else published_comparison_figure(variants)
    legend = _legend(fig)
    plain, pooled = legend["Prototype"], legend["Prototype [dice=pooled]"]
    assert isinstance(plain, Rectangle) and not plain.get_hatch() and pooled.get_hatch()
    # one colour per method: the variants differ by their hatch alone (it also survives greyscale)
    assert np.allclose(plain.get_facecolor()[:3], pooled.get_facecolor()[:3])
    assert legend["SD-FSMIS [SD-1.5]"].get_hatch() != legend["SD-FSMIS [tiny]"].get_hatch()
    bars = [p for ax in fig.get_axes() for p in ax.patches if isinstance(p, Rectangle) and p.get_height() > 0]
    hatches = {p.get_hatch() for p in bars if np.allclose(p.get_facecolor()[:3], style.method_colour("prototype"))}
    assert hatches == {None, pooled.get_hatch()}  # the bars are hatched as their legend entries
    plt.close(fig)


def test_many_variants_of_a_method_are_all_drawn_apart(tmp_path: Path) -> None:
    """A sweep over the support position gives one method ten variants: the seventh used to
    wrap round to the plain pattern, so a non-standard row looked like the standard one."""
    root = tmp_path / "results"
    _write(root, "support_copy", 0, 0.5)
    for k in range(10):
        _write(root, "support_copy", 0, 0.4 + k / 100, non_standard=[f"supp_idx={k}"])
    fig = figures.organ_dice_figure(load_results(root))
    legend = {label: handle for label, handle in _legend(fig).items() if label.startswith("Support copy")}
    assert len(legend) == 11
    hatches = [handle.get_hatch() or "" for handle in legend.values()]
    # what each hatch draws (`xxxx` and `////` overlaid with `\\\\` draw alike): all apart
    assert len({figures.hatch_lines(h) for h in hatches}) == 11 and hatches.count("") == 1
    assert not legend["Support copy"].get_hatch()  # the standard row alone is plain
    plt.close(fig)
    patterns = [figures.variant_pattern(index) for index in range(37)]
    assert len({figures.hatch_lines(pattern[0]) for pattern in patterns[:19]}) == 19  # plain, 6 single, 12 pairs
    assert len({(pattern[1], str(pattern[2])) for pattern in patterns}) == 37  # markers with line styles


def test_variants_of_a_method_have_different_point_markers(variants) -> None:
    fig = figures.volume_distribution_figure(variants)
    legend = _legend(fig)
    assert legend["Prototype"].get_marker() != legend["Prototype [dice=pooled]"].get_marker()
    panel = fig.get_axes()[0]
    shapes = {line.get_marker() for line in panel.get_lines() if line.get_linestyle() == "None"}
    assert {legend["Prototype"].get_marker(), legend["Prototype [dice=pooled]"].get_marker()} <= shapes
    plt.close(fig)


# -- 8b: what "random weights" means, per case ----------------------------------------------

def test_random_weights_footnotes_say_which_kind(variants) -> None:
    fig = figures.organ_dice_figure(variants)
    text = _all_text(fig)
    assert "trained from scratch: the tiny CPU backbone" in text  # SD-FSMIS [tiny]
    assert "random weights (pretrained=false): the pretrained architecture, randomly initialised" in text  # DiffewS
    plt.close(fig)


def test_tiny_backbone_is_not_called_the_pretrained_architecture(tmp_path: Path) -> None:
    for fold in (0, 1):
        run = _write(tmp_path, "sdfsmis", fold, 0.3, backbone="tiny")  # pretrained=true: the U-Net is still random
        info = json.loads((run / "run.json").read_text())
        info.update(random_weights=True, pretrained=True, non_standard=["random_weights"])
        (run / "run.json").write_text(json.dumps(info))
    results = load_results(tmp_path)
    fig = figures.organ_dice_figure(results)
    text = _all_text(fig)
    assert "tiny CPU backbone" in text and "pretrained architecture, randomly initialised" not in text
    plt.close(fig)


# -- 8c: one loss axis per method -------------------------------------------------------------

def test_training_losses_of_different_methods_never_share_an_axis(variants) -> None:
    fig = figures.train_loss_figure(variants)
    panels = [ax for ax in fig.get_axes() if ax.get_visible() and ax.get_lines()]
    titles = [ax.get_title().replace("\n", " ") for ax in panels]
    assert len(panels) == 3 and [t.split(" · ")[0] for t in titles] == ["SD-FSMIS", "DiffewS", "Prototype"]
    for ax in panels:  # one method per panel: all its lines share the method's hue
        hues = {round(float(matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(line.get_color()))[0]), 1)
                for line in ax.get_lines()}
        assert len(hues) == 1
    prototype = panels[2]
    assert len({line.get_linestyle() for line in prototype.get_lines()}) == 2  # the two variants: two dash styles
    plt.close(fig)


# -- 8d: the qualitative grid transposes when that gives larger panels ----------------------

def _grid(fig: plt.Figure) -> tuple[int, int, float]:
    panels = [ax for ax in fig.get_axes() if ax.images]
    xs = {round(ax.get_position().x0, 3) for ax in panels}
    ys = {round(ax.get_position().y0, 3) for ax in panels}
    width_in = panels[0].get_position().width * fig.get_size_inches()[0]
    return len(ys), len(xs), width_in


def test_qualitative_transposes_when_that_gives_larger_panels(tmp_path: Path) -> None:
    _write(tmp_path / "one", "adnet", 0, 0.6, predictions=True)
    fig = qualitative_figure(load_results(tmp_path / "one"), "abd_mri", 1, DATASET)
    rows, cols, size = _grid(fig)
    # ground truth + one method, four organs: 4 x 2 panels are larger than 2 x 4
    assert (rows, cols) == (4, 2) and size > 1.5
    plt.close(fig)
    for method in ("adnet", "ssl_alpnet", "qnet", "prototype", "support_copy"):
        _write(tmp_path / "many", method, 0, 0.6, predictions=True)
    fig = qualitative_figure(load_results(tmp_path / "many"), "abd_mri", 1, DATASET)
    rows, cols, _ = _grid(fig)
    assert (rows, cols) == (6, 4)  # methods as rows: the transpose's panels would be smaller
    plt.close(fig)
