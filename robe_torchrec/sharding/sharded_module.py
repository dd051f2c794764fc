"""ShardedRobeEmbeddingBagCollection: the DMP-sharded RobeEmbeddingBagCollection.

A thin torchrec ``ShardedEmbeddingModule`` (like torchrec's ShardedEmbeddingBagCollection): the
plan has one ``ParameterSharding`` per array group (keyed by group name); the groups of each
sharding type are handled by one sharding object, which owns its input dist, lookup and output
dist (:mod:`.dp`, :mod:`.tw`, :mod:`.rw`, in that order):

- ``input_dist`` returns torchrec's ``KJTListSplitsAwaitable`` over the shardings' input dists
  (``NoWait(NoWait(kjt))`` for data_parallel, ``KJTAllToAll`` splits awaitables for table_wise /
  row_wise, exposed in ``_input_dists[i]._dist``), so ``TrainPipelineSparseDist`` and friends can
  start it a batch ahead and fuse the splits all-to-alls of all modules;
- ``compute`` takes the ``KJTList`` and returns one pooled tensor per sharding;
- ``output_dist`` returns a ``LazyAwaitable[KeyedTensor]`` over the shardings' output collectives,
  waited only when the output is used.

Optimizer: table_wise / row_wise arrays are updated by a fused optimizer (``fused_optimizer``, a
torchrec ``FusedOptimizer``, so ``DistributedModelParallel.fused_optimizer`` / ``CombinedOptimizer``
and LR schedulers drive it) when one is configured (see ``RobeEmbeddingBagCollectionSharder``);
otherwise they get a dense gradient of their local shard. data_parallel arrays go through DDP.

Checkpoints (:mod:`.state`): ``state_dict()`` has the unsharded keys: ``arrays.<group>`` (a plain
tensor for data_parallel, a 1-D ``ShardedTensor`` of global size m for table_wise / row_wise) and
``_extra_state`` (the layout; loading a different layout is refused). The fused optimizer's
state_dict has ``arrays.<group>: {"momentum1": ShardedTensor}`` (global size m for adagrad,
ceil(m/Z) for rowwise_adagrad). ``torch.distributed.checkpoint`` reshards both on load.
``load_state_dict`` also accepts a full unsharded state dict (it keeps this rank's slice).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.types import Awaitable, EmbeddingModuleShardingPlan, LazyAwaitable, ShardingEnv
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.sharding.common import RobeSharding, RobeShardingContext
from robe_torchrec.sharding.dp import RobeDpSharding
from robe_torchrec.sharding.groups import DP, RW, TW, Group, group_from_plan
from robe_torchrec.sharding.rw import RobeRwSharding
from robe_torchrec.sharding.state import build_fused_optimizer, local_piece, sharded_1d
from robe_torchrec.sharding.tw import RobeTwSharding

__all__ = ["RobeShardingContext", "ShardedRobeEmbeddingBagCollection"]


class RobeOutputAwaitable(LazyAwaitable[KeyedTensor]):
    """Waits the shardings' output dists and assembles torchrec's EBC output (keys, order, dims)."""

    def __init__(self, awaitables: List[Awaitable[Dict[str, torch.Tensor]]], module: "ShardedRobeEmbeddingBagCollection") -> None:
        super().__init__()
        self._awaitables = awaitables
        self._module = module

    def _wait_impl(self) -> KeyedTensor:
        pooled: Dict[str, torch.Tensor] = {}
        for w in self._awaitables:
            pooled.update(w.wait())
        m = self._module
        parts = [pooled[n] for n in m._groups]
        values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if m._needs_output_permute:
            values = m._to_output_order(values)
        return KeyedTensor(keys=m._embedding_names, length_per_key=m._lengths_per_embedding, values=values)


class ShardedRobeEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, RobeShardingContext],
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
        self._groups: Dict[str, Group] = {}
        f0 = 0
        for name, layout in module.feature_layouts().items():
            if name not in plan:
                raise ValueError(f"sharding plan has no entry for ROBE group {name!r}")
            self._groups[name] = group_from_plan(
                name, self._robe_configs[name], layout, plan[name], (f0, f0 + layout.num_features),
                self._rank, self._world_size, self._device,
            )
            f0 += layout.num_features
        self._layouts = {name: g.layout for name, g in self._groups.items()}

        # Local pieces of the arrays (parameters keep the unsharded names arrays.<group>).
        self.arrays = nn.ParameterDict()
        for name, g in self._groups.items():
            self.arrays[name] = nn.Parameter(self._local_init(module, g))
        self._optim: KeyedOptimizer = build_fused_optimizer(
            self._groups, self.arrays, fused_config, getattr(module, "_fused_optimizer", None), module.arrays,
            self._rank, self._pg, self._device,
        )

        # One sharding per type present, in the order DP, TW, RW. Plain lists, not submodules:
        # they hold no state, and the state dict keys stay exactly the unsharded module's.
        self._hash_keys = {name: g.layout.hash_keys(self._device) for name, g in self._groups.items()}
        common = dict(hash_keys=self._hash_keys, kernel=self._kernel, is_weighted=self._is_weighted)
        num_features = len(self._input_features)
        by_type = {t: [g for g in self._groups.values() if g.sharding_type == t] for t in (DP, TW, RW)}
        self._shardings: List[RobeSharding] = []
        if by_type[DP]:
            self._shardings.append(RobeDpSharding(by_type[DP], num_features=num_features, **common))
        if by_type[TW]:
            self._shardings.append(RobeTwSharding(
                by_type[TW], pg=self._pg, rank=self._rank, world_size=self._world_size,
                num_features=num_features, device=self._device, **common,
            ))
        if by_type[RW]:
            self._shardings.append(RobeRwSharding(
                by_type[RW], pg=self._pg, world_size=self._world_size, num_features=num_features,
                device=self._device, **common,
            ))
        # Where torchrec's train pipelines find (and swap the forward of) the KJTAllToAlls.
        self._input_dists: List[RobeSharding] = list(self._shardings)

        self._register_state_dict_hook(ShardedRobeEmbeddingBagCollection._post_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._pre_load_state_dict_hook, with_module=False)

    def _local_init(self, module: RobeEmbeddingBagCollection, g: Group) -> torch.Tensor:
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

    def input_dist(self, ctx: RobeShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        features = self._validated(features)
        ctx.batch_size = features.stride()
        # (awaitables, ctx) only: the later profiling arguments are not in older torchrec releases.
        return KJTListSplitsAwaitable([s.input_dist(ctx, features) for s in self._shardings], ctx)

    def compute(self, ctx: RobeShardingContext, dist_input: KJTList) -> List[torch.Tensor]:
        fused = self._optim if self._fused_config is not None else None
        return [s.compute(ctx, dist_input[i], self.arrays, fused) for i, s in enumerate(self._shardings)]

    def output_dist(self, ctx: RobeShardingContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return RobeOutputAwaitable([s.output_dist(ctx, out) for s, out in zip(self._shardings, output)], self)

    # ----- checkpoints -----------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return {"groups": {g: c.layout() for g, c in self._robe_configs.items()}}

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _pre_load_state_dict_hook, before any tensor is copied

    def sharded_array(self, group: str) -> ShardedTensor:
        """``arrays.<group>`` as a 1-D ShardedTensor of global size m (table_wise / row_wise)."""
        g = self._groups[group]
        local = self.arrays[group].detach() if g.local_size > 0 else None
        return sharded_1d(local, g.config.num_elements, g.shards, g.placements, self._rank, self._pg)

    @staticmethod
    def _post_state_dict_hook(module: "ShardedRobeEmbeddingBagCollection", destination: Dict[str, Any], prefix: str, _meta: Any) -> None:
        for name, g in module._groups.items():
            if g.sharding_type != DP:
                destination[f"{prefix}arrays.{name}"] = module.sharded_array(name)

    def _pre_load_state_dict_hook(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._check_layout_before_load(state_dict, prefix)
        for name, g in self._groups.items():
            key = f"{prefix}arrays.{name}"
            if key in state_dict:
                state_dict[key] = local_piece(g, state_dict[key], self._device)
