"""The GPU engine benchmark's CPU smoke mode: every CPU-able variant runs through the engine
path and the JSON carries gpu_sd15_check's fields plus ``engine_path``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_engine_check.py"


@pytest.mark.slow
def test_cpu_smoke_mode_runs_every_variant(capsys, tmp_path, monkeypatch):
    from fsmis_bench.training import step as step_module

    # compiled GroupNorms: dynamo's capture without code generation, which the GPU measures
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "engine.json"
    argv = ["--device", "cpu", "--tiny", "--size", "64", "--steps", "1", "--warmup", "1", "--slices", "2",
            "--tiny-steps", "1", "--budget-s", "1e9", "--out", str(out)]
    assert module.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["engine_path"] is True and result["backbone"] == "tiny" and result["random_weights"] is True
    for key in ("check", "method", "device", "params", "trainable_params", "image_size", "batch_size", "versions"):
        assert key in result
    expected = {"fp32", "tf32", "tf32_fused", "tf32_fused_repeat", "tf32_fused_batch4", "lowmem", "bf16_autocast",
                "bf16_autocast_repeat", "bf16_master", "tf32_fused_nhwc", "bf16_autocast_nhwc", "tf32_fused_joint",
                "tf32_fused_joint_batched", "tf32_fused_joint_bf16vae", "tf32_fused_joint_fclip",
                "tf32_fused_joint_cudnnbench", "tf32_fused_joint_norms", "tf32_fused_joint_batched_fclip"}
    assert set(result["train"]) == expected, result["skipped"]
    for name, row in result["train"].items():
        assert row["loss_finite"] and row["median_s"] > 0 and row["n"] == 1, name
    assert result["train"]["tf32_fused_batch4"]["episodes_per_s"] > 0
    assert result["predict"]["fp32"]["chunk_slices"] == 2
    assert set(result["predict"]["fp32"]["parts_ms_per_chunk"]) == {
        "support_pass", "vae_encode", "unet_query_pass", "vae_decode", "threshold_lcc_cpu"}
    assert result["predict"]["fp32_chunk32"]["chunk_slices"] == 32
    assert set(result["predict"]) == {"fp32", "fp32_chunk32"}  # the other inference variants need CUDA
    assert result["tiny"]["tiny_eager"]["steps_per_s"] > 0
    # every variant starts from the same weights and batches: the first loss is the plain one's
    first = result["train"]["fp32"]["losses"][0]
    assert all(row["losses"][0] == pytest.approx(first, rel=1e-5) for name, row in result["train"].items()
               if name in ("tf32", "tf32_fused", "lowmem"))
    # the same weights and batches again: on the CPU bit for bit, which is what the GPU's
    # eager-vs-eager and graph-vs-eager differences are read against
    assert result["train"]["tf32_fused_repeat"]["loss_max_rel_diff_vs_eager"] == 0.0
    assert result["tiny"]["tiny_eager_repeat"]["loss_max_rel_diff_vs_eager"] == 0.0
    assert result["train"]["bf16_autocast_repeat"]["loss_max_rel_diff_vs_eager"] == 0.0
    # the joint pass ran as such, on the shared model, and gave the two-pass losses
    joint = result["train"]["tf32_fused_joint"]
    assert joint["joint_pass"] is True and result["train"]["tf32_fused"]["joint_pass"] is False
    assert joint["loss_max_rel_diff_vs_eager"] < 1e-5 and joint["speedup_vs_two_pass"] > 0
    # and the batched encode the four encodes' losses (TAESD on the CPU: the same latents)
    batched = result["train"]["tf32_fused_joint_batched"]
    assert batched["loss_max_rel_diff_vs_four_encodes"] < 1e-5 and batched["speedup_vs_four_encodes"] > 0
    # a bf16 VAE without autocast ran as such (restoring the weights kept it bf16): other
    # latents, a loss near the fp32 VAE's
    bf16_vae = result["train"]["tf32_fused_joint_bf16vae"]
    assert 0 < bf16_vae["loss_max_rel_diff_vs_fp32_vae"] < 0.1 and bf16_vae["speedup_vs_fp32_vae"] > 0
    # the clipping inside fused AdamW: the clipped update, so the losses of the clipping pass
    fused_clip = result["train"]["tf32_fused_joint_fclip"]
    assert fused_clip["loss_max_rel_diff_vs_clip_pass"] < 1e-5 and fused_clip["speedup_vs_clip_pass"] > 0
    assert isinstance(result["group_norm_keeps_channels_last"], bool)
    # cuDNN's algorithm timing does nothing on a CPU: the same losses; and it is off again after
    cudnn = result["train"]["tf32_fused_joint_cudnnbench"]
    assert cudnn["loss_max_rel_diff_vs_cudnn_heuristics"] == 0.0 and cudnn["speedup_vs_cudnn_heuristics"] > 0
    assert cudnn["cudnn_benchmark"] is True and result["train"]["tf32_fused_joint"]["cudnn_benchmark"] is False
    assert torch.backends.cudnn.benchmark is False
    # every GroupNorm ran compiled in the norms variant, the plain losses; eager again after it
    norms_name = "tf32_fused_joint_norms"
    norms = result["train"][norms_name]
    assert norms["compiled_group_norms"] > 0 and norms["loss_max_rel_diff_vs_eager_norms"] < 1e-5
    assert norms["graphs_compiled"] >= 1
    assert all(row["compiled_group_norms"] == 0 for name, row in result["train"].items() if name != norms_name)
    cuda_only = {"tf32_fused_graph", "tf32_fused_batch4_graph", "bf16_autocast_graph", "bf16_master_graph", "tiny_graph",
                 "tf32_fused_nhwc_graph", "bf16_autocast_nhwc_graph", "tf32_fused_blocks_graph",
                 "bf16_autocast_nhwc_blocks_graph", "tiny_blocks_graph", "tf32_fused_joint_graph",
                 "bf16_autocast_nhwc_joint_graph", "tiny_joint_graph", "tf32_fused_joint_batched_graph",
                 "bf16_autocast_nhwc_joint_batched_graph", "tf32_fused_joint_bf16vae_graph",
                 "tf32_fused_joint_batched_bf16vae_graph", "tiny_joint_batched_graph", "tf32_fused_joint_fclip_graph",
                 "bf16_autocast_nhwc_joint_fclip_graph", "tiny_joint_fclip_graph", "tf32_fused_joint_cudnnbench_graph",
                 "bf16_autocast_nhwc_joint_cudnnbench_graph", "tf32_fused_joint_norms_graph",
                 "bf16_autocast_nhwc_joint_norms_graph", "bf16_autocast_nhwc_joint_fclip_norms_graph",
                 "tiny_joint_norms_graph", "tf32_fused_joint_batched_fclip_graph",
                 "bf16_autocast_nhwc_joint_batched_fclip_norms_graph", "tiny_joint_batched_fclip_graph",
                 "tf32_fused_nhwc_joint_batched_fclip_graph", "tf32_fused_nhwc_joint_batched_fclip_norms_graph",
                 "tiny_joint_batched_fclip_blocks_graph"}
    assert set(result["skipped"]) == cuda_only


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adnet", "prototype"])
def test_other_methods_run_the_variants_the_prepared_script_gives_them(method, capsys):
    """The prepared script times ADNet's and Q-Net's steps with the SD model's harness; a
    method without SD-FSMIS's options must run there too."""
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--tiny", "--size", "64", "--steps", "1", "--warmup", "1", "--method", method,
            "--budget-s", "1e9", "--only", "tf32_fused", "tf32_fused_graph"]
    assert module.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["train"]) == {"tf32_fused"}, result["skipped"]
    assert result["train"]["tf32_fused"]["loss_finite"]


def test_the_prepared_gpu_speed_script_names_only_known_variants():
    """benchmarks/gpu_speed_check.sh runs on a lent GPU where a typo costs the session:
    every variant it selects must be one gpu_engine_check.py defines."""
    import re

    script = (SCRIPT.parent / "gpu_speed_check.sh").read_text().replace("\\\n", " ")  # continued lines
    source = SCRIPT.read_text()
    selected = {name for line in re.findall(r"--only ([^\n]+)", script) for name in line.split()}
    assert {"tf32_fused_joint_graph", "tf32_fused_joint_batched_fclip_graph", "bf16_autocast_nhwc_joint_graph",
            "bf16_autocast_nhwc_joint_batched_fclip_norms_graph", "tiny_joint_graph", "tiny_joint_batched_fclip_graph",
            "predict"} <= selected
    for name in selected:
        assert f'"{name}"' in source, name


@pytest.mark.slow
def test_variants_start_from_the_same_random_draws(capsys):
    """fidelity=code on the SD VAE samples the posterior from the global CPU generator. Each
    variant reseeds it, so two eager runs draw the same noise and their losses agree: an
    H100 session compared a recorded step with an eager one 37 % apart before this, because
    the generator ran on between the two variants."""
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--tiny", "--size", "64", "--steps", "2", "--warmup", "1", "--budget-s", "1e9",
            "--extra", "fidelity=code", "backbone.vae=sd", "--only", "tf32_fused", "tf32_fused_repeat"]
    assert module.main(argv) == 0
    train = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train"]
    assert train["tf32_fused_repeat"]["loss_max_rel_diff_vs_eager"] < 1e-5
    assert len(set(train["tf32_fused"]["losses"])) > 1  # the loss moved: the draws were really taken
