"""FrequencyAwareRobeEmbeddingBagCollection: exact rows for the hottest ids, ROBE for the rest.

Why: ROBE spreads every id over a shared array, so at high compression the hottest ids (which carry
most of the traffic on skewed data) drown the cold ids that share their elements (CAFE, SIGMOD'24,
does the same split with a hashed store). Same interface as RobeEmbeddingBagCollection
(EmbeddingBagConfig list in, KJT in, KeyedTensor out) and the same ROBE kernels for cold ids.

**Budget** (``memory_bytes()`` <= ``budget_bytes``, the plain ROBE array's bytes at the same ratio):
ROBE array (4 m) + hot rows (4 D per slot) + id map (int64 id + int32 slot per slot) + one
space-saving sketch per hot table (16 bytes per entry, ``sketch_factor`` entries per slot) + a few
scalars. **Optimizer state is not counted** (as for plain ROBE in docs/quality.md): with the fused
exact Adagrad it is one float per array element and per hot-row element.

**Adaptivity**: how many slots each table gets is planned once from a sample of the id stream
(``from_compression(..., sample=first batches)``, see ``frequency_aware_plan``): only ids whose
guaranteed traffic share reaches ``min_traffic_per_byte`` x their share of the bytes qualify, and
(``FrequencyAwareConfig.gate``, default on) only where the modelled gain of the rows exceeds what
their id map, sketches and scalars take from the array. On a flat stream, or where the gate says
no (e.g. only a few very dominant ids, which ROBE already serves), no table gets a slot and the
module is exactly a plain RobeEmbeddingBagCollection over the whole budget (same array size,
seed, init and kernels). Which ids hold the slots is found
online: in training mode every forward feeds the sketches, and every ``refresh_every`` forwards
each table's hot set becomes its sketch's top ids that pass the same threshold (incumbents favoured
by ``hysteresis``, at most ``max_swaps`` promotions per table, cost O(sketch log sketch + swaps D)).

**Continuity**: a promoted id's row is initialised from its current ROBE embedding (and, fused, its
Adagrad state from the state of the elements it read), so its embedding is unchanged by the swap; a
demoted id reads ROBE again (the ROBE elements have kept training on other ids meanwhile).

**Training**: cold ids through ROBE's kernels on the batch with its hot ids removed (so hot ids
neither read nor update the array, and ROBE reads less than plain ROBE); hot rows through a pooled
gather. ``fused_optimizer`` steps both in
backward with the same rule, lr and eps (hot-row state is the ``hot_state`` buffer); without it the
hot rows are a plain ``hot_rows`` parameter with a dense gradient for a torch optimizer (whose state
for a slot is not reset when the slot changes owner: a known, bounded wart).

Single ROBE group, one embedding dim for all tables. Sharding (DMP): data_parallel and table_wise
with ``FrequencyAwareRobeEmbeddingBagCollectionSharder`` (``robe_torchrec.sharding.frequency_aware``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.config import RobeConfig, full_table_elements
from robe_torchrec.hashing import block_offsets, element_indices, table_key
from robe_torchrec.modules.frequency_aware_plan import (
    FrequencyAwareConfig,
    hot_row_bytes,
    overhead_bytes,
    plan_capacities,
)
from robe_torchrec.modules.heavy_hitters import SpaceSavingSketch
from robe_torchrec.modules.robe_embedding_bag_collection import DEFAULT_GROUP, RobeEmbeddingBagCollection, _offsets_of
from robe_torchrec.ops import frequency_cpu
from robe_torchrec.ops.api import OptimizerArgs, OptimizerKind, state_numel
from robe_torchrec.ops.lookup import robe_pooled_lookup
from robe_torchrec.ops.reference import apply_optimizer_dense
from robe_torchrec.optim import RobeFusedOptimizerConfig

_EXTRA_STATE_KEY = "_extra_state"
_NO_ID = torch.iinfo(torch.int64).max


class FrequencyAwareRobeEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """Pooled embeddings: hot ids (found online by space-saving sketches) read exact rows, all
    other ids read one ROBE array; see the module docstring for budget, adaptivity and training.

    Args:
        tables: torchrec table configs, one embedding_dim for all, SUM or MEAN pooling.
        budget_bytes: everything stored (array, rows, id map, sketches) fits in this.
        hot_capacity: ``{table name: slots}`` (missing tables: 0), e.g. from ``plan_capacities``.
        block_size, seed, init_range: of the ROBE array (see RobeConfig).
        config: refresh cadence, threshold, hysteresis, decay (FrequencyAwareConfig).
        is_weighted, device, kernel, fused_optimizer: as RobeEmbeddingBagCollection.
        cpu_ops: on CPU, do the per-step bookkeeping (sketch updates, hot/cold split, hot gather)
            with the C++ ops of ``robe_torchrec.ops.frequency_cpu`` when they build: same results
            bit for bit, several times faster. False: always the torch path (the reference).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        budget_bytes: int,
        hot_capacity: Optional[Mapping[str, int]] = None,
        block_size: int = 32,
        seed: int = 0,
        init_range: Optional[float] = None,
        config: Optional[FrequencyAwareConfig] = None,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        kernel: str = "auto",
        fused_optimizer: Optional[RobeFusedOptimizerConfig] = None,
        cpu_ops: bool = True,
    ) -> None:
        super().__init__()
        self._cpu_ops = bool(cpu_ops)
        self._config = config or FrequencyAwareConfig()
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"frequency-aware ROBE needs one embedding_dim for all tables, got {sorted(dims)}")
        (self._dim,) = dims
        names = [t.name for t in tables]
        caps = dict(hot_capacity or {})
        unknown = sorted(set(caps) - set(names))
        if unknown:
            raise ValueError(f"hot_capacity names unknown table(s) {unknown}")
        bad = {t: k for t, k in caps.items() if isinstance(k, bool) or not isinstance(k, int) or k < 0}
        if bad:
            raise ValueError(f"hot_capacity must be non-negative ints, got {bad}")
        self._capacities = {n: int(caps.get(n, 0)) for n in names}
        self._budget = int(budget_bytes)
        overhead = overhead_bytes(self._capacities, self._dim, self._config)
        num_elements = (self._budget - overhead) // 4
        if num_elements < block_size:
            raise ValueError(
                f"budget of {self._budget} bytes leaves {num_elements} floats for the ROBE array after "
                f"{overhead} bytes of hot rows, id map and sketches: fewer than one block ({block_size})"
            )
        self._robe_config = RobeConfig(num_elements, block_size=block_size, seed=seed, init_range=init_range)
        self.robe = RobeEmbeddingBagCollection(
            tables, self._robe_config, is_weighted=is_weighted, device=device, kernel=kernel,
            fused_optimizer=fused_optimizer,
        )
        dev = self.robe.device
        self._hot_tables = [n for n in names if self._capacities[n] > 0]
        self._base: Dict[str, int] = {}
        total = 0
        for n in self._hot_tables:
            self._base[n] = total
            total += self._capacities[n]
        self._total_slots = total
        self._thresholds = self._config.min_traffic_per_byte * hot_row_bytes(self._dim, self._config) / self._budget
        self._table_of_feature = [self._table_by_feature(tables)[f] for f in self.robe._input_features]
        self._keys = {n: table_key(seed, n) for n in self._hot_tables}
        self._any_mean = any(t.pooling == PoolingType.MEAN for t in tables)
        # per input feature, fixed for the module's life: MEAN or not, and its hot table's index
        # (-1: none) in _hot_tables order (= the sketches' order and hot_size's)
        by_name = {t.name: t for t in tables}
        hot_index = {n: i for i, n in enumerate(self._hot_tables)}
        self._feature_mean = torch.tensor([by_name[n].pooling == PoolingType.MEAN for n in self._table_of_feature],
                                          dtype=torch.bool)
        self._feature_hot = torch.tensor([hot_index.get(n, -1) for n in self._table_of_feature], dtype=torch.int64)
        self._hot_base = torch.tensor([self._base[n] for n in self._hot_tables], dtype=torch.int64)
        self._mean_masks: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        if total:
            self.hot_rows = nn.Parameter(torch.zeros(total, self._dim, device=dev))
            self.register_buffer("hot_ids", torch.full((total,), _NO_ID, dtype=torch.int64, device=dev))
            self.register_buffer("hot_slots", torch.zeros(total, dtype=torch.int32, device=dev))
            self.register_buffer("hot_size", torch.zeros(len(self._hot_tables), dtype=torch.int64, device=dev))
            # [1], not 0-dim: a table_wise sharding saves every tensor as a ShardedTensor (no 0-dim)
            self.register_buffer("step", torch.zeros(1, dtype=torch.int64, device=dev))
            self.register_buffer("lookups", torch.zeros(1, dtype=torch.float64, device=dev))
            kind = fused_optimizer.optimizer if fused_optimizer is not None else "sgd"
            self.register_buffer(
                "hot_state", torch.zeros(state_numel(kind, total * self._dim, self._dim), device=dev)
            )
            self.sketches = nn.ModuleDict(
                {n: SpaceSavingSketch(self._config.sketch_factor * self._capacities[n], device=dev) for n in self._hot_tables}
            )
        self._register_load_state_dict_pre_hook(self._check_layout_before_load, with_module=False)

    # ----- construction from a ratio ---------------------------------------------------------------

    @classmethod
    def from_compression(
        cls,
        tables: List[EmbeddingBagConfig],
        ratio: float,
        sample: Iterable[KeyedJaggedTensor],
        block_size: int = 32,
        seed: int = 0,
        config: Optional[FrequencyAwareConfig] = None,
        **kwargs: Any,
    ) -> "FrequencyAwareRobeEmbeddingBagCollection":
        """The budget of a plain ROBE array at ``ratio`` (``RobeConfig.from_compression``), split
        by ``plan_capacities`` from ``sample`` (a few first batches of the id stream)."""
        config = config or FrequencyAwareConfig()
        plain = RobeConfig.from_compression(tables, ratio=ratio, block_size=block_size, seed=seed)
        budget = 4 * plain.num_elements
        caps = plan_capacities(tables, budget, sample, config)
        return cls(tables, budget, caps, block_size=block_size, seed=seed, config=config, **kwargs)

    # ----- torchrec interface ---------------------------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self.robe.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self.robe.is_weighted()

    @property
    def device(self) -> torch.device:
        return self.robe.device

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The array's fused optimizer; its lr / eps (param_groups) also drive the hot rows."""
        return self.robe.fused_optimizer

    def hot_capacities(self) -> Dict[str, int]:
        return dict(self._capacities)

    def hot_set(self) -> Dict[str, Dict[int, int]]:
        """``{table: {hot id: slot}}`` now."""
        out: Dict[str, Dict[int, int]] = {}
        for i, n in enumerate(self._hot_tables):
            b, size = self._base[n], int(self.hot_size[i])
            out[n] = dict(zip(self.hot_ids[b : b + size].tolist(), self.hot_slots[b : b + size].tolist()))
        return out

    def memory_bytes(self) -> int:
        """Bytes of everything counted in the budget (all parameters and buffers but optimizer state)."""
        state = {id(self.hot_state)} if self._total_slots else set()
        tensors = list(self.parameters()) + [b for b in self.buffers() if id(b) not in state]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset_parameters(self) -> None:
        """Fresh model: ROBE init, no hot ids, empty sketches, step 0."""
        self.robe.reset_parameters()
        if self._total_slots:
            with torch.no_grad():
                self.hot_rows.zero_()
                self.hot_ids.fill_(_NO_ID)
                self.hot_slots.zero_()
                self.hot_size.zero_()
                self.step.zero_()
                self.lookups.zero_()
                self.hot_state.zero_()
                for s in self.sketches.values():
                    for b in s.buffers():
                        b.zero_()

    # ----- forward ----------------------------------------------------------------------------------

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pool every configured feature; hot ids from their rows, the rest from ROBE. In training
        mode the batch's ids are counted first (and every ``refresh_every`` forwards the hot set
        is refreshed)."""
        return self.pool(features, observe=self.training)

    def pool(self, features: KeyedJaggedTensor, observe: bool = False) -> KeyedTensor:
        """:meth:`forward` with the counting made explicit: a data-parallel sharding counts the
        global batch's ids itself (:meth:`observe_ids`) and pools only its local batch here."""
        if not self._total_slots:
            return self.robe(features)
        features = self.robe._validated(features)
        batch = features.stride()
        values = features.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        offsets = _offsets_of(features)
        num_features = len(self._table_of_feature)
        bounds = offsets[:: batch].tolist() if batch else [0] * (num_features + 1)
        fast = self._fast_ops(ids)
        if observe:
            self._observe(ids, bounds)
        weights = features.weights_or_none() if self.robe.is_weighted() else None
        robe = self.robe
        fused = robe._fused_optimizer
        array = robe.arrays[DEFAULT_GROUP]
        if fused is not None:
            fused.ensure_bound(robe._named_arrays())
        args = None if fused is None else fused.kernel_args(array)
        num_bags = offsets.numel() - 1
        if fast:  # the same lists as below, in one C++ pass
            cold_ids, cold_offsets, cold_w, h_slots, h_bag, h_w = frequency_cpu.hot_cold_split(
                ids.contiguous(), offsets.contiguous(), batch, self._feature_hot, self.hot_ids, self.hot_slots,
                self._hot_base, self.hot_size, self._feature_mean, weights,
            )
        else:
            cold_ids, cold_offsets, cold_w, h_slots, h_bag, h_w = self._split_batch(ids, offsets, bounds, weights, batch)
        cold = robe_pooled_lookup(
            array, cold_ids, cold_offsets, robe._layouts[DEFAULT_GROUP], robe._keys_for(DEFAULT_GROUP), batch,
            cold_w, kernel=robe.kernel, fused_optimizer=args,
        )
        keys, lengths = robe._embedding_names, robe._lengths_per_embedding
        if fast:  # hot rows added into ROBE's output in place (no [F*B, D] temporaries)
            hot_args = None if args is None else OptimizerArgs(kind=args.kind, state=self.hot_state, lr=args.lr, eps=args.eps)
            values = _HotPooledAddFast.apply(cold, self.hot_rows, h_slots, h_bag, h_w, batch, hot_args)
            return KeyedTensor(keys=keys, length_per_key=lengths, values=values)
        if args is None:
            picked = self.hot_rows.index_select(0, h_slots) * h_w.unsqueeze(1)
            bags = torch.zeros(num_bags, self._dim, device=ids.device, dtype=picked.dtype).index_add(0, h_bag, picked)
        else:
            hot_args = OptimizerArgs(kind=args.kind, state=self.hot_state, lr=args.lr, eps=args.eps)
            bags = _HotPooledFused.apply(self.hot_rows, h_slots, h_bag, h_w, num_bags, hot_args)
        pooled_hot = bags.view(num_features, batch, self._dim).transpose(0, 1).reshape(batch, -1)
        return KeyedTensor(keys=keys, length_per_key=lengths, values=cold + pooled_hot)

    def _fast_ops(self, ids: torch.Tensor) -> bool:
        """Whether this call uses the C++ bookkeeping (CPU, ``cpu_ops``, float32 rows, built)."""
        return (self._cpu_ops and ids.device.type == "cpu" and self.hot_rows.dtype == torch.float32
                and frequency_cpu.is_available())

    def _split_batch(self, ids: torch.Tensor, offsets: torch.Tensor, bounds: List[int],
                     weights: Optional[torch.Tensor], batch: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Torch path (the reference of ``frequency_cpu.hot_cold_split``): (cold ids, offsets,
        weights) for ROBE and the hot ids' (slot, bag, weight), MEAN's 1 / bag length folded in."""
        slots, hot = self._lookup_slots(ids, bounds)
        lengths = offsets[1:] - offsets[:-1]
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths,
                                      output_size=ids.numel())
        cold_ids, cold_offsets, cold_w = self._cold_batch(ids, lengths, bag, hot, weights, batch)
        hot_idx = torch.nonzero(hot).flatten()
        h_slots, h_bag = slots[hot_idx], bag[hot_idx]
        h_w = weights[hot_idx].float() if weights is not None else torch.ones(hot_idx.numel(), device=ids.device)
        if self._any_mean:
            h_w = h_w * self._mean_scale(offsets, batch)[h_bag]
        return cold_ids, cold_offsets, cold_w, h_slots, h_bag, h_w

    def _cold_batch(self, ids: torch.Tensor, lengths: torch.Tensor, bag: torch.Tensor, hot: torch.Tensor,
                    weights: Optional[torch.Tensor], batch: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The batch without its hot ids, for ROBE's kernels (fewer reads than plain ROBE). MEAN
        bags keep dividing by their full length: their cold ids get weight cold_len / full_len."""
        cold = ~hot
        bag = bag[cold]
        cold_len = torch.bincount(bag, minlength=lengths.numel())
        cold_offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(cold_len, 0, out=cold_offsets[1:])
        w = None if weights is None else weights[cold].float()
        if self._any_mean:
            scale = torch.where(self._mean_mask(batch, ids.device), cold_len / lengths.clamp(min=1), 1.0)[bag]
            w = scale.float() if w is None else w * scale
        return ids[cold], cold_offsets, w

    def _mean_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """[F*B] bool: the bag's feature is MEAN (cached per batch size and device)."""
        key = (batch, device)
        mask = self._mean_masks.get(key)
        if mask is None:
            mask = self._mean_masks[key] = self._feature_mean.to(device).repeat_interleave(batch)
        return mask

    def _mean_scale(self, offsets: torch.Tensor, batch: int) -> torch.Tensor:
        """1 / bag length for MEAN tables' non-empty bags, else 1 ([F*B])."""
        lengths = (offsets[1:] - offsets[:-1]).to(torch.float32)
        mean = self._mean_mask(batch, offsets.device)
        return torch.where(mean & (lengths > 0), 1.0 / lengths.clamp(min=1), torch.ones_like(lengths))

    def _lookup_slots(self, ids: torch.Tensor, bounds: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per id: its hot slot (0 where cold) and whether it is hot (binary search per table)."""
        slots = torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device)
        hot = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        sizes = self.hot_size.tolist()
        index = {n: i for i, n in enumerate(self._hot_tables)}
        for f, name in enumerate(self._table_of_feature):
            i = index.get(name)
            lo, hi = bounds[f], bounds[f + 1]
            if i is None or sizes[i] == 0 or hi == lo:
                continue
            b = self._base[name]
            table_ids = self.hot_ids[b : b + sizes[i]]
            seg = ids[lo:hi]
            pos = torch.searchsorted(table_ids, seg).clamp_(max=sizes[i] - 1)
            match = table_ids[pos] == seg
            hot[lo:hi] = match
            slots[lo:hi] = torch.where(match, self.hot_slots[b : b + sizes[i]][pos].to(torch.int64), 0)
        return slots, hot

    # ----- online hot set ---------------------------------------------------------------------------

    @torch.no_grad()
    def observe_ids(self, per_feature: List[torch.Tensor]) -> None:
        """Count one training step's ids, given per input feature (in input order): exactly what
        a training forward counts, for a caller that pools elsewhere (no-op without hot slots)."""
        if not self._total_slots:
            return
        if len(per_feature) != len(self._table_of_feature):
            raise ValueError(f"observe_ids: {len(per_feature)} id tensors for {len(self._table_of_feature)} features")
        sizes = [int(t.numel()) for t in per_feature]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        ids = torch.cat([t.reshape(-1).to(torch.int64) for t in per_feature]) if per_feature else torch.zeros(0, dtype=torch.int64)
        self._observe(ids, bounds)

    @torch.no_grad()
    def _observe(self, ids: torch.Tensor, bounds: List[int]) -> None:
        """Count this batch's lookups per table (every ``sketch_every``-th batch: a subsample of the
        stream, counted in the sketches and in ``lookups`` alike, so traffic shares stay unbiased);
        every ``refresh_every`` forwards, refresh."""
        if int(self.step) % self._config.sketch_every == 0 and self._fast_ops(ids):
            frequency_cpu.space_saving_update_many(
                ids.contiguous(), torch.tensor(bounds, dtype=torch.int64), self._feature_hot,
                [(s.ids, s.counts, s.errors, s.size, s.total) for s in self.sketches.values()],
            )
            self.lookups += float(ids.numel())
        elif int(self.step) % self._config.sketch_every == 0:
            per_table: Dict[str, List[torch.Tensor]] = {}
            for f, name in enumerate(self._table_of_feature):
                per_table.setdefault(name, []).append(ids[bounds[f] : bounds[f + 1]])
            for name, parts in per_table.items():
                if name in self.sketches:
                    self.sketches[name].update(torch.cat(parts))
            self.lookups += float(ids.numel())
        self.step += 1
        if int(self.step) % self._config.refresh_every == 0:
            self.refresh()

    @torch.no_grad()
    def refresh(self) -> Dict[str, Tuple[int, int]]:
        """Promote / demote per table now; returns ``{table: (promoted, demoted)}``."""
        result: Dict[str, Tuple[int, int]] = {}
        if not self._total_slots:
            return result
        lookups = float(self.lookups)
        for i, name in enumerate(self._hot_tables):
            result[name] = self._refresh_table(i, name, lookups)
            if self._config.decay < 1.0:
                self.sketches[name].decay(self._config.decay)
        if self._config.decay < 1.0:
            self.lookups.mul_(self._config.decay)
        return result

    def _refresh_table(self, i: int, name: str, lookups: float) -> Tuple[int, int]:
        cap, b = self._capacities[name], self._base[name]
        size = int(self.hot_size[i])
        cur_ids = self.hot_ids[b : b + size].clone()
        cur_slots = self.hot_slots[b : b + size].to(torch.int64).clone()
        ids, counts, errors = self.sketches[name].entries()
        eligible = (counts - errors).double() / max(lookups, 1e-12) >= self._thresholds
        incumbent = torch.isin(ids, cur_ids)
        score = torch.where(incumbent, counts * self._config.hysteresis, counts)
        ids, score, incumbent = ids[eligible], score[eligible], incumbent[eligible]
        order = torch.argsort(ids)
        order = order[torch.argsort(-score[order], stable=True)]
        desired, desired_inc = ids[order][:cap], incumbent[order][:cap]
        keep_mask = torch.isin(cur_ids, desired)
        promote = desired[~desired_inc]
        limit = self._config.max_swaps or cap
        promote = promote[:limit]
        kept_ids, kept_slots = cur_ids[keep_mask], cur_slots[keep_mask]
        used = torch.zeros(cap, dtype=torch.bool, device=ids.device)
        used[kept_slots - b] = True
        free = torch.nonzero(~used).flatten()[: promote.numel()] + b
        if promote.numel():
            self._init_rows(name, promote, free)
        new_ids = torch.cat([kept_ids, promote])
        new_slots = torch.cat([kept_slots, free])
        order = torch.argsort(new_ids)
        n = new_ids.numel()
        self.hot_ids[b : b + cap] = _NO_ID
        self.hot_ids[b : b + n] = new_ids[order]
        self.hot_slots[b : b + cap] = 0
        self.hot_slots[b : b + n] = new_slots[order].to(torch.int32)
        self.hot_size[i] = n
        return int(promote.numel()), int(size - keep_mask.sum())

    def _init_rows(self, name: str, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Rows (and fused optimizer state) of newly hot ids from what ROBE gives them now."""
        array = self.robe.arrays[DEFAULT_GROUP]
        pos = self.robe_positions(name, ids)  # [n, D]
        self.hot_rows.data[slots] = array.data[pos]
        fused = self.robe._fused_optimizer
        if fused is None:
            return
        kind = OptimizerKind.parse(fused.config.optimizer)
        state = fused.state_of(array)
        if kind is OptimizerKind.ADAGRAD:
            self.hot_state.view(-1, self._dim)[slots] = state[pos]
        elif kind is not OptimizerKind.SGD:  # row-wise: one accumulator per row, from the chunks read
            self.hot_state[slots] = state[pos // self._robe_config.block_size].mean(dim=1)

    def robe_positions(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Array positions ``[n, D]`` that ids of table ``name`` read in ROBE (the one hash)."""
        k0, k1 = table_key(self._robe_config.seed, name)
        z, m = self._robe_config.block_size, self._robe_config.num_elements
        dev = ids.device
        offs = block_offsets(ids.to(torch.int64), torch.tensor(k0, device=dev), torch.tensor(k1, device=dev), self._dim // z, m)
        return element_indices(offs, z, m)

    # ----- checkpoints --------------------------------------------------------------------------------

    def layout(self) -> Dict[str, Any]:
        """What the state means; loading under a different layout is refused."""
        return {
            "robe": self._robe_config.layout(),
            "budget_bytes": self._budget,
            "dim": self._dim,
            "hot_capacity": dict(self._capacities),
            "config": self._config.layout_dict(),
        }

    def get_extra_state(self) -> Dict[str, Any]:
        return {"frequency_aware": self.layout()}

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _check_layout_before_load, before any tensor is copied

    def _check_layout_before_load(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key in ("step", "lookups"):  # saved 0-dim before they became [1]
            value = state_dict.get(prefix + key)
            if isinstance(value, torch.Tensor) and value.dim() == 0:
                state_dict[prefix + key] = value.reshape(1)
        saved = state_dict.get(prefix + _EXTRA_STATE_KEY)
        if saved is None:
            return
        mine = self.get_extra_state()
        if saved != mine:
            raise ValueError(
                "refusing to load a frequency-aware ROBE state dict made with a different layout "
                f"(hot rows, sketches or array would mean something else): checkpoint has "
                f"{saved.get('frequency_aware') if isinstance(saved, dict) else saved!r}, "
                f"this module has {mine['frequency_aware']}"
            )

    @staticmethod
    def _table_by_feature(tables: List[EmbeddingBagConfig]) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for t in tables:
            for f in t.feature_names or [t.name]:
                out[f] = t.name
        return out


class _HotPooledFused(torch.autograd.Function):
    """Pooled gather of the hot ids' rows (``bags[bag_i] += w_i * rows[slot_i]``) whose backward
    applies the fused optimizer rule to the rows in place (their dense gradient is small: slots x D),
    leaving no gradient."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, slots: torch.Tensor, bags: torch.Tensor,  # type: ignore[override]
                weights: torch.Tensor, num_bags: int, optimizer: OptimizerArgs) -> torch.Tensor:
        out = torch.zeros(num_bags, rows.shape[1], dtype=rows.dtype, device=rows.device)
        out.index_add_(0, bags, rows.detach()[slots] * weights.unsqueeze(1))
        ctx.meta = (rows, slots, bags, weights, optimizer)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        rows, slots, bags, weights, optimizer = ctx.meta
        g = torch.zeros_like(rows.data)
        g.index_add_(0, slots, grad_out[bags] * weights.unsqueeze(1))
        lr, eps = optimizer.hyper()
        apply_optimizer_dense(rows.data.view(-1), optimizer.state, g.view(-1), optimizer.kind, lr, eps, rows.shape[1])
        return None, None, None, None, None, None


class _HotPooledAddFast(torch.autograd.Function):
    """CPU fast path of the hot gather: ``cold [B, F*D] += pooled hot rows`` in place (the same
    float32 sums as ``_HotPooledFused`` / the index_select path, then ``cold + pooled``). Backward:
    the cold output's gradient passes through; the rows' dense gradient is returned (no optimizer)
    or stepped into them in place with the fused rule (``optimizer``)."""

    @staticmethod
    def forward(ctx: Any, cold: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,  # type: ignore[override]
                bags: torch.Tensor, weights: torch.Tensor, batch: int, optimizer: Optional[OptimizerArgs]) -> torch.Tensor:
        frequency_cpu.hot_pooled_add_(cold, rows, slots, bags, weights, batch)
        ctx.mark_dirty(cold)
        ctx.meta = (rows, slots, bags, weights, batch, optimizer)
        return cold

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        rows, slots, bags, weights, batch, optimizer = ctx.meta
        g = frequency_cpu.hot_pooled_grad(grad_out, slots, bags, weights, rows.shape[0], rows.shape[1], batch)
        if optimizer is None:
            return grad_out, g, None, None, None, None, None
        lr, eps = optimizer.hyper()
        apply_optimizer_dense(rows.data.view(-1), optimizer.state, g.view(-1), optimizer.kind, lr, eps, rows.shape[1])
        return grad_out, None, None, None, None, None, None
