"""Work recorded once as a CUDA graph and replayed: :class:`CudaGraph` (also the training
step's recorder, :mod:`fsmis_bench.training.cuda_graph`) and :class:`RecordedCall` (inference).

Why: at inference an SD U-Net pass is launch-bound on an H100. The support pass over one
slice took 117 ms and the query pass over eight slices 103 ms (``benchmarks/
gpu_engine_check.py``, ``predict_parts``): the time goes into launching thousands of small
kernels, not into arithmetic. A replayed graph launches all of them with one call.

A method wraps a function of fixed-shape tensors (``fn(*inputs) -> outputs``). The first
call with a new input signature (shapes, dtypes, device) runs ``fn`` eagerly
:data:`WARMUP_CALLS` times on a side stream (lazy cuDNN/cuBLAS set-up), then records it on
static copies of the inputs. Every call copies its inputs into those static tensors and
replays the graph. The outputs are the recording's static tensors: the next call overwrites
them, so a caller copies what it keeps. A second recorded call may read the first one's
static outputs (the query pass reads the support pass's K/V bank): its graph reads their
memory, which each replay of the first one rewrites in place.

Where recording fails (something in ``fn`` waits for the host), ``fn`` runs as it is from
then on, after one warning. Where the inputs are not on CUDA, ``fn`` runs as it is
(:func:`can_record` is False). The CPU tests set :data:`STAND_IN` to :class:`EagerReplay`,
which keeps the same static inputs and outputs but re-runs ``fn`` instead of a graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

#: eager calls on the side stream before recording a new input signature
WARMUP_CALLS = 2


class Recorder(Protocol):
    def side_stream(self) -> contextlib.AbstractContextManager[None]: ...
    def record(self, body: Callable[[], Any]) -> Any: ...
    def replay(self) -> None: ...


class CudaGraph:
    """One ``torch.cuda.CUDAGraph`` and the side stream its warm-up runs on."""

    def __init__(self, device: torch.device) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.stream = torch.cuda.Stream(device)

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        """The warm-up's stream (ordered after, and before, the current stream's work)."""
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def record(self, body: Callable[[], Any]) -> Any:
        """Record ``body`` (not run: :meth:`replay` runs it); returns its static output."""
        # thread_local: the DataLoader's pinning thread may call CUDA meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return body()

    def replay(self) -> None:
        self.graph.replay()


class EagerReplay:
    """CPU stand-in for :class:`CudaGraph`: recording runs the body once for its static
    outputs; each replay runs it again and writes the results into those same tensors, as a
    replayed graph writes into its static memory."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.body: Callable[[], Any] | None = None
        self.output: Any = None

    @contextlib.contextmanager
    def side_stream(self) -> Iterator[None]:
        yield

    def record(self, body: Callable[[], Any]) -> Any:
        self.body = body
        self.output = body()
        return self.output

    def replay(self) -> None:
        assert self.body is not None
        for static, fresh in zip(tensor_leaves(self.output), tensor_leaves(self.body()), strict=True):
            static.copy_(fresh)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (tensors, sequences, dicts, dataclasses and plain
    objects' attributes), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        items: Any = value
    elif isinstance(value, dict):
        items = value.values()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, field.name) for field in dataclasses.fields(value)]
    elif hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module)):
        items = vars(value).values()
    else:
        return []
    return [leaf for item in items for leaf in tensor_leaves(item)]


#: the recorder for non-CUDA devices: ``None`` (run as it is); the CPU tests set EagerReplay
STAND_IN: type[EagerReplay] | None = None


def can_record(device: torch.device) -> bool:
    return device.type == "cuda" or STAND_IN is not None


def make_recorder(device: torch.device) -> Recorder | None:
    """A CUDA graph for CUDA inputs, :data:`STAND_IN` elsewhere."""
    if device.type == "cuda":
        return CudaGraph(device)
    return STAND_IN(device) if STAND_IN is not None else None


def failure_reason(exc: BaseException) -> str:
    """``"Type: first line"`` of why a recording failed, for a warning and the run record."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first}"


def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(t.shape), t.dtype, t.device, t.stride()) for t in inputs)


@dataclasses.dataclass
class _Recording:
    recorder: Recorder
    inputs: tuple[torch.Tensor, ...]
    output: Any


class RecordedCall:
    """``fn(*inputs)``, recorded as a CUDA graph per input signature and replayed.

    A recording reads every other tensor it uses (the weights) at its address: update them
    in place (an optimiser step, ``load_state_dict``), never by assigning ``param.data``.

    Args:
        fn: a function of tensors whose work depends only on their values (no host reads
            of device values, no data-dependent shapes) and whose result is made of tensors.
        name: what ``fn`` is, for the warning where it cannot be recorded.
    Attributes:
        recordings: how many input signatures have been recorded.
    """

    def __init__(self, fn: Callable[..., Any], name: str = "this work") -> None:
        self.fn = fn
        self.name = name
        self._recordings: dict[tuple, _Recording] = {}
        #: why recording failed (then ``fn`` runs as it is from then on), else None
        self.fell_back: str | None = None

    @property
    def recordings(self) -> int:
        return len(self._recordings)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        key = _signature(inputs)
        recording = self._recordings.get(key)
        if recording is None:
            recorder = None if self.fell_back else make_recorder(inputs[0].device)
            if recorder is None:
                return self.fn(*inputs)
            try:
                recording = self._recordings[key] = self._record(recorder, inputs)
            except Exception as exc:  # something in fn waits for the host, or cannot be recorded
                self.fell_back = failure_reason(exc)
                warnings.warn(f"{self.name} cannot be recorded as a CUDA graph ({self.fell_back}); it runs "
                              "without the graph from now on, with the same numbers", RuntimeWarning, stacklevel=2)
                if inputs[0].is_cuda:
                    torch.cuda.synchronize()
                return self.fn(*inputs)
        for static, value in zip(recording.inputs, inputs, strict=True):
            static.copy_(value)
        recording.recorder.replay()
        return recording.output

    def _record(self, recorder: Recorder, inputs: tuple[torch.Tensor, ...]) -> _Recording:
        with recorder.side_stream():
            for _ in range(WARMUP_CALLS):
                self.fn(*inputs)
        static = tuple(t.clone() for t in inputs)
        output = recorder.record(lambda: self.fn(*static))
        return _Recording(recorder, static, output)


def pad_to(batch: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, ...)`` -> ``(size, ...)``, repeating the last item: the short last chunk of a
    volume reuses the full chunk's recording (items must not influence each other)."""
    missing = size - batch.shape[0]
    if missing <= 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(missing, *batch.shape[1:])])


__all__ = ["STAND_IN", "WARMUP_CALLS", "CudaGraph", "EagerReplay", "RecordedCall", "can_record", "failure_reason",
           "make_recorder", "pad_to", "tensor_leaves"]
