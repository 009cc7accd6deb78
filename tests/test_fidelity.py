"""`fidelity=code` end to end: every released-code form is switched on and recorded."""

from __future__ import annotations

import json

import pytest

from fsmis_bench.cli import main
from fsmis_bench.config import compose
from fsmis_bench.training import precision as precision_module
from fsmis_bench.training.precision import with_resolved_precision


def test_fidelity_code_resolves_to_fp32_with_tf32_on_a_gpu(monkeypatch):
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: True)
    code = with_resolved_precision(compose(["method=sdfsmis", "fidelity=code"]))
    paper = with_resolved_precision(compose(["method=sdfsmis"]))
    assert (code.mixed_precision, code.tf32) == (paper.mixed_precision, paper.tf32) == ("no", True)
    bf16 = with_resolved_precision(compose(["method=sdfsmis", "fidelity=code", "mixed_precision=bf16"]))
    assert bf16.mixed_precision == "bf16"  # the command line still wins


@pytest.mark.slow
def test_fidelity_code_run_records_every_code_form(results_dir):
    argv = [
        "run", "method=sdfsmis", "backbone=tiny", "backbone.vae=identity", "pretrained=false", "fidelity=code",
        "dataset=phantom", "dataset.size=32", "dataset.n_slices=12", "train.image_size=32", "train.steps=1",
        "train.grad_accum=1", "protocol.min_fg_pixels=10", "protocol.organs=[liver]", "protocol.max_queries=1",
        "device=cpu",
    ]
    assert main(argv) == 0
    (info_path,) = results_dir.glob("sdfsmis/**/run.json")
    info = json.loads(info_path.read_text())
    assert info["fidelity"] == "code" and info["status"] == "complete"
    # fidelity=code asks for TF32 (--allow_tf32), which exists on CUDA only: a CPU run records fp32
    assert info["precision"] == {"mixed_precision": "no", "tf32": False, "label": "fp32"}
    options = info["method_options"]
    assert options["threshold"] == "relative" and options["threshold_value"] == 0.25  # chunk-wise
    assert (options["train_latents"], options["vtct_shot_pooling"]) == ("sample", "before_mlp")
    assert (options["objective"], options["sii"], options["qe_form"], options["lcc"]) == (
        "degenerate_t1", "kv_concat", "fg_bg_softmax", True)
    assert (info["protocol"]["train_labels"], info["protocol"]["gt_exclusion"]) == ("gt", "liver_spleen")
    assert "gt_exclusion=liver_spleen" in info["non_standard"]
    assert info["protocol"]["chunk_support"] == "all" and "chunk_support=all" in info["non_standard"]


@pytest.mark.parametrize("method", ["adnet", "qnet", "ssl_alpnet", "prototype", "support_copy"])
def test_fidelity_code_is_refused_for_methods_whose_code_is_not_sd_fsmis(method, results_dir, capsys):
    """configs/fidelity/code.yaml is the SD-FSMIS code's protocol (GT labels minus liver and
    spleen, pooled Dice, all support slices, legacy exclusion): a classic method run under it
    would be scored by a protocol its own code never used."""
    from fsmis_bench.errors import ConfigError
    from fsmis_bench.runner import build_method

    with pytest.raises(ConfigError, match="released SD-FSMIS code's protocol") as raised:
        build_method(compose([f"method={method}", "fidelity=code"]))
    assert "drop fidelity=code" in raised.value.hint
    assert ("method.init=imagenet" in raised.value.hint) is (method == "adnet")
    assert main(["run", f"method={method}", "fidelity=code", "train.steps=1"]) != 0
    err = capsys.readouterr().err
    assert "fidelity=code" in err and "Traceback" not in err
    assert not list(results_dir.glob(f"{method}/**/COMPLETE"))


@pytest.mark.parametrize("method", ["sdfsmis", "sdfsmis_sii", "diffews"])
def test_fidelity_code_is_offered_for_the_sd_fsmis_pipeline(method):
    from fsmis_methods.sdfsmis import SDFSMIS

    from fsmis_bench.plugins import registries

    method_cls = registries().methods.get(method)
    assert issubclass(method_cls, SDFSMIS) and method_cls.released_code_protocol
