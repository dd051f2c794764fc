"""Multi-process harness for the sharding tests, plus its own checks.

``DistPool(world_size)`` spawns ``world_size`` CPU processes once (torch.multiprocessing spawn,
gloo, MASTER_ADDR=127.0.0.1 and a free port) and keeps them: each ``pool.run(fn, *args)`` runs a
module-level function ``fn(rank, world_size, *args)`` on every rank and returns the list of
results, re-raising a rank's exception with its traceback. Reusing the processes keeps each
test to a few seconds (a fresh process spends ~4 s importing torchrec). A failed run tears the
pool down (a rank may be stuck in a collective); the next run starts a fresh one.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from typing import Any, Callable, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RUN_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, inbox: Any, outbox: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=RUN_TIMEOUT_S))
    try:
        while True:
            job = inbox.get()
            if job is None:
                break
            fn, args = job
            try:
                outbox.put(("ok", fn(rank, world_size, *args)))
            except BaseException:  # noqa: BLE001 - report everything to the parent
                outbox.put(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class DistPool:
    """``world_size`` persistent gloo processes running test functions (see module docstring)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: List[Any] = []
        self._inboxes: List[Any] = []
        self._outboxes: List[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._inboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._outboxes = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, args=(r, self.world_size, port, self._inboxes[r], self._outboxes[r]), daemon=True)
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> List[Any]:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for box in self._inboxes:
            box.put((fn, args))
        results: List[Any] = []
        errors: List[str] = []
        for rank, box in enumerate(self._outboxes):
            try:
                status, value = box.get(timeout=RUN_TIMEOUT_S)
            except queue.Empty:
                status, value = "error", f"rank {rank}: no result within {RUN_TIMEOUT_S} s"
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
        if errors:
            self.close(force=True)
            raise AssertionError("distributed test failed:\n" + "\n".join(errors))
        return results

    def close(self, force: bool = False) -> None:
        for p, box in zip(self._procs, self._inboxes):
            if p.is_alive() and not force:
                box.put(None)
        for p in self._procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()  # only our own child processes
                p.join()
        self._procs = []


_POOL: Optional[DistPool] = None


def get_pool(world_size: int = 2) -> DistPool:
    """The shared pool of this pytest process (closed at exit by the fixture in conftest-less style)."""
    global _POOL
    if _POOL is None or _POOL.world_size != world_size:
        if _POOL is not None:
            _POOL.close()
        _POOL = DistPool(world_size)
    return _POOL


# ----- checks of the harness itself ------------------------------------------------------------------


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t)


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("boom from rank 1")


def test_pool_runs_collectives_and_reports_errors():
    pool = get_pool(2)
    assert pool.run(_all_reduce_rank) == [3.0, 3.0]
    with pytest.raises(AssertionError, match="boom from rank 1"):
        pool.run(_raise_on_rank_one)
    assert pool.run(_all_reduce_rank) == [3.0, 3.0]  # a fresh pool after the failure
