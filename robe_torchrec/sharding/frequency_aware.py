"""Sharding the frequency-aware module: data_parallel and table_wise, the TorchRec way.

``FrequencyAwareRobeEmbeddingBagCollection`` is one budget (ROBE array + hot rows + id map +
sketches) behind one interface, so the planner sees it as ONE shardable entry (named
``"frequency_aware"`` unless the sharder is given another name), sized by everything it stores:

- **table_wise**: the whole module lives on one rank (the owner). One ``KJTAllToAll`` sends every
  rank's features to the owner, which runs the module on the global batch ``[W * B]`` exactly as
  the unsharded module would (the sketches count the global stream, hot rows and array step in
  backward with the module's fused optimizer, or get dense gradients for the user's optimizer),
  and one ``PooledEmbeddingsAllToAll`` returns every rank its ``[B, F * D]`` rows.
- **data_parallel**: every rank holds the whole module and pools its own batch; the array and the
  hot rows are ordinary parameters, all-reduced by DMP's DDP and stepped by the dense optimizer
  (never fused: the gradient must be averaged first). The hot set must be the same on every rank
  (DDP averages row ``s`` of every rank: it must be the same id's row), so in training the input
  dist also all-gathers the ids (one ``KJTAllToAll`` of the local batch to every rank, 8 bytes per
  id per other rank) and every rank counts the GLOBAL stream in its sketches: identical sketches,
  identical refreshes (promotion reads the array, identical under DDP), identical hot sets.

Checkpoints: ``state_dict()`` has the unsharded module's keys on every rank. data_parallel:
plain tensors (the same on every rank). table_wise: every tensor as a ``ShardedTensor`` of its
own shape with one shard, the whole tensor, on the owner (empty tensors stay plain), so
``torch.distributed.checkpoint`` saves it once and loads it under another plan or unsharded. The fused optimizer's state is
``arrays.default: {"momentum1": ...}`` as unsharded (table_wise). A checkpoint of another
layout (sizes, budget, hot capacities, config, hash) is refused before any tensor is copied.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    NoWait,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection,
)
from robe_torchrec.modules.robe_embedding_bag_collection import DEFAULT_GROUP
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.sharding.common import MapAwaitable, RobeShardingContext
from robe_torchrec.sharding.groups import DP, TW, placement
from robe_torchrec.sharding.sharder import _ESTIMATOR_OPTIMIZER_CLASS, fused_config_from_params
from robe_torchrec.sharding.state import ShardedRobeFusedOptimizer, sharded_1d

PLAN_NAME = "frequency_aware"
_ARRAY_KEY = f"robe.arrays.{DEFAULT_GROUP}"
_OPTIM_KEY = f"arrays.{DEFAULT_GROUP}"


def _module_fused_config(module: FrequencyAwareRobeEmbeddingBagCollection) -> Optional[RobeFusedOptimizerConfig]:
    fused = module.robe._fused_optimizer
    return None if fused is None else fused.config


class FrequencyAwareRobeEmbeddingBagCollectionSharder(BaseEmbeddingSharder[FrequencyAwareRobeEmbeddingBagCollection]):
    """TorchRec sharder for :class:`FrequencyAwareRobeEmbeddingBagCollection` (data_parallel, table_wise).

    Args:
        fused_params: as :class:`~robe_torchrec.sharding.RobeEmbeddingBagCollectionSharder`, but the
            module's hot-row state is sized by its own fused optimizer, so table_wise accepts only
            the module's own optimizer here (a different one raises: build the module with it).
        dense_optimizer_class: the torch optimizer stepping unfused parameters (planner sizing).
        name: the plan / constraints key of the module (one per module; keep it distinct from
            table and ROBE group names of the same model).
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        dense_optimizer_class: Optional[type] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        name: str = PLAN_NAME,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._fused_config = fused_config_from_params(fused_params)
        self._dense_optimizer_class = dense_optimizer_class
        self._name = name

    @property
    def module_type(self) -> Type[FrequencyAwareRobeEmbeddingBagCollection]:
        return FrequencyAwareRobeEmbeddingBagCollection

    def shardable_parameters(self, module: FrequencyAwareRobeEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """``{name: meta [rows, D] float32}`` with ``4 * rows * D >= module.memory_bytes()``: the
        planner's storage estimate is everything the module stores (not the nominal tables)."""
        dim = module.embedding_bag_configs()[0].embedding_dim
        rows = -(-module.memory_bytes() // (4 * dim))
        view = torch.empty(rows, dim, dtype=torch.float32, device="meta")
        config = self._fused_config or _module_fused_config(module)
        if config is not None:
            view._optimizer_classes = [_ESTIMATOR_OPTIMIZER_CLASS[config.optimizer]]  # type: ignore[attr-defined]
        elif self._dense_optimizer_class is not None:
            view._optimizer_classes = [self._dense_optimizer_class]  # type: ignore[attr-defined]
        return {self._name: view}  # type: ignore[dict-item]

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [DP, TW]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if sharding_type == DP:
            return [EmbeddingComputeKernel.DENSE.value]
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(
        self,
        module: FrequencyAwareRobeEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> "ShardedFrequencyAwareRobeEmbeddingBagCollection":
        own = _module_fused_config(module)
        if self._fused_config is not None and self._fused_config != own:
            raise ValueError(
                f"FrequencyAwareRobeEmbeddingBagCollectionSharder: fused_params {self._fused_config} differ from the "
                f"module's own fused optimizer {own}; build the module with fused_optimizer=... instead (its hot-row "
                "state is sized by it)"
            )
        return ShardedFrequencyAwareRobeEmbeddingBagCollection(module, params, env, device=device, name=self._name)


class FrequencyAwareShardingContext(RobeShardingContext):
    """Per batch: the local features (data_parallel pools them while counting the global batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.local: Optional[KeyedJaggedTensor] = None
        self.gathered = False

    def record_stream(self, stream: Optional[torch.Stream]) -> None:
        super().record_stream(stream)
        if self.local is not None:
            self.local.record_stream(stream)  # type: ignore[arg-type]


class _InputDist:
    """What torchrec's train pipelines look for in ``_input_dists``: an object with ``_dist``."""

    def __init__(self, kjt_dist: KJTAllToAll) -> None:
        self._dist = kjt_dist


class _OutputAwaitable(LazyAwaitable[KeyedTensor]):
    def __init__(self, pooled: Awaitable[torch.Tensor], keys: List[str], lengths: List[int]) -> None:
        super().__init__()
        self._pooled, self._keys, self._lengths = pooled, keys, lengths

    def _wait_impl(self) -> KeyedTensor:
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=self._pooled.wait())


class ShardedFrequencyAwareRobeEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, RobeShardingContext],
    FusedOptimizerModule,
):
    """A FrequencyAwareRobeEmbeddingBagCollection, data_parallel or table_wise (module docstring).

    The ranks holding the module register its own parameters, buffers and submodules under their
    unsharded names (the same tensor objects: the module's code runs on them unchanged)."""

    def __init__(
        self,
        module: FrequencyAwareRobeEmbeddingBagCollection,
        plan: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        name: str = PLAN_NAME,
    ) -> None:
        super().__init__()
        unknown = sorted(set(plan) - {name})
        if unknown or name not in plan:
            raise ValueError(f"sharding plan for a frequency-aware module must have exactly the entry {name!r}, got {sorted(plan)}")
        ps = plan[name]
        if ps.sharding_type not in (DP, TW):
            raise ValueError(f"frequency-aware ROBE shards data_parallel or table_wise, the plan says {ps.sharding_type!r}")
        if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            raise ValueError("shard a materialised FrequencyAwareRobeEmbeddingBagCollection (it has meta tensors)")
        self._pg, self._rank, self._world_size = env.process_group, env.rank, env.world_size
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._sharding_type = ps.sharding_type
        self._owner = int(ps.ranks[0]) if ps.sharding_type == TW else -1
        if ps.sharding_type == TW and not 0 <= self._owner < self._world_size:
            raise ValueError(f"table_wise plan for {name!r} names rank {self._owner} of {self._world_size}")
        self._holds = ps.sharding_type == DP or self._rank == self._owner
        self._embedding_bag_configs = module.embedding_bag_configs()
        self._is_weighted = module.is_weighted()
        self._embedding_names = list(module.robe._embedding_names)
        self._lengths_per_embedding = list(module.robe._lengths_per_embedding)
        self._features = list(module.robe._input_features)
        self._num_features = len(self._features)
        self._out_dim = sum(self._lengths_per_embedding)
        sd = module.state_dict()
        self._meta: Dict[str, Tuple[torch.Size, torch.dtype]] = {k: (v.shape, v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self._extra: Dict[str, Any] = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
        self._layout = module.get_extra_state()
        self._fused_config = _module_fused_config(module) if ps.sharding_type == TW else None

        self._module: List[FrequencyAwareRobeEmbeddingBagCollection] = []  # a list: not a submodule (keys)
        if self._holds:
            module = module.to(self._device)
            if ps.sharding_type == DP:
                _unfuse(module)
            self._adopt(module)
            self._module.append(module)
        self._optim = self._build_fused_optimizer(module if self._holds else None)

        placements = {r: placement(r, self._rank, self._device) for r in range(self._world_size)}
        self._placements = placements
        # Plain objects, not submodules (no state); the input dist is where torchrec's train
        # pipelines look for (and swap the forward of) the KJTAllToAll.
        if ps.sharding_type == TW:
            splits = [self._num_features if r == self._owner else 0 for r in range(self._world_size)]
            dims = [self._out_dim if r == self._owner else 0 for r in range(self._world_size)]
            self._output: List[PooledEmbeddingsAllToAll] = [PooledEmbeddingsAllToAll(self._pg, dims, device=self._device)]
        else:
            splits = [self._num_features] * self._world_size  # data_parallel: every rank gets every batch
            self._output = []
        self._input_dists: List[_InputDist] = [_InputDist(KJTAllToAll(self._pg, splits))]
        self._register_state_dict_hook(ShardedFrequencyAwareRobeEmbeddingBagCollection._post_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._pre_load_state_dict_hook, with_module=False)

    def _adopt(self, module: FrequencyAwareRobeEmbeddingBagCollection) -> None:
        """Register the module's children, parameters and buffers here under their own names."""
        for n, child in module.named_children():
            self.add_module(n, child)
        for n, p in module.named_parameters(recurse=False):
            self.register_parameter(n, p)
        for n, b in module.named_buffers(recurse=False):
            self.register_buffer(n, b)

    def _build_fused_optimizer(self, module: Optional[FrequencyAwareRobeEmbeddingBagCollection]) -> KeyedOptimizer:
        """table_wise with a fused optimizer: the same keys on every rank (state as a ShardedTensor
        on the owner); the owner's module keeps stepping with its own optimizer, which reads lr /
        eps from this one's param_groups (so DMP's CombinedOptimizer and LR schedulers drive it)."""
        config = self._fused_config
        if config is None:
            return ShardedRobeFusedOptimizer({}, {}, {}, RobeFusedOptimizerConfig("sgd"))
        if module is not None:
            inner = module.robe._fused_optimizer
            array = module.robe.arrays[DEFAULT_GROUP]
            local = inner.state_of(array)
        else:
            inner = None
            array = nn.Parameter(torch.empty(0, device=self._device), requires_grad=False)
            local = torch.empty(0, device=self._device)
        total = self._meta_numel_of_state()
        view: torch.Tensor = local
        if total:
            view = sharded_1d(local if module is not None else None, total, [(self._owner, 0, total)], {
                r: placement(r, self._rank, self._device) for r in range(self._world_size)
            }, self._rank, self._pg)
        optim = ShardedRobeFusedOptimizer({_OPTIM_KEY: array}, {_OPTIM_KEY: local}, {_OPTIM_KEY: view}, config)
        if inner is not None:
            inner.param_groups = optim.param_groups
        return optim

    def _meta_numel_of_state(self) -> int:
        from robe_torchrec.ops.api import state_numel

        assert self._fused_config is not None
        layout = self._layout["frequency_aware"]["robe"]
        return state_numel(self._fused_config.optimizer, int(layout["num_elements"]), int(layout["block_size"]))

    # ----- torchrec interface ------------------------------------------------------------------------

    @property
    def unsharded_module_type(self) -> type:
        return FrequencyAwareRobeEmbeddingBagCollection

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def embedding_bag_configs(self) -> List[Any]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def sharding_type(self) -> str:
        return self._sharding_type

    def module(self) -> Optional[FrequencyAwareRobeEmbeddingBagCollection]:
        """The module this rank runs (None on a table_wise rank that does not own it)."""
        return self._module[0] if self._module else None

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        if self._sharding_type == TW and self._holds:
            for n, _ in self.named_parameters():
                yield f"{prefix}.{n}" if prefix else n

    def create_context(self) -> FrequencyAwareShardingContext:
        return FrequencyAwareShardingContext()

    def input_dist(self, ctx: FrequencyAwareShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        features = _validated(features, self._features)
        ctx.batch_size = features.stride()
        kjt_dist = self._input_dists[0]._dist
        if self._sharding_type == TW:
            return KJTListSplitsAwaitable([kjt_dist(features)], ctx)
        ctx.local = features
        ctx.gathered = self.training and self._world_size > 1
        if not ctx.gathered:
            return KJTListSplitsAwaitable([NoWait(NoWait(features))], ctx)  # type: ignore[list-item]
        # data_parallel training: the local batch to every rank; each receives the global batch
        # (feature-major, the ranks' bags one after the other), to count it in the sketches
        w = self._world_size
        weights = features.weights_or_none()
        everyone = KeyedJaggedTensor(
            keys=list(features.keys()) * w,
            values=torch.cat([features.values()] * w),
            lengths=torch.cat([features.lengths()] * w),
            weights=None if weights is None else torch.cat([weights] * w),
            stride=features.stride(),
        )
        return KJTListSplitsAwaitable([kjt_dist(everyone)], ctx)

    def compute(self, ctx: FrequencyAwareShardingContext, dist_input: KJTList) -> List[torch.Tensor]:
        kjt = dist_input[0]
        if not self._holds:
            # requires_grad: this rank must also enter the output all-to-all's backward (a collective)
            return [torch.zeros(kjt.stride(), 0, dtype=torch.float32, device=self._device, requires_grad=torch.is_grad_enabled())]
        module = self._module[0]
        if self._sharding_type == TW:  # the owner: the global batch, as the unsharded module
            return [module.pool(kjt, observe=self.training).values()]
        if not ctx.gathered:  # eval (or one rank): the local batch, as the unsharded module
            return [module.pool(kjt, observe=self.training).values()]
        module.observe_ids(list(kjt.values().split(kjt.length_per_key())))
        assert ctx.local is not None
        return [module.pool(ctx.local, observe=False).values()]

    def output_dist(self, ctx: FrequencyAwareShardingContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        pooled = output[0]
        awaitable: Awaitable[torch.Tensor] = NoWait(pooled) if self._sharding_type == DP else MapAwaitable(self._output[0](pooled), lambda t: t)
        return _OutputAwaitable(awaitable, self._embedding_names, self._lengths_per_embedding)

    # ----- checkpoints ---------------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return self._layout

    def set_extra_state(self, state: Any) -> None:
        pass  # checked in _pre_load_state_dict_hook, before any tensor is copied

    def _sharded(self, key: str, local: Optional[torch.Tensor]) -> Any:
        shape, dtype = self._meta[key]
        if int(torch.Size(shape).numel()) == 0:
            return local if local is not None else torch.empty(shape, dtype=dtype, device=self._device)
        return whole_on_owner(None if local is None else local.detach(), shape, dtype, self._owner, self._placements, self._rank, self._pg)

    @staticmethod
    def _post_state_dict_hook(module: "ShardedFrequencyAwareRobeEmbeddingBagCollection", destination: Dict[str, Any], prefix: str, _meta: Any) -> None:
        if module._sharding_type != TW:
            return
        for key in module._meta:
            local = destination.get(prefix + key) if module._holds else None
            destination[prefix + key] = module._sharded(key, local)
        if not module._holds:
            for key, value in module._extra.items():
                destination.setdefault(prefix + key, value)

    def _pre_load_state_dict_hook(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None and saved != self._layout:
            raise ValueError(
                "refusing to load a frequency-aware ROBE state dict made with a different layout "
                f"(hot rows, sketches or array would mean something else): checkpoint has "
                f"{saved.get('frequency_aware') if isinstance(saved, dict) else saved!r}, this module has "
                f"{self._layout['frequency_aware']}"
            )
        for key, (shape, _) in self._meta.items():
            full = prefix + key
            if full not in state_dict:
                continue
            if not self._holds:
                del state_dict[full]
                continue
            state_dict[full] = _whole(key, state_dict[full], shape)
        if not self._holds:
            for key in self._extra:
                if key != "_extra_state":
                    state_dict.pop(prefix + key, None)


def whole_on_owner(
    local: Optional[torch.Tensor],
    shape: torch.Size,
    dtype: torch.dtype,
    owner: int,
    placements: Dict[int, str],
    rank: int,
    pg: Any,
) -> ShardedTensor:
    """A ShardedTensor of ``shape`` with one shard, the whole tensor, on ``owner`` (``local`` there;
    no copy, no collective)."""
    meta = ShardMetadata(shard_offsets=[0] * len(shape), shard_sizes=list(shape), placement=placements[owner])
    global_meta = ShardedTensorMetadata(
        shards_metadata=[meta],
        size=torch.Size(shape),
        tensor_properties=TensorProperties(
            dtype=dtype, layout=torch.strided, requires_grad=False, memory_format=torch.contiguous_format, pin_memory=False
        ),
    )
    shards = [Shard(tensor=local, metadata=meta)] if rank == owner and local is not None else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_meta, process_group=pg)


def _whole(key: str, value: Any, shape: torch.Size) -> torch.Tensor:
    """The full tensor of ``key`` from a plain tensor or a ShardedTensor whose local shard is all of it."""
    if isinstance(value, ShardedTensor):
        if tuple(value.size()) != tuple(shape):
            raise ValueError(f"{key}: ShardedTensor of size {tuple(value.size())}, expected {tuple(shape)}")
        shards = value.local_shards()
        if len(shards) != 1 or tuple(shards[0].tensor.shape) != tuple(shape):
            raise ValueError(
                f"{key}: this rank holds the module but not the whole tensor; load it with "
                "torch.distributed.checkpoint into this module's state_dict()"
            )
        return shards[0].tensor.detach()
    if isinstance(value, torch.Tensor):
        if value.numel() != int(torch.Size(shape).numel()):
            raise ValueError(f"{key}: tensor of shape {tuple(value.shape)}, expected {tuple(shape)}")
        return value.reshape(shape)
    raise TypeError(f"{key}: cannot load a {type(value).__name__}")


def _unfuse(module: FrequencyAwareRobeEmbeddingBagCollection) -> None:
    """data_parallel: the array and hot rows become plain parameters (fresh, untagged objects) with
    dense gradients for DDP and the dense optimizer; the module's fused optimizer is dropped."""
    robe = module.robe
    if robe._fused_optimizer is None:
        return
    robe.arrays[DEFAULT_GROUP] = nn.Parameter(robe.arrays[DEFAULT_GROUP].detach().clone())
    robe._fused_optimizer = None
    if "hot_rows" in module._parameters:
        module.hot_rows = nn.Parameter(module.hot_rows.detach().clone())


def _validated(features: KeyedJaggedTensor, expected: List[str]) -> KeyedJaggedTensor:
    if not isinstance(features, KeyedJaggedTensor):
        raise TypeError(f"ShardedFrequencyAwareRobeEmbeddingBagCollection expects a KeyedJaggedTensor, got {type(features).__name__}")
    keys = list(features.keys())
    if keys != expected:
        missing = sorted(set(expected) - set(keys))
        if missing:
            raise ValueError(f"features {missing} are missing from the KeyedJaggedTensor (keys {keys})")
        features = features.permute([keys.index(k) for k in expected])
    return features
