"""``train.cuda_graph``: the bookkeeping around a recorded step, on the CPU.

A CUDA graph itself needs a GPU (``benchmarks/gpu_engine_check.py`` compares the recorded
and the eager losses there). Here :class:`EagerRecorder` stands in for the graph: it
records without running and replays by rerunning the body with the gradients unset,
as a graph's replay writes them. So these tests check what the engine adds: the static
inputs, the tensor learning rate under a changing schedule, the warm-up, the fallback,
and checkpoints that resume an eager run.
"""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from fsmis_bench.config import compose
from fsmis_bench.errors import ConfigError
from fsmis_bench.method import EpisodeBatch, Method
from fsmis_bench.runner import build_method
from fsmis_bench.training import cuda_graph, engine
from fsmis_bench.training.checkpoint import load_training_state, save_training_state
from fsmis_bench.training.cuda_graph import EagerRecorder, GraphedTrainStep, uses_cuda_graph
from fsmis_bench.training.engine import train
from fsmis_bench.training import step as step_module
from fsmis_bench.training.step import ComputeOptions, TrainStep, compile_method
from test_engine_compute import PROTOTYPE, TINY_SD, _Blocks, _close, _sampler

STEPS = 6  # three eager warm-up steps, then recorded and replayed
SCHEDULE = ["train.schedule=linear", "train.warmup_steps=2"]  # the rate changes every step


def _run(tmp_path, overrides: list[str], name: str, monkeypatch, recorder=None) -> tuple[list[float], list]:
    """Per-step losses of a fresh run through the engine, and the steps the engine built."""
    built: list = []

    def make(options, method, optimizer, scheduler, accelerator, *, grad_clip, first_step=0):
        if recorder is None:
            step = TrainStep(method, optimizer, scheduler, accelerator, grad_clip=grad_clip, first_step=first_step,
                             fused_clip=options.fused_clip)
        else:
            step = GraphedTrainStep(method, optimizer, scheduler, accelerator, grad_clip=grad_clip,
                                    first_step=first_step, fused_clip=options.fused_clip, recorder=recorder)
        built.append(step)
        return step

    monkeypatch.setattr(engine, "make_train_step", make)
    AcceleratorState._reset_state(True)
    cfg = compose([*overrides, *SCHEDULE, f"train.steps={STEPS}", "train.log_every=1", "train.num_workers=0",
                   "device=cpu"])
    torch.manual_seed(0)
    result = train(build_method(cfg), _sampler(), cfg, tmp_path / name)
    AcceleratorState._reset_state(True)
    return [row["loss"] for row in result.log], built


@pytest.mark.parametrize("base", [PROTOTYPE, [*PROTOTYPE, "train.grad_accum=2"], TINY_SD,
                                  [*PROTOTYPE, "train.fused_optimizer=true", "train.fused_clip=true"]],
                         ids=["prototype", "prototype-accumulating", "tiny-sdfsmis", "prototype-fused-clip"])
def test_recorded_step_gives_the_plain_losses(tmp_path, monkeypatch, base):
    """Six steps under a warm-up + linear schedule: three eager, three replayed (with two
    micro-batches per step: both recorded, the update once). The rate is a float32 tensor
    in the recorded step (a float64 number in the plain one): 1e-5."""
    plain, _ = _run(tmp_path, base, "plain", monkeypatch)
    graphed, built = _run(tmp_path, base, "graphed", monkeypatch,
                          recorder=lambda device, unset: EagerRecorder(device, unset))
    (step,) = built
    assert step.graphed and step.fell_back is None
    assert all(p.grad is None for p in step.method.parameters())  # freed for evaluation
    assert all(math.isfinite(v) for v in plain)
    assert _close(plain, graphed, 1e-5), (plain, graphed)


@pytest.mark.parametrize("scope", ["blocks", "norms"])
def test_recorded_step_of_compiled_blocks_gives_the_plain_losses(monkeypatch, scope):
    """``train.compile=default train.compile_scope=blocks`` (or ``norms``) with the recorded
    step: the eager warm-up steps compile the blocks (or the GroupNorms), the recorded step
    runs them compiled (the prototype has no blocks, tiny SD-FSMIS takes ~23 s: a two-block
    method, six steps)."""
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    batches = [_sampler().batch(2) for _ in range(STEPS)]

    def losses(compiled: bool) -> tuple[list[float], TrainStep]:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
        method = _Blocks()
        if compiled:
            compile_method(method, "default", scope)
        optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        kwargs = {"grad_clip": 1.0}
        step = (GraphedTrainStep(method, optimizer, scheduler, accelerator, **kwargs,
                                 recorder=lambda device, unset: EagerRecorder(device, unset)) if compiled
                else TrainStep(method, optimizer, scheduler, accelerator, **kwargs))
        out = [step([batch]).item() for batch in batches]
        AcceleratorState._reset_state(True)
        return out, step

    with torch._dynamo.config.patch(recompile_limit=8):
        plain, _ = losses(False)
        graphed, step = losses(True)
    torch._dynamo.reset()
    assert step.graphed and step.fell_back is None
    if scope == "blocks":
        assert all(block._compiled_call_impl is not None for block in step.method.blocks)
    else:
        assert all(type(block.norm).__name__ == "CompiledGroupNorm" for block in step.method.blocks)
    assert _close(plain, graphed, 1e-5), (plain, graphed)


class _Refuses(EagerRecorder):
    """A recorder that fails as CUDA does when the step waits for the host."""

    def record(self, body):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_step_that_cannot_be_recorded_trains_eagerly_with_a_warning(tmp_path, monkeypatch):
    plain, _ = _run(tmp_path, PROTOTYPE, "plain", monkeypatch)
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        eager, built = _run(tmp_path, PROTOTYPE, "fallback", monkeypatch,
                            recorder=lambda device, unset: _Refuses(device, unset))
    (step,) = built
    assert not step.graphed and "not permitted" in step.fell_back
    assert plain == eager  # the same eager path, bit for bit


class _RefusesAfterDrawing(EagerRecorder):
    """Fails as CUDA does, after the step's code has drawn random numbers, as a real
    recording runs the body's host code up to the operation that fails."""

    def record(self, body):
        torch.rand(16)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


class _Dropout(Method):
    """A step whose loss depends on every random draw (dropout)."""

    def __init__(self) -> None:
        super().__init__(compose(PROTOTYPE))
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 1, 1)

    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        features = torch.nn.functional.dropout(self.conv(batch.query_images), 0.5, training=True)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.head(features), batch.query_masks)


def test_a_failed_recording_leaves_the_random_stream_as_it_was():
    """After the fallback, the eager steps draw the numbers a run without the graph draws."""
    batches = [_sampler().batch(2) for _ in range(STEPS)]

    def losses(recorder) -> list[float]:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
        method = _Dropout()
        optimizer = torch.optim.AdamW(method.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        kwargs = {"grad_clip": 1.0}
        step = (GraphedTrainStep(method, optimizer, scheduler, accelerator, **kwargs, recorder=recorder)
                if recorder else TrainStep(method, optimizer, scheduler, accelerator, **kwargs))
        torch.manual_seed(1)
        out = [step([batch]).item() for batch in batches]
        AcceleratorState._reset_state(True)
        return out

    plain = losses(None)
    with pytest.warns(RuntimeWarning, match="cannot be recorded"):
        fell_back = losses(lambda device, unset: _RefusesAfterDrawing(device, unset))
    assert plain == fell_back


def test_checkpoint_of_a_recorded_step_resumes_an_eager_run(tmp_path):
    """The saved rates are plain numbers and ``capturable`` is as configured, so the state
    loads into a fresh eager optimiser, which continues with the same update."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4))

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = weight

        def forward(self, batch):
            return ((self.weight - batch.query_images.flatten()[:4]) ** 2).sum()

    model = Quadratic()
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    step = GraphedTrainStep(model, optimizer, scheduler, accelerator, grad_clip=1.0,
                            recorder=lambda device, unset: EagerRecorder(device, unset))
    batch = _sampler().batch(1)
    for _ in range(5):
        step([batch])
    assert step.graphed and isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
    save_training_state(tmp_path, {"step": 5, "optimizer": step.optimizer_state_dict(),
                                   "scheduler": scheduler.state_dict(), "weight": weight.detach().clone()})
    state = load_training_state(tmp_path)
    group = state["optimizer"]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    assert math.isclose(group["lr"], 0.1 / 6, rel_tol=1e-6)

    fresh = torch.nn.Parameter(state["weight"].clone())
    eager = torch.optim.AdamW([fresh], lr=0.1)
    eager.load_state_dict(state["optimizer"])
    fresh.grad = weight.grad if weight.grad is not None else torch.ones(4)
    expected = torch.nn.Parameter(weight.detach().clone())
    reference = torch.optim.AdamW([expected], lr=0.1)
    reference.load_state_dict(step.optimizer_state_dict())
    expected.grad = fresh.grad.clone()
    eager.step()
    reference.step()
    assert torch.equal(fresh, expected)
    AcceleratorState._reset_state(True)


def _options(**kwargs) -> ComputeOptions:
    return ComputeOptions(**{"cuda_graph": "auto", **kwargs})


CUDA, CPU = torch.device("cuda"), torch.device("cpu")
# options, device, processes, expected (True/False, or the ConfigError's text)
RESOLUTION = [
    (_options(), CUDA, 1, True),
    (_options(optimizer="sgd"), CUDA, 1, True),
    (_options(), CPU, 1, False),
    (_options(), CUDA, 2, False),
    (_options(optimizer="adamw8bit"), CUDA, 1, False),
    (_options(compile="default"), CUDA, 1, True),  # compiled kernels, recorded in our graph
    (_options(compile="max-autotune-no-cudagraphs"), CUDA, 1, True),
    (_options(compile="reduce-overhead"), CUDA, 1, False),  # records graphs itself
    (_options(compile="max-autotune"), CUDA, 1, False),
    (_options(cuda_graph=False), CUDA, 1, False),
    (_options(cuda_graph=True), CUDA, 1, True),
    (_options(cuda_graph=True), CPU, 1, "runs on the CPU"),
    (_options(cuda_graph=True), CUDA, 2, "2 processes"),
    (_options(cuda_graph=True, optimizer="adamw8bit"), CUDA, 1, "cannot be recorded"),
    (_options(cuda_graph=True, compile="reduce-overhead"), CUDA, 1, "train.compile=reduce-overhead records CUDA graphs"),
    (_options(cuda_graph=True, compile="max-autotune"), CUDA, 1, "train.compile=max-autotune records CUDA graphs"),
    (_options(cuda_graph=True, compile="default", compile_scope="blocks"), CUDA, 1, True),
    (_options(cuda_graph=True, compile="default", compile_scope="norms"), CUDA, 1, True),
]


@pytest.mark.parametrize("options, device, processes, expected", RESOLUTION)
def test_cuda_graph_resolution(options, device, processes, expected):
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            uses_cuda_graph(options, device, processes)
    else:
        assert uses_cuda_graph(options, device, processes) is expected


def test_cuda_graph_on_the_cpu_fails_before_anything_runs():
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true cannot be used here: the step runs on the CPU"):
        compose(["method=prototype", "train.cuda_graph=true", "device=cpu"])
    assert compose(["method=prototype", "train.cuda_graph=auto", "device=cpu"]).train.cuda_graph == "auto"


def test_the_engine_builds_the_plain_step_on_the_cpu():
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = cuda_graph.make_train_step(_options(), torch.nn.Identity(), optimizer, scheduler, accelerator, grad_clip=0.0)
    assert type(step) is TrainStep
    AcceleratorState._reset_state(True)
