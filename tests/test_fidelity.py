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
    assert info["precision"] == {"mixed_precision": "no", "tf32": True, "label": "fp32+tf32"}  # TF32: CUDA only
    options = info["method_options"]
    assert options["threshold"] == "relative" and options["threshold_value"] == 0.25  # chunk-wise
    assert (options["train_latents"], options["vtct_shot_pooling"]) == ("sample", "before_mlp")
    assert (options["objective"], options["sii"], options["qe_form"], options["lcc"]) == (
        "degenerate_t1", "kv_concat", "fg_bg_softmax", True)
    assert (info["protocol"]["train_labels"], info["protocol"]["gt_exclusion"]) == ("gt", "liver_spleen")
    assert "gt_exclusion=liver_spleen" in info["non_standard"]
    assert info["protocol"]["chunk_support"] == "all" and "chunk_support=all" in info["non_standard"]
