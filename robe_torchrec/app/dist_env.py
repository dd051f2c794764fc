"""torchrun / torchx environment: RANK, WORLD_SIZE, LOCAL_RANK; process group and device."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_choice: str = "auto") -> DistEnv:
    """Read the launcher's environment; init gloo (CPU) or nccl (CUDA) when WORLD_SIZE > 1."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:
            # Under torchrun the workers of every restart share the agent's store: keep each
            # attempt's keys apart, or a restarted rank can read a dead peer's address.
            from torch.distributed.rendezvous import rendezvous

            store, _, _ = next(rendezvous("env://", rank, world))
            store = dist.PrefixStore(f"robe_torchrec/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def init_one_process_group(env: DistEnv) -> None:
    """A 1-rank process group (in-process store, no ports) for a single process that runs under
    DistributedModelParallel, e.g. to train through TrainPipelineSparseDist on one GPU."""
    if env.world_size != 1:
        raise ValueError(f"a 1-rank process group needs WORLD_SIZE 1, got {env.world_size}")
    if not dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


TEARDOWN_BARRIER_S = 60


def teardown(completed: bool = False) -> None:
    """Destroy the process group; after a run that ``completed`` on every rank, first meet the
    other ranks (a barrier) so none leaves while a peer's last collective is still being retired.

    ``destroy_process_group`` only unregisters a gloo group: the C++ group (and its worker
    threads) lives on while torchrec / DDP objects hold it. Collecting those objects here, while
    the interpreter is fully alive, lets the group join its threads now instead of during
    interpreter shutdown, where a worker thread that needs the GIL is killed by a forced unwind
    ("terminate called without an active exception", seen once on a 2-rank CI run).
    """
    if dist.is_available() and dist.is_initialized():
        if completed:
            try:  # bounded: a peer that failed after its last agreed step must not hang this rank
                dist.barrier(async_op=True).wait(timeout=timedelta(seconds=TEARDOWN_BARRIER_S))
            except RuntimeError:
                pass
        dist.destroy_process_group()
    gc.collect()
