"""Stop requests: a signal sets a flag; the training loop stops at its next step boundary.

A signal that raised an exception in the middle of a step would leave the sampler's random
stream and the optimiser half-advanced, and a checkpoint saved then would not resume
exactly. :class:`StopRequest` only records the signal; the loop polls
:attr:`StopRequest.requested` between steps, saves a complete state and raises
:class:`Interrupted`, which carries the signal so that the caller can decide what comes
next (a cluster job asks its scheduler to requeue it, see :mod:`fsmis_bench.sweep`).

Which signals stop a run: SIGINT and SIGTERM always; more (SIGUSR1, a scheduler's
pre-emption signal) while an :func:`also_stop_on` block is active, so the engine does not
need to know who launched it.

Interface shared with the issue-9 branch (``StopRequest``, ``Interrupted``,
``DEFAULT_SIGNALS``); :func:`also_stop_on` and :func:`stop_signals` are the addition that
pre-emption needs.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: signals that ask any run to stop: Ctrl-C and ``kill``'s / a scheduler's SIGTERM
DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)

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
    """A run stopped on a signal after saving its state; the same command resumes it.

    Attributes:
        signum: the signal that asked for the stop.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """Context manager that turns ``signals`` into a flag while it is active.

    Outside the main thread (where Python cannot install handlers) it does nothing and the
    signals keep their usual effect. On exit the previous handlers come back.

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
            print(f"\n{signal.Signals(signum).name} received: stopping after the current step",
                  file=sys.stderr, flush=True)
        self.received = signum

    def stop(self) -> Interrupted:
        """The exception to raise once the state is saved."""
        assert self.received is not None
        return Interrupted(self.received)
