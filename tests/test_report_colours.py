"""A series' colour is its method's colour: never darkened or greyed for a variant or random
weights (which made the CPU example's SD-FSMIS family and DiffewS near-black look-alikes),
never dependent on the report's other runs. Not-like-for-like series are shown by patterns
that survive greyscale instead: hatched bars, hollow markers, dashed lines."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from test_report_figure_variants import _legend  # noqa: E402

from fsmis_bench.reporting import figures, style  # noqa: E402
from fsmis_bench.reporting.collect import load_results  # noqa: E402
from fsmis_bench.reporting.comparison import published_comparison_figure  # noqa: E402
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run  # noqa: E402

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(6, 24, 24))
LOG = pd.DataFrame({"step": [0, 10, 20, 30], "loss": [1.0, 0.8, 0.7, 0.6], "lr": 1e-4, "elapsed_s": [0, 1, 2, 3]})
#: the CPU example's reduced recipe: every diffusion method on the tiny backbone, random
#: weights, fewer steps and smaller images than published (non-standard options); shared by
#: all of them, it moves from the labels to a "runs with" footnote
CPU_RECIPE = {"backbone": "tiny", "random_weights": True, "non_standard": ["train.image_size=64", "train.steps=1500"]}
CPU_NAMES = ("SD-FSMIS", "SD-FSMIS (SII+QE)", "SD-FSMIS (SII+VTCT)", "SD-FSMIS (SII)", "DiffewS")
FAMILY = ("sdfsmis", "sdfsmis_qe", "sdfsmis_vtct", "sdfsmis_sii")  # Display.shade 0..3


def _write(root: Path, method: str, fold: int, score: float, **options) -> Path:
    queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
    cases = [(organ, case, *counts_for_dice(score)) for organ in DATASET.label_map for case in queries]
    return write_run(root, method, "abd_mri", 1, fold, 0, cases, train_log=LOG, **options)


def _luminance(colour) -> float:
    """WCAG relative luminance: what a colour becomes in greyscale print."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in to_rgb(colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a, b) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _colour(handle) -> tuple[float, ...]:
    colour = handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor()
    return tuple(round(c, 4) for c in to_rgb(colour))


# -- finding 1: one colour per method; patterns mark what is not like-for-like ---------------

@pytest.mark.parametrize("method", [*style.METHOD_COLOURS, *FAMILY[1:]])
def test_a_variant_or_random_weights_never_change_the_colour(tmp_path: Path, method: str) -> None:
    _write(tmp_path, method, 0, 0.5, backbone="tiny", random_weights=True, non_standard=["train.steps=30"])
    _write(tmp_path, method, 0, 0.5, dice="pooled", non_standard=["dice=pooled"])
    fig = figures.organ_dice_figure(load_results(tmp_path))
    colours = {_colour(handle) for handle in _legend(fig).values()}
    assert colours == {tuple(round(c, 4) for c in style.method_colour(method))}
    plt.close(fig)


@pytest.fixture(scope="module")
def cpu_example(tmp_path_factory: pytest.TempPathFactory):
    """The CPU example report's methods: the SD-FSMIS family and DiffewS on the reduced recipe,
    Prototype and Support copy standard."""
    root = tmp_path_factory.mktemp("cpu_example")
    for i, method in enumerate((*FAMILY, "diffews")):
        _write(root, method, 0, 0.4 + 0.02 * i, **CPU_RECIPE)
    for fold in (0, 1):
        _write(root, "prototype", fold, 0.45)
        _write(root, "support_copy", fold, 0.48)
    return load_results(root)


def test_the_cpu_example_family_and_diffews_stay_apart_in_colour_and_greyscale(cpu_example) -> None:
    fig = published_comparison_figure(cpu_example)
    legend = _legend(fig)
    handles = [legend[name] for name in (*CPU_NAMES, "Prototype", "Support copy")]
    colours = [_colour(h) for h in handles]
    # the family's hue, never near-black: the full method is the palette's own colour, the
    # ablations lighter in the documented order (fewer components, lighter)
    assert colours[0] == tuple(round(c, 4) for c in to_rgb(style.METHOD_COLOURS["sdfsmis"]))
    lightness = [_luminance(c) for c in colours[:4]]
    assert lightness == sorted(lightness) and min(b / a for a, b in zip(lightness, lightness[1:])) > 1.15
    assert colours[4] == tuple(round(c, 4) for c in to_rgb(style.METHOD_COLOURS["diffews"]))
    # different methods side by side: apart in greyscale (the audit measured 1.2-1.4 between
    # the near-black bars), and every family member is apart from DiffewS
    for a, b in zip(colours, colours[1:]):
        assert _contrast(a, b) >= 1.2, (a, b)
    assert min(_contrast(c, colours[4]) for c in colours[:4]) >= 1.6
    # random weights and a reduced budget: every such bar hatched, the family's each in its
    # own pattern; the standard methods plain
    hatches = [h.get_hatch() for h in handles]
    assert all(hatches[:5]) and len(set(hatches[:4])) == 4 and not any(hatches[5:])
    plt.close(fig)


def test_not_like_for_like_points_are_hollow_and_curves_dashed(cpu_example) -> None:
    fig = figures.volume_distribution_figure(cpu_example)
    legend = _legend(fig)
    diffews, prototype = legend["DiffewS"], legend["Prototype"]
    assert diffews.get_markerfacecolor() == "white" and diffews.get_markeredgecolor() == diffews.get_color()
    assert prototype.get_markerfacecolor() != "white"
    plt.close(fig)
    fig = figures.train_loss_figure(cpu_example)
    styles = {label: handle.get_linestyle() for label, handle in _legend(fig).items()}
    assert styles["Prototype"] == "-" and all(styles[name] != "-" for name in CPU_NAMES)
    plt.close(fig)


# -- finding 2: a run's colour does not depend on the report's other runs --------------------

def _train(steps: int) -> dict:
    return {"train": {"steps": steps, "batch_size": 4, "image_size": 128}}


def test_a_run_keeps_its_colour_when_a_second_configuration_joins_the_report(tmp_path: Path) -> None:
    for fold in (0, 1):
        _write(tmp_path / "alone", "prototype", fold, 0.5, config=_train(100))
        _write(tmp_path / "both", "prototype", fold, 0.5, config=_train(100))
        _write(tmp_path / "both", "prototype", fold, 0.4, config=_train(40))
    alone = figures.organ_dice_figure(load_results(tmp_path / "alone"))
    both = figures.organ_dice_figure(load_results(tmp_path / "both"))
    (colour,) = {_colour(h) for h in _legend(alone).values()}
    legend = _legend(both)
    assert set(legend) == {"Prototype [train.steps=100]", "Prototype [train.steps=40]"}
    assert {_colour(h) for h in legend.values()} == {colour}  # it was dark navy beside its sibling
    assert len({h.get_hatch() for h in legend.values()}) == 2  # the two configurations differ by hatch
    plt.close(alone)
    plt.close(both)
