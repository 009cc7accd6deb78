"""One optimiser step, and the compute switches around it (``train.*`` in the config).

The step never waits for the device: the loss stays a device tensor (the engine reads it at
logging steps only), and a non-finite loss is caught by a device-side flag that the engine
checks at logging and checkpoint steps (:meth:`TrainStep.raise_if_nonfinite`).

Compute switches, each tested against the plain path (tests/test_engine_compute.py); those whose
``auto`` default turns them on with CUDA were measured faster there:

* ``train.compile``: ``torch.compile`` of the method's training forward (``false`` |
  ``default`` | ``reduce-overhead`` (CUDA graphs) | ``max-autotune-no-cudagraphs`` |
  ``max-autotune``); shapes are static, so it compiles once.
* ``train.compile_scope``: what ``train.compile`` compiles (:func:`compile_method`):
  ``model`` (the whole training forward), ``blocks`` (regional compilation: each repeated
  block of :meth:`~fsmis_bench.method.Method.compile_regions` on its own, so that identical
  blocks share compiled graphs and compilation takes a few blocks' time) or ``norms`` (every
  GroupNorm runs one compiled function with dynamic shapes: :mod:`.compiled_norms`).
* ``train.channels_last``: NHWC memory format for the method's 4-D weights.
* ``train.weight_dtype``: ``bfloat16`` stores the weights in bf16 with fp32 master copies
  in the optimiser (``mixed_precision=bf16`` autocast around them); see :mod:`.optim`.
* ``train.fused_optimizer``, ``train.optimizer``: :mod:`.optim`.
* ``train.cuda_graph``: the whole step recorded once as a CUDA graph and replayed
  (:class:`GraphedTrainStep`): one launch instead of thousands of small kernels per step.
* ``train.fused_clip``: the gradient clipping folded into the fused AdamW kernel
  (:func:`clip_divisor`): the global norm is computed as before, but instead of a pass that
  multiplies every gradient by the clipping coefficient, the optimiser divides by its
  inverse as it reads them (its ``grad_scale``, the input that ``GradScaler`` uses). The same
  update up to rounding, one read and one write of all gradients fewer. ``auto`` (the
  default) clips there wherever the optimiser is the fused AdamW on fp32 weights, so with
  CUDA (:func:`~.precision.fused_clip_applies`).
* ``train.accumulation``: ``batched`` runs ``grad_accum`` micro-batches of ``batch_size`` as
  one batch of ``grad_accum x batch_size`` episodes (the same episodes, the same mean loss;
  per-sample normalisation, so the gradient is the same up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig

from ..errors import ConfigError, FsmisError
from ..method import EpisodeBatch, Method, method_name
from .compiled_norms import compile_group_norms, restore_group_norms
from .precision import fused_clip_applies

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
#: ``train.compile_scope``: the whole method, its repeated blocks one by one, or its GroupNorms
COMPILE_SCOPES = ("model", "blocks", "norms")
ACCUMULATION = ("sequential", "batched")
#: compiled variants allowed per region under ``compile_scope=blocks`` (dynamo's default per object)
REGION_RECOMPILES = 8
#: compiled variants allowed for the one GroupNorm function under ``compile_scope=norms``
NORM_RECOMPILES = 32
#: torch.compile backend; the CPU tests swap in ``aot_eager`` (same graph capture, no codegen)
COMPILE_BACKEND = "inductor"



class TrainingError(FsmisError, FloatingPointError):
    """Training cannot go on: the loss became non-finite (a user-fixable condition, exit 2)."""

@dataclass(frozen=True)
class ComputeOptions:
    """The compute switches of ``cfg.train`` (defaults: the plain path)."""

    compile: str | None = None
    compile_scope: str = "model"  # "model" | "blocks" | "norms" (see compile_method)
    channels_last: bool = False
    weight_dtype: str = "float32"
    optimizer: str = "adamw"
    fused_optimizer: bool | str = False  # True | False | "auto" (fused where the parameters are on CUDA)
    accumulation: str = "sequential"
    cuda_graph: bool | str = False  # True | False | "auto" (on where the step runs on CUDA)
    fused_clip: bool | str = False  # True | False | "auto" (inside the optimiser where it is fused AdamW)

    @classmethod
    def from_config(cls, train: DictConfig) -> "ComputeOptions":
        get = train.get
        mode = get("compile", False)
        mode = None if mode in (False, None, "false", "none", "off") else str(mode)
        if mode is not None and mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile={mode!r} is unknown", hint=f"use false or one of {', '.join(COMPILE_MODES)}")
        scope = str(get("compile_scope", "model"))
        if scope not in COMPILE_SCOPES:
            raise ConfigError(f"train.compile_scope={scope!r} is unknown", hint=f"use one of {', '.join(COMPILE_SCOPES)}")
        accumulation = str(get("accumulation", "sequential"))
        if accumulation not in ACCUMULATION:
            raise ConfigError(f"train.accumulation={accumulation!r} is unknown", hint="use sequential or batched")
        return cls(
            compile=mode,
            compile_scope=scope,
            channels_last=bool(get("channels_last", False)),
            weight_dtype=str(get("weight_dtype", "float32")),
            optimizer=str(get("optimizer", "adamw")),
            fused_optimizer=_auto_or_bool(get("fused_optimizer", False)),
            accumulation=accumulation,
            cuda_graph=_auto_or_bool(get("cuda_graph", False)),
            fused_clip=_auto_or_bool(get("fused_clip", False)),
        )


def _auto_or_bool(value: Any) -> bool | str:
    return "auto" if value == "auto" else bool(value)


@torch.no_grad()
def clip_divisor(parameters: Any, max_norm: float) -> torch.Tensor:
    """The 0-d float32 tensor that divides every gradient so that their global L2 norm is at
    most ``max_norm``: ``1 / min(1, max_norm / (norm + 1e-6))``, the inverse of the factor
    ``torch.nn.utils.clip_grad_norm_`` multiplies them by. Computed on the device, no sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0).float() for g in grads]), 2.0)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return (1.0 / coefficient).float()  # the fused kernels take a float32 grad_scale


def core_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def micro_batches(batch_size: int, grad_accum: int, accumulation: str) -> tuple[int, int]:
    """``(episodes per forward, forwards per optimiser step)``."""
    if accumulation == "batched":
        return batch_size * grad_accum, 1
    return batch_size, grad_accum


def prepare_method(method: Method, options: ComputeOptions, mixed_precision: str = "no") -> Method:
    """Apply the memory-format, weight-dtype and compile switches to ``method`` in place."""
    if options.channels_last:
        method.to(memory_format=torch.channels_last)
    if options.weight_dtype == "bfloat16":
        if mixed_precision != "bf16":
            raise ConfigError(
                "train.weight_dtype=bfloat16 needs mixed_precision=bf16",
                hint="add mixed_precision=bf16 (autocast keeps norms and losses in fp32)",
            )
        for param in method.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if options.compile is not None:
        compile_method(method, options.compile, options.compile_scope)
    return method


def compile_method(method: Method, mode: str, scope: str = "model") -> list[torch.nn.Module]:
    """``torch.compile`` (``nn.Module.compile``: in place, static shapes) at ``train.compile_scope``.

    * ``model``: the whole method, i.e. its ``forward`` (the training loss); ``predict``
      stays eager.
    * ``blocks``: each module of ``method.compile_regions()`` on its own. Blocks of one class
      run the same code, so they share compiled graphs (one per shape, grad mode and pass),
      and compilation takes a few blocks' time instead of the whole network's. A block that
      specialises on its own attributes compiles its own graph, which is why SD-FSMIS leaves
      out its transformer blocks (they look their support-bank entry up by layer name). The
      code between the blocks runs eagerly.
      ``train.compile`` off: nothing is compiled, whatever the scope.
    * ``norms``: every ``nn.GroupNorm`` of the method runs one compiled function with dynamic
      shapes (:func:`~.compiled_norms.compile_group_norms`).

    Every scope compiles for training only: :func:`uncompile_method` undoes it before the
    evaluation.

    Like ``train.compile``, ``blocks`` and ``norms`` are part of the run's hash: they change
    the generated kernels, hence the rounding, not the model. ``model``, the value every
    earlier run had, is left out of the hash, so earlier records keep their identity
    (records.py).

    Returns:
        the compiled modules (``[method]`` for ``model``).
    Raises:
        ConfigError: ``blocks`` on a method without regions, ``norms`` on one without GroupNorm.
    """
    compiled = _compile_scope(method, mode, scope)
    method.__dict__.setdefault(_COMPILED_FOR_TRAINING, []).extend(compiled)  # for uncompile_method
    return compiled


#: where :func:`compile_method` notes the modules it compiled, on the method itself
_COMPILED_FOR_TRAINING = "_fsmis_compiled_for_training"


def _compile_scope(method: Method, mode: str, scope: str) -> list[torch.nn.Module]:
    if scope == "model":
        method.compile(mode=mode, backend=COMPILE_BACKEND, dynamic=False)
        return [method]
    if scope == "norms":
        # variants of the one function (dtype, memory format, grad mode, groups, eps): the
        # default limit, 8, is near a diffusion method's count
        _allow_recompiles(NORM_RECOMPILES)
        norms = compile_group_norms(method, mode, COMPILE_BACKEND)
        if not norms:
            raise ConfigError(f"train.compile_scope=norms: method {method_name(method)} has no GroupNorm to compile",
                              hint="use train.compile_scope=model (the whole training forward)")
        return norms
    if scope != "blocks":
        raise ConfigError(f"train.compile_scope={scope!r} is unknown", hint=f"use one of {', '.join(COMPILE_SCOPES)}")
    regions = method.compile_regions()
    if not regions:
        raise ConfigError(
            f"train.compile_scope=blocks: method {method_name(method)} has no repeated blocks to compile",
            hint="use train.compile_scope=model (the whole training forward)",
        )
    # Each compiled variant (shape, grad mode) is one cache entry of its class's forward,
    # shared by all blocks of that class; past dynamo's limit (8 per code object) a block
    # would run eagerly from then on, silently. Allow 8 per region instead.
    _allow_recompiles(REGION_RECOMPILES * len(regions))
    for region in regions:
        region.compile(mode=mode, backend=COMPILE_BACKEND, dynamic=False)
    return regions


def uncompile_method(method: torch.nn.Module) -> int:
    """Undo :func:`compile_method` in place (any scope): the evaluation runs the plain modules.

    Why: a run resumed after its training, and ``eval`` from its weights, evaluate modules
    that were never compiled, and compiled kernels round differently, so an in-process
    evaluation of compiled modules gave other masks than those. Compiling for inference also
    costs time the step never paid back: under ``speed=fast`` on an H100 the evaluation of the
    embedded phantom, its GroupNorms still compiled (they recompile for other batch sizes and
    without autograd), had not finished some 20 s after training, where the default run's
    took 9 s, and was cut off (``docs/measurements/gpu_run_fast_h100_run.json``). Only what
    :func:`compile_method` changed is undone (a method's own compiled inference stays), and
    dynamo's caches are dropped with it, compiled graphs and their memory pools included.

    Returns:
        how many modules were switched back (0: nothing was compiled).
    """
    compiled = method.__dict__.pop(_COMPILED_FOR_TRAINING, [])
    restored = len(restore_group_norms(compiled))
    for module in compiled:
        if getattr(module, "_compiled_call_impl", None) is not None:  # nn.Module.compile's compiled __call__
            module._compiled_call_impl = None
            restored += 1
    if restored:
        torch._dynamo.reset()
    return restored


def _allow_recompiles(wanted: int) -> None:
    """Raise dynamo's per-code-object graph limit to ``wanted`` (within its overall ceiling);
    past the limit a compiled function would run eagerly from then on, silently."""
    config = torch._dynamo.config
    # torch < 2.6 names them cache_size_limit / accumulated_cache_size_limit
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    ceiling = getattr(config, "accumulated_recompile_limit", getattr(config, "accumulated_cache_size_limit", 256))
    setattr(config, limit, max(getattr(config, limit), min(wanted, ceiling)))


class TrainStep:
    """One optimiser step: forward/backward over the micro-batches, clipping, the optimiser
    and the schedule, without a host sync.

    Args:
        method: the (accelerate-prepared) method; ``method(batch)`` is its training loss.
        optimizer, scheduler, accelerator: as prepared by the engine.
        grad_clip: max global gradient norm (0: none).
        first_step: the step count before the first call (a resumed run's step).
        fused_clip: clip inside the optimiser (``train.fused_clip``): the optimiser must be
            one whose step takes a ``grad_scale`` (fused AdamW).
    """

    def __init__(self, method, optimizer, scheduler, accelerator, *, grad_clip: float, first_step: int = 0,
                 fused_clip: bool | str = False) -> None:
        self.method = method
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = accelerator
        self.grad_clip = float(grad_clip)
        self.first_step = first_step
        if fused_clip == "auto":
            core = core_optimizer(optimizer)
            # exactly torch's AdamW: the bf16 master-weight subclass (weight_dtype) is another
            fused_clip = fused_clip_applies(
                "auto", optimizer="adamw" if type(core) is torch.optim.AdamW else type(core).__name__,
                fused=bool(core.defaults.get("fused")), weight_dtype="float32",
                mixed_precision=str(getattr(accelerator, "mixed_precision", "no")))
        self.fused_clip = bool(fused_clip) and self.grad_clip > 0
        if self.fused_clip and not getattr(core_optimizer(optimizer), "_step_supports_amp_scaling", False):
            raise ConfigError(
                f"train.fused_clip=true needs an optimiser whose step applies a grad_scale (fused AdamW); "
                f"the {type(core_optimizer(optimizer)).__name__} built here does not",
                hint="use train.optimizer=adamw with train.fused_optimizer=true, or train.fused_clip=false",
            )
        if self.fused_clip and getattr(accelerator, "scaler", None) is not None:  # fp16's GradScaler sets grad_scale
            raise ConfigError("train.fused_clip=true cannot be used with mixed_precision=fp16",
                              hint="use mixed_precision=bf16 or no, or train.fused_clip=false")
        device = accelerator.device
        self._steps = torch.zeros((), dtype=torch.long, device=device)
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)

    def __call__(self, batches: list[EpisodeBatch]) -> torch.Tensor:
        """Returns the step's loss (mean over the micro-batches), a 0-d device tensor."""
        total = self._update(self.with_host_draws(batches))
        self._count(total)
        return total

    def with_host_draws(self, batches: list[EpisodeBatch]) -> list[EpisodeBatch]:
        """``batches`` with what :meth:`Method.host_draws` draws for each, in micro-batch order,
        under the step's autocast (a draw may take the dtype autocast gives), on the batches'
        device: pinned and copied asynchronously to a GPU, so the step still never waits."""
        method = self.accelerator.unwrap_model(self.method)
        method = getattr(method, "_orig_mod", method)  # a torch.compile wrapper's module
        if getattr(type(method), "host_draws", Method.host_draws) is Method.host_draws:
            return batches  # draws nothing (or a bare nn.Module in a test): no work per step
        draw = method.host_draws
        drawn = []
        for batch in batches:
            with self.accelerator.autocast():
                draws = draw(batch)
            if draws:
                device = batch.query_images.device
                moved = {name: (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                                else t.to(device)) for name, t in draws.items()}
                batch = replace(batch, host_draws=moved)
            drawn.append(batch)
        return drawn

    def _update(self, batches: list[EpisodeBatch], zero_grad: bool = True) -> torch.Tensor:
        """Forward, backward, clipping and the optimiser over ``batches``; the mean loss."""
        accelerator, method, optimizer = self.accelerator, self.method, self.optimizer
        total = None
        for batch in batches:
            with accelerator.accumulate(method), accelerator.autocast():
                loss = method(batch)  # forward == training_loss; through the DDP wrapper
                self._check_loss(loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and self.fused_clip:
                    core_optimizer(optimizer).grad_scale = clip_divisor(method.parameters(), self.grad_clip)
                elif accelerator.sync_gradients and self.grad_clip > 0:
                    accelerator.clip_grad_norm_(method.parameters(), self.grad_clip)
                optimizer.step()
                if self.fused_clip:  # read by this step only
                    vars(core_optimizer(optimizer)).pop("grad_scale", None)
                if zero_grad:
                    optimizer.zero_grad(set_to_none=True)
            part = loss.detach().float() / len(batches)
            total = part if total is None else total + part
        return total

    def _described(self) -> str:
        """``"method 'x' (plugin 'p' of dist 1.0)"``: the method being trained, for messages."""
        method = self.accelerator.unwrap_model(self.method)
        method = getattr(method, "_orig_mod", method)  # a torch.compile wrapper's module
        name = method_name(method)
        try:
            from ..plugins import origin_of  # late: the plugins import the method plugins

            return origin_of("method", name)
        except Exception:  # noqa: BLE001 - a message must not fail
            return f"method {name!r}"

    def _check_loss(self, loss: object) -> None:
        """Refuse a training loss that is not a 0-dim float tensor (its shape and dtype only:
        no device sync, and a recorded or compiled step checks it while recording)."""
        if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point() and loss.requires_grad:
            return
        got = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}, not a scalar loss"
               if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}, not a scalar loss")
        if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point():
            got = ("a scalar without a gradient (computed under torch.no_grad, detached, or from no trained "
                   "parameter)")
        from ..plugins import PluginError  # late: the plugins import the method plugins

        if isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point():
            remedy = ("compute it from the trained parameters' outputs, outside torch.no_grad and without "
                      "`.detach()` or `.item()`")
        else:
            remedy = "reduce a per-pixel or per-episode loss inside training_loss (e.g. `.mean()`, or reduction='mean')"
        raise PluginError(
            f"{self._described()} broke the training_loss contract: it returned {got}",
            hint="Method.training_loss(batch) must return a 0-dim float tensor that is differentiable w.r.t. the "
                 f"trained parameters: {remedy}",
        )

    def _count(self, total: torch.Tensor) -> None:
        self.scheduler.step()
        self._steps += 1
        bad = ~torch.isfinite(total)
        self._first_nonfinite = torch.where(bad & (self._first_nonfinite < 0), self._steps, self._first_nonfinite)

    def optimizer_state_dict(self) -> dict[str, Any]:
        """The optimiser's state for a checkpoint."""
        return self.optimizer.state_dict()

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`TrainingError` if any step so far had a non-finite loss (syncs)."""
        first = int(self._first_nonfinite)
        if first >= 0:
            raise TrainingError(
                f"non-finite loss at step {self.first_step + first}: the loss that {self._described()} returned "
                "from its training_loss was NaN or infinite",
                hint="lower the learning rate, check the training data, or check the method's training_loss "
                     "(a division by an empty mask, a log of 0); a rerun resumes from the last checkpoint saved "
                     "before that step, if any, and with the same config and code meets the same loss",
            )
