"""ShardedRobeEmbeddingBagCollection: the DMP-sharded RobeEmbeddingBagCollection.

Per array group (the plan has one ``ParameterSharding`` per group, keyed by group name):

- ``data_parallel``: every rank holds the whole array ``arrays.<group>`` and pools its own batch
  with the module's kernel. The array is NOT among ``sharded_parameter_names``, so DMP's
  ``DefaultDataParallelWrapper`` wraps it in DDP: its dense gradient is all-reduced (averaged)
  and the dense optimizer steps it. Never fused.
- ``table_wise``: the array lives on one rank (``ParameterSharding.ranks[0]``). The group's
  features are routed to it with torchrec's ``KJTAllToAll``; it pools the global batch with the
  module's kernel (fused optimizer in backward) and torchrec's ``PooledEmbeddingsAllToAll``
  returns every rank its rows.
- ``row_wise``: the array is split into contiguous Z-aligned element ranges (rows of the
  planner's ``[ceil(m/Z), Z]`` view); each lookup is routed (``KJTAllToAll`` of a bucketized KJT)
  to every rank owning an element of its blocks; each rank sums only its own elements
  (:mod:`robe_torchrec.sharding.rw_lookup`), and the partial sums are reduce-scattered back to
  the batch's rank (:mod:`robe_torchrec.sharding.comm`); MEAN divides after the reduction.

Optimizer: table_wise / row_wise arrays are updated by a fused optimizer
(``ShardedRobeFusedOptimizer``, a torchrec ``FusedOptimizer`` exposed as ``fused_optimizer``, so
``DistributedModelParallel.fused_optimizer`` / ``CombinedOptimizer`` and LR schedulers drive it)
when one is configured (sharder ``fused_params`` or the module's own); otherwise they get a dense
gradient of their local shard, for any element-wise torch optimizer.

Checkpoints: ``state_dict()`` has the unsharded keys: ``arrays.<group>`` (a plain tensor for
data_parallel, a 1-D ``ShardedTensor`` of global size m for table_wise / row_wise) and
``_extra_state`` (the layout; loading a different layout is refused). The fused optimizer's
state_dict has ``arrays.<group>: {"momentum1": ShardedTensor}`` (global size m for adagrad,
ceil(m/Z) for rowwise_adagrad). ``torch.distributed.checkpoint`` reshards both on load.
``load_state_dict`` also accepts a full unsharded state dict (it keeps this rank's slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.embedding_types import ShardedEmbeddingModule
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    LazyNoWait,
    NoWait,
    ShardingEnv,
    ShardingType,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.streamable import Multistreamable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.config import RobeConfig
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection, _offsets_of
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.lookup import robe_pooled_lookup
from robe_torchrec.optim import (
    STATE_NAME,
    RobeFusedOptimizerBase,
    RobeFusedOptimizerConfig,
    mark_in_backward,
    state_numel,
)
from robe_torchrec.sharding.comm import reduce_scatter_sum
from robe_torchrec.sharding.rw_lookup import ShardRanges, owner_mask, partial_pooled, partial_pooled_fused

DP = ShardingType.DATA_PARALLEL.value
TW = ShardingType.TABLE_WISE.value
RW = ShardingType.ROW_WISE.value


@dataclass
class _Group:
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


class RobeShardingContext(Multistreamable):
    """Per-forward context: the local batch size and, for MEAN row-wise groups, bag lengths."""

    def __init__(self) -> None:
        self.batch_size: int = 0
        self.lengths: Dict[str, torch.Tensor] = {}

    def record_stream(self, stream: Optional[torch.Stream]) -> None:
        for t in self.lengths.values():
            t.record_stream(stream)  # type: ignore[arg-type]


def _sharded_1d(
    local: Optional[torch.Tensor],
    global_size: int,
    shards: List[Tuple[int, int, int]],
    placements: Dict[int, str],
    rank: int,
    pg: Optional[dist.ProcessGroup],
    dtype: torch.dtype = torch.float32,
) -> ShardedTensor:
    """A 1-D ShardedTensor over ``shards`` (rank, lo, hi) whose local shard is ``local`` (no copy, no collective)."""
    metas = [
        ShardMetadata(shard_offsets=[lo], shard_sizes=[hi - lo], placement=placements[r]) for r, lo, hi in shards
    ]
    global_meta = ShardedTensorMetadata(
        shards_metadata=metas,
        size=torch.Size([global_size]),
        tensor_properties=TensorProperties(
            dtype=dtype, layout=torch.strided, requires_grad=False, memory_format=torch.contiguous_format, pin_memory=False
        ),
    )
    local_shards = [
        Shard(tensor=local, metadata=meta) for (r, _, _), meta in zip(shards, metas) if r == rank and local is not None
    ]
    return ShardedTensor._init_from_local_shards_and_global_metadata(local_shards, global_meta, process_group=pg)


def _state_range(optimizer: str, lo: int, hi: int, block_size: int) -> Tuple[int, int]:
    """Slice of the optimizer state that belongs to array elements [lo, hi) (lo is Z-aligned)."""
    if optimizer == "adagrad":
        return lo, hi
    if optimizer == "rowwise_adagrad":
        return lo // block_size, (hi + block_size - 1) // block_size
    return 0, 0


class ShardedRobeFusedOptimizer(RobeFusedOptimizerBase):
    """The fused optimizer of a sharded collection's table_wise / row_wise arrays.

    Keys ``arrays.<group>``; state ``momentum1`` is a ShardedTensor laid out like the array
    (empty plain tensor for SGD, as unsharded). Same ``lr`` / ``eps`` / ``config`` / ``state_of``
    interface as :class:`robe_torchrec.optim.RobeFusedOptimizer`, so the kernels take either.
    """

    def __init__(
        self,
        params: Dict[str, nn.Parameter],
        local_state: Dict[str, torch.Tensor],
        state_views: Dict[str, torch.Tensor],
        config: RobeFusedOptimizerConfig,
    ) -> None:
        self.config = config
        self._local_state = {params[k]: v for k, v in local_state.items()}
        state = {params[k]: {STATE_NAME: state_views[k]} for k in params}
        groups = [
            {"params": list(params.values()), "lr": config.lr, "eps": config.eps, "optimizer": config.optimizer}
        ] if params else []
        super().__init__(dict(params), state, groups)
        mark_in_backward(params.values(), self)

    def state_of(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the accumulator of one array."""
        return self._local_state[param]


class ShardedRobeEmbeddingBagCollection(
    ShardedEmbeddingModule[Dict[str, Any], Dict[str, torch.Tensor], KeyedTensor, RobeShardingContext],
    FusedOptimizerModule,
):
    """A RobeEmbeddingBagCollection sharded by a plan (see the module docstring)."""

    # Same validation, output ordering and layout check as the unsharded module.
    _validated = RobeEmbeddingBagCollection._validated
    _to_output_order = RobeEmbeddingBagCollection._to_output_order
    _check_layout_before_load = RobeEmbeddingBagCollection._check_layout_before_load

    def __init__(
        self,
        module: RobeEmbeddingBagCollection,
        table_name_to_parameter_sharding: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        fused_config: Optional[RobeFusedOptimizerConfig] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._env = env
        self._pg = env.process_group
        self._world_size = env.world_size
        self._rank = env.rank
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._module_fqn = module_fqn
        self._kernel = module.kernel
        self._is_weighted = module.is_weighted()
        self._embedding_bag_configs = module.embedding_bag_configs()
        self._robe_configs = module.robe_configs()
        self._table_to_group = module.table_to_group()
        self._embedding_names = list(module._embedding_names)
        self._lengths_per_embedding = list(module._lengths_per_embedding)
        self._input_features = list(module._input_features)
        self._output_slots = list(module._output_slots)
        self._needs_output_permute = module._needs_output_permute
        self._fused_config = fused_config

        plan = table_name_to_parameter_sharding
        unknown = sorted(set(plan) - set(self._robe_configs))
        if unknown:
            raise ValueError(f"sharding plan names unknown ROBE group(s) {unknown}; groups are {list(self._robe_configs)}")
        self._groups: Dict[str, _Group] = {}
        f0 = 0
        for name, layout in module.feature_layouts().items():
            if name not in plan:
                raise ValueError(f"sharding plan has no entry for ROBE group {name!r}")
            self._groups[name] = self._group_from_plan(name, layout, plan[name], (f0, f0 + layout.num_features))
            f0 += layout.num_features

        # Local pieces of the arrays (parameters keep the unsharded names arrays.<group>).
        self.arrays = nn.ParameterDict()
        for name, g in self._groups.items():
            self.arrays[name] = nn.Parameter(self._local_init(module, g))
        self._hash_keys: Dict[str, torch.Tensor] = {}
        self._layouts = {name: g.layout for name, g in self._groups.items()}

        # Fused optimizer over table_wise / row_wise arrays.
        fused_params: Dict[str, nn.Parameter] = {}
        local_state: Dict[str, torch.Tensor] = {}
        state_views: Dict[str, torch.Tensor] = {}
        if fused_config is not None:
            src_opt = getattr(module, "_fused_optimizer", None)
            for name, g in self._groups.items():
                if g.sharding_type == DP:
                    continue
                key = f"arrays.{name}"
                param = self.arrays[name]
                z = g.config.block_size
                s0, s1 = _state_range(fused_config.optimizer, g.lo, g.hi, z)
                local = torch.zeros(s1 - s0, dtype=torch.float32, device=self._device)
                if src_opt is not None and src_opt.config.optimizer == fused_config.optimizer:
                    src = src_opt.state_of(module.arrays[name])
                    if not src.is_meta and src.numel() > 0:
                        local.copy_(src[s0:s1])
                if fused_config.optimizer == "sgd":
                    view: torch.Tensor = local
                else:
                    total = state_numel(fused_config.optimizer, g.config.num_elements, z)
                    state_shards = [(r, *_state_range(fused_config.optimizer, lo, hi, z)) for r, lo, hi in g.shards]
                    view = _sharded_1d(local, total, state_shards, g.placements, self._rank, self._pg)
                fused_params[key] = param
                local_state[key] = local
                state_views[key] = view
            self._optim: KeyedOptimizer = ShardedRobeFusedOptimizer(fused_params, local_state, state_views, fused_config)
        else:
            self._optim = ShardedRobeFusedOptimizer({}, {}, {}, RobeFusedOptimizerConfig("sgd"))

        # Communication: one KJT all-to-all for all table-wise groups, one per row-wise group.
        self._tw_groups_by_rank: List[List[str]] = [[] for _ in range(self._world_size)]
        for name, g in self._groups.items():
            if g.sharding_type == TW:
                self._tw_groups_by_rank[g.shards[0][0]].append(name)
        self._tw_feature_order: List[int] = []  # canonical feature index, in destination-rank order
        self._tw_dims_per_rank: List[int] = []
        for names in self._tw_groups_by_rank:
            for name in names:
                f0, f1 = self._groups[name].feature_range
                self._tw_feature_order.extend(range(f0, f1))
            self._tw_dims_per_rank.append(sum(self._groups[n].layout.total_dim for n in names))
        self._has_tw = any(self._tw_groups_by_rank)
        # Plain containers, not submodules: their buffers must not enter the state dict, whose
        # keys are exactly the unsharded module's.
        self._dists: Dict[str, nn.Module] = {}
        if self._has_tw:
            self._dists["tw_input"] = KJTAllToAll(
                self._pg, [sum(self._groups[n].layout.num_features for n in names) for names in self._tw_groups_by_rank]
            )
            self._dists["tw_output"] = PooledEmbeddingsAllToAll(self._pg, self._tw_dims_per_rank, device=self._device)
        for name, g in self._groups.items():
            if g.sharding_type == RW:
                self._dists[f"rw_input:{name}"] = KJTAllToAll(self._pg, [g.layout.num_features] * self._world_size)
        self._register_state_dict_hook(ShardedRobeEmbeddingBagCollection._post_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._pre_load_state_dict_hook, with_module=False)

    # ----- plan ------------------------------------------------------------------------------------

    def _placement(self, rank: int) -> str:
        if self._device.type == "cpu":
            return f"rank:{rank}/cpu"
        if rank == self._rank:
            return f"rank:{rank}/{self._device}"
        local = max(torch.cuda.device_count(), 1) if self._device.type == "cuda" else 1
        return f"rank:{rank}/{self._device.type}:{rank % local}"

    def _group_from_plan(self, name: str, layout: FeatureLayout, ps: Any, feature_range: Tuple[int, int]) -> _Group:
        config = self._robe_configs[name]
        m, z = config.num_elements, config.block_size
        stype = ps.sharding_type
        placements = {r: self._placement(r) for r in range(self._world_size)}
        if stype == DP:
            g = _Group(name, DP, config, layout, feature_range, [], placements, 0, m)
        elif stype == TW:
            if not ps.ranks:
                raise ValueError(f"table_wise plan for ROBE group {name!r} has no rank")
            owner = int(ps.ranks[0])
            lo, hi = (0, m) if owner == self._rank else (0, 0)
            g = _Group(name, TW, config, layout, feature_range, [(owner, 0, m)], placements, lo, hi)
        elif stype == RW:
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
            ranges = ShardRanges(shards, m, self._world_size)
            lo, hi = ranges.local(self._rank)
            g = _Group(name, RW, config, layout, feature_range, ranges.ranges, placements, lo, hi, ranges)
        else:
            raise ValueError(
                f"ROBE group {name!r}: sharding type {stype!r} is not supported (data_parallel, table_wise, row_wise)"
            )
        return g

    def _local_init(self, module: RobeEmbeddingBagCollection, g: _Group) -> torch.Tensor:
        src = module.arrays[g.name]
        if src.is_meta:
            local = torch.empty(g.local_size, dtype=torch.float32, device=self._device)
            members = [t for t in self._embedding_bag_configs if self._table_to_group[t.name] == g.name]
            r = g.config.resolved_init_range(members)
            with torch.no_grad():
                local.uniform_(-r, r)
            return local
        return src.detach()[g.lo : g.hi].to(self._device, copy=True)

    # ----- torchrec interface ----------------------------------------------------------------------

    @property
    def unsharded_module_type(self) -> type:
        return RobeEmbeddingBagCollection

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def embedding_bag_configs(self) -> List[Any]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def sharding_types(self) -> Dict[str, str]:
        """``{group: sharding type}``."""
        return {n: g.sharding_type for n, g in self._groups.items()}

    def local_range(self, group: str) -> Tuple[int, int]:
        """``[lo, hi)``: the elements of ``arrays.<group>`` this rank holds."""
        g = self._groups[group]
        return g.lo, g.hi

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name, g in self._groups.items():
            if g.sharding_type != DP:
                yield f"{prefix}.arrays.{name}" if prefix else f"arrays.{name}"

    def create_context(self) -> RobeShardingContext:
        return RobeShardingContext()

    def _keys_for(self, group: str) -> torch.Tensor:
        cached = self._hash_keys.get(group)
        if cached is None or cached.device != self._device:
            cached = self._groups[group].layout.hash_keys(self._device)
            self._hash_keys[group] = cached
        return cached

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[Dict[str, Any]]]:
        features = self._validated(features)
        ctx.batch_size = features.stride()
        per_group = features.split([g.layout.num_features for g in self._groups.values()])
        local: Dict[str, KeyedJaggedTensor] = {}
        routed: Dict[str, KeyedJaggedTensor] = {}
        for (name, g), kjt in zip(self._groups.items(), per_group):
            if g.sharding_type == DP:
                local[name] = kjt
            elif g.sharding_type == RW:
                if any(g.layout.mean):
                    ctx.lengths[name] = kjt.lengths().view(g.layout.num_features, ctx.batch_size)
                routed[name] = self._dists[f"rw_input:{name}"](self._bucketize(g, kjt)).wait().wait()
        tw: Optional[KeyedJaggedTensor] = None
        if self._has_tw:
            kjt = features.permute(self._tw_feature_order) if self._tw_feature_order else features
            tw = self._dists["tw_input"](kjt).wait().wait()
        return NoWait(NoWait({"local": local, "rw": routed, "tw": tw}))

    def _bucketize(self, g: _Group, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """The group's KJT regrouped by destination rank: keys repeated W times (torchrec's layout)."""
        assert g.ranges is not None
        values = kjt.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        lengths = kjt.lengths()
        weights = kjt.weights_or_none()
        batch = kjt.stride()
        mask = owner_mask(ids, lengths, batch, g.layout, self._keys_for(g.name), g.ranges)  # [nnz, W]
        bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=ids.device), lengths, output_size=ids.numel())
        vals, lens, wts = [], [], []
        for r in range(self._world_size):
            sel = mask[:, r].nonzero().squeeze(1)
            vals.append(values[sel])
            lens.append(torch.bincount(bags[sel], minlength=lengths.numel()).to(lengths.dtype))
            if weights is not None:
                wts.append(weights[sel])
        return KeyedJaggedTensor(
            keys=list(kjt.keys()) * self._world_size,
            values=torch.cat(vals),
            lengths=torch.cat(lens),
            weights=torch.cat(wts) if weights is not None else None,
            stride=batch,
        )

    def compute(self, ctx: RobeShardingContext, dist_input: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        fused = self._optim if self._fused_config is not None else None
        for name, kjt in dist_input["local"].items():
            out[name] = self._lookup(name, kjt, fused_optimizer=None)
        for name, kjt in dist_input["rw"].items():
            g = self._groups[name]
            values = kjt.values()
            ids = values if values.dtype == torch.int64 else values.to(torch.int64)
            args = (self.arrays[name], g.lo, ids, kjt.lengths(), g.layout, self._keys_for(name), kjt.stride(), kjt.weights_or_none())
            if fused is not None:
                out[name] = partial_pooled_fused(*args, fused, fused.state_of(self.arrays[name]))  # type: ignore[attr-defined]
            else:
                out[name] = partial_pooled(*args)
        tw = dist_input["tw"]
        if tw is not None:
            mine = self._tw_groups_by_rank[self._rank]
            if mine:
                parts = tw.split([self._groups[n].layout.num_features for n in mine])
                pooled = [self._lookup(n, kjt, fused_optimizer=fused) for n, kjt in zip(mine, parts)]
                out["__tw__"] = torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]
            else:
                # Nothing to pool here; requires_grad so that this rank also enters the
                # all-to-all's backward (a collective) like the owners do.
                out["__tw__"] = torch.zeros(
                    tw.stride(), 0, dtype=torch.float32, device=self._device, requires_grad=torch.is_grad_enabled()
                )
        return out

    def _lookup(self, name: str, kjt: KeyedJaggedTensor, fused_optimizer: Optional[Any]) -> torch.Tensor:
        values = kjt.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        return robe_pooled_lookup(
            self.arrays[name],
            ids,
            _offsets_of(kjt),
            self._groups[name].layout,
            self._keys_for(name),
            kjt.stride(),
            kjt.weights_or_none() if self._is_weighted else None,
            kernel=self._kernel,
            fused_optimizer=fused_optimizer,
        )

    def output_dist(self, ctx: RobeShardingContext, output: Dict[str, torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        pooled: Dict[str, torch.Tensor] = {}
        if "__tw__" in output:
            received = self._dists["tw_output"](output["__tw__"]).wait()  # [B, sum of all TW dims], rank order
            cols = [self._groups[n].layout.total_dim for names in self._tw_groups_by_rank for n in names]
            for n, chunk in zip([n for names in self._tw_groups_by_rank for n in names], received.split(cols, dim=1)):
                pooled[n] = chunk
        for name, g in self._groups.items():
            if g.sharding_type == DP:
                pooled[name] = output[name]
            elif g.sharding_type == RW:
                summed = reduce_scatter_sum(output[name], self._pg)
                if name in ctx.lengths:
                    summed = self._mean_after_reduction(g, summed, ctx.lengths[name])
                pooled[name] = summed
        values = torch.cat([pooled[n] for n in self._groups], dim=1) if len(self._groups) > 1 else pooled[next(iter(self._groups))]
        if self._needs_output_permute:
            values = self._to_output_order(values)
        return LazyNoWait(
            KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=values)
        )

    @staticmethod
    def _mean_after_reduction(g: _Group, summed: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Divide MEAN features' columns by their bag length ([F, B] lengths; empty bags stay 0)."""
        mean = torch.tensor(g.layout.mean, dtype=torch.bool, device=summed.device)
        scale = torch.where(
            mean.unsqueeze(1), 1.0 / lengths.clamp(min=1).to(summed.dtype), torch.ones((), dtype=summed.dtype, device=summed.device)
        )  # [F, B]
        per_col = torch.repeat_interleave(scale, torch.tensor(g.layout.dims, device=summed.device), dim=0)  # [total_dim, B]
        return summed * per_col.t()

    # ----- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return {"groups": {g: c.layout() for g, c in self._robe_configs.items()}}

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _pre_load_state_dict_hook, before any tensor is copied

    def sharded_array(self, group: str) -> ShardedTensor:
        """``arrays.<group>`` as a 1-D ShardedTensor of global size m (table_wise / row_wise)."""
        g = self._groups[group]
        local = self.arrays[group].detach() if g.local_size > 0 else None
        return _sharded_1d(local, g.config.num_elements, g.shards, g.placements, self._rank, self._pg)

    @staticmethod
    def _post_state_dict_hook(module: "ShardedRobeEmbeddingBagCollection", destination: Dict[str, Any], prefix: str, _meta: Any) -> None:
        for name, g in module._groups.items():
            if g.sharding_type != DP:
                destination[f"{prefix}arrays.{name}"] = module.sharded_array(name)

    def _pre_load_state_dict_hook(
        self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        self._check_layout_before_load(state_dict, prefix)
        for name, g in self._groups.items():
            key = f"{prefix}arrays.{name}"
            if key in state_dict:
                state_dict[key] = self._local_piece(g, state_dict[key])

    def _local_piece(self, g: _Group, value: Any) -> torch.Tensor:
        """This rank's [lo, hi) of a full tensor or of a ShardedTensor's local shards."""
        m = g.config.num_elements
        if isinstance(value, ShardedTensor):
            if tuple(value.size()) != (m,):
                raise ValueError(f"arrays.{g.name}: ShardedTensor of size {tuple(value.size())}, expected ({m},)")
            out = torch.empty(g.local_size, dtype=torch.float32, device=self._device)
            covered = 0
            for shard in value.local_shards():
                s_lo = int(shard.metadata.shard_offsets[0])
                s_hi = s_lo + int(shard.metadata.shard_sizes[0])
                a, b = max(s_lo, g.lo), min(s_hi, g.hi)
                if a < b:
                    out[a - g.lo : b - g.lo].copy_(shard.tensor.detach()[a - s_lo : b - s_lo])
                    covered += b - a
            if covered != g.local_size:
                raise ValueError(
                    f"arrays.{g.name}: the ShardedTensor's local shards do not cover this rank's elements "
                    f"[{g.lo}, {g.hi}); load it with torch.distributed.checkpoint into this module's state_dict()"
                )
            return out
        if isinstance(value, torch.Tensor):
            if value.numel() == m:
                return value.detach().reshape(-1)[g.lo : g.hi]
            if value.numel() == g.local_size:
                return value.detach().reshape(-1)
            raise ValueError(f"arrays.{g.name}: tensor of {value.numel()} elements, expected {m} (full array)")
        raise TypeError(f"arrays.{g.name}: cannot load a {type(value).__name__}")
