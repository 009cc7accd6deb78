"""The full report: one command writes tables, figures and a self-contained HTML page."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsmis_bench.errors import FsmisError
from fsmis_bench.reporting import write_report
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(8, 32, 32))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html_results")
    rng = np.random.default_rng(0)
    for method, q, backbone in (("adnet", 0.7, "none"), ("sdfsmis", 0.8, "sd15")):
        for setting in (1, 2):
            for fold in range(5):
                queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
                cases, predictions = [], {}
                for organ in ("liver", "spleen"):
                    for case_id in queries:
                        cases.append((organ, case_id, *counts_for_dice(q + rng.normal(0, 0.05))))
                        if fold == 0 and setting == 1:
                            truth = DATASET.load(case_id).label == DATASET.label_map[organ]
                            slices = np.flatnonzero(truth.any(axis=(1, 2)))
                            predictions[(organ, case_id)] = (slices, np.roll(truth[slices], 2, axis=2))
                log = pd.DataFrame({"step": np.arange(0, 200, 10), "loss": np.exp(-np.arange(20) / 5) + 0.1,
                                    "lr": 1e-5, "elapsed_s": np.arange(20.0)})
                write_run(root, method, "abd_mri", setting, fold, 0, cases, backbone=backbone, train_log=log,
                          predictions=predictions or None)
    write_run(root, "adnet", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.1))], random_weights=True)
    write_run(root, "adnet", "abd_mri", 2, 0, 7, [("liver", "1", *counts_for_dice(0.1))], complete=False)
    out = tmp_path_factory.mktemp("report") / "out"
    write_report(root, out, dataset_loader=lambda name: DATASET, n_boot=500)
    return out


def test_report_writes_every_artifact(report: Path) -> None:
    for name in ("main", "ablation", "backbone", "cross_domain"):
        for suffix in (".md", ".tex", ".csv"):
            assert (report / "tables" / f"{name}{suffix}").is_file(), name + suffix
    assert (report / "tables" / "compare_sdfsmis-sd15_vs_adnet.md").is_file()
    assert (report / "tables" / "bootstrap_ci.csv").is_file()
    folds = pd.read_csv(report / "tables" / "fold_scores.csv")
    assert set(folds["method"]) == {"adnet", "sdfsmis"} and len(folds) == 2 * 2 * 5 * 2 + 1
    for stem in ("published_comparison", "organ_dice", "volume_distribution", "setting_drop", "train_loss",
                 "qualitative_abd_mri"):
        assert (report / "figures" / f"{stem}.png").is_file() and (report / "figures" / f"{stem}.pdf").is_file()
    # adnet and sdfsmis have published numbers for Abd-MRI: the figure's values are in a table
    comparison = pd.read_csv(report / "tables" / "published_comparison.csv")
    assert set(comparison.dropna(subset=["published"])["published_as"]) == {"ADNet", "SD-FSMIS"}


def test_html_is_self_contained(report: Path) -> None:
    page = (report / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert 'id="table-main"' in page and "SD-FSMIS†" in page and "arXiv 2604.03134" in page
    assert "ADNet*§" in page  # one fold: incomplete and random
    assert "1 unfinished run(s)" in page and "seed7" in page
    assert "A = SD-FSMIS [SD-1.5] vs B = ADNet" in page  # named as in the tables and figures
    # captions say what the error bars are; the published comparison names its source
    assert "±1 standard deviation across folds" in page and "White diamonds: the published value" in page


def test_refuses_to_overwrite_without_force(report: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_run(results, "adnet", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.5)), ("liver", "2", *counts_for_dice(0.6))])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FsmisError, match="not empty"):
        write_report(results, out, n_boot=50)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(FsmisError, match="no finished runs of 'nobody'"):
        write_report(results, tmp_path / "other", compare=[("nobody", "adnet")], n_boot=50)
    assert not (tmp_path / "other").exists()
    written = write_report(results, out, force=True, n_boot=50)
    assert (written / "report.html").is_file() and (out / "keep.txt").read_text() == "mine"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_html_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium) - cannot render the HTML report")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (report / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("L"), dtype=float)
    # a rendered page: mostly white background with a fair amount of dark text and table rules
    assert pixels.mean() > 180 and (pixels < 100).mean() > 0.01
    dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == 6 and 'id="table-main"' in dom
