"""The engine's speed switches: each gives the plain path's losses (within a stated tolerance),
through the real engine (`train`), on the CPU. Plus the input pipeline's exactness and the
device-side non-finite check."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from fsmis_bench.config import compose
from fsmis_bench.errors import ConfigError
from fsmis_bench.method import EpisodeBatch, Method
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.runner import build_method
from fsmis_bench.training import step as step_module
from fsmis_bench.training.engine import train
from fsmis_bench.training.episodes import EpisodeSampler
from fsmis_bench.training.loader import EpisodeLoader, resolve_num_workers
from fsmis_bench.training.step import ComputeOptions, TrainStep, compile_method
from fsmis_datasets.phantom import Phantom

PROTOTYPE = ["method=prototype", "method.width=8", "method.feature_dim=16", "train.image_size=32", "train.batch_size=2"]
TINY_SD = [
    "method=sdfsmis", "backbone=tiny", "backbone.vae=identity", "pretrained=false",
    "train.image_size=32", "train.batch_size=1",
]
STEPS = 3


def _sampler(seed: int = 0) -> EpisodeSampler:
    dataset = Phantom(size=32, n_slices=10, n_cases=3)
    group = EvalGroup("all", tuple(dataset.test_organs))
    return EpisodeSampler(dataset, dataset.case_ids(), group, min_fg_pixels=10, image_size=32, seed=seed)


def _losses(tmp_path, overrides: list[str], name: str) -> list[float]:
    """Per-step losses of a fresh ``STEPS``-step run through the engine."""
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    cfg = compose([*overrides, f"train.steps={STEPS}", "train.log_every=1", "train.num_workers=0",
                   "train.schedule=constant", "device=cpu"])
    method = build_method(cfg)
    result = train(method, _sampler(), cfg, tmp_path / name)
    AcceleratorState._reset_state(True)
    return [row["loss"] for row in result.log]


def _close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=0) for x, y in zip(a, b))


# switch, base config (the plain path), tolerance on every step's loss (relative), why that tolerance
SWITCHES = [
    (["train.fused_optimizer=true"], PROTOTYPE, 1e-5, "fused AdamW: the same update, other rounding"),
    # prototype.yaml turns NHWC on, so the plain path is NCHW here: measured 1.1e-5 apart
    (["train.channels_last=true"], [*PROTOTYPE, "train.channels_last=false"], 1e-4,
     "NHWC convolutions: other summation order"),
    (["train.optimizer=adamw8bit"], PROTOTYPE, 1e-3,
     "8-bit moments: step 1 identical, then quantised moments (measured 4e-5 apart)"),
    (["train.grad_accum=2", "train.accumulation=batched"], PROTOTYPE, 1e-5, "same episodes, same mean loss"),
    (["train.num_workers=2"], PROTOTYPE, 0.0, "episodes drawn in worker processes: the same episodes, bit for bit"),
    (["train.channels_last=true", "method.vae_dtype=float32"], TINY_SD, 1e-5, "NHWC convolutions"),
    (["train.grad_accum=2", "train.accumulation=batched"], TINY_SD, 1e-5, "same episodes, same mean loss"),
    (["train.fused_optimizer=true", "train.fused_clip=true"], PROTOTYPE, 1e-5,
     "clipping inside fused AdamW: the same update, other rounding"),
    (["train.fused_optimizer=true", "train.fused_clip=true"], TINY_SD, 1e-5,
     "clipping inside fused AdamW: the same update, other rounding"),
    (["train.fused_optimizer=true", "train.fused_clip=true", "train.grad_accum=2"], PROTOTYPE, 1e-5,
     "clipping inside fused AdamW once per accumulated step (fidelity=code's 4 micro-batches with CUDA)"),
    (["train.fused_clip=true"],
     [*PROTOTYPE, "train.weight_dtype=bfloat16", "mixed_precision=bf16", "train.fused_optimizer=true"], 5e-3,
     "bf16 weights, fp32 masters: the plain path rounds the clipped gradients to bf16, this one divides in fp32"),
    (["method.gradient_checkpointing=true"], TINY_SD, 1e-5, "activations recomputed in the backward: the same sums"),
    (["memory=low"], TINY_SD, 1e-3, "recomputed activations and 8-bit AdamW moments (measured 2.4e-6 apart)"),
    # bf16 autocast is not the plain precision: lossy by design, within the drift measured here
    (["mixed_precision=bf16"], PROTOTYPE, 1e-1, "bf16 autocast: up to 6 % by the third step on these episodes"),
    (["mixed_precision=bf16"], TINY_SD, 1e-2, "bf16 autocast: 0.2 % on the tiny backbone"),
    # a CPU has no fp16 autocast: the run is fp32 (and recorded so), bit for bit
    (["mixed_precision=fp16"], PROTOTYPE, 0.0, "fp16 runs as fp32 on a CPU"),
]


def _switched_keys(base: list[str], switch: list[str]) -> dict[str, object]:
    """The keys ``switch`` changes in the resolved config of ``base`` (empty: a vacuous switch)."""
    from fsmis_bench.training.precision import with_resolved_precision

    def flat(overrides):
        return pd.json_normalize(OmegaConf.to_container(with_resolved_precision(compose(overrides)))).iloc[0].to_dict()

    plain, switched = flat(base), flat([*base, *switch])
    return {k: v for k, v in switched.items() if plain.get(k) != v}


@pytest.mark.parametrize("switch, base, rel, why", SWITCHES, ids=[" ".join(s[0]) + " " + s[1][0] for s in SWITCHES])
def test_switch_gives_the_plain_losses(tmp_path, switch, base, rel, why):
    plain_switches = [s for s in switch if s.startswith("train.grad_accum")]  # the plain run accumulates too
    if switch != ["mixed_precision=fp16"]:  # that one resolves to the plain precision on a CPU, by design
        assert _switched_keys([*base, *plain_switches], switch), f"{switch} changes nothing in {base}"
    plain = _losses(tmp_path, [*base, *plain_switches], "plain")
    fast = _losses(tmp_path, [*base, *switch], "fast")
    assert all(math.isfinite(v) for v in plain)
    assert _close(plain, fast, rel), f"{why}: {plain} vs {fast}"
    if "adamw8bit" in " ".join(switch) or switch == ["memory=low"]:  # nothing has been updated at the first loss
        assert plain[0] == fast[0]


def test_adamw8bit_keeps_the_large_tensors_moments_in_8_bits():
    """The 8-bit switch really quantises: a tensor of 4096 elements or more (bitsandbytes'
    threshold) keeps uint8 moments, a smaller one 32-bit moments."""
    from fsmis_bench.training.engine import make_optimizer

    large, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(10))
    cfg = compose([*PROTOTYPE, "train.optimizer=adamw8bit"])
    optimizer = make_optimizer([{"params": [large, small], "lr": 1e-3, "name": "all"}], cfg.train)
    (large.sum() + small.sum()).backward()
    optimizer.step()
    assert optimizer.state[large]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32


@pytest.mark.slow
def test_speed_preset_gives_the_plain_losses_within_bf16s_drift(tmp_path, monkeypatch):
    """``speed=fast`` (bf16 autocast, NHWC, compiled GroupNorms; ``aot_eager`` for the
    compilation, as above) against the plain path on the tiny backbone: 0.2 % measured."""
    torch._dynamo.reset()
    plain = _losses(tmp_path, TINY_SD, "plain")
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    fast = _losses(tmp_path, [*TINY_SD, "speed=fast"], "fast")
    torch._dynamo.reset()
    assert _close(plain, fast, 2e-2), (plain, fast)


@pytest.mark.slow
def test_inductor_compiled_norms_give_the_plain_losses(tmp_path):
    """The compile switch with the backend it runs (Inductor generates and builds C++ kernels
    on a CPU, Triton ones on CUDA), not the ``aot_eager`` stand-in: GroupNorms compiled."""
    torch._dynamo.reset()
    plain = _losses(tmp_path, PROTOTYPE, "plain")
    assert step_module.COMPILE_BACKEND == "inductor"
    compiled = _losses(tmp_path, [*PROTOTYPE, "train.compile=default", "train.compile_scope=norms"], "compiled")
    torch._dynamo.reset()
    assert _close(plain, compiled, 1e-5), (plain, compiled)


def test_bf16_master_weights_track_bf16_autocast(tmp_path):
    """bf16 weights + fp32 master copies vs fp32 weights, both under bf16 autocast: the first
    loss is identical (autocast rounds the weights to bf16 too); after that the bf16-rounded
    weight gradients move the tiny net apart by a few % within 3 steps at lr 1e-3: up to 7 %
    at the third step on these episodes (the reference episode sampler's; up to 6 % on the
    earlier sampler's), as far as bf16 autocast and plain fp32 are apart (6 %). Tolerance
    10 %, against plain fp32 as well."""
    autocast = _losses(tmp_path, [*PROTOTYPE, "mixed_precision=bf16"], "autocast")
    master = _losses(tmp_path, [*PROTOTYPE, "mixed_precision=bf16", "train.weight_dtype=bfloat16"], "master")
    fp32 = _losses(tmp_path, PROTOTYPE, "fp32")
    assert autocast[0] == master[0]
    assert _close(autocast, master, 1e-1), (autocast, master)
    assert _close(fp32, master, 1e-1), (fp32, master)


def test_bf16_weights_need_bf16_autocast(tmp_path):
    from fsmis_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="needs mixed_precision=bf16"):
        _losses(tmp_path, [*PROTOTYPE, "train.weight_dtype=bfloat16"], "bad")


@pytest.mark.parametrize("base, scope", [(PROTOTYPE, "model"), (PROTOTYPE, "norms"),
                                         pytest.param(TINY_SD, "model", marks=pytest.mark.slow),
                                         pytest.param(TINY_SD, "blocks", marks=pytest.mark.slow),
                                         pytest.param(TINY_SD, "norms", marks=pytest.mark.slow)],
                         ids=["prototype", "prototype-norms", "tiny-sdfsmis", "tiny-sdfsmis-blocks",
                              "tiny-sdfsmis-norms"])
def test_compile_gives_the_plain_losses(tmp_path, monkeypatch, capsys, base, scope):
    """torch.compile's graph capture (dynamo + AOT autograd; the ``aot_eager`` backend skips
    code generation, which the GPU benchmark measures) computes the plain losses, of the
    whole method, of its blocks one by one (the prototype has no blocks: see below) or of
    its GroupNorms."""
    torch._dynamo.reset()
    plain = _losses(tmp_path, base, "plain")
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    assert "compile" not in capsys.readouterr().err
    with torch._dynamo.config.patch(recompile_limit=8):  # blocks raises it (restored after)
        compiled = _losses(tmp_path, [*base, "train.compile=default", f"train.compile_scope={scope}"], "compiled")
    torch._dynamo.reset()
    assert _close(plain, compiled, 1e-5), (plain, compiled)
    # the progress bar stands still while the first step compiles: the run says why
    assert f"train.compile=default (scope {scope}): the first steps compile" in capsys.readouterr().err


class _Blocks(Method):
    """Two identical residual blocks (named as torchvision's, so :meth:`Method.compile_regions`
    finds them) between an eager stem and head."""

    class BasicBlock(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(width, width, 3, padding=1)
            self.norm = torch.nn.GroupNorm(2, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.nn.functional.silu(self.norm(self.conv(x)))

    def __init__(self) -> None:
        super().__init__(compose(PROTOTYPE))
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = torch.nn.Sequential(self.BasicBlock(4), self.BasicBlock(4))
        self.head = torch.nn.Conv2d(4, 1, 1)

    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        logits = self.head(self.blocks(self.stem(batch.query_images)))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.query_masks)


@torch._dynamo.config.patch(recompile_limit=8)
def test_blocks_scope_compiles_each_block_and_shares_their_graph(monkeypatch):
    """``train.compile_scope=blocks``: the regions are compiled in place, the method's own
    forward is not; blocks of one class and shape share one graph; loss and gradients as
    the plain method's."""
    torch._dynamo.reset()
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    batch = _sampler().batch(2)
    plain, compiled = _Blocks(), _Blocks()
    regions = compile_method(compiled, "default", "blocks")
    assert regions == list(compiled.blocks)
    assert compiled._compiled_call_impl is None  # nn.Module.compile's compiled __call__
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert torch._dynamo.config.recompile_limit == 2 * step_module.REGION_RECOMPILES
    counters.clear()
    want, got = plain(batch), compiled(batch)
    assert counters["stats"]["unique_graphs"] == 1  # both blocks run the one compiled graph
    grads = torch.autograd.grad(got, list(compiled.parameters()))
    for g, w in zip(grads, torch.autograd.grad(want, list(plain.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)
    torch._dynamo.reset()


def test_blocks_scope_without_blocks_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="method prototype has no repeated blocks") as caught:
        _losses(tmp_path, [*PROTOTYPE, "train.compile=default", "train.compile_scope=blocks"], "blocks")
    assert "train.compile_scope=model" in caught.value.hint


class _NoNorms(Method):
    def __init__(self) -> None:
        super().__init__(compose(PROTOTYPE))
        self.head = torch.nn.Conv2d(1, 1, 1)

    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        return self.head(batch.query_images).mean()


def test_norms_scope_without_group_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="method prototype has no GroupNorm to compile") as caught:
        compile_method(_NoNorms(), "default", "norms")
    assert "train.compile_scope=model" in caught.value.hint


def _norm_stack() -> torch.nn.Sequential:
    """Three GroupNorms of different widths between convolutions, as in a U-Net stage."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 16, eps=1e-6), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 12, 1), torch.nn.GroupNorm(3, 12), torch.nn.SiLU(),
    )


@pytest.mark.parametrize("scope", ["norms", "blocks", "model"])
def test_uncompile_method_gives_back_the_plain_modules(monkeypatch, scope):
    """The evaluation runs the plain modules, as ``eval`` from the weights does: every scope
    is undone in place, the state dict and the outputs are the plain module's."""
    from fsmis_bench.training.step import uncompile_method

    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain = _norm_stack()
    compiled = _norm_stack()
    compiled.load_state_dict(plain.state_dict())
    keys = list(compiled.state_dict())
    if scope == "blocks":
        monkeypatch.setattr(compiled, "compile_regions", lambda: [compiled[0], compiled[3]], raising=False)
    compile_method(compiled, "default", scope)
    x = torch.randn(2, 4, 12, 12)
    compiled(x)  # compiled and run once
    restored = uncompile_method(compiled)
    assert restored == {"norms": 3, "blocks": 2, "model": 1}[scope]
    assert [type(m) for m in compiled] == [type(m) for m in plain]
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in compiled.modules())
    assert not any(hasattr(m, "compiled_group_norm") for m in compiled.modules())
    assert list(compiled.state_dict()) == keys
    counters.clear()
    assert torch.equal(compiled(x), plain(x))  # bit for bit: the eager kernels again
    assert counters["stats"]["unique_graphs"] == 0  # and nothing compiled on the way
    assert uncompile_method(compiled) == 0


def test_compiled_norms_leave_a_plugins_own_group_norm_and_uncompile_only_what_they_compiled(monkeypatch):
    """A GroupNorm subclass with a forward of its own keeps it (the compiled function
    computes nn.GroupNorm's); a module the method compiled itself stays compiled."""
    from fsmis_bench.training.compiled_norms import CompiledGroupNorm
    from fsmis_bench.training.step import uncompile_method

    class ScaledNorm(torch.nn.GroupNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    class PlainSubclass(torch.nn.GroupNorm):
        pass

    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), ScaledNorm(4, 8), PlainSubclass(4, 8),
                                torch.nn.Conv2d(8, 8, 1))
    model[3].compile(backend="aot_eager")  # the method's own choice, e.g. for its inference
    norms = compile_method(model, "default", "norms")
    assert norms == [model[2]] and type(model[1]) is ScaledNorm and type(model[2]) is CompiledGroupNorm
    assert uncompile_method(model) == 1
    assert type(model[2]) is PlainSubclass and type(model[1]) is ScaledNorm
    assert model[3]._compiled_call_impl is not None


@pytest.mark.slow
def test_a_run_compiled_for_training_is_evaluated_with_plain_modules(monkeypatch, results_dir):
    """``train.compile_scope=norms`` (``speed=fast``) compiles the GroupNorms for the step;
    the evaluation after it gets the plain ones, as a resumed run or ``eval`` does."""
    from fsmis_bench import runner
    from fsmis_bench.cli import main
    from fsmis_bench.training.compiled_norms import CompiledGroupNorm

    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    seen = []
    real_evaluate = runner.evaluate

    def spying_evaluate(method, *args, **kwargs):
        seen.append(sorted({type(m).__name__ for m in method.modules() if isinstance(m, torch.nn.GroupNorm)}))
        return real_evaluate(method, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", spying_evaluate)
    trained = []
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda method, *a, **k: (real_train(method, *a, **k), trained.append(
        any(isinstance(m, CompiledGroupNorm) for m in method.modules())))[0])
    argv = ["run", *TINY_SD, "dataset=phantom", "dataset.size=64", "dataset.n_slices=16", "protocol.min_fg_pixels=20", "train.steps=2",
            "train.compile=default", "train.compile_scope=norms", "protocol.organs=[liver]", "protocol.max_queries=1"]
    assert main(argv) == 0
    assert trained == [True]  # the step did run the compiled GroupNorms
    assert seen == [["GroupNorm"]]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_norms_scope_shares_one_graph_across_shapes_and_keeps_the_layout(monkeypatch, channels_last):
    """``train.compile_scope=norms``: GroupNorms of three widths and two spatial sizes run
    three compiled graphs forward, one per ``(num_groups, eps)`` pair (dynamo specialises
    those, not the shapes); outputs, gradients and the state dict are the eager module's; an
    NHWC input gives NHWC outputs, so the next convolution reads them as they lie."""
    from fsmis_bench.training.compiled_norms import CompiledGroupNorm

    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    plain, compiled = _norm_stack(), _norm_stack()
    keys = list(compiled.state_dict())
    form = torch.channels_last if channels_last else torch.contiguous_format
    plain.to(memory_format=form)
    compiled.to(memory_format=form)
    norms = compile_method(compiled, "default", "norms")
    assert [type(m) for m in norms] == [CompiledGroupNorm] * 3
    assert all(isinstance(m, torch.nn.GroupNorm) for m in norms) and list(compiled.state_dict()) == keys
    counters.clear()
    for size in (16, 12):  # a second input size reuses the graphs
        x = torch.randn(2, 4, size, size).to(memory_format=form)
        want, got = plain(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), list(compiled.parameters())),
                                   torch.autograd.grad(want.square().sum(), list(plain.parameters())),
                                   rtol=1e-4, atol=1e-5)
        inner = compiled[1](compiled[0](x))
        assert inner.is_contiguous(memory_format=form)
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_norm_returns_nhwc_where_eager_group_norm_would_not(monkeypatch):
    """Where a device's eager GroupNorm returns NCHW for an NHWC input (the CPU's keeps
    NHWC; whether CUDA's does is what ``group_norm_keeps_channels_last`` in the GPU benchmark
    records), the compiled function hands the next convolution NHWC all the same. A stand-in
    for such a kernel, on the CPU."""
    import types

    from fsmis_bench.training import compiled_norms

    def nchw_group_norm(*args):
        return torch.nn.functional.group_norm(*args).contiguous()

    monkeypatch.setattr(compiled_norms, "F", types.SimpleNamespace(group_norm=nchw_group_norm))
    x = torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(8), torch.randn(8)
    out = compiled_norms._group_norm(x, 4, weight, bias, 1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.group_norm(x, 4, weight, bias, 1e-5))
    flat = torch.randn(2, 8, 6, 6)
    assert compiled_norms._group_norm(flat, 4, weight, bias, 1e-5).is_contiguous()


def test_compile_regions_of_tiny_sdfsmis(monkeypatch):
    """SD-FSMIS compiles its ResNet blocks and its transformer blocks' feed-forward parts, none
    of which sees the support bank; the transformer blocks, which look their bank entry up by
    their own layer name, would each compile on their own. Blocks of one class and shape
    share one compiled graph."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.resnet import ResnetBlock2D

    method = build_method(compose(TINY_SD))
    regions = method.compile_regions()
    kinds = (FeedForward, ResnetBlock2D)
    assert {id(m) for m in regions} == {id(m) for m in method.modules() if isinstance(m, kinds)}
    assert sum(isinstance(m, ResnetBlock2D) for m in regions) == 14 and len(regions) == 24
    assert not any(type(inner).__name__ in ("Attention", "SupportCrossAttentionBlock")
                   for m in regions for inner in m.modules())
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    compile_method(method, "default", "blocks")
    size = 32
    batch = EpisodeBatch(torch.rand(1, 1, 1, size, size) * 2 - 1, (torch.rand(1, 1, 1, size, size) > 0.5).float(),
                         torch.rand(1, 1, size, size) * 2 - 1, (torch.rand(1, 1, size, size) > 0.5).float())
    method(batch).backward()
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs < len(regions), graphs  # shared, not one per block
    torch._dynamo.reset()


@pytest.mark.parametrize("value", ["layers", "true"])
def test_bad_compile_scope_fails_at_compose_time(value):
    with pytest.raises(ConfigError, match="train.compile_scope"):
        compose([*PROTOTYPE, f"train.compile_scope={value}"])
    with pytest.raises(ConfigError, match="train.compile_scope"):
        ComputeOptions.from_config(OmegaConf.create({"compile_scope": value}))


def test_bf16_vae_stays_close_to_fp32(tmp_path):
    """The frozen VAE in bf16 (TAESD, random weights): latents within bf16 rounding, so the
    losses are within 3 %."""
    base = [s.replace("backbone.vae=identity", "backbone.vae=taesd") for s in TINY_SD]
    fp32 = _losses(tmp_path, base, "fp32")
    bf16 = _losses(tmp_path, [*base, "method.vae_dtype=bfloat16"], "bf16")
    assert _close(fp32, bf16, 3e-2), (fp32, bf16)


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_draw_exactly_the_episodes_of_one_process(workers):
    """Micro-batch i holds episodes i*B ... whoever draws it, from any start (a resumed run)."""
    sampler = _sampler()
    reference = [sampler.batch(2) for _ in range(5)]
    loaded = list(EpisodeLoader(_sampler(), 2, start=2, stop=5, device=torch.device("cpu"), num_workers=workers))
    assert len(loaded) == 3
    for ref, got in zip(reference[2:], loaded):
        assert torch.equal(ref.query_images, got.query_images) and torch.equal(ref.support_masks, got.support_masks)


def test_accumulated_and_batched_steps_see_the_same_episodes():
    sampler = _sampler()
    four_of_one = [sampler.batch(1) for _ in range(4)]
    sampler = _sampler()
    one_of_four = sampler.batch(4)
    assert torch.equal(torch.cat([b.query_images for b in four_of_one]), one_of_four.query_images)
    assert sampler.state_dict() == {"seed": 0, "next_episode": 4}


@pytest.mark.parametrize("value, cuda, cores, expected", [
    ("auto", False, 16, 0), ("auto", True, 16, 4), ("auto", True, 2, 1), (3, False, 2, 3), ("2", True, 2, 2),
])
def test_num_workers_resolution(value, cuda, cores, expected, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert resolve_num_workers(value, cuda) == expected


@pytest.mark.parametrize("value", [-1, "many", True])
def test_bad_num_workers_is_a_config_error(value):
    from fsmis_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="num_workers"):
        resolve_num_workers(value, False)


class _Scripted(torch.nn.Module):
    """A one-parameter stand-in for a method: its n-th call (from 1) returns ``loss(weight, n)``."""

    def __init__(self, weight: torch.nn.Parameter, loss) -> None:
        super().__init__()
        self.weight = weight
        self.loss = loss
        self.calls = 0

    def forward(self, batch) -> torch.Tensor:
        self.calls += 1
        return self.loss(self.weight, self.calls)


def test_nonfinite_loss_is_caught_on_device_and_named_by_step():
    """The step never syncs; the flag names the first bad step when the engine checks it."""
    AcceleratorState._reset_state(True)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(()))
    model = _Scripted(weight, lambda w, call: w * (float("nan") if call in (3, 4) else 1.0))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = TrainStep(model, optimizer, scheduler, accelerator, grad_clip=1.0, first_step=10)
    for _ in range(2):
        step([None])
    step.raise_if_nonfinite()  # steps 11, 12 fine
    for _ in range(3):
        loss = step([None])
    assert loss.device.type == "cpu" and loss.ndim == 0
    with pytest.raises(FloatingPointError, match="step 13"):
        step.raise_if_nonfinite()
    AcceleratorState._reset_state(True)


def _clipped_weights(gradient_sizes: tuple[float, ...], *, grad_clip: float, fused_clip: bool) -> torch.Tensor:
    """The weights after one fused-AdamW step per size, each step's gradient a fixed direction
    scaled to that L2 norm, through :class:`TrainStep`."""
    AcceleratorState._reset_state(True)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    direction = torch.linspace(-1.0, 2.0, 1000)
    direction /= torch.linalg.vector_norm(direction)
    weight = torch.nn.Parameter(torch.linspace(0.5, -0.5, 1000))
    model = _Scripted(weight, lambda w, call: (w * direction * gradient_sizes[call - 1]).sum())
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = TrainStep(model, optimizer, scheduler, accelerator, grad_clip=grad_clip, fused_clip=fused_clip)
    for _ in gradient_sizes:
        step([None])
    assert not hasattr(optimizer, "grad_scale")  # read by its own step only
    AcceleratorState._reset_state(True)
    return weight.detach().clone()


# gradient norms per step: AdamW divides by the root of its second moment, so a clipping
# factor that stays the same from step to step cancels; sizes that change do not
@pytest.mark.parametrize("sizes, clipped", [((100.0, 0.5, 30.0), True), ((0.2, 0.5, 0.9), False)],
                         ids=["above-the-bound", "under-the-bound"])
def test_fused_clip_gives_the_clipped_update(sizes, clipped):
    """``train.fused_clip``: fused AdamW dividing by :func:`clip_divisor` makes the update that
    ``clip_grad_norm_`` + fused AdamW makes; where clipping changes the update the test can
    tell the two apart from no clipping, and under the bound the divisor is exactly 1."""
    outside = _clipped_weights(sizes, grad_clip=1.0, fused_clip=False)
    inside = _clipped_weights(sizes, grad_clip=1.0, fused_clip=True)
    unclipped = _clipped_weights(sizes, grad_clip=0.0, fused_clip=True)  # fused_clip without a bound: off
    assert torch.allclose(inside, outside, rtol=1e-6, atol=1e-7), (inside - outside).abs().max()
    if clipped:
        assert (unclipped - outside).abs().max() > 1e-3
    else:
        assert torch.equal(inside, outside) and torch.equal(unclipped, outside)


def test_clip_divisor_is_the_inverse_of_clip_grad_norm_factor():
    grads = [torch.full((3,), 4.0), torch.full((4,), -3.0)]  # norm sqrt(48 + 36)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    divisor = step_module.clip_divisor(params, 2.0)
    assert divisor.dtype == torch.float32 and divisor.ndim == 0
    assert math.isclose(float(divisor), (math.sqrt(84.0) + 1e-6) / 2.0, rel_tol=1e-6)
    assert float(step_module.clip_divisor(params, 100.0)) == 1.0
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    assert torch.allclose(params[0].grad, grads[0] / divisor) and torch.allclose(params[1].grad, grads[1] / divisor)


@pytest.mark.parametrize("extra, reason", [
    ([], "AdamW is not fused here"),  # fused_optimizer=auto is off on a CPU
    (["train.optimizer=sgd", "train.fused_optimizer=true"], "train.optimizer=sgd"),
    (["train.fused_optimizer=true", "mixed_precision=fp16", "device=cuda"], "mixed_precision=fp16"),  # CUDA's
], ids=["auto-on-cpu", "sgd", "fp16"])
def test_fused_clip_without_a_fused_adamw_fails_at_compose_time(extra, reason):
    with pytest.raises(ConfigError, match=reason):
        compose([*PROTOTYPE, "device=cpu", "train.fused_clip=true", *extra])
    compose([*PROTOTYPE, "device=cpu", "train.fused_clip=true", "train.fused_optimizer=true"])  # allowed


def test_fused_clip_refuses_an_optimizer_without_grad_scale():
    """What the config check cannot see (an optimiser built elsewhere) the step refuses."""
    AcceleratorState._reset_state(True)
    from accelerate import Accelerator

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)  # foreach, not fused: no grad_scale
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(ConfigError, match="needs an optimiser whose step applies a grad_scale"):
        TrainStep(torch.nn.Identity(), optimizer, scheduler, Accelerator(cpu=True), grad_clip=1.0, fused_clip=True)
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("name, fused, weight_dtype, inside", [
    ("adamw", True, "float32", True),
    ("adamw", False, "float32", False),  # foreach: no grad_scale, clipped outside
    ("sgd", True, "float32", False),
    ("adamw", True, "bfloat16", False),  # fp32 master copies: clipped outside
], ids=["fused-adamw", "foreach-adamw", "fused-sgd", "master-weight-adamw"])
def test_fused_clip_auto_clips_inside_a_fused_adamw_only(name, fused, weight_dtype, inside):
    """``train.fused_clip=auto`` (the default): the step clips inside the optimiser exactly
    where the run's hash says it does (:func:`fused_clip_applies` on the config), and
    never refuses an optimiser."""
    AcceleratorState._reset_state(True)
    from accelerate import Accelerator

    from fsmis_bench.training.optim import build_optimizer

    weight = torch.nn.Parameter(torch.ones(3, dtype=getattr(torch, weight_dtype)))
    optimizer = build_optimizer([{"params": [weight], "lr": 0.1}], name=name, fused=fused, weight_dtype=weight_dtype)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = TrainStep(torch.nn.Identity(), optimizer, scheduler, Accelerator(cpu=True), grad_clip=1.0, fused_clip="auto")
    assert step.fused_clip is inside
    off = TrainStep(torch.nn.Identity(), optimizer, scheduler, Accelerator(cpu=True), grad_clip=0.0, fused_clip="auto")
    assert off.fused_clip is False  # no bound, nothing to clip
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("extra, inside", [
    (["train.fused_optimizer=true"], True),
    ([], False),  # fused_optimizer=auto: plain AdamW on a CPU
    (["train.fused_optimizer=true", "train.optimizer=sgd"], False),
    (["train.fused_optimizer=true", "mixed_precision=fp16", "device=cuda"], False),  # (a CPU runs fp16 as fp32)
    (["train.fused_optimizer=true", "mixed_precision=bf16", "train.weight_dtype=bfloat16"], False),
], ids=["fused", "auto-on-cpu", "sgd", "fp16", "master-weights"])
def test_fused_clip_auto_resolves_for_the_hash_as_the_step_does(extra, inside):
    from fsmis_bench.training.precision import with_resolved_precision

    cfg = compose([*PROTOTYPE, "device=cpu", *extra])
    assert cfg.train.fused_clip == "auto"
    assert with_resolved_precision(cfg).train.fused_clip is inside


def test_cudnn_benchmark_follows_each_run_config():
    """``train.cudnn_benchmark`` is process-wide in torch: each run (a sweep runs several in
    one process) sets it from its own config, for training and evaluation alike."""
    from fsmis_bench.training.engine import make_accelerator

    before = torch.backends.cudnn.benchmark
    try:
        make_accelerator(compose([*PROTOTYPE, "device=cpu", "train.cudnn_benchmark=true"]))
        assert torch.backends.cudnn.benchmark is True
        make_accelerator(compose([*PROTOTYPE, "device=cpu"]))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
        AcceleratorState._reset_state(True)


def test_memory_preset_switches_checkpointing_and_8bit_adamw():
    cfg = compose(["method=sdfsmis", "backbone=tiny", "memory=low"])
    assert cfg.method.gradient_checkpointing is True and cfg.train.optimizer == "adamw8bit"
    assert compose(["method=sdfsmis", "backbone=tiny"]).train.optimizer == "adamw"
    # two passes on a GPU too, as the preset's memory was measured; hashed as before the joint pass
    from omegaconf import open_dict

    from fsmis_bench.records import config_hash
    from fsmis_bench.training.precision import with_resolved_precision

    on_gpu = compose(["method=sdfsmis", "backbone=tiny", "memory=low", "device=cuda"])
    resolved = with_resolved_precision(on_gpu)
    assert resolved.method.joint_pass is False and resolved.method.batched_encode is False
    assert resolved.train.fused_clip is False  # 8-bit AdamW takes no grad_scale
    before = compose(["method=sdfsmis", "backbone=tiny", "memory=low", "device=cuda"])
    with open_dict(before):  # a memory=low config from before these switches
        del before.method["joint_pass"], before.method["batched_encode"], before.train["fused_clip"]
    assert config_hash(on_gpu) == config_hash(before)


def test_speed_preset_is_the_fastest_measured_step_and_hashed_as_its_keys():
    """``speed=fast``: bf16 autocast, NHWC and compiled GroupNorms (the fastest SD-1.5 step
    measured on an H100); the same run as those keys given one by one."""
    from fsmis_bench.records import config_hash, training_hash

    base = ["method=sdfsmis", "backbone=tiny", "device=cuda"]
    fast = compose([*base, "speed=fast"])
    assert fast.mixed_precision == "bf16" and fast.train.channels_last is True
    assert fast.train.compile == "default" and fast.train.compile_scope == "norms"
    by_hand = compose([*base, "mixed_precision=bf16", "train.channels_last=true", "train.compile=default",
                       "train.compile_scope=norms"])
    for digest in (config_hash, training_hash):
        assert digest(fast) == digest(by_hand) and digest(fast) != digest(compose(base))
    assert compose([*base, "speed=fast", "mixed_precision=no"]).mixed_precision == "no"  # the command line wins


def test_prototype_shared_features_give_the_reencoded_loss_and_gradients():
    """Encoding each image once (the alignment pass reuses the features) is the same function
    as encoding it again: same loss, same gradients up to summation order."""
    torch.manual_seed(0)
    method = build_method(compose(PROTOTYPE))
    batch = _sampler().batch(2)
    shared = method.training_loss(batch)
    grads = torch.autograd.grad(shared, list(method.parameters()))
    reencoded = method.training_loss_reencoded(batch)
    reference = torch.autograd.grad(reencoded, list(method.parameters()))
    assert torch.equal(shared, reencoded)
    for got, want in zip(grads, reference):
        # float32 sums in another order: relative to each gradient's scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
