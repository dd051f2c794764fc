"""``robe_ify``: compress any TorchRec model's EmbeddingBagCollections with ROBE, in one call.

    from torchrec.models.dlrm import DLRM
    import robe_torchrec

    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device="meta"), ...)
    model = robe_torchrec.robe_ify(model, ratio=1000, block_size=16, min_rows=10_000)
    # then train it as is, or plan + DistributedModelParallel with RobeEmbeddingBagCollectionSharder

Every ``torchrec.EmbeddingBagCollection`` found in the module tree (recursively; the root too)
is replaced by a :class:`RobeEmbeddingBagCollection` over the same tables and features (same
``is_weighted``, same device, ``meta`` included), whose array holds
``sum(num_embeddings * embedding_dim) / ratio`` elements. Tables with ``num_embeddings <
min_rows`` stay full tables: they go into a small stock ``EmbeddingBagCollection`` (their
weights copied from the original), and a :class:`RobeHybridEmbeddingBagCollection` merges both
outputs back into the original KeyedTensor (same keys, order and lengths). The rest of the model
is untouched, so its forward, its checkpoints of the dense parts and DMP sharding keep working.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from robe_torchrec.config import RobeConfig
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig

MAX_DEFAULT_BLOCK = 32


def default_block_size(tables: List[EmbeddingBagConfig], cap: int = MAX_DEFAULT_BLOCK) -> int:
    """The largest Z <= ``cap`` dividing every table's embedding_dim."""
    g = 0
    for t in tables:
        g = math.gcd(g, int(t.embedding_dim))
    return max(z for z in range(1, min(g, cap) + 1) if g % z == 0)


class RobeHybridEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A ROBE part and a full-table part behind one EmbeddingBagCollection interface.

    ``robe`` (a RobeEmbeddingBagCollection) and ``full`` (a stock EmbeddingBagCollection) serve
    disjoint subsets of ``tables``; the output is one KeyedTensor with exactly the keys, order and
    lengths a stock ``EmbeddingBagCollection(tables)`` would return. Both parts are ordinary
    submodules (``robe.`` / ``full.`` in the state dict), so DistributedModelParallel shards each
    with its own sharder (RobeEmbeddingBagCollectionSharder / torchrec's).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        robe: RobeEmbeddingBagCollection,
        full: EmbeddingBagCollection,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self.robe = robe
        self.full = full
        names = get_embedding_names_by_table(tables)
        self._keys: List[str] = [n for ns in names for n in ns]
        self._lengths: List[int] = [t.embedding_dim for t in tables for _ in t.feature_names]
        # (part, key in that part) for every output key, by table and position in the table.
        where: Dict[str, Tuple[str, List[str]]] = {}
        for part, sub in (("robe", robe), ("full", full)):
            sub_tables = sub.embedding_bag_configs()
            for t, ns in zip(sub_tables, get_embedding_names_by_table(sub_tables)):
                where[t.name] = (part, list(ns))
        self._sources: List[Tuple[str, str]] = []
        for t, ns in zip(tables, names):
            part, sub_names = where[t.name]
            self._sources.extend((part, s) for s in sub_names)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self.robe.device

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        parts = {"robe": self.robe(features).to_dict(), "full": self.full(features).to_dict()}
        values = torch.cat([parts[p][k] for p, k in self._sources], dim=1)
        return KeyedTensor(keys=self._keys, length_per_key=self._lengths, values=values, key_dim=1)


def _device_of(ebc: EmbeddingBagCollection) -> torch.device:
    dev = getattr(ebc, "device", None)
    if isinstance(dev, torch.device):
        return dev
    p = next(ebc.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _robe_version(
    ebc: EmbeddingBagCollection, ratio: float, block_size: Optional[int], seed: int, min_rows: int,
    kernel: str, fused_optimizer: Optional[RobeFusedOptimizerConfig],
) -> nn.Module:
    tables = list(ebc.embedding_bag_configs())
    robe_tables = [t for t in tables if t.num_embeddings >= min_rows]
    full_tables = [t for t in tables if t.num_embeddings < min_rows]
    if not robe_tables:
        return ebc  # every table is small: keep the original
    device = _device_of(ebc)
    z = block_size if block_size is not None else default_block_size(robe_tables)
    robe = RobeEmbeddingBagCollection(
        robe_tables, RobeConfig.from_compression(robe_tables, ratio, z, seed),
        is_weighted=ebc.is_weighted(), device=device, kernel=kernel, fused_optimizer=fused_optimizer,
    )
    if not full_tables:
        return robe
    full = EmbeddingBagCollection(full_tables, is_weighted=ebc.is_weighted(), device=device)
    with torch.no_grad():
        for t in full_tables:
            src = ebc.embedding_bags[t.name].weight
            dst = full.embedding_bags[t.name].weight
            if not src.is_meta and not dst.is_meta:
                dst.copy_(src)
    return RobeHybridEmbeddingBagCollection(tables, robe, full, is_weighted=ebc.is_weighted())


def robe_ify(
    model: nn.Module,
    ratio: float = 1000.0,
    block_size: Optional[int] = None,
    seed: int = 0,
    min_rows: int = 0,
    kernel: str = "auto",
    fused_optimizer: Optional[RobeFusedOptimizerConfig] = None,
) -> nn.Module:
    """Replace every stock ``EmbeddingBagCollection`` in ``model`` by a ROBE one (in place).

    Args:
        model: any ``nn.Module`` (or an EmbeddingBagCollection itself).
        ratio: compression: array elements = full-table elements of the replaced tables / ratio
            (one array per collection, rounded up, at least one block).
        block_size: ROBE block size Z; must divide every replaced table's embedding_dim.
            ``None``: the largest Z <= 32 that divides them all.
        seed: ROBE hash seed. Each collection gets ``seed + i`` (i = its index in module
            order), so two collections never share block placements.
        min_rows: tables with ``num_embeddings < min_rows`` stay full ``nn.EmbeddingBag``
            tables (weights kept); the output's keys, order and shapes are unchanged.
        kernel: lookup kernel of the ROBE collections (``auto``, ``reference``, ``cpu``, ``triton``).
        fused_optimizer: optional optimizer fused into the ROBE backward (single-process
            training); leave ``None`` for DMP (the sharder's ``fused_params`` decide) or a
            dense optimizer.

    Returns:
        ``model`` itself with its collections replaced, or the replacement when ``model`` is
        an EmbeddingBagCollection.
    """
    counter = [0]

    def convert(ebc: EmbeddingBagCollection) -> nn.Module:
        i = counter[0]
        counter[0] += 1
        return _robe_version(ebc, ratio, block_size, seed + i, min_rows, kernel, fused_optimizer)

    if type(model) is EmbeddingBagCollection:
        return convert(model)

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if type(child) is EmbeddingBagCollection:
                setattr(parent, name, convert(child))
            else:
                visit(child)

    visit(model)
    return model
