"""Run a function on N gloo CPU ranks (forked, so the children skip the imports); an assertion on any rank fails
the test."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def gloo_threads() -> list[str]:
    """Names of this process's gloo worker threads (Linux: read from /proc; elsewhere an empty list)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    return [n for n in ((t / "comm").read_text().strip() for t in tasks.iterdir()) if n.startswith("pt_gloo")]


def assert_gloo_threads_joined() -> None:
    """After `m6lit.cli.finish_distributed`: no gloo worker thread is left to meet interpreter finalisation (where
    it can abort a finished run with SIGABRT)."""
    left = gloo_threads()
    assert not left, f"gloo threads still running after finish_distributed: {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """fn(rank, world, *args) on `world` processes with a gloo group initialised (fn must be importable)."""
    mp.start_processes(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True, start_method="fork")
