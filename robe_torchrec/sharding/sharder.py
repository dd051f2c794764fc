"""RobeEmbeddingBagCollectionSharder: shards a RobeEmbeddingBagCollection the TorchRec way.

Pass it, together with torchrec's default sharders, to both the planner and DMP::

    sharders = [RobeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    plan = EmbeddingShardingPlanner(topology, constraints=constraints).plan(model, sharders)
    model = DistributedModelParallel(model, plan=plan, sharders=sharders, device=device)

Shardable parameters (what the planner sees, and what ``ParameterConstraints`` are keyed by)
-----------------------------------------------------------------------------------------------
One per ROBE array group, named by the **group name** (``"default"`` for a single
``RobeConfig``; the keys of ``robe={group: RobeConfig}`` otherwise). Constrain a group with
``constraints={"default": ParameterConstraints(sharding_types=["row_wise"])}``. Group names
share the planner's name space with the table names of ordinary EBCs in the same model, so keep
them distinct from table names.

The tensor handed to the planner is a 2-D view ``[ceil(m / Z), Z]`` of the group's array (m
elements, block size Z), so torchrec's storage estimator (which in 1.8 sizes from the tensor:
``numel * element_size``, scaled by each shard's share of rows) sees the TRUE bytes of the array,
not ``num_embeddings * D`` of the nominal tables. (When Z does not divide m, a meta tensor of that
padded shape stands in: at most Z - 1 elements of over-count.) Row-wise shards are whole rows of
this view, so every shard boundary is a multiple of Z (the row-wise Adagrad chunks stay aligned).

Optimizer state is counted by the estimator from the tensor's ``_optimizer_classes`` attribute
(torchrec 1.8 ``_get_optimizer_multipler``): this sharder sets it from the fused optimizer
(the arrays' ``apply_optimizer_in_backward`` tag first, see ``robe_torchrec.optim_in_backward``,
then sharder ``fused_params``, else the module's own fused optimizer): ``sgd`` -> SGD (x0),
``adagrad`` -> Adagrad (x1: one float per element), ``rowwise_adagrad`` -> torchrec's
RowWiseAdagrad (x 1/shape[-1] = 1/Z: one float per Z-chunk). Exactly the state
``RobeFusedOptimizer`` keeps. Without a fused optimizer no state is counted (the dense optimizer's
state is the user's choice); pass ``dense_optimizer_class`` (e.g. ``torch.optim.Adagrad``) to count it.

Sharding types (CPU and CUDA): ``data_parallel`` (kernel label ``dense``), ``table_wise`` and
``row_wise`` (kernel label ``fused``; labels the perf estimator knows). See
``robe_torchrec.sharding.sharded_module`` for what each does.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, EmbeddingComputeKernel
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.optim import RowWiseAdagrad

from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.optim_in_backward import arrays_config

if TYPE_CHECKING:
    from robe_torchrec.sharding.sharded_module import ShardedRobeEmbeddingBagCollection

SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
)

_ESTIMATOR_OPTIMIZER_CLASS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
}


def fused_config_from_params(fused_params: Optional[Dict[str, Any]]) -> Optional[RobeFusedOptimizerConfig]:
    """A ``RobeFusedOptimizerConfig`` from sharder ``fused_params``, or None.

    Accepted keys: ``optimizer`` ("sgd" | "adagrad" | "rowwise_adagrad"), ``lr`` (or
    ``learning_rate``), ``eps``, ``stochastic_rounding``. Other keys (torchrec's TBE options) are ignored.
    """
    if not fused_params or "optimizer" not in fused_params:
        return None
    opt = fused_params["optimizer"]
    if not isinstance(opt, str):  # torchrec's EmbOptimType enum
        opt = str(getattr(opt, "value", opt)).lower()
        opt = {"exact_sgd": "sgd", "exact_adagrad": "adagrad", "exact_row_wise_adagrad": "rowwise_adagrad",
               "row_wise_adagrad": "rowwise_adagrad"}.get(opt, opt)
    kwargs: Dict[str, Any] = {"optimizer": opt}
    if "lr" in fused_params or "learning_rate" in fused_params:
        kwargs["lr"] = float(fused_params.get("lr", fused_params.get("learning_rate")))
    if "eps" in fused_params:
        kwargs["eps"] = float(fused_params["eps"])
    if "stochastic_rounding" in fused_params:  # TBE's option of the same name (bf16 / fp16 arrays)
        kwargs["stochastic_rounding"] = bool(fused_params["stochastic_rounding"])
    return RobeFusedOptimizerConfig(**kwargs)


class RobeEmbeddingBagCollectionSharder(BaseEmbeddingSharder[RobeEmbeddingBagCollection]):
    """TorchRec sharder for :class:`RobeEmbeddingBagCollection` (one plan entry per array group).

    Args:
        fused_params: optional ``{"optimizer": "sgd"|"adagrad"|"rowwise_adagrad", "lr": ..,
            "eps": ..}``: the optimizer fused into backward for table_wise / row_wise groups.
            Overrides the module's own fused optimizer. With neither, table_wise / row_wise
            arrays get a dense gradient of their local shard (step them with any element-wise
            torch optimizer). data_parallel arrays are never fused (their gradient must be
            all-reduced first): they go through DDP and the dense optimizer.
        dense_optimizer_class: the torch optimizer class that steps arrays which are not fused,
            so that the planner counts its state (torchrec's multipliers: SGD 0, Adam 2, any
            other 1 per element).
        qcomm_codecs_registry: accepted for API compatibility (quantized comms are not used).
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        dense_optimizer_class: Optional[type] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._fused_config = fused_config_from_params(fused_params)
        self._dense_optimizer_class = dense_optimizer_class

    @property
    def module_type(self) -> Type[RobeEmbeddingBagCollection]:
        return RobeEmbeddingBagCollection

    def fused_config_for(self, module: RobeEmbeddingBagCollection) -> Optional[RobeFusedOptimizerConfig]:
        """The fused optimizer the sharded module will use: the arrays' optimizer in backward
        (``apply_optimizer_in_backward``; per-parameter wins, as in torchrec's sharders), else the
        sharder's ``fused_params``, else the module's own."""
        tagged = arrays_config(dict(module.arrays.items()))
        if tagged is not None:
            return tagged
        if self._fused_config is not None:
            return self._fused_config
        fused = getattr(module, "_fused_optimizer", None)
        return None if fused is None else fused.config

    def shardable_parameters(self, module: RobeEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """``{group_name: [ceil(m/Z), Z] view of arrays.<group>}`` (see the module docstring)."""
        config = self.fused_config_for(module)
        out: Dict[str, nn.Parameter] = {}
        for group, robe in module.robe_configs().items():
            array = module.arrays[group]
            z, m = robe.block_size, robe.num_elements
            rows = (m + z - 1) // z
            if m % z == 0:
                view = array.detach().view(rows, z)
            else:
                view = torch.empty(rows, z, dtype=array.dtype, device="meta")
            if config is not None:
                view._optimizer_classes = [_ESTIMATOR_OPTIMIZER_CLASS[config.optimizer]]  # type: ignore[attr-defined]
            elif self._dense_optimizer_class is not None:
                view._optimizer_classes = [self._dense_optimizer_class]  # type: ignore[attr-defined]
            out[group] = view  # type: ignore[assignment]
        return out

    def sharding_types(self, compute_device_type: str) -> List[str]:
        """data_parallel, table_wise and row_wise, on CPU as well as CUDA."""
        return list(SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return [EmbeddingComputeKernel.DENSE.value]
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(
        self,
        module: RobeEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> "ShardedRobeEmbeddingBagCollection":
        from robe_torchrec.sharding.sharded_module import ShardedRobeEmbeddingBagCollection

        reduced = {g: a.dtype for g, a in module.arrays.items() if a.dtype != torch.float32}
        if reduced:  # the sharded arrays, their state and checkpoints are float32 throughout
            raise NotImplementedError(
                f"sharding bf16 / fp16 ROBE arrays is not supported yet (groups {reduced}); shard the "
                "float32 module (the plain module trains bf16 / fp16 arrays)"
            )
        _warn_if_tag_meets_data_parallel(module, params, module_fqn)
        return ShardedRobeEmbeddingBagCollection(
            module,
            params,
            env,
            device=device,
            fused_config=self.fused_config_for(module),
            module_fqn=module_fqn,
        )


def _warn_if_tag_meets_data_parallel(
    module: RobeEmbeddingBagCollection, params: EmbeddingModuleShardingPlan, module_fqn: Optional[str]
) -> None:
    """An optimizer-in-backward tag does not reach data_parallel groups: their arrays are
    all-reduced by DDP and stepped by the dense optimizer (as torchrec's data-parallel tables).
    Say so once per module instead of silently training them with another optimizer."""
    tagged = arrays_config(dict(module.arrays.items()))
    dp = sorted(g for g, p in params.items() if p.sharding_type == ShardingType.DATA_PARALLEL.value)
    if tagged is not None and dp:
        warnings.warn(
            f"{module_fqn or 'RobeEmbeddingBagCollection'}: ROBE group(s) {dp} are data_parallel, so the optimizer "
            f"in backward ({tagged.optimizer}) does not apply to them: DDP all-reduces their gradient and your "
            "dense optimizer steps them, as for torchrec's data-parallel tables (plan them table_wise / row_wise "
            "to keep the fused optimizer)",
            UserWarning,
            stacklevel=3,
        )
