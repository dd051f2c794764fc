"""SpaceSavingSketch: the heaviest ids of one table's id stream, in bounded memory.

Why a sketch: the frequency-aware ROBE collection gives the hottest ids an exact row, and must
find them online, during training, without a vocabulary. Space-saving (Metwally et al. 2005)
keeps ``capacity`` (id, count, error) entries and guarantees, for a stream of total weight N:

* a monitored id's true count lies in ``[count - error, count]``;
* an unmonitored id's true count is at most ``min_count()`` (0 while the sketch is not full);
* ``min_count() <= N / capacity``, so every id with true count above ``N / capacity`` is monitored.

The update takes a whole batch at once (vectorised torch, no Python loop over ids): the batch's
exact counts are merged into the sketch as two space-saving summaries are merged (an id missing from
the full sketch enters with ``min_count()`` added to its count and its error), then the
``capacity`` largest estimates are kept. Cost per batch: O((capacity + n) log(capacity + n)) for n
ids. The three guarantees above still hold after the merge (see ``update``). Optional exponential
decay (``decay(gamma)``) scales counts, errors and N together, so the bounds then hold for the
decayed stream. State lives in buffers: the sketch is in its module's state dict.
On CPU the frequency-aware collection updates all its sketches in one C++ call
(``robe_torchrec.ops.frequency_cpu.space_saving_update_many``), tested bit-identical to ``update``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


class SpaceSavingSketch(nn.Module):
    """Space-saving heavy-hitter sketch over int64 ids with float32 (decayable) counts.

    Memory: ``capacity * 16`` bytes (int64 id, float32 count, float32 error) plus two scalars.
    """

    def __init__(self, capacity: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"SpaceSavingSketch capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.register_buffer("ids", torch.zeros(capacity, dtype=torch.int64, device=device))
        self.register_buffer("counts", torch.zeros(capacity, dtype=torch.float32, device=device))
        self.register_buffer("errors", torch.zeros(capacity, dtype=torch.float32, device=device))
        self.register_buffer("size", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("total", torch.zeros((), dtype=torch.float64, device=device))

    # ----- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.size)

    def nbytes(self) -> int:
        """Bytes of the sketch's state (what a byte budget must count)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def is_full(self) -> bool:
        return int(self.size) == self.capacity

    def min_count(self) -> float:
        """Upper bound on the count of any unmonitored id (0 until the sketch is full)."""
        return float(self.counts[: int(self.size)].min()) if self.is_full() else 0.0

    def entries(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, counts, errors) of the monitored ids, by count descending, ties by id ascending."""
        n = int(self.size)
        ids, counts, errors = self.ids[:n], self.counts[:n], self.errors[:n]
        order = _order_desc(ids, counts)
        return ids[order], counts[order], errors[order]

    def topk(self, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``k`` (or fewer) monitored ids with the largest estimated counts: (ids, counts, errors)."""
        ids, counts, errors = self.entries()
        return ids[:k], counts[:k], errors[:k]

    def estimate(self, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(upper, lower) bounds on the true counts of ``ids``: ``[count, count - error]`` for a
        monitored id, ``[min_count(), 0]`` for any other."""
        ids = ids.to(torch.int64)
        n = int(self.size)
        if n == 0:
            zero = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
            return zero, zero.clone()
        sid, sort = torch.sort(self.ids[:n])
        pos = torch.searchsorted(sid, ids).clamp_(max=n - 1)
        hit = sid[pos] == ids
        counts, errors = self.counts[:n][sort][pos], self.errors[:n][sort][pos]
        upper = torch.where(hit, counts, torch.full_like(counts, self.min_count()))
        lower = torch.where(hit, counts - errors, torch.zeros_like(counts))
        return upper, lower

    # ----- updating -------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, ids: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Count a batch of ids (optionally weighted by non-negative ``weights``).

        Merge of the sketch S (full or not) with the batch's exact counts c: an id in S gets
        ``count + c``; a new id gets ``c + m`` with error ``+ m``, where ``m = min_count()``
        bounds its true past count (0 if S was never full: then every past id is monitored).
        The ``capacity`` largest estimates are kept. The invariants hold: estimates never go below
        the truth (every true past count is <= its count or <= m), an evicted id's estimate was at
        most the new minimum, and each kept new id replaces an entry whose count was >= m, so the
        sum of counts grows by at most the batch's weight: sum <= N, hence min <= N / capacity.
        """
        ids = ids.reshape(-1).to(torch.int64)
        if ids.numel() == 0:
            return
        if weights is None:
            uniq, batch_counts = torch.unique(ids, return_counts=True)
            batch_counts = batch_counts.to(torch.float32)
            weight = float(ids.numel())
        else:
            weights = weights.reshape(-1).to(torch.float32)
            if weights.shape != ids.shape:
                raise ValueError(f"update: {weights.numel()} weights for {ids.numel()} ids")
            if bool((weights < 0).any()):
                raise ValueError("update: weights must be non-negative")
            uniq, inv = torch.unique(ids, return_inverse=True)
            batch_counts = torch.zeros(uniq.numel(), dtype=torch.float32, device=ids.device)
            batch_counts.index_add_(0, inv, weights)
            weight = float(weights.sum())
        n = int(self.size)
        floor = self.min_count()
        cand = torch.cat([self.ids[:n], uniq])
        merged, inv = torch.unique(cand, return_inverse=True)
        counts = torch.zeros(merged.numel(), dtype=torch.float32, device=ids.device)
        errors = torch.zeros_like(counts)
        monitored = torch.zeros(merged.numel(), dtype=torch.bool, device=ids.device)
        counts.index_add_(0, inv[:n], self.counts[:n])
        errors.index_add_(0, inv[:n], self.errors[:n])
        monitored[inv[:n]] = True
        counts.index_add_(0, inv[n:], batch_counts)
        if floor > 0:
            counts[~monitored] += floor
            errors[~monitored] += floor
        keep = _order_desc(merged, counts)[: self.capacity]
        k = keep.numel()
        self.ids[:k] = merged[keep]
        self.counts[:k] = counts[keep]
        self.errors[:k] = errors[keep]
        self.size.fill_(k)
        self.total += weight

    @torch.no_grad()
    def decay(self, gamma: float) -> None:
        """Multiply every count, error and the stream weight by ``gamma`` in (0, 1]: the bounds
        then hold for the exponentially decayed stream (recent traffic weighs more)."""
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"decay factor must be in (0, 1], got {gamma}")
        self.counts.mul_(gamma)
        self.errors.mul_(gamma)
        self.total.mul_(gamma)


def _order_desc(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Indices sorting by count descending, ties broken by id ascending (deterministic)."""
    by_id = torch.argsort(ids)
    by_count = torch.argsort(-counts[by_id], stable=True)
    return by_id[by_count]
