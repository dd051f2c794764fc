"""How much of a ROBE byte budget goes to exact rows for hot ids, per table, decided from the id stream.

Why a threshold on traffic per byte: in a ROBE array of m floats every element receives on average
1/m of all element reads; an id carrying a share p of all lookups reads D elements with p/D each,
so it *dominates* its elements once p >= D/m, i.e. once its traffic share is at least its share of
the bytes (4D of 4m). Such an id is represented by ROBE about as well as by its own row, but it
drowns the cold ids sharing its elements; moving it to an exact row costs about the bytes it
already occupies. Below that level an exact row takes more than the id's fair share of the budget
from the cold ids. So an id may get a row only if (its guaranteed count from the sketch) / (all
lookups) >= ``min_traffic_per_byte`` * (bytes of a hot row incl. id map and sketch) / budget. With
flat frequencies no id passes and the collection is plain ROBE with the whole budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.modules.heavy_hitters import SpaceSavingSketch

ID_MAP_BYTES_PER_ROW = 8 + 4  # sorted int64 hot id + int32 slot
SKETCH_BYTES_PER_ENTRY = 16  # int64 id + float32 count + float32 error
SKETCH_FIXED_BYTES = 16  # size (int64) + total (float64)
TABLE_FIXED_BYTES = 8  # the table's hot-set size (int64)
STEP_BYTES = 16  # the step counter (int64) and all lookups seen (float64)


@dataclass(frozen=True)
class FrequencyAwareConfig:
    """Knobs of the frequency-aware ROBE collection.

    Attributes:
        max_hot_fraction: at most this share of the byte budget goes to hot rows, their id map and
            their sketches (the ROBE array keeps the rest).
        min_traffic_per_byte: alpha of the module docstring: an id is hot only if its guaranteed
            traffic share is >= alpha * (its bytes) / budget (planning and every refresh).
        sketch_factor: sketch entries per hot row of a table (space-saving needs slack over k).
        refresh_every: training forwards between promotion/demotion passes.
        sketch_every: feed the sketches every this many training forwards (1: every batch; more
            cuts the per-step cost of counting, on a subsample of the stream).
        max_swaps: promotions per table per refresh (bounded cost); 0 means the table's capacity.
        hysteresis: an incumbent hot id's count is multiplied by this when ranking (no thrashing
            between ids of nearly equal counts).
        decay: sketch counts are multiplied by this after each refresh (1: no decay).
        calibration_capacity: sketch capacity per table while planning (transient, not stored).
    """

    max_hot_fraction: float = 0.5
    min_traffic_per_byte: float = 1.0
    sketch_factor: int = 2
    refresh_every: int = 32
    sketch_every: int = 1
    max_swaps: int = 0
    hysteresis: float = 1.2
    decay: float = 1.0
    calibration_capacity: int = 4096

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_hot_fraction < 1.0:
            raise ValueError(f"max_hot_fraction must be in [0, 1), got {self.max_hot_fraction}")
        if not (self.min_traffic_per_byte > 0 and math.isfinite(self.min_traffic_per_byte)):
            raise ValueError(f"min_traffic_per_byte must be a positive number, got {self.min_traffic_per_byte}")
        for name in ("sketch_factor", "refresh_every", "sketch_every", "calibration_capacity"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FrequencyAwareConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_swaps < 0:
            raise ValueError(f"max_swaps must be >= 0, got {self.max_swaps}")
        if self.hysteresis < 1.0:
            raise ValueError(f"hysteresis must be >= 1, got {self.hysteresis}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def hot_row_bytes(dim: int, config: FrequencyAwareConfig) -> int:
    """Bytes one hot row costs: the row, its id-map entry and its sketch entries."""
    return 4 * dim + ID_MAP_BYTES_PER_ROW + SKETCH_BYTES_PER_ENTRY * config.sketch_factor


def overhead_bytes(capacities: Mapping[str, int], dim: int, config: FrequencyAwareConfig) -> int:
    """Everything the collection stores besides the ROBE array, for these per-table capacities."""
    hot = {t: k for t, k in capacities.items() if k > 0}
    if not hot:
        return 0
    per_table = TABLE_FIXED_BYTES + SKETCH_FIXED_BYTES
    return STEP_BYTES + sum(k * hot_row_bytes(dim, config) + per_table for k in hot.values())


def ids_by_table(tables: Sequence[EmbeddingBagConfig], kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """The ids of every table in one KJT (all of the table's features concatenated)."""
    keys = kjt.keys()
    out: Dict[str, torch.Tensor] = {}
    for t in tables:
        parts = [kjt[f].values() for f in t.feature_names if f in keys]
        if parts:
            out[t.name] = torch.cat(parts).to(torch.int64)
    return out


def plan_capacities(
    tables: Sequence[EmbeddingBagConfig],
    budget_bytes: int,
    sample: Iterable[KeyedJaggedTensor],
    config: FrequencyAwareConfig,
) -> Dict[str, int]:
    """Hot rows per table for ``budget_bytes``, from a sample of the id stream (e.g. the first
    training batches): ids passing the traffic-per-byte threshold, the best traffic per byte
    first, until ``max_hot_fraction`` of the budget is spent. All zeros on a flat stream."""
    dims = {t.embedding_dim for t in tables}
    if len(dims) != 1:
        raise ValueError(f"frequency-aware ROBE needs one embedding_dim for all tables, got {sorted(dims)}")
    (dim,) = dims
    sketches = {t.name: SpaceSavingSketch(config.calibration_capacity) for t in tables}
    for kjt in sample:
        for name, ids in ids_by_table(tables, kjt).items():
            sketches[name].update(ids)
    total = sum(float(s.total) for s in sketches.values())
    capacities = {t.name: 0 for t in tables}
    if total <= 0 or config.max_hot_fraction == 0:
        return capacities
    cost = hot_row_bytes(dim, config)
    threshold = config.min_traffic_per_byte * cost / budget_bytes
    shares: List[torch.Tensor] = []
    owners: List[int] = []
    names = [t.name for t in tables]
    for i, name in enumerate(names):
        _, counts, errors = sketches[name].entries()
        s = (counts - errors).double() / total
        s = s[s >= threshold]
        shares.append(s)
        owners.extend([i] * s.numel())
    if not owners:
        return capacities
    share = torch.cat(shares)
    order = torch.argsort(-share, stable=True)
    limit = config.max_hot_fraction * budget_bytes
    chosen: Dict[str, int] = {n: 0 for n in names}
    for j in order.tolist():
        trial = dict(chosen)
        trial[names[owners[j]]] += 1
        if overhead_bytes(trial, dim, config) > limit:
            break
        chosen = trial
    return chosen


def plan_summary(capacities: Mapping[str, int]) -> str:
    hot = {t: k for t, k in capacities.items() if k}
    return f"{sum(hot.values())} hot rows in {len(hot)} tables" if hot else "no hot rows (plain ROBE)"
