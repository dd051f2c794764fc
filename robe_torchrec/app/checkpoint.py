"""Atomic torch.distributed.checkpoint (DCP) checkpoints: model, optimizers, fused state, step.

Layout under the checkpoint directory::

    step_10/        a complete DCP checkpoint
    step_20/
    latest          text file: "step_20"

Writing step N: every rank writes its DCP shards into ``step_N.tmp/``; then rank 0 renames it to
``step_N/`` and atomically replaces ``latest`` (write ``latest.tmp``, fsync, ``os.replace``).
A crash at any point leaves ``latest`` naming the previous complete checkpoint; a stale
``step_N.tmp/`` is removed by the next save.

Contents: ``model`` and ``optim`` (the dense optimizer), ``fused`` (the fused ROBE optimizer,
when there is one) and ``progress.step``. One process (plain module, torch optimizer):
``torch.distributed.checkpoint.state_dict.get_state_dict``. Under DistributedModelParallel (the
dense optimizer is a torchrec ``KeyedOptimizer``): ``dmp.state_dict()`` (unsharded keys;
ShardedTensors for table_wise / row_wise ROBE arrays), the keyed dense optimizer's state dict and
``dmp.fused_optimizer.state_dict()`` (ShardedTensor accumulators); DCP loads them in place.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LATEST = "latest"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _keyed(optimizer: Any) -> bool:
    from torchrec.optim.keyed import KeyedOptimizer

    return isinstance(optimizer, KeyedOptimizer)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fused: Optional[Any], step: int) -> Dict[str, Any]:
    if _keyed(optimizer):  # DMP: torchrec state dicts (ShardedTensors under the unsharded keys)
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    state: Dict[str, Any] = {
        "model": model_sd,
        "optim": optim_sd,
        "progress": {"step": torch.tensor(step, dtype=torch.int64)},
    }
    if fused is not None:
        state["fused"] = fused.state_dict()
    return state


def _publish(tmp: str, final: str, directory: str) -> None:
    """Make the written ``tmp`` checkpoint visible: rename, then repoint ``latest`` atomically."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = os.path.join(directory, LATEST + ".tmp")
    with open(pointer_tmp, "w") as f:
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(directory, LATEST))


def _prune(directory: str, keep: int) -> None:
    done = sorted(
        (d for d in os.listdir(directory) if d.startswith("step_") and not d.endswith(".tmp")),
        key=lambda d: int(d[5:]),
    )
    current = latest_step_dir(directory)
    for d in done[:-keep]:
        if os.path.join(directory, d) != current:
            shutil.rmtree(os.path.join(directory, d), ignore_errors=True)


def save(
    directory: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    fused: Optional[Any] = None, keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically (collective: call on every rank); returns its path."""
    final = os.path.join(directory, f"step_{step}")
    tmp = final + ".tmp"
    if _is_main():
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    _barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer, fused, step), checkpoint_id=tmp)
    _barrier()
    if _is_main():
        _publish(tmp, final, directory)
        _prune(directory, keep)
    _barrier()
    return final


def latest_step_dir(directory: str) -> Optional[str]:
    """The checkpoint ``latest`` names, or None when there is none."""
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(directory, name)
    return path if os.path.isdir(path) else None


def load(
    path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fused: Optional[Any] = None
) -> int:
    """Load checkpoint ``path`` into model and optimizers in place; returns its step."""
    keyed = _keyed(optimizer)
    if keyed:
        optimizer.init_state()  # lazily created state (e.g. Adam) must exist before an in-place load
    state = _state(model, optimizer, fused, step=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(_without_empty_shards(state), checkpoint_id=path)  # in place: shares the tensors
    if keyed:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if fused is not None:
        fused.load_state_dict(state["fused"])
    return int(state["progress"]["step"])


def _without_empty_shards(state: Any) -> Any:
    """``state`` (new dicts, same tensors) minus ShardedTensors with no shard on this rank.

    A table_wise array (and its fused state) has no shard on the other ranks. DCP (torch 2.13)
    takes a requested-but-empty ShardedTensor for a sign of a pre-2.4 checkpoint, switches to the
    old key flattening and then misses non-tensor entries such as the ROBE ``_extra_state``; such
    a rank has nothing to read for that tensor anyway.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(state, dict):
        return {
            k: _without_empty_shards(v)
            for k, v in state.items()
            if not (isinstance(v, ShardedTensor) and not v.local_shards())
        }
    return state


def list_checkpoints(directory: str) -> List[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if d.startswith("step_"))
