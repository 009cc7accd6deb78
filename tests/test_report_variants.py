"""Runs configured differently are never averaged into one report row nor superseded by each
other; a departure from a method's published setup is marked; the Runs summary shows the
training steps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fsmis_bench.config import compose
from fsmis_bench.records import config_hash, non_standard_options, training_hash
from fsmis_bench.reporting import write_report
from fsmis_bench.reporting.collect import load_results, summarise_runs
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run
from fsmis_bench.reporting.tables import main_table

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(6, 24, 24))


def _train(steps: int, **more: object) -> dict:
    """The ``train`` section of a resolved config, as a run writes it."""
    return {"train": {"steps": steps, "batch_size": 4, "image_size": 128, "log_every": 10, "checkpoint_every": 100,
                      "num_workers": "auto", **more}}


def _run(root: Path, fold: int, score: float, config: dict, *, method: str = "prototype", seed: int = 0,
         finished_at: str = "2026-01-01T01:00:00+00:00", **options) -> Path:
    """One record of ``method`` on Abd-MRI setting 1 with every query volume at Dice ``score``."""
    queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
    cases = [(organ, case, *counts_for_dice(score)) for organ in ("liver", "spleen") for case in queries]
    return write_run(root, method, "abd_mri", 1, fold, seed, cases, config=config, finished_at=finished_at, **options)


# -- defect: settings averaged into one row, or a debug run superseding a real one -------------

def test_runs_trained_with_other_settings_are_separate_rows(tmp_path: Path) -> None:
    for fold in (0, 1):
        _run(tmp_path, fold, 0.4, _train(40))
    _run(tmp_path, 2, 0.6, _train(60))
    results = load_results(tmp_path)
    assert sorted(set(results.runs["variant"])) == ["train.steps=40", "train.steps=60"]
    folds = results.fold_scores.groupby("variant")["fold"].apply(lambda s: sorted(set(s))).to_dict()
    assert folds == {"train.steps=40": [0, 1], "train.steps=60": [2]}
    labels = [row.labels["Method"] for row in main_table(results, include_published=False).rows]
    assert labels == ["Prototype [train.steps=40]", "Prototype [train.steps=60]"]
    assert not results.notes


def test_a_later_debug_run_of_one_fold_supersedes_nothing(tmp_path: Path) -> None:
    for fold in (0, 1, 2):
        _run(tmp_path, fold, 0.4, _train(40))
    debug = _run(tmp_path, 1, 0.1, _train(5), finished_at="2026-02-01T00:00:00+00:00")
    results = load_results(tmp_path)
    assert len(results.runs) == 4 and not [n for n in results.notes if "superseded" in n]
    by_variant = results.runs.groupby("variant")["fold"].apply(sorted).to_dict()
    assert by_variant == {"train.steps=40": [0, 1, 2], "train.steps=5": [1]}
    assert results.runs.loc[results.runs["run_dir"] == str(debug), "steps"].item() == 5


def test_only_identically_configured_runs_supersede_each_other(tmp_path: Path) -> None:
    first = _run(tmp_path, 0, 0.4, _train(40))
    # the same configuration again (another log cadence and worker count: they change no number)
    second = _run(tmp_path, 0, 0.5, _train(40, log_every=50, num_workers=0), finished_at="2026-02-01T00:00:00+00:00")
    results = load_results(tmp_path)
    assert results.runs["run_dir"].tolist() == [str(second)]
    assert set(results.runs["variant"]) == {""}  # nothing to tell apart: no label
    (note,) = [n for n in results.notes if "superseded" in n]
    assert str(first) in note and f"kept {second}" in note


def test_a_run_below_its_methods_own_budget_is_marked(tmp_path: Path) -> None:
    """prototype has no published numbers, so no published_config: its shipped budget (800
    steps) is the reference, and a shorter run is never shown or ranked as the method."""
    _run(tmp_path, 0, 0.4, {**_train(800), "method": {"name": "prototype", "lr": 0.001}})
    _run(tmp_path, 1, 0.4, {**_train(300), "method": {"name": "prototype", "lr": 0.001}})
    runs = load_results(tmp_path).runs.set_index("fold")
    assert runs.loc[0, "non_standard"] == "" and runs.loc[1, "non_standard"] == "train.steps=300"
    assert runs.loc[1, "variant"] == "train.steps=300"


def test_row_labels_name_the_differing_keys_or_the_fingerprint(tmp_path: Path) -> None:
    # at prototype's own budget (800 steps), which no mark names
    _run(tmp_path / "a", 0, 0.4, {**_train(800), "method": {"name": "prototype", "lr": 0.001}})
    _run(tmp_path / "a", 1, 0.4, {**_train(800, batch_size=2), "method": {"name": "prototype", "lr": 0.01}})
    assert sorted(set(load_results(tmp_path / "a").runs["variant"])) == [
        "method.lr=0.001,train.batch_size=4", "method.lr=0.01,train.batch_size=2"]
    # more than three keys differ: the fingerprint, not a label longer than the table
    _run(tmp_path / "b", 0, 0.4, _train(800, batch_size=1, image_size=64, grad_clip=1.0))
    _run(tmp_path / "b", 1, 0.4, _train(800, batch_size=2, image_size=96, grad_clip=0.5, warmup_steps=10))
    variants = sorted(set(load_results(tmp_path / "b").runs["variant"]))
    assert len(variants) == 2 and all(re.fullmatch(r"config=[0-9a-f]{8}", v) for v in variants)


def test_paths_device_and_cadence_never_split_a_row(tmp_path: Path) -> None:
    for fold, (root, device, log_every) in enumerate([("/data/a", "cpu", 10), ("/data/b", "cuda", 100)]):
        config = {**_train(40, log_every=log_every), "data_root": root, "results_dir": f"/r{fold}", "device": device}
        _run(tmp_path, fold, 0.4, config)
    results = load_results(tmp_path)
    assert set(results.runs["variant"]) == {""} and results.runs["config_id"].nunique() == 1


def test_an_option_left_null_matches_a_record_made_before_it_existed(tmp_path: Path) -> None:
    _run(tmp_path, 0, 0.4, {**_train(800), "method": {"name": "prototype", "lr": 0.001}})
    _run(tmp_path, 1, 0.4, {**_train(800), "method": {"name": "prototype", "lr": 0.001, "new_option": None}})
    _run(tmp_path, 2, 0.4, {**_train(800), "method": {"name": "prototype", "lr": 0.001, "new_option": "other"}})
    variants = load_results(tmp_path).runs.groupby("variant")["fold"].apply(sorted).to_dict()
    assert variants == {"method.new_option=default": [0, 1], "method.new_option=other": [2]}


def test_a_switch_at_its_default_is_labelled_with_its_value(tmp_path: Path) -> None:
    """A switch added after records existed leaves a run's fingerprint at its default (so older
    records stay alike): the label names the value the run had, not "default"."""
    _run(tmp_path, 0, 0.4, _train(40))  # a record from before the switch
    _run(tmp_path, 1, 0.4, _train(40, fused_clip=False))
    _run(tmp_path, 2, 0.4, _train(40, fused_clip=True))
    variants = load_results(tmp_path).runs.groupby("variant")["fold"].apply(sorted).to_dict()
    assert variants == {"train.fused_clip=false": [0, 1], "train.fused_clip=true": [2]}


def test_other_variant_flags_and_settings_combine(tmp_path: Path) -> None:
    _run(tmp_path, 0, 0.4, _train(40), dice="pooled", non_standard=["dice=pooled"])
    _run(tmp_path, 1, 0.4, _train(60), dice="pooled", non_standard=["dice=pooled"])
    _run(tmp_path, 0, 0.4, _train(40))
    assert sorted(set(load_results(tmp_path).runs["variant"])) == [
        "", "dice=pooled,train.steps=40", "dice=pooled,train.steps=60"]


def test_steps_in_the_runs_summary_runs_csv_and_html(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    for fold in (0, 1):
        _run(results_dir, fold, 0.4, _train(40))
    _run(results_dir, 2, 0.6, _train(60))
    write_run(results_dir, "support_copy", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.3))])
    summary = summarise_runs(load_results(results_dir)).set_index(["method", "variant"])
    assert summary.loc[("prototype", "train.steps=40"), "steps"] == "40"
    assert summary.loc[("prototype", "train.steps=60"), "steps"] == "60"
    assert summary.loc[("support_copy", ""), "steps"] == "?"  # a record without a train section
    out = write_report(results_dir, tmp_path / "out", dataset_loader=lambda name: DATASET, n_boot=20,
                       include_published=False)
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert "steps" in runs.columns and sorted(runs["steps"].dropna().astype(int)) == [40, 40, 60]
    page = (out / "report.html").read_text(encoding="utf-8")
    runs_section = page[page.index('id="runs"'):]
    assert ">steps</th>" in runs_section


# -- published_config: a reduced budget is non-standard, and hashes are unchanged -------------

SDFSMIS_FAMILY = ("sdfsmis", "sdfsmis_sii", "sdfsmis_qe", "sdfsmis_vtct")


def _without_published_config(cfg):
    data = OmegaConf.to_container(cfg)
    data["method"].pop("published_config", None)
    return OmegaConf.create(data)


@pytest.mark.parametrize("method", [*SDFSMIS_FAMILY, "diffews"])
def test_the_published_setup_is_declared_and_not_hashed(method: str) -> None:
    cfg = compose([f"method={method}"], resolve_datasets=False)
    published = OmegaConf.to_container(cfg.method.published_config)
    assert published["train.steps"] == 15000 and published["train.image_size"] == 256
    assert published["train.batch_size"] == 1 and published["method.lr"] == pytest.approx(1e-5)
    if method != "diffews":
        assert published["method.lr_vtct"] == pytest.approx(5e-5)
    assert non_standard_options(cfg, random_weights=False) == []  # the defaults are the paper's setup
    # an annotation, not a setting: the run's identity (folder, found checkpoints) is unchanged
    bare = _without_published_config(cfg)
    assert config_hash(cfg) == config_hash(bare) and training_hash(cfg) == training_hash(bare)


def test_the_classic_methods_keep_their_published_config_hashed() -> None:
    cfg = compose(["method=adnet"], resolve_datasets=False)
    assert config_hash(cfg) != config_hash(_without_published_config(cfg))  # as their records always had it


def test_fidelity_code_keeps_the_shared_setup_standard() -> None:
    cfg = compose(["method=sdfsmis", "fidelity=code"], resolve_datasets=False)
    assert not [m for m in non_standard_options(cfg, random_weights=False) if m.startswith(("train.", "method."))]


@pytest.mark.parametrize("method", SDFSMIS_FAMILY)
def test_a_small_budget_is_marked_non_standard(method: str) -> None:
    cfg = compose([f"method={method}", "backbone=tiny", "train.steps=1500", "train.image_size=64",
                   "method.lr=1e-3"], resolve_datasets=False)
    marks = non_standard_options(cfg, random_weights=True)
    assert {"train.steps=1500", "train.image_size=64", "method.lr=0.001"} <= set(marks)
    assert "prototype" not in marks and compose(["method=prototype"], resolve_datasets=False).method.get(
        "published_config") is None  # no published numbers, no invented setup


def test_records_from_before_the_published_config_are_judged_by_the_shipped_one(tmp_path: Path) -> None:
    """A tiny-backbone SD-FSMIS record whose run.json lists no deviation (written before the
    method declared its published setup; its hash, and so its folder, is unchanged since)."""
    config = {"method": {"name": "sdfsmis", "lr": 0.001, "lr_vtct": 5e-5},
              "train": {"steps": 1500, "batch_size": 4, "image_size": 64, "weight_decay": 0.01}}
    for fold in range(5):
        _run(tmp_path, fold, 0.5, config, method="sdfsmis", backbone="tiny", random_weights=True)
    results = load_results(tmp_path)
    (variant,) = set(results.runs["variant"])
    assert variant == "tiny,method.lr=0.001,random_weights,train.batch_size=4,train.image_size=64,train.steps=1500"
    assert set(results.runs["non_standard"]) == {"method.lr=0.001;train.batch_size=4;train.image_size=64;train.steps=1500"}
    (row,) = [r for r in main_table(results, include_published=False).rows]
    assert row.markers == ["random_weights", "non_standard"]
    text = main_table(results, include_published=False).to_markdown()
    assert "§‡" in text and "tiny CPU backbone" in text  # the § legend says what kind of random weights


def test_a_record_keeps_the_published_config_it_recorded(tmp_path: Path) -> None:
    recorded = {"train.steps": 2000}  # the record's own published_config wins over the shipped one
    config = {"method": {"name": "sdfsmis", "lr": 1e-5, "published_config": recorded}, "train": {"steps": 2000}}
    _run(tmp_path, 0, 0.5, config, method="sdfsmis", backbone="sd15")
    results = load_results(tmp_path)
    assert set(results.runs["non_standard"]) == {""} and set(results.runs["variant"]) == {"sd15"}
    assert json.loads((Path(results.runs["run_dir"].item()) / "run.json").read_text())["non_standard"] == []


def test_records_trained_before_the_reference_sampler_are_marked_and_kept_apart(tmp_path: Path) -> None:
    """A record whose config lacks ``protocol.episode_sampler`` was trained by the earlier
    rule (``uniform_pairs``): it is marked non-standard and never averaged with runs of the
    reference rule; a method that trains nothing is not affected."""
    _run(tmp_path, 0, 0.6, {**_train(40), "method": {"name": "prototype"}, "protocol": {"episode_sampler": "reference"}})
    _run(tmp_path, 1, 0.4, _train(40) | {"method": {"name": "prototype"}, "protocol": {}})  # older: no such key
    results = load_results(tmp_path)
    flags = {int(row.fold): row.variant for row in results.runs.itertuples()}
    assert "episode_sampler=uniform_pairs" in flags[1] and "episode_sampler" not in flags[0]
    assert results.fold_scores.groupby("variant").fold.nunique().tolist() == [1, 1]  # two rows, one fold each


def _with_weights(run_dir: Path, unet_digest: str, location: str) -> None:
    info = json.loads((run_dir / "run.json").read_text())
    info["inputs"] = {"train_data": {"id": "d"}, "test_data": {"id": "d"},
                      "weights": {"unet": {"source": "runwayml/stable-diffusion-v1-5", "location": location,
                                           "digest": unet_digest, "layout": "diffusers",
                                           "files": {"unet/diffusion_pytorch_model.safetensors": unet_digest}}}}
    (run_dir / "run.json").write_text(json.dumps(info))


def test_runs_from_different_pretrained_weights_are_never_averaged_or_superseded(tmp_path: Path) -> None:
    """The same hub id on two machines can hold other files: the report tells the runs apart
    by the weights' digests, never by the path they were read from."""
    root = tmp_path / "results"
    cases = [("liver", "1", 80, 20, 20)]
    for fold, digest in ((0, "sha256:aaaa"), (1, "sha256:bbbb")):
        _with_weights(write_run(root, "sdfsmis", "abd_mri", 1, fold, 0, cases, backbone="sd15"), digest, "/m1/hub")
    # fold 0 again, the first weights read from another folder, finished later: supersedes
    later = write_run(root / "elsewhere", "sdfsmis", "abd_mri", 1, 0, 0, [("liver", "1", 90, 10, 10)], backbone="sd15",
                      finished_at="2026-01-02T00:00:00+00:00")
    _with_weights(later, "sha256:aaaa", "/m2/copy")
    moved = root / "sdfsmis" / "abd_mri" / "setting1" / "fold0" / "seed0-later"
    later.rename(moved)
    results = load_results(root)
    variants = dict(zip(results.runs["fold"], results.runs["variant"]))
    assert variants[0] != variants[1]
    assert all(v.startswith("sd15,weights=") for v in variants.values())
    assert results.fold_scores.groupby("variant")["fold"].nunique().tolist() == [1, 1]  # no mean over both
    superseded = [n for n in results.notes if "superseded" in n]
    assert len(superseded) == 1 and "weights" in superseded[0] and str(moved) in superseded[0]


def _released_by(run_dir: Path, distribution: str, version: str) -> Path:
    """Say in ``run.json`` which release of which package registered the run's method."""
    info = json.loads((run_dir / "run.json").read_text())
    info["registered_by"] = {"method": {"name": info["method"], "plugin": "pkg", "distribution": distribution,
                                        "version": version}}
    (run_dir / "run.json").write_text(json.dumps(info))
    return run_dir


def test_runs_of_two_releases_of_a_plugin_are_never_averaged_or_superseded(tmp_path: Path) -> None:
    """A plugin's release is not in a run's hash (a rerun keeps the old record and warns):
    a fold of 0.1.0 and a fold of 0.2.0 stay two rows, and neither replaces the other."""
    root = tmp_path / "results"
    _released_by(_run(root, 0, 0.8, _train(40), method="minicos"), "fsmis-minicos", "0.1.0")
    _released_by(_run(root, 1, 0.0, _train(40), method="minicos"), "fsmis-minicos", "0.2.0")
    later = _run(root / "b", 0, 0.1, _train(40), method="minicos", finished_at="2026-01-02T00:00:00+00:00")
    moved = root / "minicos" / "abd_mri" / "setting1" / "fold0" / "seed0-later"
    _released_by(later, "fsmis-minicos", "0.2.0").rename(moved)
    results = load_results(root)
    variants = sorted(set(results.runs["variant"]))
    assert variants == ["code=fsmis-minicos-0.1.0", "code=fsmis-minicos-0.2.0"]
    assert not [n for n in results.notes if "superseded" in n]
    by_variant = results.fold_scores.groupby("variant")["fold"].apply(lambda f: sorted(set(f))).to_dict()
    assert by_variant == {"code=fsmis-minicos-0.1.0": [0], "code=fsmis-minicos-0.2.0": [0, 1]}
    # fsmis-bench's own methods are not split by its version
    assert results.runs.loc[0, "code_id"].startswith("fsmis-minicos")
    own = tmp_path / "own"
    _released_by(_run(own, 0, 0.8, _train(40)), "fsmis-bench", "0.1.0")
    _released_by(_run(own, 1, 0.8, _train(40)), "fsmis-bench", "0.2.0")
    assert set(load_results(own).runs["variant"]) == {""}


def test_a_late_option_is_told_apart_as_it_acted(tmp_path: Path) -> None:
    """SD-FSMIS's VTCT fallback for empty masks: a record made before the option existed ran
    `soft`; a run leaving it null ran today's `soft_area` (under fidelity=paper). Two forms,
    two rows, named by what they ran; never averaged as one configuration."""
    earlier = {**_train(40), "fidelity": "paper", "method": {"name": "sdfsmis", "lr": 1e-5}}
    today = {**_train(40), "fidelity": "paper", "method": {"name": "sdfsmis", "lr": 1e-5, "vtct_empty_mask": None}}
    _run(tmp_path, 0, 0.4, earlier, method="sdfsmis", backbone="tiny")
    _run(tmp_path, 1, 0.5, today, method="sdfsmis", backbone="tiny")
    variants = load_results(tmp_path).runs.groupby("variant")["fold"].apply(sorted).to_dict()
    named = {variant.rsplit(",", 1)[-1]: folds for variant, folds in variants.items()}
    assert named == {"method.vtct_empty_mask=soft": [0], "method.vtct_empty_mask=soft_area": [1]}


def test_a_null_option_is_named_by_the_value_it_resolves_to(tmp_path: Path) -> None:
    """SD-FSMIS's threshold is null by default and follows `fidelity` (`absolute` under the
    paper reading). A run leaving it null and one asking for `absolute` ran alike: one row.
    A run asking for `relative` is another row, and both are named by the values, not by
    `default`."""
    base = {**_train(40), "fidelity": "paper"}
    left_null = {**base, "method": {"name": "sdfsmis", "lr": 1e-5, "threshold": None}}
    explicit = {**base, "method": {"name": "sdfsmis", "lr": 1e-5, "threshold": "absolute"}}
    relative = {**base, "method": {"name": "sdfsmis", "lr": 1e-5, "threshold": "relative"}}
    _run(tmp_path, 0, 0.4, left_null, method="sdfsmis", backbone="tiny")
    _run(tmp_path, 1, 0.4, explicit, method="sdfsmis", backbone="tiny")
    _run(tmp_path, 2, 0.5, relative, method="sdfsmis", backbone="tiny")
    variants = load_results(tmp_path).runs.groupby("variant")["fold"].apply(sorted).to_dict()
    named = {",".join(variant.split(",")[-2:]): folds for variant, folds in variants.items()}
    # the threshold's value follows the threshold (0 absolute, 0.25 relative): named too
    assert named == {"method.threshold=absolute,method.threshold_value=0": [0, 1],
                        "method.threshold=relative,method.threshold_value=0.25": [2]}


def test_a_new_record_marks_a_run_below_its_methods_own_budget() -> None:
    from fsmis_bench.config import compose
    from fsmis_bench.records import non_standard_options

    assert "train.steps=300" in non_standard_options(compose(["method=prototype", "train.steps=300"]), False, None)
    assert non_standard_options(compose(["method=prototype"]), False, None) == []
    # a method that trains nothing has no budget to fall short of
    assert non_standard_options(compose(["method=support_copy", "train.steps=5"]), False, None) == []
