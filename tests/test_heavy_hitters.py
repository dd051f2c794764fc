"""SpaceSavingSketch against exact counts (collections.Counter) of Zipf and flat streams."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from robe_torchrec.modules.heavy_hitters import SpaceSavingSketch


def _zipf_stream(n: int, vocab: int, s: float, seed: int) -> torch.Tensor:
    """Ids with P(rank r) ~ r^-s over ``vocab`` ranks, scrambled to large int64 ids (negatives too)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** s
    ranks = rng.choice(vocab, size=n, p=p / p.sum())
    labels = rng.integers(-(2**62), 2**62, size=vocab)
    return torch.from_numpy(labels[ranks])


def _feed(sketch: SpaceSavingSketch, stream: torch.Tensor, batch: int) -> None:
    for i in range(0, stream.numel(), batch):
        sketch.update(stream[i : i + batch])


def _check_bounds(sketch: SpaceSavingSketch, exact: Counter, total: int) -> None:
    ids, counts, errors = sketch.entries()
    for i, c, e in zip(ids.tolist(), counts.tolist(), errors.tolist()):
        true = exact.get(i, 0)
        assert c - e - 1e-3 <= true <= c + 1e-3, (i, true, c, e)
        assert e <= total / sketch.capacity + 1e-3
    floor = sketch.min_count()
    assert floor <= total / sketch.capacity + 1e-3
    monitored = set(ids.tolist())
    for i, c in exact.items():
        if i not in monitored:
            assert c <= floor + 1e-3, (i, c, floor)
    assert float(sketch.total) == pytest.approx(total)


@pytest.mark.parametrize("batch", [1, 97, 4096])
def test_zipf_top_ids_found_and_bounds_hold(batch):
    stream = _zipf_stream(60_000, 50_000, 1.1, seed=batch)
    sketch = SpaceSavingSketch(256)
    _feed(sketch, stream, batch)
    exact = Counter(stream.tolist())
    _check_bounds(sketch, exact, stream.numel())
    # every id heavier than N / capacity is monitored; the true top 20 are the sketch's top 20
    ranked = exact.most_common()
    true_top = [i for i, _ in ranked[:20]]
    got, _, got_err = sketch.topk(20)
    assert set(true_top[:10]) <= set(got.tolist())
    # the sketch's top 20 are the true top 20 up to ties within the error bound
    slack = float(got_err.max())
    assert all(exact[i] >= ranked[19][1] - slack for i in got.tolist())
    assert sum(exact[i] for i in got.tolist()) >= sum(c for _, c in ranked[:20]) - 20 * slack
    # with bincount over ranks as a second exact reference: estimates of the top ids are tight
    upper, lower = sketch.estimate(torch.tensor(true_top))
    for i, u, lo in zip(true_top, upper.tolist(), lower.tolist()):
        assert lo <= exact[i] <= u and (u - lo) <= 0.05 * exact[i] + 1


def test_weighted_updates_and_decay_keep_bounds():
    stream = _zipf_stream(20_000, 5_000, 1.2, seed=7)
    w = torch.rand(stream.numel(), generator=torch.Generator().manual_seed(0)) * 2
    sketch = SpaceSavingSketch(64)
    exact: Counter = Counter()
    for i in range(0, stream.numel(), 1000):
        ids, ws = stream[i : i + 1000], w[i : i + 1000]
        sketch.update(ids, ws)
        for a, b in zip(ids.tolist(), ws.tolist()):
            exact[a] += b
        if i % 4000 == 0:
            sketch.decay(0.5)
            for a in exact:
                exact[a] *= 0.5
    total = sum(exact.values())
    ids, counts, errors = sketch.entries()
    for i, c, e in zip(ids.tolist(), counts.tolist(), errors.tolist()):
        assert c - e - 1e-2 <= exact[i] <= c + 1e-2
    assert sketch.min_count() <= total / 64 + 1e-2
    assert float(sketch.total) == pytest.approx(total, rel=1e-5)
    top = max(exact, key=exact.get)
    assert sketch.topk(1)[0].item() == top


def test_not_full_sketch_is_exact_and_estimates_unseen_as_zero():
    stream = torch.tensor([5, 5, 5, -3, 7, 7, 2**62, 5])
    sketch = SpaceSavingSketch(10)
    sketch.update(stream[:4])
    sketch.update(stream[4:])
    ids, counts, errors = sketch.entries()
    assert ids.tolist() == [5, 7, -3, 2**62] and counts.tolist() == [4, 2, 1, 1]
    assert errors.abs().sum() == 0 and not sketch.is_full() and sketch.min_count() == 0
    upper, lower = sketch.estimate(torch.tensor([5, 123]))
    assert upper.tolist() == [4, 0] and lower.tolist() == [4, 0]


def test_flat_stream_has_no_confident_heavy_hitter():
    gen = torch.Generator().manual_seed(3)
    stream = torch.randint(0, 100_000, (50_000,), generator=gen)
    sketch = SpaceSavingSketch(128)
    _feed(sketch, stream, 2048)
    exact = Counter(stream.tolist())
    _check_bounds(sketch, exact, stream.numel())
    # guaranteed counts (count - error) are tiny: no id provably carries traffic
    _, counts, errors = sketch.entries()
    assert float((counts - errors).max()) <= max(exact.values())


def test_state_dict_round_trip_and_bad_input():
    stream = _zipf_stream(5000, 1000, 1.1, seed=1)
    a = SpaceSavingSketch(32)
    _feed(a, stream, 512)
    b = SpaceSavingSketch(32)
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.entries(), b.entries()):
        assert torch.equal(x, y)
    assert a.nbytes() == 32 * 16 + 16
    with pytest.raises(ValueError, match="capacity"):
        SpaceSavingSketch(0)
    with pytest.raises(ValueError, match="weights"):
        a.update(torch.tensor([1, 2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        a.update(torch.tensor([1]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="decay"):
        a.decay(0.0)
