"""QuantRobeEmbeddingBagCollection: the inference twin of RobeEmbeddingBagCollection (int8 / bf16 / fp16 / fp32).

What torchrec's ``QuantEmbeddingBagCollection`` is to an ``EmbeddingBagCollection``: built from a
trained float module by ``from_float`` (which torchrec's ``quantize_inference_model`` calls through
its ``quantization_mapping``: torchrec's default one once ``robe_torchrec.modules`` is imported, see
:func:`register_default_quantization`, or :func:`robe_quantization_mapping`), same inputs and outputs (KJT in,
KeyedTensor out in torchrec's order), no gradients. The lookup is one ``robe::pooled_lookup_stored``
custom op (``robe_torchrec.ops.stored_lookup``) over every group at once, so the module traces
through ``torchrec.fx.symbolic_trace`` and ``torch.export`` and scripts with ``torch.jit.script``.

State: ``data`` (every group's array back to back, in the storage dtype), ``scale_bias`` (int8
row scales and biases; empty otherwise) and ``layout`` (int64 ``[groups, 4]``: hash version, m, Z,
seed); loading a state dict or an artifact with another layout is refused. Traced or scripted
graphs expect the KJT's keys in the configured order (torchrec's EBC order, what torchrec's own
inputs use); eager calls reorder other orders.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Type, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.config import RobeConfig
from robe_torchrec.hashing import HASH_VERSION, table_key
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.ops import stored_lookup  # noqa: F401  (registers torch.ops.robe.pooled_lookup_stored)
from robe_torchrec.ops.stored_lookup import STORAGE_DTYPES, quantize_rowwise_int8, storage_name

_STORAGE_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.uint8}


class QuantRobeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """ROBE arrays stored in ``storage`` (``int8``, ``bfloat16``, ``float16`` or ``float32``) for serving.

    Args:
        tables: the float module's table configs.
        robe: ``{group: RobeConfig}``.
        table_to_group: the group of every table.
        is_weighted: pool with the KJT's weights.
        storage: the arrays' storage format (see ``robe_torchrec.ops.stored_lookup``).
        device: where the stored arrays live.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: Mapping[str, RobeConfig],
        table_to_group: Mapping[str, str],
        is_weighted: bool = False,
        storage: str = "int8",
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self._storage = storage
        self._groups: List[str] = list(robe)
        self._robe_configs = dict(robe)
        self._table_to_group = dict(table_to_group)
        group_index = {g: i for i, g in enumerate(self._groups)}
        feats = [(f, t) for t in tables for f in t.feature_names]
        self._feature_names: List[str] = [f for f, _ in feats]
        self._dims: List[int] = [t.embedding_dim for _, t in feats]
        self._feature_groups: List[int] = [group_index[table_to_group[t.name]] for _, t in feats]
        self._embedding_names: List[str] = [n for names in get_embedding_names_by_table(tables) for n in names]
        configs = [robe[g] for g in self._groups]
        self._group_elements: List[int] = [c.num_elements for c in configs]
        self._group_block_sizes: List[int] = [c.block_size for c in configs]
        self._group_data_offsets: List[int] = _prefix_sums(self._group_elements)
        self._group_row_offsets: List[int] = _prefix_sums(
            [(c.num_elements + c.block_size - 1) // c.block_size for c in configs]
        )
        total = sum(self._group_elements)
        rows = sum((c.num_elements + c.block_size - 1) // c.block_size for c in configs)
        self.register_buffer("data", torch.zeros(total, dtype=_STORAGE_TORCH[storage], device=device))
        self.register_buffer(
            "scale_bias", torch.zeros(rows if storage == "int8" else 0, 2, dtype=torch.float32, device=device)
        )
        self.register_buffer("layout", _layout_tensor(configs, device))
        keys = [table_key(robe[table_to_group[t.name]].seed, t.name) for _, t in feats]
        self.register_buffer(
            "hash_keys", torch.tensor(keys, dtype=torch.int64, device=device).reshape(-1, 2), persistent=False
        )
        self.register_buffer(
            "mean", torch.tensor([t.pooling == PoolingType.MEAN for _, t in feats], device=device), persistent=False
        )
        self._register_load_state_dict_pre_hook(self._refuse_other_layout, with_module=False)

    # ----- construction from a trained float module -------------------------------------------------

    @classmethod
    def from_float(cls, module: RobeEmbeddingBagCollection, storage: Optional[str] = None) -> "QuantRobeEmbeddingBagCollection":
        """Quantize a trained RobeEmbeddingBagCollection. ``storage`` None: from ``module.qconfig``
        (set by torchrec's ``quantize_inference_model``: its weight dtype, int8 by default), else int8."""
        if not isinstance(module, RobeEmbeddingBagCollection):
            raise TypeError(f"from_float expects a RobeEmbeddingBagCollection, got {type(module).__name__}")
        if storage is None:
            qconfig = getattr(module, "qconfig", None)
            storage = storage_name(qconfig.weight().dtype) if qconfig is not None else "int8"
        device = next(iter(module.arrays.values())).device
        quant = cls(
            module.embedding_bag_configs(), module.robe_configs(), module.table_to_group(),
            is_weighted=module.is_weighted(), storage=storage, device=device,
        )
        with torch.no_grad():
            for g, group in enumerate(quant._groups):
                array = module.arrays[group].detach()
                lo, m = quant._group_data_offsets[g], quant._group_elements[g]
                if storage == "int8":
                    q, sb = quantize_rowwise_int8(array, quant._group_block_sizes[g])
                    r = quant._group_row_offsets[g]
                    quant.data[lo : lo + m] = q
                    quant.scale_bias[r : r + sb.shape[0]] = sb
                else:
                    quant.data[lo : lo + m] = array.to(quant.data.dtype)
        return quant

    # ----- torchrec interface ------------------------------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def storage(self) -> str:
        return self._storage

    def robe_configs(self) -> Dict[str, RobeConfig]:
        return dict(self._robe_configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of every configured feature, in torchrec's EBC output order."""
        if not torch.jit.is_scripting():
            features = self._in_configured_order(features)
        weights: Optional[torch.Tensor] = None
        if self._is_weighted:
            weights = features.weights()
        scale_bias: Optional[torch.Tensor] = None
        if self._storage == "int8":
            scale_bias = self.scale_bias
        pooled = torch.ops.robe.pooled_lookup_stored(
            self.data, scale_bias, features.values(), features.lengths(), weights, self.hash_keys, self.mean,
            self._dims, self._feature_groups, self._group_elements, self._group_block_sizes,
            self._group_data_offsets, self._group_row_offsets,
        )
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=pooled)

    @torch.jit.unused
    def _in_configured_order(self, features: Any) -> Any:
        """Eager / export: check the KJT and reorder its keys; under fx tracing (a Proxy) pass through."""
        if not isinstance(features, KeyedJaggedTensor):
            if isinstance(features, torch.fx.Proxy):
                return features
            raise TypeError(f"{type(self).__name__} expects a KeyedJaggedTensor, got {type(features).__name__}")
        keys = features.keys()
        if keys == self._feature_names:
            return features
        missing = [f for f in self._feature_names if f not in keys]
        if missing:
            raise ValueError(f"KeyedJaggedTensor is missing configured feature(s) {missing}; it has keys {keys}")
        return features.permute([keys.index(f) for f in self._feature_names])

    # ----- checkpoints / artifacts ---------------------------------------------------------------------

    def _refuse_other_layout(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "layout")
        if saved is not None and not torch.equal(saved.to(self.layout.device), self.layout):
            raise ValueError(
                "refusing to load a ROBE inference state made with a different layout (the arrays would "
                f"mean something else): it has [hash_version, m, Z, seed] per group {saved.tolist()}, "
                f"this module has {self.layout.tolist()}"
            )


def _prefix_sums(sizes: List[int]) -> List[int]:
    out, total = [], 0
    for s in sizes:
        out.append(total)
        total += s
    return out


def _layout_tensor(configs: List[RobeConfig], device: torch.device) -> torch.Tensor:
    rows = [[HASH_VERSION, c.num_elements, c.block_size, c.seed] for c in configs]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _robe_typename() -> str:
    from torchrec.inference.modules import trim_torch_package_prefix_from_typename

    return trim_torch_package_prefix_from_typename(torch.typename(RobeEmbeddingBagCollection))


def robe_quantization_mapping() -> Dict[str, Type[nn.Module]]:
    """torchrec's default ``quantization_mapping`` plus ROBE -> QuantRobe, for
    ``torchrec.inference.modules.quantize_inference_model(model, quantization_mapping=...)``
    (or for extending a mapping of your own: ``{**mine, **robe_quantization_mapping()}``)."""
    from torchrec.inference.modules import DEFAULT_QUANT_MAPPING

    mapping = dict(DEFAULT_QUANT_MAPPING)
    mapping[_robe_typename()] = QuantRobeEmbeddingBagCollection
    return mapping


def register_default_quantization() -> None:
    """Add ROBE -> QuantRobe to torchrec's ``DEFAULT_QUANT_MAPPING`` (idempotent).

    ``quantize_inference_model(model)`` without a ``quantization_mapping`` reads that public dict
    (typename -> quantized class) when it runs; torchrec has no registration function, and this
    adds one key for our own type only, so torchrec's entries and behaviour for every other module
    are unchanged. Called when ``robe_torchrec.modules`` is imported, which any process holding a
    RobeEmbeddingBagCollection has done."""
    from torchrec.inference.modules import DEFAULT_QUANT_MAPPING

    DEFAULT_QUANT_MAPPING.setdefault(_robe_typename(), QuantRobeEmbeddingBagCollection)
