"""CPU fast path of the frequency-aware collection's per-step bookkeeping (``csrc/frequency_cpu.cpp``).

Why: at Z = 32 plain ROBE's step is ~5 ms, and the frequency-aware module's hundreds of small torch
ops per step (26 sketch merges, per-feature binary searches, the hot/cold split, the hot gather)
cost several times that. These four functions do the same work in a few C++ loops and give
bit-identical results to the torch code they replace (which stays the reference and the fallback:
``is_available()`` is False when the extension cannot be built). All tensors are CPU tensors.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from robe_torchrec.ops.jit_extension import JitExtension

EXTENSION = JitExtension(
    name="robe_torchrec_frequency_cpu_v2",
    sources=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "frequency_cpu.cpp")],
    what="the frequency-aware CPU ops",
    fallback="the frequency-aware module then uses its torch path",
)


def is_available() -> bool:
    """True if the extension is built (building it now if needed) and loads; never raises."""
    return EXTENSION.is_available()


def space_saving_update_many(ids: torch.Tensor, bounds: torch.Tensor, feature_sketch: torch.Tensor,
                             sketches: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
                             ) -> None:
    """Unweighted ``SpaceSavingSketch.update`` of every sketch at once, in place.

    Args:
        ids: int64 ``[N]``, all features' ids back to back.
        bounds: int64 ``[F + 1]``: feature f's ids are ``ids[bounds[f]:bounds[f + 1]]``.
        feature_sketch: int64 ``[F]``: which sketch counts feature f (-1: none); a sketch fed by
            several features counts the concatenation of their ids.
        sketches: per sketch its buffers ``(ids, counts, errors, size, total)``.
    """
    cols: List[List[torch.Tensor]] = [list(c) for c in zip(*sketches)] if sketches else [[], [], [], [], []]
    EXTENSION.load().space_saving_update_many(ids, bounds, feature_sketch, *cols)


def hot_cold_split(ids: torch.Tensor, offsets: torch.Tensor, batch: int, feature_table: torch.Tensor,
                   hot_ids: torch.Tensor, hot_slots: torch.Tensor, base: torch.Tensor, size: torch.Tensor,
                   feature_mean: torch.Tensor, weights: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over a batch: ``(cold_ids, cold_offsets, cold_weights, hot_slots, hot_bags, hot_weights)``.

    An id of feature f is hot if it is among ``hot_ids[base[t]:base[t] + size[t]]`` (sorted) of
    ``t = feature_table[f]`` (-1: no hot table). MEAN features (``feature_mean``) keep dividing by
    the full bag length: cold ids weigh ``cold_len / len``, hot ids ``1 / len`` (times ``weights``).
    ``cold_weights`` is None when there are neither weights nor MEAN features.
    """
    w = None if weights is None else weights.float().contiguous()
    out = EXTENSION.load().hot_cold_split(ids, offsets, int(batch), feature_table, hot_ids, hot_slots, base, size,
                                          feature_mean, w)
    return out[0], out[1], out[2], out[3], out[4], out[5]


def hot_pooled_add_(out: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, bags: torch.Tensor,
                    weights: torch.Tensor, batch: int) -> None:
    """``out += pooled`` in place, ``out`` ``[B, F*D]`` (bag ``f*B + b`` is ``out[b, f*D:(f+1)*D]``),
    ``pooled[bag] = zeros(D).index_add_(0, ..., rows[slots] * weights[:, None])`` over the bag's
    entries in order; ``bags`` non-decreasing. The torch path's (index_add_, transpose, +) sums."""
    EXTENSION.load().hot_pooled_add_(out, rows.detach().contiguous(), slots, bags, weights, int(batch))


def hot_pooled_grad(grad_out: torch.Tensor, slots: torch.Tensor, bags: torch.Tensor, weights: torch.Tensor,
                    num_slots: int, dim: int, batch: int) -> torch.Tensor:
    """Gradient ``[num_slots, dim]`` of the rows in :func:`hot_pooled_add_`:
    ``zeros.index_add_(0, slots, grad_out_bags[bags] * weights[:, None])``, same order."""
    return EXTENSION.load().hot_pooled_grad(grad_out, slots, bags, weights, int(num_slots), int(dim), int(batch))
