"""The interface every method implements. The engine owns everything else.

A method never writes a loop, never touches an optimiser, a device or a file. It says:

* which parameters train, at which learning rate (:meth:`Method.param_groups`);
* the loss on a batch of training episodes (:meth:`Method.training_loss`);
* the mask for a chunk of query slices given the support (:meth:`Method.predict`).

Shapes: ``B`` episodes, ``S`` support shots, ``Q`` query slices, images ``(1, H, W)``.
Images arrive normalised per volume as the method's :attr:`Method.input_norm` asks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .data.base import INPUT_NORMS  # the values of Method.input_norm (normalise_volume's modes)


@dataclass
class EpisodeBatch:
    """A batch of training episodes.

    Attributes:
        support_images: ``(B, S, 1, H, W)`` float.
        support_masks: ``(B, S, 1, H, W)`` float in {0, 1}.
        query_images: ``(B, 1, H, W)`` float.
        query_masks: ``(B, 1, H, W)`` float in {0, 1}.
        host_draws: the random tensors :meth:`Method.host_draws` drew for this batch before
            the step, by name (empty for most methods).
    """

    support_images: torch.Tensor
    support_masks: torch.Tensor
    query_images: torch.Tensor
    query_masks: torch.Tensor
    host_draws: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the batch, in a fixed order (the images and masks, then the draws)."""
        return [self.support_images, self.support_masks, self.query_images, self.query_masks,
                *self.host_draws.values()]

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "EpisodeBatch":
        """A batch of ``fn`` of every tensor (``fn`` = ``Tensor.clone``, a move, a cast)."""
        return EpisodeBatch(fn(self.support_images), fn(self.support_masks), fn(self.query_images),
                            fn(self.query_masks), {name: fn(t) for name, t in self.host_draws.items()})

    def to(self, device: torch.device | str) -> "EpisodeBatch":
        return self.apply(lambda tensor: tensor.to(device))

    @property
    def batch_size(self) -> int:
        return int(self.query_images.shape[0])


#: class names that :meth:`Method.compile_regions` finds besides diffusers' ``_repeated_blocks``:
#: diffusers' U-Net/VAE residual block and torchvision-style ResNet blocks
REGION_CLASS_NAMES = ("ResnetBlock2D", "Bottleneck", "BasicBlock")



class Method(nn.Module):
    """Base class of all method plugins.

    A plugin registers its subclass with ``registry.register(name, cls)`` in an
    ``fsmis_register_methods`` hook and ships ``method/<name>.yaml`` (``method.name: <name>``
    and every option the class reads) in a folder its ``fsmis_config_dirs`` hook returns.
    An exception other than :class:`~fsmis_bench.errors.FsmisError` raised by the
    constructor is reported as a :class:`~fsmis_bench.plugins.PluginError` naming the plugin.

    Args:
        cfg: the full resolved run config; a method reads ``cfg.method`` (its own group),
            and where relevant ``cfg.backbone``, ``cfg.pretrained`` and ``cfg.weights_root``.
    """

    #: False for training-free methods: the engine skips training entirely.
    needs_training: ClassVar[bool] = True
    #: per-volume intensity normalisation the method expects: one of :data:`INPUT_NORMS`
    #: (``"zscore"``, ``"minmax"`` to [-1, 1], ``"none"``: the intensities as stored).
    input_norm: ClassVar[str] = "zscore"
    #: ``cfg.method`` options added after runs of the method were recorded, with the value
    #: every earlier run had. A run's hash holds such an option as :meth:`late_option_values`
    #: resolves it, and only where it differs from that value: earlier records keep their
    #: hashes, and a run whose numbers the option changes gets its own (an option whose
    #: ``null`` follows ``cfg.fidelity`` would otherwise hash as ``null`` either way).
    late_options: ClassVar[dict[str, Any]] = {}
    #: ``cfg.method`` options read only when predicting (chunk size, thresholds, test-time
    #: refinement): they change the masks, not the trained weights, so they stay out of the
    #: training hash and ``eval`` may change them on a trained checkpoint (they stay in the
    #: run's own hash: another threshold is another run).
    inference_options: ClassVar[tuple[str, ...]] = ("predict_batch_size", "predict_cuda_graph")
    #: whether ``fidelity=code`` describes this method: its harness-level options
    #: (``configs/fidelity/code.yaml``: GT labels minus liver and spleen, pooled Dice, every
    #: support slice per chunk, the legacy setting-2 exclusion, 4-step accumulation) are the
    #: released SD-FSMIS code's protocol. Other methods refuse ``fidelity=code``, which would
    #: otherwise train and score them under a protocol their own code never used.
    released_code_protocol: ClassVar[bool] = False

    @classmethod
    def late_option_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """The :attr:`late_options` as ``cfg`` resolves them (default: as composed)."""
        method_cfg = cfg.get("method") or {}
        return {name: method_cfg.get(name, earlier) for name, earlier in cls.late_options.items()}

    @classmethod
    def option_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """``cfg.method``'s options as the method resolves the ``null`` (and missing) ones, e.g.
        from ``cfg.fidelity``; default: none resolved. Reports name a run's settings by these
        values, so that a ``null`` option and the value it stands for are one configuration."""
        return {}

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # -- training ----------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: ``[{"name": str, "params": [...], "lr": float}]``.

        The default trains every parameter that requires grad at ``cfg.method.lr``, which the
        method's yaml must declare (a rate no config names would not be recorded).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"name": "all", "params": params, "lr": float(self.cfg.method.lr)}]

    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """Scalar loss on one batch of episodes.

        Args:
            batch: support images and masks ``(B, S, 1, H, W)``, query images and masks
                ``(B, 1, H, W)``, float (masks in {0, 1}).
        Returns:
            A 0-dim float tensor, differentiable w.r.t. :meth:`param_groups`' parameters.
        """
        raise NotImplementedError(f"{type(self).__name__} is trainable but has no training_loss")

    def augment_form(self) -> str:
        """The form of the training episodes' augmentation
        (:data:`fsmis_bench.training.augment.AUGMENT_FORMS`): ``"standard"`` (PROTOCOL.md §5),
        unless the method reproduces code that augments otherwise."""
        return "standard"

    def host_draws(self, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
        """Random tensors the training loss on ``batch`` reads, drawn on the host before the step.

        The engine calls this once per micro-batch, outside the step, and hands the result in
        as ``batch.host_draws``. Why: a draw from torch's CPU generator (kept on the CPU so a
        resumed run is exact on any device) is host code, and a step recorded as a CUDA graph
        runs host code once, so it would replay one draw at every step. Drawn here, the
        numbers are inputs that the recorded step copies in like the images. A loss called
        without them (outside the engine) should draw them itself through this method, so
        its numbers do not depend on who drew. Draws on the device (dropout,
        ``torch.randn(device=...)``) need no hook: recorded graphs advance the device
        generator. Default: none.
        """
        return {}

    def forward(self, batch: EpisodeBatch) -> torch.Tensor:
        # The engine calls the module itself so that multi-GPU wrappers see a forward pass.
        return self.training_loss(batch)

    # -- inference ---------------------------------------------------------------------
    def predict(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
    ) -> torch.Tensor:
        """Segment a chunk of query slices with one support.

        Args:
            support_images: ``(S, 1, H, W)``.
            support_masks: ``(S, 1, H, W)`` in {0, 1}.
            query_images: ``(Q, 1, H, W)`` — all query slices of the chunk, so the support
                can be encoded once and reused.
        Returns:
            ``(Q, H, W)`` ``torch.bool`` foreground masks, one per query slice, at the query
            images' ``(H, W)``. Evaluation checks every chunk
            (:func:`fsmis_bench.evaluation.check_prediction`) and stops the run with an error
            naming the method's plugin on anything else: float scores are not thresholded,
            a ``(1, H, W)`` mask is not broadcast, ``(Q, 1, H, W)`` is not squeezed.

        Called in ``eval()`` mode under ``torch.no_grad()``.
        """
        raise NotImplementedError

    # -- compilation -------------------------------------------------------------------
    def compile_regions(self) -> list[nn.Module]:
        """The repeated blocks that ``train.compile_scope=blocks`` compiles one by one.

        The default: every submodule whose class, or a base class, is named in the
        ``_repeated_blocks`` of a diffusers model inside the method (``UNet2DConditionModel``:
        ``BasicTransformerBlock``) or in :data:`REGION_CLASS_NAMES` (``ResnetBlock2D``, ResNet
        ``Bottleneck``/``BasicBlock``); classes are matched by name, so no import is needed.
        A region inside another region is not listed (the outer one compiles it). In module
        order; empty where there is none (``blocks`` is then refused). A method overrides this
        to compile other parts; each region must be called as a module (``region(x)``).
        """
        names = set(REGION_CLASS_NAMES)
        for module in self.modules():
            names.update(getattr(module, "_repeated_blocks", None) or ())
        regions: list[nn.Module] = []
        inside: list[str] = []  # the qualified names of the regions found so far
        for qualified, module in self.named_modules():
            if module is self or any(qualified.startswith(outer + ".") for outer in inside):
                continue
            if any(cls.__name__ in names for cls in type(module).__mro__):
                regions.append(module)
                inside.append(qualified)
        return regions

    # -- introspection -----------------------------------------------------------------
    def components(self) -> dict[str, nn.Module]:
        """Named parts for ``fsmis-bench describe`` (default: the direct children)."""
        return dict(self.named_children())

    def resolved_options(self) -> dict[str, Any]:
        """The method's options as this run uses them, for run.json (JSON-serialisable).

        The default is ``cfg.method`` as composed; methods whose ``null`` options are
        resolved later (e.g. from ``cfg.fidelity``) return the concrete values."""
        method_cfg = self.cfg.get("method") if isinstance(self.cfg, DictConfig) else None
        return OmegaConf.to_container(method_cfg, resolve=True) if method_cfg is not None else {}  # type: ignore[return-value]

    def weight_identity(self) -> dict:
        """The pretrained weights this method loaded, for the run's identity and record:
        ``{component: {"source": str, "digest": str}}``. Empty for methods without any."""
        return {}

    def uses_random_weights(self) -> bool:
        """True when a component that should be pretrained was built with random weights."""
        return False


def method_name(method: Method) -> str:
    """The name ``method`` was registered and configured under (``cfg.method.name``), else its
    class name: what messages call it."""
    cfg = getattr(method, "cfg", None)
    try:
        name = cfg.method.get("name") if cfg is not None else None  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - a config without a method section
        name = None
    return str(name) if name else type(method).__name__


def contract_problems(method: type[Method] | Method) -> list[tuple[str, str]]:
    """How a method class, or a built method, breaks the contract the engine relies on:
    ``[(what is wrong, what to change)]``, empty when nothing is.

    :meth:`fsmis_bench._registry.Registry.build` checks the class before constructing it and
    the built object after, so each of these stops the command with one
    :class:`~fsmis_bench.plugins.PluginError` before anything is trained or written:

    * ``predict`` is not overridden (every method is evaluated);
    * ``input_norm`` is not one of :data:`INPUT_NORMS`;
    * built only: a trainable method (``needs_training``) overrides neither ``training_loss``
      nor ``forward``, or has no parameter that requires a gradient, or keeps the default
      ``param_groups`` without declaring ``method.lr``;
    * built only: the method or one of its submodules overrides ``get_extra_state``: a
      checkpoint holds trainable parameters and buffers only
      (:func:`fsmis_bench.training.checkpoint.trainable_state`), so such state would be lost
      on resuming and in the saved weights.
    """
    cls = method if isinstance(method, type) else type(method)
    problems: list[tuple[str, str]] = []
    if getattr(cls, "predict", Method.predict) is Method.predict:
        problems.append((
            "it does not override predict",
            "define predict(self, support_images, support_masks, query_images) returning a (Q, H, W) torch.bool "
            "mask per query slice",
        ))
    norm = getattr(method, "input_norm", None)
    if norm not in INPUT_NORMS:
        from ._registry import closest  # the registry imports no method: imported when needed

        close = closest(str(norm), list(INPUT_NORMS)) if isinstance(norm, str) else None
        problems.append((
            f"its input_norm is {norm!r}",
            (f"did you mean {close!r}? " if close else "")
            + "set the class attribute input_norm to one of " + ", ".join(repr(n) for n in INPUT_NORMS)
            + " (per-volume z-score, min-max to [-1, 1], or the intensities as stored)",
        ))
    if isinstance(method, type):
        return problems
    if (method.needs_training and getattr(cls, "training_loss", Method.training_loss) is Method.training_loss
            and getattr(cls, "forward", Method.forward) is Method.forward):
        problems.append((
            "it is trainable (needs_training is true) but does not override training_loss",
            "define training_loss(self, batch) returning a 0-dim loss tensor, or set needs_training = False for "
            "a method that trains nothing",
        ))
    method_cfg = getattr(getattr(method, "cfg", None), "method", None)
    if (method.needs_training and getattr(cls, "param_groups", Method.param_groups) is Method.param_groups
            and method_cfg is not None and "lr" not in method_cfg):
        problems.append((
            "it trains with the default param_groups, which read method.lr, but its config declares no method.lr",
            "declare method.lr (e.g. lr: 1.0e-3) in the method's yaml, or override param_groups",
        ))
    if method.needs_training and not any(p.requires_grad for p in method.parameters()):
        problems.append((
            "it is trainable (needs_training is true) but has no trainable parameter",
            "create its layers in __init__ (as attributes, nn.Module or nn.Parameter) with requires_grad left on, "
            "or set needs_training = False for a method that trains nothing",
        ))
    extra = [f"its submodule {qualified!r} ({type(module).__name__})" if qualified else "it"
             for qualified, module in method.named_modules()
             if getattr(type(module), "get_extra_state", nn.Module.get_extra_state) is not nn.Module.get_extra_state]
    if extra:
        problems.append((
            f"{' and '.join(extra)} override{'s' if len(extra) == 1 else ''} get_extra_state, whose state a checkpoint "
            "does not save (a resumed training would go on without it, and the saved weights would lack it)",
            "keep every state that training changes in a trainable parameter or a registered buffer "
            "(self.register_buffer(name, tensor); an EMA or teacher copy too) and remove get_extra_state",
        ))
    return problems
