"""`eval` may change the method options read only when predicting (thresholds, chunk size,
test-time refinement) on a trained checkpoint; every option training reads still names
another training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fsmis_bench.cli import main
from fsmis_bench.config import compose
from fsmis_bench.records import config_hash, inference_options, training_hash

from tiny_runs import run_dirs as _run_dirs

# method: (its inference-only options with another value, a training option with another value);
# a change of several overrides is written with spaces
INFERENCE_TABLE = {
    "sdfsmis": (["method.threshold=relative", "method.threshold_value=0.4",
                 "method.threshold=relative method.threshold_levels=uint8",  # uint8 levels: relative only
                 "method.lcc=true", "method.predict_batch_size=3"], "method.qe_tau=0.5"),
    "diffews": (["method.predict_batch_size=3"], "method.lr=2e-5"),
    "qnet": (["method.refine_iterations=0", "method.refine_lr=0.1", "method.predict_batch_size=3"],
             "method.scale=10"),
    "ssl_alpnet": (["method.pool_window_test=4", "method.predict_batch_size=3"], "method.pool_window_train=2"),
    "adnet": (["method.predict_batch_size=3"], "method.steepness=1.0"),
}


@pytest.mark.parametrize("method", sorted(INFERENCE_TABLE))
def test_inference_options_change_the_run_but_not_its_training(method):
    changes, training_change = INFERENCE_TABLE[method]
    base = compose([f"method={method}"])
    changed = {o.split("=")[0].removeprefix("method.") for change in changes for o in change.split()}
    assert changed <= set(inference_options(base))
    for change in changes:
        other = compose([f"method={method}", *change.split()])
        assert training_hash(other) == training_hash(base), change
        assert config_hash(other) != config_hash(base), change  # another threshold is another run
        # records made before the split hashed them: those hashes still tell them apart
        assert training_hash(other, with_inference_options=True) != training_hash(base, with_inference_options=True)
    trained_otherwise = compose([f"method={method}", training_change])
    assert training_hash(trained_otherwise) != training_hash(base)


#: the architecture of each method small enough for a CPU step
SMALL_ARCH = {"sdfsmis": ["backbone=tiny"], "diffews": ["backbone=tiny"], "qnet": ["method.encoder=resnet18"],
              "ssl_alpnet": ["method.encoder=resnet18"], "adnet": ["method.encoder=resnet18"]}


@pytest.mark.parametrize("method", sorted(INFERENCE_TABLE))
def test_training_reads_none_of_the_inference_options(method):
    """What makes leaving them out of the training hash safe: the same initial weights, the
    same episode and the same random draws give the same loss and the same gradients, bit
    for bit, whatever the inference options say (all changed at once). Every option a method
    lists is in the table (bar the CUDA-only predict_cuda_graph, which no hash holds)."""
    from fsmis_bench.api import build_method
    from fsmis_bench.method import EpisodeBatch

    changes, _ = INFERENCE_TABLE[method]
    base = [f"method={method}", "pretrained=false", "train.image_size=64", *SMALL_ARCH[method]]
    listed = set(inference_options(compose(base))) - {"predict_cuda_graph"}
    assert listed <= {o.split("=")[0].removeprefix("method.") for c in changes for o in c.split()}
    changed = dict(o.split("=") for c in changes for o in c.split())  # the last value of each option

    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 1, 1, 64, 64, generator=generator) > 0.6).float()
    batch = EpisodeBatch(torch.randn(2, 1, 1, 64, 64, generator=generator), masks,
                         torch.randn(2, 1, 64, 64, generator=generator), masks[:, 0].clone())

    def loss_and_grads(overrides: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_method(overrides)
        model.train()
        torch.manual_seed(1)
        drawn = EpisodeBatch(*batch.tensors()[:4], host_draws=model.host_draws(batch))
        loss = model.training_loss(drawn)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(base)
    other_loss, other_grads = loss_and_grads([*base, *(f"{k}={v}" for k, v in changed.items())])
    assert grads and torch.equal(loss, other_loss)
    assert len(grads) == len(other_grads) and all(torch.equal(a, b) for a, b in zip(grads, other_grads))


QNET = ["method=qnet", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16", "pretrained=false",
        "method.encoder=resnet18", "method.feature_dim=16", "train.image_size=64", "train.steps=2",
        "protocol.min_fg_pixels=20", "method.refine_iterations=1"]


def _trained(argv: list[str], results_dir: Path, capsys) -> Path:
    """The record folder of ``fsmis-bench run`` with ``argv``, the only run under ``results_dir``."""
    assert main(["run", *argv]) == 0
    capsys.readouterr()
    (run_dir,) = _run_dirs(results_dir)
    return run_dir


@pytest.fixture
def trained_qnet(results_dir: Path, capsys) -> Path:
    return _trained(QNET, results_dir, capsys)


def test_eval_with_another_test_time_option_reuses_the_weights(trained_qnet, results_dir, capsys):
    assert main(["eval", *QNET, "method.refine_iterations=0", "method.predict_batch_size=3"]) == 0
    assert f"using trained weights {trained_qnet}" in capsys.readouterr().err
    (evaluated,) = [d for d in _run_dirs(results_dir) if d != trained_qnet]
    assert not (evaluated / "checkpoints").exists()
    assert json.loads((evaluated / "run.json").read_text())["weights_trained_by"]["all"]["run"] == trained_qnet.name
    # an option training reads is another training: nothing to evaluate
    assert main(["eval", *QNET, "method.scale=10"]) == 2
    assert "no trained checkpoint" in capsys.readouterr().err


def test_eval_of_a_checkpoint_names_the_training_option_that_differs(trained_qnet, capsys):
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", "method.refine_iterations=0"]) == 0
    capsys.readouterr()
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", "method.scale=10"]) == 2
    err = capsys.readouterr().err
    assert "was trained with method.scale=20.0; this evaluation asks for method.scale=10" in err
    assert "refine_iterations" in err  # the hint lists what may differ


def test_a_record_that_hashed_its_test_time_options_still_serves_another_one(trained_qnet, results_dir, capsys):
    """Records made before the split hashed every method option into the training hash."""
    info = json.loads((trained_qnet / "run.json").read_text())
    cfg = OmegaConf.load(trained_qnet / "config.yaml")
    info["training_hash"] = training_hash(cfg, info["inputs"], with_inference_options=True)
    (trained_qnet / "run.json").write_text(json.dumps(info))
    assert main(["eval", *QNET, "method.refine_iterations=0"]) == 0
    assert f"using trained weights {trained_qnet}" in capsys.readouterr().err


def test_a_null_test_time_option_of_an_earlier_record_is_taken_over_as_null(trained_qnet, capsys):
    """An earlier record's option left null (the method's own default) is what its hash held."""
    config = OmegaConf.load(trained_qnet / "config.yaml")
    config.method.refine_lr = None
    OmegaConf.save(config, trained_qnet / "config.yaml")
    info = json.loads((trained_qnet / "run.json").read_text())
    info["training_hash"] = training_hash(config, info["inputs"], with_inference_options=True)
    (trained_qnet / "run.json").write_text(json.dumps(info))
    assert main(["eval", *QNET, "method.refine_lr=0.5"]) == 0
    assert f"using trained weights {trained_qnet}" in capsys.readouterr().err


SDFSMIS = ["method=sdfsmis", "backbone=tiny", "pretrained=false", "dataset=phantom", "dataset.size=64",
           "dataset.n_slices=12", "train.image_size=64", "train.steps=1", "protocol.min_fg_pixels=20"]


@pytest.fixture
def trained_sdfsmis(results_dir: Path, capsys) -> Path:
    return _trained(SDFSMIS, results_dir, capsys)


def test_eval_of_a_checkpoint_compares_the_forms_its_null_options_took(trained_sdfsmis, capsys):
    """SD-FSMIS's null options follow `fidelity`, and an option a training's config lacks had
    the value of its time: a checkpoint trained in another form is refused, not evaluated."""
    assert main(["eval", *SDFSMIS, f"checkpoint={trained_sdfsmis}", "method.threshold=relative"]) == 0
    capsys.readouterr()
    assert main(["eval", *SDFSMIS, f"checkpoint={trained_sdfsmis}", "fidelity=code"]) == 2
    err = capsys.readouterr().err
    assert "was trained with another fidelity (fidelity=paper)" in err and "protocol.dice=pooled" in err
    # a record made before method.vtct_empty_mask existed trained with its earlier form, `soft`
    config = OmegaConf.load(trained_sdfsmis / "config.yaml")
    del config.method["vtct_empty_mask"]
    OmegaConf.save(config, trained_sdfsmis / "config.yaml")
    assert main(["eval", *SDFSMIS, f"checkpoint={trained_sdfsmis}"]) == 2
    assert ("was trained with method.vtct_empty_mask=soft; this evaluation asks for "
            "method.vtct_empty_mask=soft_area") in capsys.readouterr().err
    assert main(["eval", *SDFSMIS, f"checkpoint={trained_sdfsmis}", "method.vtct_empty_mask=soft"]) == 0


@pytest.mark.parametrize("asked, named", [
    (["train.steps=7"], "train.steps=2; this evaluation asks for train.steps=7"),
    (["seed=3"], "seed=0; this evaluation asks for seed=3"),
    (["fold=1"], "fold=0; this evaluation asks for fold=1"),  # its test scans were training scans
    (["protocol.episode_sampler=uniform_pairs"], "protocol.episode_sampler=reference; this evaluation asks for "
                                                 "protocol.episode_sampler=uniform_pairs"),
])
def test_eval_of_a_run_refuses_another_training_setting(trained_qnet, capsys, asked, named):
    """Its record would hold the asked setting as the weights' training (and the report count
    the run as, e.g., another seed)."""
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", *asked]) == 2
    err = capsys.readouterr().err
    assert named in err and "only evaluation options" in err


def test_eval_of_a_run_takes_evaluation_options_and_precision(trained_qnet):
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", "protocol.dice=pooled", "protocol.chunk_support=all",
                 "mixed_precision=no"]) == 0


def test_an_external_checkpoints_row_names_its_test_time_options(trained_qnet, results_dir):
    """Alone in its report row (marked external_checkpoint=...), nothing else would say that
    another test-time refinement made its masks."""
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", "method.refine_iterations=0"]) == 0
    (evaluated,) = [d for d in _run_dirs(results_dir) if d != trained_qnet]
    marks = json.loads((evaluated / "run.json").read_text())["non_standard"]
    assert marks.count("method.refine_iterations=0") == 1  # also a departure from the published setup
    assert any(m.startswith("external_checkpoint=") for m in marks)
    assert main(["eval", *QNET, f"checkpoint={trained_qnet}", "method.refine_lr=0.1"]) == 0
    (other,) = [d for d in _run_dirs(results_dir) if d not in (trained_qnet, evaluated)]
    assert "method.refine_lr=0.1" in json.loads((other / "run.json").read_text())["non_standard"]
