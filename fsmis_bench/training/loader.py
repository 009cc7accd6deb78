"""The input pipeline: training episodes drawn ahead of the step, in worker processes.

Episode ``j`` of a run is drawn from its own generator, seeded by ``(seed, j)``
(:meth:`EpisodeSampler.episode`), and micro-batch ``i`` holds episodes
``i * B ... i * B + B - 1``. So any micro-batch can be drawn in any process, in any order:

* ``train.num_workers`` DataLoader processes draw and augment micro-batches ahead
  (``prefetch_factor`` each), into pinned memory when the step runs on CUDA, while the
  accelerator computes; the number of workers never changes a number (it is not part of a
  run's hash);
* a resumed run needs only the index of its next micro-batch, which the step count gives;
* ``B`` episodes as one batch and ``B`` accumulated batches of one are the same episodes;
* the N processes of a multi-process run take disjoint shares of each micro-batch
  (process k: episodes ``i * B + k * B / N ...``), so together they train on the episodes
  of a one-process run.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from ..method import EpisodeBatch
from .episodes import EpisodeSampler
from .interrupt import stop_signals

#: micro-batches each worker keeps ready
PREFETCH_FACTOR = 4
#: workers that ``num_workers=auto`` starts next to a CUDA device, at most one per spare
#: core (none on the CPU, where every core already computes the step)
CUDA_WORKERS = 4


def resolve_num_workers(value: int | str, cuda: bool) -> int:
    """``train.num_workers``: an integer >= 0, or ``auto`` (up to ``CUDA_WORKERS`` with CUDA, else 0)."""
    if value == "auto":
        return min(CUDA_WORKERS, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0 or isinstance(value, bool):
        raise ConfigError(f"train.num_workers={value!r} is not allowed", hint="use auto or an integer >= 0")
    return workers


#: signals a worker leaves to the main process: a terminal's Ctrl-C, GNU ``timeout`` and
#: Slurm signal the whole process group, and only the main process decides how to stop
_WORKER_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: stop signals sent to the process group are
    the main process's to act on (it saves at the next step boundary, then shuts the
    workers down), so a worker ignores them. Without this a worker dies on the group's
    SIGTERM (torch's own handler) and the main process fails mid-step with no checkpoint,
    and a worker that inherited the main process's Python handler prints its "received"
    line again.

    SIGTERM from the parent itself (torch's and multiprocessing's ``terminate()`` of a
    worker that did not exit) still ends the worker: SIGTERM is blocked and a thread takes
    it with its sender. A worker whose parent dies exits through torch's watchdog.
    Seeding is untouched: torch seeds each worker before this runs, and every episode
    draws from its own generator anyway.
    """
    others = tuple(s for s in set(_WORKER_IGNORED) | set(stop_signals()) if s != signal.SIGTERM)
    for signum in others:
        signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)  # as torch's worker handler does for its parent's SIGTERM

    threading.Thread(target=take_sigterm, name="fsmis-worker-sigterm", daemon=True).start()


class EpisodeStream(Dataset):
    """Micro-batch ``i`` of a run as four tensors (so that the DataLoader can pin them).

    Returns ``(support_images (B, 1, 1, H, W), support_masks (B, 1, 1, H, W),
    query_images (B, 1, H, W), query_masks (B, 1, H, W))``.
    """

    def __init__(self, sampler: EpisodeSampler, batch_size: int, length: int, shard: tuple[int, int] = (0, 1)) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.length = length
        self.part, self.parts = shard

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        share = self.batch_size // self.parts
        self.sampler.seek(index * self.batch_size + self.part * share)
        batch = self.sampler.batch(share)
        return batch.support_images, batch.support_masks, batch.query_images, batch.query_masks


class EpisodeLoader:
    """Micro-batches ``start ... stop - 1`` of a run, as :class:`EpisodeBatch` on ``device``.

    Args:
        sampler: draws the episodes (copied into each worker process).
        batch_size: episodes per micro-batch.
        start, stop: the micro-batch range (a resumed run starts where it stopped).
        device: where batches go (``non_blocking`` copies from pinned memory on CUDA).
        num_workers: worker processes; 0 draws in this process, just in time.
        shard: ``(k, n)``: this is process k of n, which trains on the k-th share of each
            micro-batch (``batch_size`` counts all n shares).
    """

    def __init__(
        self,
        sampler: EpisodeSampler,
        batch_size: int,
        *,
        start: int,
        stop: int,
        device: torch.device,
        num_workers: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        stream = EpisodeStream(sampler, batch_size, stop, shard)
        self.loader = DataLoader(
            stream,
            batch_size=None,  # items are micro-batches already
            sampler=range(start, stop),
            num_workers=num_workers,
            pin_memory=self.pin,
            prefetch_factor=PREFETCH_FACTOR if num_workers else None,
            persistent_workers=False,
            worker_init_fn=_leave_signals_to_the_main_process if num_workers else None,
        )

    def __iter__(self) -> Iterator[EpisodeBatch]:
        for tensors in self.loader:
            moved = [t.to(self.device, non_blocking=self.pin) for t in tensors]
            yield EpisodeBatch(*moved)
