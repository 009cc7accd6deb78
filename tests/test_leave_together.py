"""The processes of a multi-process run leave together: the others wait on the launcher's
store until the main process has finished (``fsmis_bench.cli._leave_together``), so none
tears its process group down under a busy peer."""

from __future__ import annotations

import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from fsmis_bench import cli

MAIN_WORK_S = 1.5  # the main process "evaluates" this long after the others are done


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(rank: int, port: int, left_at) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(MAIN_WORK_S)
    cli._leave_together()
    left_at[rank] = time.time()


def test_the_other_process_waits_for_the_main_one():
    left_at = mp.Manager().dict()
    began = time.time()
    mp.spawn(_process, args=(_free_port(), left_at), nprocs=2, join=True)
    assert left_at[1] >= left_at[0] - 0.05  # not before the main process was done
    assert left_at[1] - began >= MAIN_WORK_S


def test_one_process_leaves_at_once():
    began = time.time()
    cli._leave_together()  # no process group
    assert time.time() - began < 0.5
