"""RobeEmbeddingBagCollection: a drop-in for torchrec's EmbeddingBagCollection backed by ROBE arrays.

Same inputs and outputs as ``torchrec.EmbeddingBagCollection`` (EmbeddingBagConfig in,
KeyedJaggedTensor -> KeyedTensor out, same keys, order and shapes), but every table reads its
rows from one flat learned array (or one of several named arrays), so memory is a budget rather
than a vocabulary. It subclasses ``EmbeddingBagCollectionInterface``, not
``EmbeddingBagCollection``: DistributedModelParallel and the planner match the exact type.
"""

# No `from __future__ import annotations` here: torch.jit.script of a traced collection reads
# this module's annotations (modules/traced_lookup.py).
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer

from robe_torchrec.config import RobeConfig
from robe_torchrec.modules.traced_lookup import traced_forward
from robe_torchrec.ops.layout import FeatureLayout, distinct_dims
from robe_torchrec.ops.lookup import KERNELS, robe_pooled_lookup
from robe_torchrec.optim import RobeFusedOptimizer, RobeFusedOptimizerConfig
from robe_torchrec.optim_in_backward import adopt_in_backward_optimizer, mark_robe_array

DEFAULT_GROUP = "default"
_EXTRA_STATE_KEY = "_extra_state"
DEBUG_CHECKS_ENV = "ROBE_TORCHREC_DEBUG_CHECKS"


def debug_checks_from_env() -> bool:
    """Whether ``ROBE_TORCHREC_DEBUG_CHECKS`` asks for the data-dependent KJT checks on every device."""
    return os.environ.get(DEBUG_CHECKS_ENV, "0").strip().lower() in ("1", "true", "on", "yes")


def _data_checks_on(module: nn.Module, device: torch.device) -> bool:
    """Check the lengths' values: always on CPU (free), elsewhere only with the module's
    ``debug_checks`` (modules that borrow ``_validated`` without the attribute: the env var)."""
    if device.type == "cpu":
        return True
    flag = getattr(module, "debug_checks", None)
    return debug_checks_from_env() if flag is None else bool(flag)


def _check_lengths(lengths: torch.Tensor, num_ids: int) -> None:
    """Lengths sum to the number of ids and none is negative (reads two values on the host)."""
    total, negative = torch.stack([lengths.sum().to(torch.int64), (lengths < 0).any().to(torch.int64)]).tolist()
    if total != num_ids:
        raise ValueError(f"KJT lengths sum to {total} but it has {num_ids} ids")
    if negative:
        raise ValueError("KJT has negative lengths")


class RobeEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """Pooled embeddings of many tables, read from ROBE arrays.

    Args:
        tables: torchrec table configs. ``num_embeddings`` only sizes ``from_compression`` and
            the default init range: every int64 id is valid. ``pooling`` SUM or MEAN.
        robe: one ``RobeConfig`` (one array, group ``"default"``, shared by all tables), or a
            dict ``{group_name: RobeConfig}`` of named arrays.
        table_to_group: with a dict ``robe``, the group of every table. Group membership is
            part of the model, never derived from the world size.
        is_weighted: pool with the KJT's per-id weights.
        device: where the arrays live; ``"meta"`` builds without memory (DMP then calls
            ``reset_parameters``).
        kernel: ``"auto"`` (triton on CUDA, C++ on CPU), ``"reference"``, ``"cpu"`` or
            ``"triton"``; see ``robe_torchrec.ops.lookup``.
        fused_optimizer: fuse this optimizer into backward (no gradient is left on the arrays;
            ``module.fused_optimizer`` holds lr and state). ``None``: arrays get a dense
            ``.grad`` for a plain torch optimizer / DDP (data-parallel training).

    Input contract: every configured feature must be a key of the KJT (missing ones raise);
    extra keys are ignored, as torchrec's EmbeddingBagCollection ignores them. Keys, dtypes and
    shapes are validated on every forward; that the lengths sum to the number of ids (and none is
    negative) is checked on CPU, and on a GPU only with ``module.debug_checks = True`` or
    ``ROBE_TORCHREC_DEBUG_CHECKS=1`` (it needs a device-to-host sync per forward). Ids may be any
    int64 (negative too: the hash reads the id's 64-bit two's-complement form) or int32.
    The array is ``arrays.<group>`` in the state dict.

    ``torchrec.fx.symbolic_trace`` traces it (one ``robe_traced_lookup`` node over the
    ``robe::pooled_forward`` op, see ``modules/traced_lookup.py``) and ``torch.jit.script`` compiles
    the traced graph, as torchrec's inference flow expects of an EBC.

    Precision: a group's array has its tables' ``EmbeddingBagConfig.data_type`` (FP32, BF16 or
    FP16, mapped as torchrec's ``data_type_to_dtype``; all tables of a group must agree; torchrec's
    unsharded EBC itself stores every non-FP32 table as float16), or whatever ``module.to(dtype)``
    makes it. Kernels read bf16 / fp16 arrays as float32 and pool in float32; the pooled output is
    then returned in the array's dtype, as torchrec's EmbeddingBagCollection returns its tables'
    dtype. Gradients and fused optimizer state are computed in float32 (the state stays float32
    across ``.to(dtype)``); a fused step rounds the array's new values to nearest even, or
    stochastically with ``RobeFusedOptimizerConfig(stochastic_rounding=True)`` (see
    ``docs/kernels.md``).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: Union[RobeConfig, Mapping[str, RobeConfig]],
        table_to_group: Optional[Mapping[str, str]] = None,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        kernel: str = "auto",
        fused_optimizer: Optional[RobeFusedOptimizerConfig] = None,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once(f"robe_torchrec.{self.__class__.__name__}")
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._robe_configs, self._table_to_group = _resolve_groups(tables, robe, table_to_group)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self._kernel = kernel
        #: Check KJT lengths against the ids on accelerators too (one device sync per forward;
        #: on CPU they are always checked). Default: ``ROBE_TORCHREC_DEBUG_CHECKS=1``.
        self.debug_checks = debug_checks_from_env()

        self._embedding_names: List[str] = [
            n for names in get_embedding_names_by_table(tables) for n in names
        ]
        self._lengths_per_embedding: List[int] = [
            t.embedding_dim for t in tables for _ in t.feature_names
        ]
        self._layouts: Dict[str, FeatureLayout] = {}
        # Canonical input order: group by group, then dim by dim (fast kernels take one dim per
        # call), tables in config order within.
        self._input_features: List[str] = []
        self._output_slots: List[int] = []  # where each canonical feature goes in the output
        slot_of = _output_slots_by_table(tables)
        for group, config in self._robe_configs.items():
            members = [t for t in tables if self._table_to_group[t.name] == group]
            members = [t for d in distinct_dims([t.embedding_dim for t in members]) for t in members if t.embedding_dim == d]
            feats = [(f, t) for t in members for f in t.feature_names]
            self._layouts[group] = FeatureLayout(
                feature_names=tuple(f for f, _ in feats),
                table_names=tuple(t.name for _, t in feats),
                dims=tuple(t.embedding_dim for _, t in feats),
                mean=tuple(t.pooling == PoolingType.MEAN for _, t in feats),
                block_size=config.block_size,
                num_elements=config.num_elements,
                seed=config.seed,
            )
            self._input_features.extend(f for f, _ in feats)
            self._output_slots.extend(slot_of[(t.name, f)] for f, t in feats)
        self._needs_output_permute = self._output_slots != sorted(self._output_slots)

        self.arrays = _RobeArrays(
            {
                group: nn.Parameter(
                    torch.empty(
                        config.num_elements,
                        dtype=_group_dtype([t for t in tables if self._table_to_group[t.name] == group], group),
                        device=self._device,
                    )
                )
                for group, config in self._robe_configs.items()
            },
            init_ranges={
                group: config.resolved_init_range(
                    [t for t in tables if self._table_to_group[t.name] == group]
                )
                for group, config in self._robe_configs.items()
            },
        )
        self._hash_keys: Dict[str, torch.Tensor] = {}
        # sha256 of the table names, once on the host: torch.compile cannot trace hashlib.
        self._host_hash_keys: Dict[str, torch.Tensor] = {g: lay.hash_keys(torch.device("cpu")) for g, lay in self._layouts.items()}
        self._fused_optimizer: Optional[RobeFusedOptimizer] = None
        if fused_optimizer is not None:
            self._fused_optimizer = RobeFusedOptimizer(
                self._named_arrays(),
                {f"arrays.{g}": c.block_size for g, c in self._robe_configs.items()},
                fused_optimizer,
            )
        self._register_load_state_dict_pre_hook(self._check_layout_before_load, with_module=False)
        self.reset_parameters()

    # ----- torchrec interface -----------------------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def robe_configs(self) -> Dict[str, RobeConfig]:
        """The arrays of this collection, by group name."""
        return dict(self._robe_configs)

    def table_to_group(self) -> Dict[str, str]:
        """The array group of every table."""
        return dict(self._table_to_group)

    def feature_layouts(self) -> Dict[str, FeatureLayout]:
        """Per group, the features it pools in kernel input order (used by kernels and sharding)."""
        return dict(self._layouts)

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The optimizer fused into backward (torchrec's FusedOptimizerModule interface); an empty
        one when the arrays are trained by a dense optimizer (DMP collects it either way)."""
        adopt_in_backward_optimizer(self)  # torchrec's apply_optimizer_in_backward idiom
        if self._fused_optimizer is None:
            return EmptyFusedOptimizer()
        self._fused_optimizer.ensure_bound(self._named_arrays())
        return self._fused_optimizer

    @property
    def kernel(self) -> str:
        return self._kernel

    def _named_arrays(self) -> Dict[str, nn.Parameter]:
        return {f"arrays.{g}": p for g, p in self.arrays.items()}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "RobeEmbeddingBagCollection":
        """Move the fused optimizer's state along with the arrays (.to, .cuda, to_empty)."""
        super()._apply(fn, *args, **kwargs)
        if self._fused_optimizer is not None:
            self._fused_optimizer.rebind(self._named_arrays(), move=fn)
        if len(self.arrays):
            self._device = next(iter(self.arrays.values())).device
        return self

    def reset_parameters(self) -> None:
        """Uniform(-r, r) init of every array (see RobeConfig.init_range) and zero optimizer
        state; arrays still on meta are skipped."""
        self.arrays.reset_parameters()
        if self._fused_optimizer is not None:
            self._fused_optimizer.rebind(self._named_arrays())
            self._fused_optimizer.reset_state()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pool every configured feature of ``features``; output keys as torchrec's EBC."""
        if isinstance(features, torch.fx.Proxy):  # torchrec.fx.symbolic_trace: see modules/traced_lookup.py
            return traced_forward(self, features)
        features = self._validated(features)
        batch_size = features.stride()
        values = features.values()
        ids = values if values.dtype == torch.int64 else values.to(torch.int64)
        offsets = _offsets_of(features)
        weights = features.weights_or_none() if self._is_weighted else None
        adopt_in_backward_optimizer(self)  # torchrec's apply_optimizer_in_backward idiom
        if self._fused_optimizer is not None:
            self._fused_optimizer.ensure_bound(self._named_arrays())

        outputs: List[torch.Tensor] = []
        first_feature = 0
        for group, layout in self._layouts.items():
            f0, f1 = first_feature, first_feature + layout.num_features
            first_feature = f1
            array = self.arrays[group]
            # One group's bags are a window of the KJT's offsets; the kernels take the whole
            # batch's ids and weights with it, so no offset is read on the host.
            pooled_group = robe_pooled_lookup(
                    array,
                    ids,
                    offsets[f0 * batch_size : f1 * batch_size + 1],
                    layout,
                    self._keys_for(group),
                    batch_size,
                    weights,
                    kernel=self._kernel,
                    fused_optimizer=None if self._fused_optimizer is None else self._fused_optimizer.kernel_args(array),
                )
            # float32 from the kernels; a bf16 / fp16 array's group is returned in its dtype (torchrec's EBC)
            outputs.append(pooled_group if pooled_group.dtype == array.dtype else pooled_group.to(array.dtype))
        pooled = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if self._needs_output_permute:
            pooled = self._to_output_order(pooled)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=pooled,
        )

    # ----- helpers --------------------------------------------------------------------------------

    def _keys_for(self, group: str) -> torch.Tensor:
        """Table keys of a group on the array's device, copied there once (computed at init)."""
        device = self.arrays[group].device
        cached = self._hash_keys.get(group)
        if cached is None or cached.device != device:
            cached = self._host_hash_keys[group].to(device)
            if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):  # traced: may be fake
                self._hash_keys[group] = cached
        return cached

    def _to_output_order(self, pooled: torch.Tensor) -> torch.Tensor:
        chunks = pooled.split([self._lengths_per_embedding[s] for s in self._output_slots], dim=1)
        ordered: List[Optional[torch.Tensor]] = [None] * len(chunks)
        for chunk, slot in zip(chunks, self._output_slots):
            ordered[slot] = chunk
        return torch.cat(ordered, dim=1)  # type: ignore[arg-type]

    def _validated(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Check the KJT against the configs and bring it into canonical feature order.

        Keys, dtypes and every shape are checked on every call (no device sync). The values of
        the lengths (they sum to the number of ids, none is negative) are checked where that is
        free, on CPU tensors, and elsewhere only with ``debug_checks`` (a GPU sync per forward).
        """
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(
                f"{type(self).__name__} expects a KeyedJaggedTensor, got {type(features).__name__}"
            )
        keys = features.keys()
        missing = [f for f in self._input_features if f not in keys]
        if missing:
            raise ValueError(
                f"KeyedJaggedTensor is missing configured feature(s) {missing}; it has keys {keys}"
            )
        if features.variable_stride_per_key() or features.inverse_indices_or_none() is not None:
            raise ValueError("variable batch size per feature (VBE) is not supported yet")
        values = features.values()
        if values.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"KeyedJaggedTensor ids must be int64 or int32, got {values.dtype}")
        weights = features.weights_or_none()
        if self._is_weighted and weights is None:
            raise ValueError("this collection is weighted (is_weighted=True) but the KJT has no weights")
        if not self._is_weighted and weights is not None:
            raise ValueError(
                "the KJT carries weights but this collection is unweighted; "
                "build it with is_weighted=True to pool with them"
            )
        if weights is not None and (not weights.is_floating_point() or weights.numel() != values.numel()):
            raise ValueError(
                f"KJT weights must be floating point with one weight per id: got {weights.dtype} "
                f"with {weights.numel()} weights for {values.numel()} ids"
            )
        lengths = features.lengths()
        if lengths.numel() != len(keys) * features.stride():
            raise ValueError(
                f"KJT has {lengths.numel()} lengths for {len(keys)} keys x batch {features.stride()}"
            )
        offsets = features.offsets_or_none()
        if offsets is not None and offsets.numel() != lengths.numel() + 1:
            raise ValueError(f"KJT has {offsets.numel()} offsets for {lengths.numel()} bags (expected bags + 1)")
        # Under torch.compile / export the host read would break the graph (or fail on a dynamic
        # number of ids): the lookup op then checks the bag window itself when it runs.
        if _data_checks_on(self, values.device) and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            _check_lengths(lengths, values.numel())
        if list(keys) != self._input_features:
            features = features.permute([keys.index(f) for f in self._input_features])
        return features

    # ----- checkpoints ----------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        """The ROBE layout; a state dict is only meaningful under the same layout."""
        return {"groups": {g: c.layout() for g, c in self._robe_configs.items()}}

    def set_extra_state(self, state: Any) -> None:
        # Checked (before any tensor is copied) in _check_layout_before_load.
        pass

    def _check_layout_before_load(
        self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + _EXTRA_STATE_KEY)
        if saved is None:
            return  # strict loading reports the missing key itself
        mine = self.get_extra_state()
        if saved != mine:
            raise ValueError(
                "refusing to load a ROBE state dict made with a different layout "
                "(the array would mean something else): "
                f"checkpoint has {saved['groups'] if isinstance(saved, dict) else saved!r}, "
                f"this module has {mine['groups']}"
            )


class _RobeArrays(nn.ParameterDict):
    """The arrays, by group, with their own ``reset_parameters``: DistributedModelParallel
    materialises meta parameters module by module and resets the module that owns them."""

    def __init__(self, params: Dict[str, nn.Parameter], init_ranges: Dict[str, float]) -> None:
        super().__init__(params)
        self._init_ranges = dict(init_ranges)
        self._mark_arrays()

    def _mark_arrays(self) -> None:
        """Mark the arrays (``robe_torchrec.apply_optimizer_in_backward`` recognises them by it),
        again after anything that may replace the Parameter objects: ``to`` / ``to_empty``
        (``_apply``) and copy / unpickle (``__setstate__``)."""
        for param in self.values():
            mark_robe_array(param)

    def _apply(self, fn: Any, recurse: bool = True) -> "_RobeArrays":
        out = super()._apply(fn, recurse)
        self._mark_arrays()
        return out

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._mark_arrays()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for group, param in self.items():
                if param.device.type != "meta":
                    r = self._init_ranges[group]
                    param.uniform_(-r, r)


def _resolve_groups(
    tables: Sequence[EmbeddingBagConfig],
    robe: Union[RobeConfig, Mapping[str, RobeConfig]],
    table_to_group: Optional[Mapping[str, str]],
) -> "tuple[Dict[str, RobeConfig], Dict[str, str]]":
    """Validate tables and groups; return ({group: config}, {table: group})."""
    if not tables:
        raise ValueError("RobeEmbeddingBagCollection needs at least one table")
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate table name(s) {dup}")
    for t in tables:
        if not t.feature_names:
            t.feature_names = [t.name]  # torchrec's EBC does the same
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (SUM or MEAN)")
    if isinstance(robe, RobeConfig):
        if table_to_group is not None and set(table_to_group.values()) - {DEFAULT_GROUP}:
            raise ValueError("table_to_group needs robe={group_name: RobeConfig}, got one RobeConfig")
        configs = {DEFAULT_GROUP: robe}
        mapping = {t.name: DEFAULT_GROUP for t in tables}
    else:
        configs = dict(robe)
        if not configs:
            raise ValueError("robe must be a RobeConfig or a non-empty {group: RobeConfig} dict")
        for g, c in configs.items():
            if not isinstance(c, RobeConfig):
                raise TypeError(f"robe[{g!r}] must be a RobeConfig, got {type(c).__name__}")
        if table_to_group is None:
            if len(configs) != 1:
                raise ValueError("several ROBE groups need table_to_group={table_name: group_name}")
            (only,) = configs
            mapping = {t.name: only for t in tables}
        else:
            mapping = dict(table_to_group)
            unknown = sorted(set(mapping) - set(names))
            if unknown:
                raise ValueError(f"table_to_group names unknown table(s) {unknown}")
            unmapped = [n for n in names if n not in mapping]
            if unmapped:
                raise ValueError(f"table(s) {unmapped} have no group in table_to_group")
            bad = {n: g for n, g in mapping.items() if g not in configs}
            if bad:
                raise ValueError(f"table_to_group maps to unknown group(s) {bad}; groups are {list(configs)}")
        empty = [g for g in configs if g not in mapping.values()]
        if empty:
            raise ValueError(f"ROBE group(s) {empty} serve no table")
    for group, config in configs.items():
        config.validate_tables([t for t in tables if mapping[t.name] == group])
    return configs, mapping


_DTYPE_OF_DATA_TYPE = {DataType.FP32: torch.float32, DataType.BF16: torch.bfloat16, DataType.FP16: torch.float16}


def _group_dtype(tables: Sequence[EmbeddingBagConfig], group: str) -> torch.dtype:
    """The array dtype of one group: its tables' ``data_type`` (torchrec's ``data_type_to_dtype``
    mapping, restricted to the float formats the kernels train in)."""
    kinds = sorted({t.data_type for t in tables}, key=lambda d: d.value)
    if len(kinds) > 1:
        names = {t.name: t.data_type.name for t in tables}
        raise ValueError(f"ROBE group {group!r}: its tables share one array and need one data_type, got {names}")
    if kinds[0] not in _DTYPE_OF_DATA_TYPE:
        raise ValueError(
            f"ROBE group {group!r}: data_type {kinds[0].name} is not supported for a training array "
            f"(FP32, BF16 or FP16; int8 is a serving format, see QuantRobeEmbeddingBagCollection)"
        )
    return _DTYPE_OF_DATA_TYPE[kinds[0]]


def _output_slots_by_table(tables: Sequence[EmbeddingBagConfig]) -> Dict["tuple[str, str]", int]:
    """(table, feature) -> position of its pooled embedding in torchrec's EBC output order."""
    slots: Dict["tuple[str, str]", int] = {}
    for t in tables:
        for f in t.feature_names:
            slots[(t.name, f)] = len(slots)
    return slots


def _offsets_of(features: KeyedJaggedTensor) -> torch.Tensor:
    """Bag offsets [F*B + 1] of a KJT, computed with plain torch ops when the KJT has only lengths
    (torchrec would call an fbgemm op that the CPU build of fbgemm lacks for CUDA tensors)."""
    offsets = features.offsets_or_none()
    if offsets is not None:
        return offsets if offsets.dtype == torch.int64 else offsets.to(torch.int64)
    lengths = features.lengths()
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out
