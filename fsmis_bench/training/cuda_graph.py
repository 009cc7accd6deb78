"""``train.cuda_graph``: the whole training step recorded once as a CUDA graph, then replayed.

Why: a diffusion step at batch 1 is thousands of small kernels (the U-Net's support and
query passes and their backward, the frozen VAE, clipping, AdamW). On an H100 their
launches, not their arithmetic, set the step time (README, "Where the GPU step stands").
A replayed graph launches all of them with one call.

What recording needs, and how this module provides it:

* **Static inputs.** Every micro-batch is copied into tensors that the graph reads. Shapes
  never change within a run (one image size, one batch size).
* **A learning rate that changes without re-recording.** Each parameter group's ``lr`` is a
  device tensor that the schedule fills in place (torch's schedulers fill tensor rates).
  Checkpoints store it as a plain number, so a graphed run and an eager run resume each
  other.
* **A capturable optimiser.** AdamW's ``capturable`` keeps its step counter on the device.
  8-bit AdamW (bitsandbytes) is not capturable.
* **Gradients written afresh on every replay.** They are unset before recording, so the
  recorded backward allocates and writes them. The optimiser never sees a stale gradient.
* **No host sync inside the step.** :class:`~.step.TrainStep` already has none.
* **Host random numbers as inputs.** What a method draws from the CPU generator
  (:meth:`~fsmis_bench.method.Method.host_draws`: SD-FSMIS's posterior samples under
  ``fidelity=code``) is drawn before each replay and copied in with the batch; inside the
  graph it would be drawn once and replayed at every step.
* **Warm-up.** The first :data:`WARMUP_STEPS` steps run eagerly on a side stream, as
  PyTorch requires (lazy cuDNN/cuBLAS set-up, the optimiser's state), and count as
  training steps; they are the plain step. Then the step is recorded and replayed from
  the next batch on.

A method whose step cannot be recorded (something in it waits for a value on the host)
trains eagerly from then on, with a warning. A failed recording has still run the step's
host code and drawn from the random generators (dropout on the device, say), so their
states are put back: the eager steps draw what they would have drawn. Recording changes
only how the kernels are launched. On an H100 in TF32 the recorded losses differ from the
eager ones by no more than two eager runs differ from each other (0.21 % vs 0.17 % per step; in bf16, recorded vs eager
2.8 % against 6.0 % between two eager runs: ``benchmarks/gpu_engine_check.py``).
``tests/test_cuda_graph.py`` checks the bookkeeping on the CPU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..method import EpisodeBatch
from ..recorded import CudaGraph, failure_reason
from .checkpoint import rng_state, set_rng_state
from .step import ComputeOptions, TrainStep, core_optimizer

#: eager steps before recording (PyTorch's whole-network capture example uses 3)
WARMUP_STEPS = 3
#: optimisers whose step can be recorded (``train.optimizer``)
CAPTURABLE_OPTIMIZERS = ("adamw", "sgd")


class EagerRecorder:
    """A stand-in for :class:`~fsmis_bench.recorded.CudaGraph` where there is no CUDA (the CPU tests).

    Recording stores the body without running it. Each replay unsets the gradients (a
    graph's replay writes them afresh) and runs the body, writing its output into the
    one static output tensor, as a replayed graph writes into its static memory.
    """

    def __init__(self, device: torch.device, unset_gradients: Callable[[], None]) -> None:
        self.device = device
        self.unset_gradients = unset_gradients
        self.body: Callable[[], torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        yield

    def record(self, body: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.body = body
        self.output = torch.zeros((), dtype=torch.float32, device=self.device)
        return self.output

    def replay(self) -> None:
        assert self.body is not None and self.output is not None
        self.unset_gradients()
        self.output.copy_(self.body())


class GraphedTrainStep(TrainStep):
    """:class:`~.step.TrainStep` whose work, after :data:`WARMUP_STEPS` eager steps, is one
    replayed CUDA graph.

    Args:
        as :class:`~.step.TrainStep`; ``recorder``: builds the recorder from the device and
        a callable that unsets the gradients (default: a CUDA graph).
    """

    def __init__(self, *args: Any, recorder: Callable[..., Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        device = self.accelerator.device
        self.recorder = (recorder or (lambda dev, _unset: CudaGraph(dev)))(device, self._unset_gradients)
        self.graphed = False
        self.fell_back: str | None = None
        self._eager_steps = 0
        self._static: list[EpisodeBatch] | None = None
        self._static_loss: torch.Tensor | None = None
        self._capturable = [group.get("capturable") for group in core_optimizer(self.optimizer).param_groups]

    def _make_capturable(self) -> None:
        """Tensor learning rates that the schedule fills in place; ``capturable`` on CUDA."""
        inner, device = core_optimizer(self.optimizer), self.accelerator.device
        self._plain_lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            if device.type == "cuda" and "capturable" in group:
                group["capturable"] = True
        if device.type == "cuda":  # a capturable optimiser counts its steps on the device
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor) and not state["step"].is_cuda:
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)

    def _make_plain(self) -> None:
        """Undo :meth:`_make_capturable` (a step that cannot be recorded trains as the plain one)."""
        for group, capturable, lr in zip(core_optimizer(self.optimizer).param_groups, self._capturable, self._plain_lrs):
            group["lr"] = lr
            if capturable is not None:
                group["capturable"] = capturable

    def _unset_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, batches: list[EpisodeBatch]) -> torch.Tensor:
        if self._static is None and (self.fell_back or self._eager_steps < WARMUP_STEPS):
            self._eager_steps += 1
            with self.recorder.side_stream():
                return super().__call__(batches)
        batches = self.with_host_draws(batches)  # host code: outside the graph, every step
        if self._static is None and not self._record(batches):
            total = self._update(batches)  # these draws, not new ones: the plain step's numbers
            self._count(total)
            return total
        assert self._static is not None and self._static_loss is not None
        for static, batch in zip(self._static, batches, strict=True):
            for static_tensor, tensor in zip(static.tensors(), batch.tensors(), strict=True):
                static_tensor.copy_(tensor, non_blocking=True)
        self.recorder.replay()
        total = self._static_loss.clone()  # the next replay overwrites the static loss
        self._count(total)
        return total

    def _record(self, batches: list[EpisodeBatch]) -> bool:
        """Record the step on static copies of ``batches``; False (and eager from now on) if it cannot be."""
        static = [batch.apply(torch.Tensor.clone) for batch in batches]
        self._unset_gradients()
        self._make_capturable()
        generators = rng_state()
        try:
            loss = self.recorder.record(lambda: self._update(static, zero_grad=False))
        except Exception as exc:  # a sync or an unsupported operation inside the step
            set_rng_state(generators)
            self._unset_gradients()
            self._make_plain()
            self.fell_back = failure_reason(exc)
            warnings.warn(f"train.cuda_graph: this method's training step cannot be recorded as a CUDA graph "
                          f"({self.fell_back}); training goes on without the graph, with the same numbers",
                          RuntimeWarning, stacklevel=2)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return False
        self._static, self._static_loss, self.graphed = static, loss, True
        return True

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimiser state with plain-number learning rates and the configured
        ``capturable``, so that the checkpoint resumes an eager run as well (syncs once)."""
        state = self.optimizer.state_dict()
        for group, capturable in zip(state["param_groups"], self._capturable):
            if isinstance(group.get("lr"), torch.Tensor):
                group["lr"] = float(group["lr"])
            if capturable is not None:
                group["capturable"] = capturable
        return state


def uses_cuda_graph(options: ComputeOptions, device: torch.device, processes: int) -> bool:
    """Resolve ``train.cuda_graph`` for this run: ``auto`` is on for a single process on
    CUDA with a capturable optimiser and a ``train.compile`` mode that records no CUDA graphs
    itself; ``true`` where that does not hold is a :class:`ConfigError`.

    ``train.compile=default`` and ``max-autotune-no-cudagraphs`` go with the graph: the
    :data:`WARMUP_STEPS` eager steps run (and so compile) the compiled code, and the whole
    step, its generated kernels included, is then recorded as one graph.
    ``reduce-overhead`` and ``max-autotune`` record CUDA graphs of their own, which cannot be
    recorded inside ours, so they exclude it."""
    reasons = []
    if device.type != "cuda":
        reasons.append("the step runs on the CPU (use device=cuda)")
    if processes > 1:
        reasons.append(f"{processes} processes train together (recording with DDP's collectives is not supported)")
    if options.optimizer not in CAPTURABLE_OPTIMIZERS:
        reasons.append(f"train.optimizer={options.optimizer} cannot be recorded (use adamw or sgd)")
    if options.compile in ("reduce-overhead", "max-autotune"):  # inductor records CUDA graphs in these
        reasons.append(f"train.compile={options.compile} records CUDA graphs itself "
                       "(use train.compile=default or max-autotune-no-cudagraphs with the graph)")
    if options.cuda_graph == "auto":
        return not reasons
    if options.cuda_graph and reasons:
        raise ConfigError(f"train.cuda_graph=true cannot be used here: {'; '.join(reasons)}",
                          hint="set train.cuda_graph=false (or auto, which turns it on where it can be)")
    return bool(options.cuda_graph)


def make_train_step(options: ComputeOptions, method: Any, optimizer: Any, scheduler: Any, accelerator: Any, *,
                    grad_clip: float, first_step: int = 0) -> TrainStep:
    """The run's step: :class:`GraphedTrainStep` where ``train.cuda_graph`` resolves on, else :class:`TrainStep`."""
    kind = GraphedTrainStep if uses_cuda_graph(options, accelerator.device, accelerator.num_processes) else TrainStep
    return kind(method, optimizer, scheduler, accelerator, grad_clip=grad_clip, first_step=first_step,
                fused_clip=options.fused_clip)
