"""Comparison points for the accuracy-per-byte benchmark (``robe_torchrec.bench.quality``).

Small modules with torchrec's EmbeddingBagCollection interface (KeyedJaggedTensor in,
KeyedTensor out, same keys, order and shapes), so ``torchrec.models.dlrm.DLRM`` takes them as its
``embedding_bag_collection``. They are benchmark baselines, not product features:

* :func:`full_tables`: torchrec's own ``EmbeddingBagCollection`` (one row per id, no compression),
  switched to sparse gradients so a sparse ``torch.optim.Adagrad`` touches only the rows a batch
  reads. Needs ids already in ``[0, num_embeddings)`` (a vocabulary index).
* :class:`HashingTrickEBC`: the hashing trick. Every id (any int64, negatives too) goes through a
  multiplicative hash to a non-negative 47-bit value, then modulo a smaller per-table full table.
* :class:`QREmbeddingBagCollection`: quotient-remainder compositional embeddings (Shi et al.,
  KDD 2020): an index ``x`` in ``[0, num_embeddings)`` is split into mixed-radix digits
  (remainder ``x mod b1``, quotient ``x // b1``, and, when the budget is below two square roots of
  the vocabulary, more digits: the paper's generalised complementary partitions); each digit has
  its own table and the digit embeddings are combined by element-wise multiplication. Every id
  gets a unique combination of rows (no collisions), so it needs a vocabulary index too.

Memory budgets are split over tables by :func:`water_fill_rows`: every table gets
``min(num_embeddings, cap)`` rows with one cap chosen so the total meets the budget, i.e. small
tables stay uncompressed and the big ones share what is left (the strongest simple allocation for
the hashing trick and QR; ROBE needs no allocation, all tables share one array).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

_MUL = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (odd: a bijection mod 2**64)
_HASH_BITS = 47


def mult_hash(ids: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Any int64 ids (negative too) -> non-negative int64 in ``[0, 2**47)``, well mixed.

    xor-shift, then a multiplicative (Fibonacci) hash whose top bits are kept; int64 multiplication
    wraps modulo 2**64 in torch, which is exactly what a multiplicative hash needs.
    """
    x = ids.to(torch.int64)
    if salt:
        x = x + (salt * 0x632BE59BD9B4E019 % (1 << 63))
    x = x ^ ((x >> 31) & ((1 << 33) - 1))  # logical shift: a bijection on 64-bit patterns
    x = x * _MUL
    return (x >> (64 - _HASH_BITS)) & ((1 << _HASH_BITS) - 1)


def water_fill_rows(cardinalities: Sequence[int], budget_rows: int) -> List[int]:
    """Rows per table: ``min(card, cap)`` with the largest cap whose total fits ``budget_rows``.

    Every table gets at least one row (so the total can exceed a budget smaller than the number
    of tables). Leftover rows from rounding go to the largest tables.
    """
    cards = [int(c) for c in cardinalities]
    if budget_rows >= sum(cards):
        return list(cards)
    lo, hi = 1, max(cards)
    while lo < hi:  # largest cap with sum(min(c, cap)) <= budget
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in cards) <= budget_rows:
            lo = mid
        else:
            hi = mid - 1
    rows = [min(c, lo) for c in cards]
    spare = budget_rows - sum(rows)
    for i in sorted(range(len(cards)), key=lambda i: -cards[i]):
        if spare <= 0:
            break
        if rows[i] < cards[i]:
            rows[i] += 1
            spare -= 1
    return rows


def _iroot_ceil(n: int, k: int) -> int:
    """Smallest integer r with r**k >= n."""
    if n <= 1:
        return 1
    r = max(1, int(round(n ** (1.0 / k))))
    while r**k < n:
        r += 1
    while r > 1 and (r - 1) ** k >= n:
        r -= 1
    return r


def qr_radices(cardinality: int, budget_rows: int) -> List[int]:
    """Mixed-radix digit table sizes ``[b1, b2, ...]`` with ``prod >= cardinality`` and
    ``sum <= budget_rows`` where possible.

    One table (no compression) when the budget holds the vocabulary; otherwise the fewest digits k
    that fit (k = 2 is the paper's quotient-remainder trick), with the remainder table ``b1`` as
    large as the budget allows and the other digits equal. If even ``k`` digits of size 2 do not
    fit, the smallest possible decomposition is returned (over budget; the benchmark reports the
    memory actually used).
    """
    n, r = int(cardinality), int(budget_rows)
    if r >= n or n <= 1:
        return [n]
    k = 2
    while True:
        b = _iroot_ceil(n, k)
        if k * b <= r or b <= 2:
            break
        k += 1
    rest = lambda b1: _iroot_ceil(-(-n // b1), k - 1)  # noqa: E731

    def fits(b1: int) -> bool:
        return b1 + (k - 1) * rest(b1) <= r

    if not fits(b):
        return [b] * k  # over budget: the smallest decomposition
    lo, hi = b, r  # largest b1 that still fits (the sum grows with b1 beyond the balanced point)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return [lo] + [rest(lo)] * (k - 1)


class _PooledBaseEBC(EmbeddingBagCollectionInterface):
    """What the baselines share: config bookkeeping and KJT -> KeyedTensor plumbing."""

    def __init__(self, tables: List[EmbeddingBagConfig], device: Optional[torch.device]) -> None:
        super().__init__()
        for t in tables:
            if not t.feature_names:
                t.feature_names = [t.name]
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling must be SUM or MEAN")
        self._tables = list(tables)
        self._device = device or torch.device("cpu")
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._lengths_per_embedding = [t.embedding_dim for t in tables for _ in t.feature_names]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self._device

    def _pool_table(self, table_index: int, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        by_key = features.to_dict()
        pooled: List[torch.Tensor] = []
        for i, t in enumerate(self._tables):
            for f in t.feature_names:
                jt = by_key[f]
                pooled.append(self._pool_table(i, jt.values(), jt.offsets()))
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._lengths_per_embedding,
            values=torch.cat(pooled, dim=1),
        )


def _bag(rows: int, dim: int, pooling: PoolingType, device: torch.device) -> nn.EmbeddingBag:
    """A sparse-gradient bag, torchrec's init: uniform(-sqrt(1/rows), sqrt(1/rows))."""
    mode = "sum" if pooling == PoolingType.SUM else "mean"
    bag = nn.EmbeddingBag(rows, dim, mode=mode, sparse=True, include_last_offset=True, device=device)
    r = math.sqrt(1.0 / rows)
    with torch.no_grad():
        bag.weight.uniform_(-r, r)
    return bag


class HashingTrickEBC(_PooledBaseEBC):
    """The hashing trick: table ``t`` has ``rows[t]`` rows; id -> ``mult_hash(id) % rows[t]``.

    Args:
        tables: nominal table configs (``num_embeddings`` only sizes the default budget split).
        rows: rows per table, e.g. ``water_fill_rows(cards, budget_rows)``.
        salt: varies the hash (a different collision pattern per seed).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        rows: Sequence[int],
        salt: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(tables, device)
        self.salt = int(salt)
        if len(rows) != len(tables) or min(rows) < 1:
            raise ValueError("rows needs one positive row count per table")
        self.rows = [int(r) for r in rows]
        self.embedding_bags = nn.ModuleDict(
            {t.name: _bag(r, t.embedding_dim, t.pooling, self._device) for t, r in zip(tables, self.rows)}
        )

    def _pool_table(self, i: int, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        t = self._tables[i]
        return self.embedding_bags[t.name](mult_hash(ids, self.salt) % self.rows[i], offsets)


class QREmbeddingBagCollection(_PooledBaseEBC):
    """Quotient-remainder compositional embeddings, one set of digit tables per table.

    Args:
        tables: table configs; ids must be vocabulary indices in ``[0, num_embeddings)``.
        radices: per table, the digit table sizes (``qr_radices``); ``[n]`` means a plain table.

    Digit ``j`` of index ``x`` is ``(x // (b1 * ... * b_{j-1})) % b_j`` (the last digit is not
    reduced modulo, it is already below ``b_k``). Row ``x``'s embedding is the element-wise
    product of its digits' rows; pooling (sum / mean) happens after the product, per id.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        radices: Sequence[Sequence[int]],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(tables, device)
        if len(radices) != len(tables):
            raise ValueError("radices needs one entry per table")
        self.radices = [[int(b) for b in r] for r in radices]
        for t, r in zip(tables, self.radices):
            if math.prod(r) < t.num_embeddings:
                raise ValueError(f"table {t.name!r}: radices {r} cannot index {t.num_embeddings} ids")
        self.digit_tables = nn.ModuleDict(
            {
                t.name: nn.ModuleList(
                    # unpooled digit rows (pooling after the product): an EmbeddingBag of bag size 1
                    [_bag(b, t.embedding_dim, PoolingType.SUM, self._device) for b in r]
                )
                for t, r in zip(tables, self.radices)
            }
        )

    def _pool_table(self, i: int, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        t = self._tables[i]
        digits = self.digit_tables[t.name]
        radices = self.radices[i]
        x = ids.to(torch.int64)
        single = torch.arange(x.numel() + 1, device=x.device)  # one id per "bag": row lookup
        emb: Optional[torch.Tensor] = None
        for j, (table, b) in enumerate(zip(digits, radices)):
            d = x if j == len(radices) - 1 else x % b
            rows = table(d, single)
            emb = rows if emb is None else emb * rows
            x = x // b
        assert emb is not None
        batch = offsets.numel() - 1
        seg = torch.repeat_interleave(torch.arange(batch, device=emb.device), offsets.diff())
        out = torch.zeros(batch, t.embedding_dim, dtype=emb.dtype, device=emb.device)
        out.index_add_(0, seg, emb)
        if t.pooling == PoolingType.MEAN:
            out = out / offsets.diff().clamp(min=1).unsqueeze(1).to(out.dtype)
        return out


def full_tables(tables: List[EmbeddingBagConfig], device: Optional[torch.device] = None) -> EmbeddingBagCollection:
    """torchrec's EmbeddingBagCollection with sparse gradients (for a sparse torch Adagrad)."""
    ebc = EmbeddingBagCollection(tables=tables, device=device or torch.device("cpu"))
    for bag in ebc.embedding_bags.values():
        bag.sparse = True
    return ebc


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters (the embedding memory; optimizer state not included)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def table_rows_summary(module: nn.Module) -> Dict[str, int]:
    """Parameter rows per named parameter (for logging)."""
    return {n: int(p.shape[0]) for n, p in module.named_parameters()}
