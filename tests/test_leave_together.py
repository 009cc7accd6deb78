"""The processes of a multi-process run leave together: the others wait on the launcher's
store until the main process has finished (``fsmis_bench.cli._leave_together``), so none
tears its process group down under a busy peer."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from fsmis_bench import cli

MAIN_WORK_S = 1.5  # the main process "evaluates" this long after the others are done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(rank: int, port: int, times) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(MAIN_WORK_S)
        times["main_done"] = time.time()
    cli._leave_together()
    if rank == 1:
        times["other_left"] = time.time()


def test_the_other_process_waits_for_the_main_one():
    times = mp.Manager().dict()
    mp.spawn(_process, args=(_free_port(), times), nprocs=2, join=True)
    assert times["other_left"] >= times["main_done"]


def _interrupted_process(rank: int, port: int, times) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(2 * MAIN_WORK_S)
        times["main_done"] = time.time()
        cli._leave_together()
        return
    # Ctrl-C as in a terminal. A test run started in the background (`cmd &` in a script)
    # inherits SIGINT ignored, and so does this spawned process; the press would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while waiting
    try:
        cli._leave_together()
    except KeyboardInterrupt:
        times["other_interrupted"] = time.time()


def test_ctrl_c_stops_a_waiting_process_at_once():
    times = mp.Manager().dict()
    mp.spawn(_interrupted_process, args=(_free_port(), times), nprocs=2, join=True)
    assert times["other_interrupted"] < times["main_done"]


def test_one_process_leaves_at_once(monkeypatch):
    def no_store():
        raise AssertionError("a run without a process group has no store to wait on")

    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", no_store)
    assert not dist.is_initialized()
    cli._leave_together()


def test_only_a_command_that_worked_waits(monkeypatch):
    """A process that failed must not wait for the others: its launcher stops them."""
    calls = []
    monkeypatch.setattr(cli, "_leave_together", lambda: calls.append(True))
    assert cli.main(["run", "method=nope"]) == 2
    assert calls == []
    assert cli.main(["list"]) == 0
    assert calls == [True]
