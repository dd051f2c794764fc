"""Frequency-aware ROBE: lookups against exact rows + slow ROBE math, continuity of promotion and
demotion, checkpoints, layout refusal, budget, adaptivity (flat stream -> plain ROBE), training."""

from __future__ import annotations

import copy
from typing import Dict, List

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig, plan_capacities
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection as FreqEBC,
)
from robe_torchrec.optim import RobeFusedOptimizerConfig
from tests.slow_reference import embedding_row

CARDS = [6, 500, 20_000]
DIM = 8


def _tables(pooling=PoolingType.SUM) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=c, feature_names=[f"f{i}"], pooling=pooling)
        for i, c in enumerate(CARDS)
    ]


def _batch(rng: np.random.Generator, b: int = 64, s: float = 1.2, max_len: int = 1) -> KeyedJaggedTensor:
    vals, lens = [], []
    for c in CARDS:
        ln = rng.integers(0 if max_len > 1 else 1, max_len + 1, size=b)
        p = 1.0 / np.arange(1, c + 1) ** s
        vals.append(rng.choice(c, size=int(ln.sum()), p=p / p.sum()) * 7919 - 3)  # scrambled, some negative
        lens.append(ln)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(CARDS))],
        values=torch.from_numpy(np.concatenate(vals)).to(torch.int64),
        lengths=torch.from_numpy(np.concatenate(lens)).to(torch.int32),
    )


def _module(seed=0, fused=None, pooling=PoolingType.SUM, ratio=50, refresh=4, z=2, **cfg) -> FreqEBC:
    """A module with hot rows to exercise. gate=False: at D = 8 a hot row's id map and sketch
    entries cost more than its 4 D bytes, so the gate (tested on its own below) would plan none."""
    rng = np.random.default_rng(100)
    sample = [_batch(rng) for _ in range(8)]
    cfg.setdefault("gate", False)
    config = FrequencyAwareConfig(refresh_every=refresh, **cfg)
    torch.manual_seed(seed)
    return FreqEBC.from_compression(_tables(pooling), ratio, sample, block_size=z, seed=seed, config=config,
                                    kernel="auto", fused_optimizer=fused)


def _reference(m: FreqEBC, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Slow: per bag, per id, the exact row if the id is hot now, else the ROBE math of slow_reference."""
    array = m.robe.arrays["default"].detach().double().tolist()
    z, seed = m.robe.robe_configs()["default"].block_size, m.robe.robe_configs()["default"].seed
    hot = m.hot_set()
    rows = m.hot_rows.detach().double() if m.hot_capacities() and sum(m.hot_capacities().values()) else None
    cols = []
    for t in m.embedding_bag_configs():
        for f in t.feature_names:
            out = torch.zeros(kjt.stride(), DIM, dtype=torch.float64)
            for b, bag in enumerate(kjt[f].to_dense()):
                for idx in bag.tolist():
                    slot = hot.get(t.name, {}).get(idx)
                    out[b] += rows[slot] if slot is not None else torch.tensor(embedding_row(array, seed, t.name, idx, DIM, z), dtype=torch.float64)
                if t.pooling == PoolingType.MEAN and len(bag):
                    out[b] /= len(bag)
            cols.append(out)
    return torch.cat(cols, dim=1)


def _train(m: torch.nn.Module, rng: np.random.Generator, steps: int, opt=None) -> None:
    m.train()
    for _ in range(steps):
        out = m(_batch(rng)).values()
        loss = (out * torch.linspace(-1, 1, out.shape[1])).sum()
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()


def _single_id_kjt(table_ids: Dict[int, List[int]]) -> KeyedJaggedTensor:
    """One bag per id, the same number of bags for every feature (padded with empty bags)."""
    n = max(len(v) for v in table_ids.values())
    vals, lens = [], []
    for i in range(len(CARDS)):
        ids = table_ids.get(i, [])
        vals.extend(ids)
        lens.extend([1] * len(ids) + [0] * (n - len(ids)))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(CARDS))], values=torch.tensor(vals, dtype=torch.int64),
        lengths=torch.tensor(lens, dtype=torch.int32),
    )


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_lookup_matches_exact_rows_plus_slow_robe(pooling):
    m = _module(pooling=pooling, fused=RobeFusedOptimizerConfig("adagrad", lr=0.05))
    caps = m.hot_capacities()
    assert caps["t0"] == CARDS[0] and sum(caps.values()) > caps["t0"]  # skewed stream: hot rows planned
    rng = np.random.default_rng(1)
    _train(m, rng, 9)  # two refreshes: hot rows exist and have trained apart from ROBE
    assert all(len(v) > 0 for v in m.hot_set().values())
    m.eval()
    kjt = _batch(rng, b=16, max_len=3)
    got = m(kjt).values().double()
    torch.testing.assert_close(got, _reference(m, kjt), rtol=1e-5, atol=1e-6)
    assert m(kjt).keys() == ["f0", "f1", "f2"]


def test_promotion_keeps_embeddings_and_demotion_falls_back_to_robe():
    m = _module(fused=RobeFusedOptimizerConfig("adagrad", lr=0.05), refresh=10**6)
    rng = np.random.default_rng(2)
    _train(m, rng, 5)  # sketches fed, no refresh yet: everything is ROBE
    probe = {i: list(range(-3, 7919 * 40, 7919)) for i in range(3)}  # the hottest ranks of every table
    kjt = _single_id_kjt(probe)
    m.eval()
    before = m(kjt).values().clone()
    torch.testing.assert_close(before.double(), _reference(m, kjt), rtol=1e-5, atol=1e-6)
    moved = m.refresh()
    assert sum(p for p, _ in moved.values()) > 0
    after = m(kjt).values()
    assert torch.equal(before, after)  # promoted ids read the copy of their ROBE embedding
    # train, then force demotions by flattening the stream: demoted ids read ROBE again
    m.train()
    _train(m, rng, 4)
    m.eval()
    hot_before = m.hot_set()
    for s in m.sketches.values():
        s.counts.zero_()
        s.errors.zero_()
    moved = m.refresh()
    assert sum(d for _, d in moved.values()) == sum(len(v) for v in hot_before.values())
    assert all(len(v) == 0 for v in m.hot_set().values())
    torch.testing.assert_close(m(kjt).values().double(), _reference(m, kjt), rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_restores_hot_set_and_training_continues_identically():
    fused = RobeFusedOptimizerConfig("adagrad", lr=0.05)
    a = _module(fused=fused)
    rng = np.random.default_rng(3)
    _train(a, rng, 10)
    b = _module(seed=0, fused=fused)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.hot_set() == a.hot_set() and sum(map(len, a.hot_set().values())) > 0
    # the fused array state is the optimizer's (as for plain ROBE): carry it like a trainer would
    b.robe.fused_optimizer.load_state_dict(a.robe.fused_optimizer.state_dict())
    for x, y in zip(a.sketches.values(), b.sketches.values()):
        assert all(torch.equal(p, q) for p, q in zip(x.entries(), y.entries()))
    ra, rb = np.random.default_rng(4), np.random.default_rng(4)
    _train(a, ra, 6)
    _train(b, rb, 6)
    assert a.hot_set() == b.hot_set()
    kjt = _batch(np.random.default_rng(5))
    a.eval(), b.eval()
    assert torch.equal(a(kjt).values(), b(kjt).values())


def test_load_under_another_layout_is_refused():
    a = _module()
    for other in (_module(seed=1), _module(ratio=20), _module(refresh=8), _module(max_hot_fraction=0.2)):
        with pytest.raises(ValueError, match="different layout"):
            other.load_state_dict(a.state_dict())


def test_flat_stream_reduces_to_plain_robe():
    tables = _tables()
    gen = torch.Generator().manual_seed(0)
    sample = [
        KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1", "f2"], values=torch.cat([torch.randint(0, c, (512,), generator=gen) for c in [10**6] * 3]),
            lengths=torch.ones(3 * 512, dtype=torch.int32),
        )
        for _ in range(8)
    ]
    assert sum(plan_capacities(tables, 4 * 2000, sample, FrequencyAwareConfig()).values()) == 0
    torch.manual_seed(0)
    m = FreqEBC.from_compression(tables, 10, sample, block_size=4)
    torch.manual_seed(0)
    plain = RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, 10, block_size=4))
    assert m.memory_bytes() == sum(p.numel() * 4 for p in plain.parameters())
    kjt = sample[0]
    assert torch.equal(m(kjt).values(), plain(kjt).values())


def test_budget_counts_everything_and_is_met():
    for ratio in (10, 50, 500):
        m = _module(ratio=ratio)
        plain_bytes = 4 * RobeConfig.from_compression(_tables(), ratio, block_size=2).num_elements
        assert plain_bytes - 4 < m.memory_bytes() <= plain_bytes
        n_buffers = sum(b.numel() for b in m.buffers())
        assert n_buffers > 0 and sum(m.hot_capacities().values()) > 0
    with pytest.raises(ValueError, match="fewer than one block"):
        FreqEBC(_tables(), 200, {"t0": 6})
    with pytest.raises(ValueError, match="unknown table"):
        FreqEBC(_tables(), 10**6, {"nope": 1})
    with pytest.raises(ValueError, match="one embedding_dim"):
        FreqEBC(_tables() + [EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=5, feature_names=["x"])], 10**6)


def test_fused_training_equals_dense_torch_adagrad():
    """Hot rows and array stepped in backward == a torch Adagrad on the parameters (same hot set)."""
    fused = _module(fused=RobeFusedOptimizerConfig("adagrad", lr=0.05, eps=1e-8), refresh=10**6)
    dense = _module(refresh=10**6)
    assert torch.equal(dense.robe.arrays["default"], fused.robe.arrays["default"])  # same seed, same init
    rng = np.random.default_rng(6)
    warm = [_batch(rng) for _ in range(3)]
    for m in (fused, dense):
        for kjt in warm:  # feed sketches only (no parameter change: no backward)
            m.train()
            m(kjt)
        m.refresh()  # promote at step 0: all optimizer state is still zero
    assert fused.hot_set() == dense.hot_set() and sum(map(len, fused.hot_set().values())) > 0
    opt = torch.optim.Adagrad(dense.parameters(), lr=0.05, eps=1e-8)
    ra, rb = np.random.default_rng(7), np.random.default_rng(7)
    _train(fused, ra, 5)
    _train(dense, rb, 5, opt)
    torch.testing.assert_close(fused.hot_rows, dense.hot_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.robe.arrays["default"], dense.robe.arrays["default"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused.hot_rows, torch.zeros_like(fused.hot_rows))


def test_quick_quality_benchmark_robe_freq_learns(tmp_path):
    from robe_torchrec.bench import quality

    result = quality.main(["--quick", "--out", str(tmp_path), "--no-plots", "--methods", "robe,robe_freq",
                           "--block-sizes", "8"])
    by = {s["method"]: s for s in result["summary"]}
    freq, plain = by["robe_freq-Z8"], by["robe-Z8"]
    assert "hot rows in" in freq["detail"]  # the planted Zipf data is skewed: hot rows were planned
    assert freq["auc_mean"] > 0.7 and freq["auc_mean"] > plain["auc_mean"] - 0.02
    assert plain["memory_bytes"] - 4 < freq["memory_bytes"] <= plain["memory_bytes"]
    run = next(r for r in result["runs"] if r["method"] == "robe_freq-Z8")
    assert run["curve"][-1][1] > run["curve"][0][1]  # the learning curve rises


def test_sketch_every_counts_a_subsample_in_sketches_and_lookups_alike():
    m = _module(refresh=10**6, sketch_every=2)
    rng = np.random.default_rng(8)
    batches = [_batch(rng) for _ in range(6)]
    m.train()
    for kjt in batches:
        m(kjt)
    counted = batches[0::2]
    assert float(m.lookups) == sum(k.values().numel() for k in counted)
    from collections import Counter

    exact = Counter(torch.cat([k["f0"].values() for k in counted]).tolist())
    ids, counts, errors = m.sketches["t0"].entries()  # t0 has 6 ids, fewer than its capacity: exact
    assert errors.abs().sum() == 0
    assert {int(i): float(c) for i, c in zip(ids, counts)} == {i: float(c) for i, c in exact.items()}
