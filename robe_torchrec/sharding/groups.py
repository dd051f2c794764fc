"""Where each ROBE array group lives under a sharding plan (one ``ParameterSharding`` per group)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.distributed.types import ShardingType

from robe_torchrec.config import RobeConfig
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.sharding.rw_lookup import ShardRanges

DP = ShardingType.DATA_PARALLEL.value
TW = ShardingType.TABLE_WISE.value
RW = ShardingType.ROW_WISE.value
SUPPORTED = (DP, TW, RW)


@dataclass
class Group:
    """How one array group is sharded, and where this rank's piece is."""

    name: str
    sharding_type: str
    config: RobeConfig
    layout: FeatureLayout
    feature_range: Tuple[int, int]  # [f0, f1) in the canonical input order
    shards: List[Tuple[int, int, int]]  # (rank, lo, hi) of every non-empty shard (element ranges)
    placements: Dict[int, str]  # rank -> placement device string
    lo: int = 0
    hi: int = 0  # this rank's [lo, hi)
    ranges: Optional[ShardRanges] = None

    @property
    def local_size(self) -> int:
        return self.hi - self.lo


def placement(rank: int, my_rank: int, device: torch.device) -> str:
    """ShardedTensor placement string of ``rank``'s shard."""
    if device.type == "cpu":
        return f"rank:{rank}/cpu"
    if rank == my_rank:
        return f"rank:{rank}/{device}"
    local = max(torch.cuda.device_count(), 1) if device.type == "cuda" else 1
    return f"rank:{rank}/{device.type}:{rank % local}"


def group_from_plan(
    name: str,
    config: RobeConfig,
    layout: FeatureLayout,
    ps: Any,
    feature_range: Tuple[int, int],
    rank: int,
    world_size: int,
    device: torch.device,
) -> Group:
    """The ``Group`` of one plan entry; a plan this module cannot run raises a ValueError naming it."""
    m, z = config.num_elements, config.block_size
    stype = ps.sharding_type
    placements = {r: placement(r, rank, device) for r in range(world_size)}
    if stype == DP:
        return Group(name, DP, config, layout, feature_range, [], placements, 0, m)
    if stype == TW:
        if not ps.ranks:
            raise ValueError(f"table_wise plan for ROBE group {name!r} has no rank")
        owner = int(ps.ranks[0])
        lo, hi = (0, m) if owner == rank else (0, 0)
        return Group(name, TW, config, layout, feature_range, [(owner, 0, m)], placements, lo, hi)
    if stype == RW:
        shards: List[Tuple[int, int, int]] = []
        spec = ps.sharding_spec
        if spec is None or not getattr(spec, "shards", None):
            raise ValueError(f"row_wise plan for ROBE group {name!r} has no sharding_spec")
        for meta in spec.shards:
            row, rows = int(meta.shard_offsets[0]), int(meta.shard_sizes[0])
            cols = int(meta.shard_sizes[1]) if len(meta.shard_sizes) > 1 else 1
            if cols != z:
                raise ValueError(
                    f"row_wise plan for ROBE group {name!r}: shards must span whole rows of the "
                    f"[ceil(m/Z), Z] view (got {list(meta.shard_sizes)}, Z={z})"
                )
            lo, hi = min(row * z, m), min((row + rows) * z, m)
            shards.append((meta.placement.rank(), lo, hi))
        ranges = ShardRanges(shards, m, world_size)
        lo, hi = ranges.local(rank)
        return Group(name, RW, config, layout, feature_range, ranges.ranges, placements, lo, hi, ranges)
    raise ValueError(f"ROBE group {name!r}: sharding type {stype!r} is not supported (data_parallel, table_wise, row_wise)")
