"""What a report must say of the rows it draws: unequal seeds across folds
are marked, records that differ only in their CPU thread count say so, exclusion=all is
footnoted as the published setting-2 rule, a dataset's own fold count decides completeness,
published_gap states missing folds and published_comparison.csv its table as a whole number,
a lone row is never "best", and the figures fit a page and explain what they draw."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fsmis_bench.reporting import figures, style  # noqa: E402
from fsmis_bench.reporting.collect import (  # noqa: E402
    EXCLUSION_ALL_NOTE,
    N_FOLDS,
    dataset_fold_count,
    load_results,
    long_fold_csv,
    summarise_runs,
)
from fsmis_bench.reporting.comparison import SETTING2_NOTE, comparison_frame, published_comparison_figure  # noqa: E402
from fsmis_bench.reporting.qualitative import qualitative_caption, qualitative_figure  # noqa: E402
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run  # noqa: E402
from fsmis_bench.reporting.tables import cross_domain_table, main_table, published_gap  # noqa: E402

ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")
DATASET = SyntheticDataset("abd_mri", ORGANS, n_cases=20, shape=(6, 24, 24))


def _cases(score: float, fold: int = 0) -> list[tuple[str, str, int, int, int]]:
    queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
    return [(organ, case, *counts_for_dice(score)) for organ in ORGANS for case in queries]


def _texts(fig: plt.Figure) -> str:
    """Every text a figure draws (legends, footnotes, titles), joined."""
    with style.paper_style():
        return "\n".join(text for text, _ in style.rendered_text_boxes(fig))


def _md_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


# -- a seed missing on some folds is flagged ----------------------------------------

@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ADNet on five folds, fold 0 with seeds 0 and 1, the others with seed 0 only; SSL-ALPNet
    on five folds with one seed (evenly seeded, for contrast)."""
    root = tmp_path_factory.mktemp("uneven")
    for fold in range(5):
        write_run(root, "adnet", "abd_mri", 1, fold, 0, _cases(0.7, fold))
        write_run(root, "ssl_alpnet", "abd_mri", 1, fold, 0, _cases(0.6, fold))
    write_run(root, "adnet", "abd_mri", 1, 0, 1, _cases(0.9, 0))
    return root


def test_unequal_seeds_across_folds_are_marked_in_every_table_format(uneven: Path) -> None:
    results = load_results(uneven)
    table = main_table(results, include_published=False)
    markdown, latex, page = table.to_markdown(), table.to_latex(), table.to_html()
    assert _md_row(markdown, "ADNet¶")[4] == "72.00"  # fold 0 (0.8 over two seeds) weighed as each other fold (0.7)
    assert "¶ unequal seeds" in markdown and "ADNet, Abd-MRI setting 1: fold 0: seeds 0,1; folds 1,2,3,4: seed 0" in markdown
    assert "ADNet\\textsuperscript{\\P}" in latex and "folds 1,2,3,4: seed 0" in latex
    assert "ADNet¶" in page and "fold 0: seeds 0,1" in page
    frame = table.to_frame().set_index("key")
    assert frame.loc["adnet", "markers"] == "uneven_seeds" and frame.loc["ssl_alpnet", "markers"] == ""
    csv = long_fold_csv(results)
    assert set(csv.loc[csv["method"] == "adnet", "markers"]) == {"uneven_seeds"}
    assert set(csv.loc[csv["method"] == "ssl_alpnet", "markers"]) == {""}
    # a flagged row does not compete: the lone unmarked row is not "best" either
    assert "**" not in _md_row(markdown, "ADNet¶")[2] and "**" not in _md_row(markdown, "SSL-ALPNet")[2]


def test_unequal_seeds_are_named_per_fold_in_the_runs_section_and_figures(uneven: Path) -> None:
    results = load_results(uneven)
    seeds = summarise_runs(results).set_index("method")["seeds"]
    assert seeds["adnet"] == "fold 0: seeds 0,1; folds 1,2,3,4: seed 0" and seeds["ssl_alpnet"] == "0"
    fig = figures.organ_dice_figure(results)
    texts = _texts(fig).replace("\n", " ")
    plt.close(fig)
    assert "unequal seeds across folds" in texts and "ADNet on Abd-MRI setting 1, fold 0: seeds 0,1" in texts


# -- records that differ only in their CPU thread count ----------------------------

def test_a_record_superseded_by_one_with_another_thread_count_says_so(tmp_path: Path) -> None:
    first = write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, _cases(0.5), inputs={"cpu_threads": 1})
    # the engine's folder hash covers the thread count; the report's identity of a measurement does not
    later = write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, _cases(0.52), inputs={"cpu_threads": 2},
                      config={"train": {"steps": 20}}, finished_at="2026-02-01T00:00:00+00:00")
    (later / "config.yaml").write_text((first / "config.yaml").read_text())  # the same configuration
    results = load_results(tmp_path)
    assert list(results.runs["run_dir"]) == [str(later)]
    (note,) = [n for n in results.notes if "superseded" in n]
    assert "differs only in its CPU thread count" in note
    assert f"{first} (1 CPU thread, not counted; kept {later}, 2 CPU threads)" in note
    assert "nondeterminism" not in note and "as expected from their CPU thread counts" in note


def test_a_row_whose_folds_used_different_thread_counts_is_noted(tmp_path: Path) -> None:
    for fold, threads in ((0, 1), (1, 2), (2, 2)):
        write_run(tmp_path, "prototype", "abd_mri", 1, fold, 0, _cases(0.5, fold), inputs={"cpu_threads": threads})
    write_run(tmp_path, "adnet", "abd_mri", 1, 0, 0, _cases(0.5), inputs={"cpu_threads": 2})
    notes = load_results(tmp_path).notes
    (note,) = [n for n in notes if "CPU thread counts" in n]
    assert note.startswith("prototype, Abd-MRI setting 1: its runs were computed with different CPU thread counts "
                           "(fold 0: 1 CPU thread; folds 1,2: 2 CPU threads)")
    assert len(load_results(tmp_path).runs) == 4  # one row: nothing split, nothing dropped


def test_a_row_whose_folds_ran_different_code_of_the_method_is_noted(tmp_path: Path) -> None:
    """A run is kept when its method's code changes, so a row can mix folds run before and
    after an edit: said with the folds of each version; records that do not say are left out."""
    for fold, code in ((0, "a" * 64), (1, "a" * 64), (2, "b" * 64), (3, None)):
        run_dir = write_run(tmp_path, "prototype", "abd_mri", 1, fold, 0, _cases(0.5, fold))
        if code:
            info = json.loads((run_dir / "run.json").read_text())
            info["code"] = {"method_code_sha256": code}
            (run_dir / "run.json").write_text(json.dumps(info))
    results = load_results(tmp_path)
    (note,) = [n for n in results.notes if "different code of the method" in n]
    assert note.startswith("prototype, Abd-MRI setting 1: its runs ran different code of the method "
                           "(folds 0,1: method code aaaaaaaa; fold 2: method code bbbbbbbb;")
    assert len(results.runs) == 4 and set(results.runs["method_code"]) == {"aaaaaaaa", "bbbbbbbb", ""}


# -- exclusion=all is the published setting-2 rule ---------------------------------

@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ADNet in setting 2, standard and with exclusion=all, five folds each."""
    root = tmp_path_factory.mktemp("legacy")
    for fold in range(5):
        write_run(root, "adnet", "abd_mri", 2, fold, 0, _cases(0.6, fold))
        write_run(root, "adnet", "abd_mri", 2, fold, 0, _cases(0.95, fold), non_standard=["exclusion=all"],
                  config={"protocol": {"episode_sampler": "reference", "exclusion": "all"}})
    return root


def test_exclusion_all_is_footnoted_as_the_published_rule_and_not_ranked(legacy: Path) -> None:
    results = load_results(legacy)
    markdown = main_table(results).to_markdown()
    legend = next(line for line in markdown.splitlines() if line.startswith("‡ "))
    assert EXCLUSION_ALL_NOTE in legend and "not ranked for best and second" in legend
    assert "departure from the setup of the published numbers" not in legend
    row = _md_row(markdown, "ADNet [exclusion=all]‡")
    assert row[2] == "95.00"  # above every published setting-2 value, but not bold
    fig = figures.organ_dice_figure(results)
    texts = _texts(fig)
    plt.close(fig)
    assert "the rule the published setting-2" in texts.replace("\n", " ")
    assert "not comparable with published numbers" not in texts.replace("\n", " ")


# -- the fold count of the evaluated dataset ---------------------------------------

def test_dataset_fold_count_from_the_record() -> None:
    one_fold = {"inputs": {"test_data": {"name": "nifti_folder", "folds": [["1", "2", "3", "5", "8"]]}}}
    assert dataset_fold_count(one_fold) == 1
    assert dataset_fold_count({"inputs": {"test_data": {"name": "x", "n_folds": 3}}}) == 3
    assert dataset_fold_count({"test_dataset": "card_mri"}) == 5  # an old record: the built-in folds
    assert dataset_fold_count({"inputs": {"test_data": {"name": "phantom", "options": {"n_cases": 6}}}}) == 1
    assert dataset_fold_count({"inputs": {"test_data": {"name": "phantom", "options": {}}}}) == 5
    assert dataset_fold_count({"test_dataset": "nifti_folder"}) == N_FOLDS  # folds not recorded: as before


def test_a_one_fold_test_set_is_complete_and_competes(tmp_path: Path) -> None:
    test_data = {"name": "nifti_folder", "path": "/data/my_scans", "folds": [["1", "2", "3", "5", "8"]]}
    for method, score in (("adnet", 0.7), ("ssl_alpnet", 0.6)):
        write_run(tmp_path, method, "nifti_folder", 1, 0, 0, _cases(score), train_dataset="abd_mri",
                  inputs={"test_data": test_data})
    results = load_results(tmp_path)
    table = cross_domain_table(results)
    markdown = table.to_markdown()
    assert "incomplete" not in markdown
    assert _md_row(markdown, "ADNet")[-1] == "**70.00**" and _md_row(markdown, "SSL-ALPNet")[-1] == "<u>60.00</u>"
    assert set(long_fold_csv(results)["markers"]) == {""}
    fig = figures.organ_dice_figure(results)
    texts = _texts(fig)
    plt.close(fig)
    assert "incomplete" not in texts


# -- published_gap says missing folds; the table number is whole ------------------

def test_published_gap_states_missing_folds_as_published_comparison_does(tmp_path: Path) -> None:
    for fold in range(2):
        write_run(tmp_path, "adnet", "abd_mri", 1, fold, 0, _cases(0.7, fold))
    write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, _cases(0.5))  # no published counterpart
    results = load_results(tmp_path)
    gap = published_gap(main_table(results)).set_index("published_as")
    assert "2 of 5 folds" in gap.loc["ADNet", "caveat"]
    frame = comparison_frame(results)
    mean = frame[(frame["method"] == "adnet") & (frame["organ"] == "mean")].iloc[0]
    assert "2 of 5 folds" in mean["caveat"]  # the same words as published_gap


def test_published_comparison_csv_writes_the_table_as_a_whole_number(tmp_path: Path) -> None:
    write_run(tmp_path, "adnet", "abd_mri", 1, 0, 0, _cases(0.7))
    write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, _cases(0.5))  # no published counterpart
    frame = comparison_frame(load_results(tmp_path))
    csv = pd.read_csv(io.StringIO(frame.to_csv(index=False)), dtype=str, keep_default_na=False)
    assert set(csv.loc[csv["method"] == "adnet", "table"]) == {"1"}
    assert set(csv.loc[csv["method"] == "prototype", "table"]) == {""}


# -- no best among fewer than two competing values --------------------------------

def test_a_lone_competing_row_is_not_bold(tmp_path: Path) -> None:
    for fold in range(5):
        write_run(tmp_path, "support_copy", "card_mri", 1, fold, 0,
                  [(organ, str(case), *counts_for_dice(0.3)) for organ in ("lv_myo", "lv_bp", "rv") for case in (1, 2)])
    table = main_table(load_results(tmp_path), include_published=False)
    assert table.ranks() == {}
    assert _md_row(table.to_markdown(), "Support copy")[2:] == ["30.00"] * 4
    assert "\\textbf{3" not in table.to_latex() and "<b>3" not in table.to_html()


# -- figures ------------------------------------------------------------------------

def test_train_loss_at_single_width_fits_a_page(tmp_path: Path) -> None:
    steps = np.arange(0, 100, 10)
    log = pd.DataFrame({"step": steps, "loss": 1.0 / (1 + steps), "lr": 1e-4, "elapsed_s": steps})
    methods = ("adnet", "ssl_alpnet", "diffews", "sdfsmis", "sdfsmis_qe", "sdfsmis_vtct", "sdfsmis_sii", "prototype")
    for method in methods:
        write_run(tmp_path, method, "abd_mri", 1, 0, 0, _cases(0.5), train_log=log)
    fig = figures.train_loss_figure(load_results(tmp_path), width=style.SINGLE_COLUMN_IN)
    width, height = fig.get_size_inches()
    with style.paper_style():
        problems = style.text_problems(fig)
    plt.close(fig)
    assert width == pytest.approx(style.SINGLE_COLUMN_IN) and height <= style.MAX_HEIGHT_IN + 1e-6
    assert problems == []


def test_published_comparison_png_footnotes_the_legacy_exclusion(legacy: Path) -> None:
    fig = published_comparison_figure(load_results(legacy))
    texts = _texts(fig).replace("\n", " ")
    plt.close(fig)
    assert "setting 2: the published setting-2 numbers were made with the legacy exclusion" in texts
    assert SETTING2_NOTE.startswith("setting 2: ")


def test_the_empty_prediction_symbol_is_explained(tmp_path: Path) -> None:
    masks = {}
    queries = [c for i, c in enumerate(DATASET.fold_cases(0)) if i != 2]
    for organ in ORGANS:
        for case in queries:
            truth = DATASET.load(case).label == DATASET.label_map[organ]
            slices = np.flatnonzero(truth.any(axis=(1, 2)))
            masks[(organ, case)] = (slices, np.zeros_like(truth[slices]))  # predicts nothing
    for method in ("adnet", "ssl_alpnet", "prototype", "support_copy"):  # many small panels
        write_run(tmp_path, method, "abd_mri", 1, 0, 0, [(o, c, 0, 0, 10) for o in ORGANS for c in queries],
                  predictions=masks)
    results = load_results(tmp_path)
    fig = qualitative_figure(results, "abd_mri", 1, DATASET, width=style.SINGLE_COLUMN_IN)
    texts = _texts(fig)
    with style.paper_style():
        problems = style.text_problems(fig)
    plt.close(fig)
    assert "∅" in texts and "∅: empty prediction" in texts.replace("\n", " ") and problems == []
    assert "∅ in small panels" in qualitative_caption(results, "qualitative_abd_mri")


def test_box_outlines_keep_the_series_colour(tmp_path: Path) -> None:
    for method in ("prototype", "diffews"):
        write_run(tmp_path, method, "abd_mri", 1, 0, 0,
                  [(organ, str(case), *counts_for_dice(0.3 + 0.05 * case)) for organ in ORGANS for case in range(1, 7)],
                  backbone="sd15" if method == "diffews" else "none")
    fig = figures.volume_distribution_figure(load_results(tmp_path))
    boxes = [patch for ax in fig.axes for patch in ax.patches]
    edges = {tuple(round(c, 3) for c in patch.get_edgecolor()[:3]) for patch in boxes}
    plt.close(fig)
    wanted = {tuple(round(c, 3) for c in style.method_colour(m)) for m in ("prototype", "diffews")}
    assert edges == wanted  # each box in its legend colour, not a darker outline near another series'


def test_an_external_checkpoint_row_counts_the_weights_steps(tmp_path: Path) -> None:
    """`eval checkpoint=model.safetensors` runs with the default config (train.steps 800 for
    prototype); the weights trained 20 steps, and that is what the runs table says."""
    run_dir = write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, _cases(0.5),
                        config={"train": {"steps": 800}, "method": {"name": "prototype", "lr": 0.001}},
                        non_standard=["external_checkpoint=0e6cd2e1"])
    info = json.loads((run_dir / "run.json").read_text())
    info["weights_from"] = "external_checkpoint"
    info.setdefault("inputs", {})["checkpoint"] = {"path": "/x/model.safetensors", "sha256": "0e6c" * 16, "step": 20}
    (run_dir / "run.json").write_text(json.dumps(info))
    runs = load_results(tmp_path).runs
    assert runs["steps"].tolist() == [20]
    # and the weights' 20 steps, not the config's 800, are what its budget is judged by
    assert runs["non_standard"].tolist() == ["external_checkpoint=0e6cd2e1;train.steps=20"]


def test_a_budget_is_judged_against_the_reference_its_record_holds(tmp_path: Path) -> None:
    """prototype's own budget has changed before (1000, 500, 800): a record is judged against
    the budget its run.json recorded, so that runs made alike stay one row when it changes."""
    for fold, (steps, reference, recorded) in enumerate([(10, 10, []), (10, 800, ["train.steps=10"]),
                                                         (800, 800, []), (10, None, [])]):
        run_dir = write_run(tmp_path, "prototype", "abd_mri", 1, fold, 0, _cases(0.5, fold),
                            config={"train": {"steps": steps}, "method": {"name": "prototype", "lr": 0.001}},
                            non_standard=recorded)
        if reference is not None:
            info = json.loads((run_dir / "run.json").read_text())
            info["reference_config"] = {"train.steps": reference}
            (run_dir / "run.json").write_text(json.dumps(info))
    marks = load_results(tmp_path).runs.set_index("fold")["non_standard"].to_dict()
    # fold 0: made when the default was 10; fold 1 and 3 (a record of before reference_config:
    # today's 800) fell short of theirs
    assert marks == {0: "", 1: "train.steps=10", 2: "", 3: "train.steps=10"}
