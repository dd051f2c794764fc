"""The frequency-aware C++ ops against the torch code they replace, bit for bit.

References: ``SpaceSavingSketch.update`` called per sketch (the unweighted torch merge) and the
module's torch split / gather (``_split_batch``, ``index_add_``)."""

from __future__ import annotations

import copy
from typing import List, Tuple

import numpy as np
import pytest
import torch

from robe_torchrec.modules.heavy_hitters import SpaceSavingSketch
from robe_torchrec.ops import frequency_cpu

pytestmark = pytest.mark.skipif(not frequency_cpu.is_available(), reason="frequency-aware CPU ops did not build")

I64 = torch.iinfo(torch.int64)


def _bits_equal(a: SpaceSavingSketch, b: SpaceSavingSketch) -> bool:
    """Every buffer identical, floats compared as bit patterns (the stale tail included)."""
    for x, y in zip(a.buffers(), b.buffers()):
        if x.dtype.is_floating_point:
            x, y = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64), y.view(
                torch.int32 if y.dtype == torch.float32 else torch.int64)
        if not torch.equal(x, y):
            return False
    return True


def _round(rng: np.random.Generator, features: int, vocab: int) -> Tuple[torch.Tensor, List[int]]:
    """One batch of ``features`` segments (some empty) of Zipf ids mapped to extreme int64 labels."""
    labels = np.concatenate([[I64.min, I64.max, -1, 0], rng.integers(I64.min, I64.max, size=vocab, dtype=np.int64)])
    p = 1.0 / np.arange(1, labels.size + 1) ** 1.1
    parts, bounds = [], [0]
    for _ in range(features):
        n = int(rng.choice([0, 1, 7, 300, 2048]))
        parts.append(labels[rng.choice(labels.size, size=n, p=p / p.sum())])
        bounds.append(bounds[-1] + n)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64)), bounds


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_update_many_bit_identical_to_per_sketch_update(decay):
    rng = np.random.default_rng(7)
    caps = [1, 3, 16, 64, 1000]  # small ones fill at once; 1000 stays not-full for a while
    feature_sketch = [0, 1, 2, 3, 4, 2, -1, 4]  # features 2 and 5 share a sketch, 6 is not counted
    ref = [SpaceSavingSketch(c) for c in caps]
    fast = [copy.deepcopy(s) for s in ref]
    fs = torch.tensor(feature_sketch, dtype=torch.int64)
    seen_not_full = False
    for r in range(60):
        ids, bounds = _round(rng, len(feature_sketch), vocab=3000)
        for i, s in enumerate(ref):
            parts = [ids[bounds[f]: bounds[f + 1]] for f, k in enumerate(feature_sketch) if k == i]
            s.update(torch.cat(parts))
        frequency_cpu.space_saving_update_many(
            ids, torch.tensor(bounds), fs, [(s.ids, s.counts, s.errors, s.size, s.total) for s in fast])
        for i, (a, b) in enumerate(zip(ref, fast)):
            assert _bits_equal(a, b), (r, i, a.entries(), b.entries())
        seen_not_full = seen_not_full or (0 < len(fast[4]) < fast[4].capacity)
        if decay < 1 and r % 5 == 4:
            for s in ref + fast:
                s.decay(decay)
    assert seen_not_full and all(s.is_full() for s in fast[:4])  # both branches ran
    assert float(fast[0].errors[0]) > 0  # the full sketch's floor was added


def test_update_many_empty_batch_and_no_sketches():
    s = SpaceSavingSketch(4)
    s.update(torch.tensor([5, 5, 9]))
    before = copy.deepcopy(s)
    frequency_cpu.space_saving_update_many(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0]),
                                           torch.tensor([0]), [(s.ids, s.counts, s.errors, s.size, s.total)])
    assert _bits_equal(s, before)
    frequency_cpu.space_saving_update_many(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([-1]), [])


def test_update_many_rejects_bad_input():
    s = SpaceSavingSketch(4)
    bufs = [(s.ids, s.counts, s.errors, s.size, s.total)]
    with pytest.raises(RuntimeError, match="bounds"):
        frequency_cpu.space_saving_update_many(torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([0]), bufs)
    with pytest.raises(RuntimeError, match="sketches"):
        frequency_cpu.space_saving_update_many(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1]), bufs)
    with pytest.raises(RuntimeError, match="int64|Long"):
        frequency_cpu.space_saving_update_many(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 2]),
                                               torch.tensor([0]), bufs)


def test_hot_pooled_add_and_grad_match_index_add():
    """Reference: the module's torch path (index_add_ into zeros, KeyedTensor transpose, + cold)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 16, generator=g)
    n, batch, features = 4000, 30, 10
    slots = torch.randint(0, 50, (n,), generator=g)
    bag = torch.sort(torch.randint(0, batch * features, (n,), generator=g)).values
    w = torch.rand(n, generator=g)
    cold = torch.randn(batch, features * 16, generator=g)
    pooled = torch.zeros(batch * features, 16).index_add_(0, bag, rows[slots] * w.unsqueeze(1))
    ref = cold + pooled.view(features, batch, 16).transpose(0, 1).reshape(batch, -1)
    out = cold.clone()
    frequency_cpu.hot_pooled_add_(out, rows, slots, bag, w, batch)
    assert torch.equal(out, ref)
    grad = torch.randn(batch, features * 16, generator=g)
    bags_grad = grad.view(batch, features, 16).transpose(0, 1).reshape(-1, 16)
    ref_g = torch.zeros(50, 16).index_add_(0, slots, bags_grad[bag] * w.unsqueeze(1))
    assert torch.equal(frequency_cpu.hot_pooled_grad(grad, slots, bag, w, 50, 16, batch), ref_g)
    with pytest.raises(RuntimeError, match="out of range"):
        frequency_cpu.hot_pooled_add_(out, rows, slots + 50, bag, w, batch)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        frequency_cpu.hot_pooled_add_(out, rows, slots, bag.flip(0), w, batch)
