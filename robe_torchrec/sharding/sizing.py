"""Size a ROBE array group to a per-device memory budget.

Per-device bytes of a group of m float32 elements (block size Z), as torchrec's storage estimator
counts them for this sharder (array + optimizer state, see ``sharder.py``):

    data_parallel, table_wise:  m * (4 + s)                       (the whole array on a device)
    row_wise:                   ceil(ceil(m / Z) / W) * Z * (4 + s) (the largest Z-aligned shard)

with s the optimizer state bytes per element: sgd 0, adagrad 4, rowwise_adagrad 4 / Z,
adam 8 (a dense torch Adam on a data-parallel array).
"""

from __future__ import annotations

from typing import Optional, Union

from torchrec.distributed.planner.types import Topology

from robe_torchrec.optim import FUSED_OPTIMIZERS, state_numel

# fused optimizers: their state per Z-element block (robe_torchrec.optim.state_numel); adam: two moments
_STATE_BYTES = {o: (lambda z, o=o: 4.0 * state_numel(o, z, z) / z) for o in FUSED_OPTIMIZERS}
_STATE_BYTES["adam"] = lambda z: 8.0


def bytes_per_element(optimizer: Optional[str], block_size: int) -> float:
    """Array + optimizer-state bytes per float32 element."""
    if optimizer is None:
        return 4.0
    if optimizer not in _STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(_STATE_BYTES)} or None, got {optimizer!r}")
    return 4.0 + _STATE_BYTES[optimizer](block_size)


def device_bytes(num_elements: int, world_size: int, optimizer: Optional[str], sharding_type: str, block_size: int) -> float:
    """Bytes the group takes on its most loaded device (the planner's view)."""
    per = bytes_per_element(optimizer, block_size)
    if sharding_type in ("data_parallel", "table_wise"):
        return num_elements * per
    if sharding_type == "row_wise":
        rows = -(-num_elements // block_size)
        return -(-rows // world_size) * block_size * per
    raise ValueError(f"sharding_type must be data_parallel, table_wise or row_wise, got {sharding_type!r}")


def array_elements_for_budget(
    bytes_per_device: Optional[float],
    topology: Union[Topology, int],
    optimizer: Optional[str] = "adagrad",
    sharding_type: str = "row_wise",
    block_size: int = 32,
) -> int:
    """The largest m (a multiple of ``block_size``) whose group fits ``bytes_per_device`` per device.

    Args:
        bytes_per_device: the budget for this group on each device; ``None`` takes the smallest
            device capacity of ``topology`` (HBM on cuda, DDR on cpu) as the budget.
        topology: a torchrec ``Topology`` or just the world size.
        optimizer: the group's optimizer (sgd, adagrad, rowwise_adagrad, adam) or None.
        sharding_type: data_parallel, table_wise or row_wise.
        block_size: Z.

    The result is a model-configuration number: use it in ``RobeConfig(num_elements=...)`` once,
    and keep it when the world size changes (checkpoints reshard; a different m is a different model).
    """
    world_size = topology if isinstance(topology, int) else topology.world_size
    if bytes_per_device is None:
        if isinstance(topology, int):
            raise ValueError("bytes_per_device=None needs a Topology to read device capacities from")
        kind = "hbm" if topology.compute_device in ("cuda", "mtia") else "ddr"
        bytes_per_device = min(getattr(d.storage, kind) for d in topology.devices)
    if world_size < 1 or block_size < 1:
        raise ValueError("world size and block size must be >= 1")
    per = bytes_per_element(optimizer, block_size)
    rows_per_device = int(bytes_per_device // (block_size * per))
    if sharding_type in ("data_parallel", "table_wise"):
        rows = rows_per_device
    elif sharding_type == "row_wise":
        rows = rows_per_device * world_size
    else:
        raise ValueError(f"sharding_type must be data_parallel, table_wise or row_wise, got {sharding_type!r}")
    if rows < 1:
        raise ValueError(f"a budget of {bytes_per_device} bytes per device does not hold one block of {block_size} elements")
    m = rows * block_size
    assert device_bytes(m, world_size, optimizer, sharding_type, block_size) <= bytes_per_device
    return m
