"""How much of a ROBE byte budget goes to exact rows for hot ids, per table, decided from the id stream.

Noise model. In a ROBE array of m floats an average element receives lambda = D/m of all element
reads (each lookup reads D elements); an id carrying a share p of all lookups reads each of its D
elements p, so it holds a share s = p / (p + lambda) of its elements' reads, and it *dominates* them
once p >= lambda, i.e. once its traffic share is at least its share of the bytes (4D of 4m). Write
r = p / lambda (its traffic per byte relative to the array's average).

Lower threshold (per id). An id may get a row only if (its guaranteed count from the sketch) /
(all lookups) >= ``min_traffic_per_byte`` * (bytes of a hot row incl. id map and sketch) / budget:
below that, an exact row takes more than the id's fair share of the budget from the cold ids.

Gate (whole plan, ``FrequencyAwareConfig.gate``). A promotion creates no capacity, it moves it:
plain ROBE already gives the id D s floats of its own (its share of its elements), the row gives it
D; the cold ids get the id's D elements back but lose the row's D floats and its overhead (id-map
and sketch entries, the table's and the module's scalars). Valuing each float by the traffic that
reads it (p for the id's own floats, lambda for an average array float), the row is worth

    gain(r) = 4 D (1 - s) (r - 1) = 4 D (r - 1) / (r + 1)     bytes of plain ROBE array,

and the plan is kept only where it pays: an id needs gain(r) > its row's overhead bytes (id map and
sketch entries), a table needs the sum over its hot ids to exceed its fixed bytes, and the whole
plan needs the sum over tables to exceed the module's. gain(r) < 4 D for every r: a very dominant id
(ROBE already serves it: s close to 1) is worth at most the row it takes, so dominance alone never
pays for the id map and sketch, and at D * 4 <= the per-row overhead (D <= 11 with sketch_factor 2)
no plan can pay. When the gate says no, every table gets zero rows and the module is exactly plain
ROBE over the whole budget (no id map, no sketch). With flat frequencies no id passes either test.
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
        gate: keep the plan only where its modelled gain exceeds its overhead (module docstring);
            False: every id passing ``min_traffic_per_byte`` is planned (the behaviour before the
            gate). Planning only: the plan's result (``hot_capacity``) is what a checkpoint's
            layout records, so this flag is not part of it.
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
    gate: bool = True

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
        if not isinstance(self.gate, bool):
            raise ValueError(f"gate must be a bool, got {self.gate!r}")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def layout_dict(self) -> Dict[str, Any]:
        """The fields a checkpoint's layout records: all but the planning-only ``gate`` (its
        decision is recorded as ``hot_capacity``; checkpoints saved before the gate existed load)."""
        out = asdict(self)
        out.pop("gate")
        return out


def hot_row_bytes(dim: int, config: FrequencyAwareConfig) -> int:
    """Bytes one hot row costs: the row, its id-map entry and its sketch entries."""
    return 4 * dim + ID_MAP_BYTES_PER_ROW + SKETCH_BYTES_PER_ENTRY * config.sketch_factor


def row_overhead_bytes(config: FrequencyAwareConfig) -> int:
    """Bytes a hot row costs beyond its own 4 D: its id-map entry and its sketch entries."""
    return ID_MAP_BYTES_PER_ROW + SKETCH_BYTES_PER_ENTRY * config.sketch_factor


def row_gain_bytes(share: torch.Tensor, dim: int, budget_bytes: int) -> torch.Tensor:
    """What an exact row is worth, in bytes of plain ROBE array, to an id with traffic ``share``:
    ``4 D (r - 1) / (r + 1)`` with ``r = share / (4 D / budget)`` (the module docstring's gate)."""
    r = share.double() * budget_bytes / (4 * dim)
    return 4 * dim * (r - 1) / (r + 1)


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
    first, until ``max_hot_fraction`` of the budget is spent; then, with ``config.gate``, only the
    ids, tables and plan that pay for their overhead (module docstring). All zeros on a flat
    stream, and wherever the gate says no."""
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
    if config.gate:
        chosen = _gate(chosen, shares, names, dim, budget_bytes, config)
    return chosen


def _gate(chosen: Dict[str, int], shares: List[torch.Tensor], names: List[str], dim: int, budget_bytes: int,
          config: FrequencyAwareConfig) -> Dict[str, int]:
    """``chosen`` cut to the ids, tables and plan whose modelled gain exceeds their overhead (module
    docstring), all zeros if the plan does not pay. ``shares[i]``: table i's candidate shares."""
    row_cost = row_overhead_bytes(config)
    table_cost = TABLE_FIXED_BYTES + SKETCH_FIXED_BYTES
    out = {n: 0 for n in names}
    total = 0.0
    for i, name in enumerate(names):
        top = torch.sort(shares[i], descending=True).values[: chosen[name]]
        net = row_gain_bytes(top, dim, budget_bytes) - row_cost
        net = net[net > 0]  # decreasing in the share: a prefix of the table's hottest ids
        if float(net.sum()) > table_cost:
            out[name] = int(net.numel())
            total += float(net.sum()) - table_cost
    if total <= STEP_BYTES:
        return {n: 0 for n in names}
    return out


def plan_summary(capacities: Mapping[str, int]) -> str:
    hot = {t: k for t, k in capacities.items() if k}
    return f"{sum(hot.values())} hot rows in {len(hot)} tables" if hot else "no hot rows (plain ROBE)"
