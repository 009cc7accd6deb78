"""Stop requests: a signal sets a flag, the loop stops at its next safe point.

A signal that raised an exception in the middle of a training step would leave the
sampler's random stream and the optimiser half-advanced, so a checkpoint saved then would
not resume exactly. :class:`StopRequest` instead records the signal; the loop polls
:attr:`StopRequest.requested` at each step boundary, saves a complete state and raises
:class:`Interrupted`. A second Ctrl-C stops at once (without saving; the last periodic
checkpoint stays valid).

Other signals (e.g. ``SIGUSR1`` before a cluster's pre-emption) plug in through
``StopRequest(signals=...)``, or, without the engine knowing who launched it, through an
:func:`also_stop_on` block around the run (:mod:`fsmis_bench.sweep`); the caller reads
:attr:`Interrupted.signum` to decide what to do after saving (requeue the job).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: signals that ask a run to stop: Ctrl-C and a scheduler's or ``kill``'s SIGTERM
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

_EXTRA: list[int] = []


@contextmanager
def also_stop_on(*signals: int) -> Iterator[None]:
    """While active, a :class:`StopRequest` built without arguments also catches ``signals``."""
    added = [s for s in signals if s not in DEFAULT_SIGNALS and s not in _EXTRA]
    _EXTRA.extend(added)
    try:
        yield
    finally:
        for s in added:
            _EXTRA.remove(s)


def stop_signals() -> tuple[int, ...]:
    """The signals a default :class:`StopRequest` catches right now."""
    return DEFAULT_SIGNALS + tuple(_EXTRA)


class Interrupted(KeyboardInterrupt):
    """A run stopped on a signal after saving what it had; the same command resumes it.

    Attributes:
        signum: the signal that asked for the stop.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    def __reduce__(self):
        # pickled by its signal number: a joblib job's stop reaches the sweep's process as
        # this exception (the default, from the signal's name, failed to un-pickle there)
        return (type(self), (self.signum,))

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """Context manager that turns ``signals`` into a flag while it is active.

    Outside the main thread (where Python cannot install handlers) it does nothing and
    signals keep their usual effect.

    Args:
        signals: the signals to catch; default :func:`stop_signals`.
    """

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signals = tuple(signals) if signals is not None else stop_signals()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user wants out now
        if self.received is None:
            name = signal.Signals(signum).name
            # a second Ctrl-C stops at once; said only to whoever can press it
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            print(f"\n{name} received: stopping after the current step{again}", file=sys.stderr, flush=True)
        self.received = signum

    def stop(self) -> Interrupted:
        """The exception to raise once the state is saved."""
        assert self.received is not None
        return Interrupted(self.received)
