"""Measured rows of methods with published numbers stand beside their published row, and the
gap between the two means is reported (synthetic run records, hand-computed values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fsmis_bench.reporting.collect import load_published, load_results, published_name
from fsmis_bench.reporting.commands import write_report
from fsmis_bench.reporting.synthetic import write_run
from fsmis_bench.reporting.tables import main_table, published_gap

ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")


def _cases(dice: float) -> list[tuple[str, str, int, int, int]]:
    """Two query volumes per organ, both at ``dice``: tp = 100 d, fp = fn = 100 (1 - d)."""
    tp, miss = int(round(100 * dice)), int(round(100 * (1 - dice)))
    return [(organ, case, tp, miss, miss) for organ in ORGANS for case in ("1", "2")]


@pytest.fixture()
def records(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for fold in range(5):  # adnet: a standard five-fold run at 0.70 per organ
        write_run(root, "adnet", "abd_mri", 1, fold, 0, _cases(0.70))
    # qnet: one fold, random weights and a reduced budget
    write_run(root, "qnet", "abd_mri", 1, 0, 0, _cases(0.40), random_weights=True, non_standard=["train.steps=300"])
    for fold in range(5):  # a method without published numbers
        write_run(root, "prototype", "abd_mri", 1, fold, 0, _cases(0.50))
    return root


def test_every_mapped_name_has_published_rows():
    published = set(load_published()["method"])
    mapped = {published_name(m) for m in ("ssl_alpnet", "adnet", "qnet", "sdfsmis", "diffews")}
    assert mapped == {"SSL-ALPNet", "ADNet", "Q-Net", "SD-FSMIS", "DiffewS"}
    assert mapped <= published


def test_measured_rows_stand_beside_their_published_rows(records: Path):
    table = main_table(load_results(records))
    labels = [row.labels["Method"] for row in table.rows if row.rank_group == 1]
    adnet = labels.index("ADNet")
    assert labels[adnet + 1] == "adnet"
    qnet = labels.index("Q-Net")
    assert labels[qnet + 1] == "qnet [random_weights,train.steps=300]"
    # rows without a published counterpart follow the published block
    assert labels.index("prototype") > max(adnet, qnet)
    markdown = table.to_markdown()
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    first = [line.split("|")[1].strip() for line in lines]
    assert first[first.index("ADNet†") + 1] == "adnet"


def test_published_gap_is_measured_minus_published(records: Path):
    gaps = published_gap(main_table(load_results(records))).set_index("published_as")
    published = load_published()
    adnet_mean = published[(published["method"] == "ADNet") & (published["table"] == 1) & (published["setting"] == 1)
                           & (published["test_on"] == "abd_mri") & (published["organ"] == "mean")]["dice"].item()
    assert adnet_mean == 78.51
    row = gaps.loc["ADNet"]
    assert row["evaluation"] == "Abd-MRI" and row["measured_mean"] == 70.0
    assert row["gap"] == pytest.approx(70.0 - 78.51) and row["markers"] == ""
    qnet = gaps.loc["Q-Net"]
    assert qnet["published_mean"] == 81.02 and qnet["gap"] == pytest.approx(40.0 - 81.02)
    assert qnet["markers"] == "incomplete;random_weights;non_standard"
    assert "prototype" not in set(gaps["method"])


def test_report_writes_the_gap_table(records: Path, tmp_path: Path):
    out = write_report(records, tmp_path / "report", include_published=True, n_boot=200, log=lambda _: None)
    text = (out / "tables" / "published_gap.md").read_text()
    assert "ADNet" in text and "-8.51" in text
