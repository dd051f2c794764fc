"""The frequency-aware plan's gate (``FrequencyAwareConfig.gate``): zero hot rows, and then exactly
plain ROBE, where the rows cannot pay for their id map and sketches; the true heavy hitters of a
Zipf stream where they can. References: plain RobeEmbeddingBagCollection, exact counts (numpy), and
the gate's rule written out from its spec in ``frequency_aware_plan``'s docstring."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig, plan_capacities
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection as FreqEBC,
)
from robe_torchrec.optim import RobeFusedOptimizerConfig

# the layout's config keys before the gate existed: checkpoints saved then must still load
PRE_GATE_CONFIG_KEYS = {"max_hot_fraction", "min_traffic_per_byte", "sketch_factor", "refresh_every",
                        "sketch_every", "max_swaps", "hysteresis", "decay", "calibration_capacity"}


def _tables(cards: Dict[str, int], dim: int) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=c, feature_names=[k])
            for k, c in cards.items()]


def _one_hot(columns: Dict[str, np.ndarray]) -> KeyedJaggedTensor:
    keys = list(columns)
    values = np.concatenate([columns[k] for k in keys]).astype(np.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(values),
                                               lengths=torch.ones(values.size, dtype=torch.int32))


# MovieLens-like: flat user / item ids, and small side tables whose every id passes the
# traffic-per-byte threshold (each carries 1/28 of all lookups) but is already served by ROBE
SIDE_CARDS = {"user": 3000, "item": 5000, "age": 7, "occupation": 21}


def _side_batch(rng: np.random.Generator, b: int = 256) -> KeyedJaggedTensor:
    return _one_hot({k: rng.integers(0, c, size=b) for k, c in SIDE_CARDS.items()})


def test_side_table_stream_gets_no_hot_rows_and_is_exactly_plain_robe():
    dim, ratio, z, seed = 16, 100, 4, 5
    tables = _tables(SIDE_CARDS, dim)
    rng = np.random.default_rng(0)
    sample = [_side_batch(rng) for _ in range(16)]
    budget = 4 * RobeConfig.from_compression(tables, ratio, block_size=z, seed=seed).num_elements
    ungated = plan_capacities(tables, budget, sample, FrequencyAwareConfig(gate=False))
    assert ungated["t_age"] == 7 and sum(ungated.values()) == 7  # the threshold alone makes all ages hot
    assert sum(plan_capacities(tables, budget, sample, FrequencyAwareConfig()).values()) == 0

    fused = RobeFusedOptimizerConfig("adagrad", lr=0.05, eps=1e-8)
    torch.manual_seed(seed)
    freq = FreqEBC.from_compression(tables, ratio, sample, block_size=z, seed=seed, fused_optimizer=fused)
    torch.manual_seed(seed)
    plain = RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio, block_size=z, seed=seed),
                                       fused_optimizer=fused)
    assert freq.hot_capacities() == {t.name: 0 for t in tables}
    assert freq.memory_bytes() == budget == sum(p.numel() * 4 for p in plain.parameters())
    assert not list(freq.buffers())  # no id map, no sketch, no counters
    w = torch.linspace(-1, 1, dim * len(SIDE_CARDS))
    for m in (freq, plain):  # same batches, same fused Adagrad steps
        m.train()
        for kjt in [_side_batch(np.random.default_rng(1 + i)) for i in range(4)]:
            (m(kjt).values() * w).sum().backward()
    assert torch.equal(freq.robe.arrays["default"], plain.arrays["default"])
    kjt = _side_batch(np.random.default_rng(9))
    freq.eval(), plain.eval()
    assert torch.equal(freq(kjt).values(), plain(kjt).values())


def test_no_plan_can_pay_when_the_row_costs_less_than_its_overhead():
    """gain < 4 D for every traffic share, and 4 D = 32 bytes < 44 bytes of id map + 2 sketch
    entries at D = 8: even an id carrying 90% of its table's lookups gets no row."""
    tables = _tables({"a": 1000, "b": 1000}, 8)
    rng = np.random.default_rng(2)
    hot = lambda n: np.where(rng.random(n) < 0.9, 17, rng.integers(0, 1000, size=n))  # noqa: E731
    sample = [_one_hot({"a": hot(512), "b": hot(512)}) for _ in range(8)]
    budget = 4 * RobeConfig.from_compression(tables, 10, block_size=1).num_elements
    assert sum(plan_capacities(tables, budget, sample, FrequencyAwareConfig(gate=False)).values()) > 0
    assert sum(plan_capacities(tables, budget, sample, FrequencyAwareConfig()).values()) == 0


ZIPF_CARDS = {"a": 2000, "b": 3000, "c": 500}


def _zipf_batch(rng: np.random.Generator, b: int = 512) -> KeyedJaggedTensor:
    cols = {}
    for i, (k, c) in enumerate(ZIPF_CARDS.items()):
        p = 1.0 / np.arange(1, c + 1) ** 1.1
        cols[k] = rng.choice(c, size=b, p=p / p.sum()) * 7919 + 1000 * i  # scrambled ids
    return _one_hot(cols)


def _expected_plan(batches: Sequence[KeyedJaggedTensor], dim: int, budget: int, sketch_factor: int) -> Dict[str, int]:
    """The gate's spec on exact counts: an id needs share >= (4D + 12 + 16 f) / budget and
    4D (r - 1) / (r + 1) > 12 + 16 f (r = share * budget / 4D); a table needs the sum of that
    margin over its ids > 24 bytes; the plan needs the sum over tables of (sum - 24) > 16 bytes."""
    ids = {k: np.concatenate([kjt[k].values().numpy() for kjt in batches]) for k in ZIPF_CARDS}
    total = sum(v.size for v in ids.values())
    overhead = 12 + 16 * sketch_factor
    plan, net_total = {}, 0.0
    for k, v in ids.items():
        share = np.sort(np.unique(v, return_counts=True)[1])[::-1] / total
        r = share * budget / (4 * dim)
        margin = 4 * dim * (r - 1) / (r + 1) - overhead
        keep = (share >= (4 * dim + overhead) / budget) & (margin > 0)
        if margin[keep].sum() > 24:
            plan[f"t_{k}"] = int(keep.sum())
            net_total += margin[keep].sum() - 24
        else:
            plan[f"t_{k}"] = 0
    return plan if net_total > 16 else {n: 0 for n in plan}


def test_zipf_heavy_hitters_are_planned_and_found_online():
    dim, ratio, z = 32, 20, 1
    tables = _tables(ZIPF_CARDS, dim)
    rng = np.random.default_rng(3)
    sample = [_zipf_batch(rng) for _ in range(8)]
    config = FrequencyAwareConfig(refresh_every=4, calibration_capacity=8192)  # exact counts in planning
    budget = 4 * RobeConfig.from_compression(tables, ratio, block_size=z).num_elements
    expected = _expected_plan(sample, dim, budget, config.sketch_factor)
    ungated = plan_capacities(tables, budget, sample, replace(config, gate=False))
    plan = plan_capacities(tables, budget, sample, config)
    assert plan == expected
    assert 0 < sum(plan.values()) < sum(ungated.values())  # the gate keeps the heavy hitters, cuts the margin
    assert all(plan[t] > 0 for t in plan)

    m = FreqEBC.from_compression(tables, ratio, sample, block_size=z, config=config)
    assert m.hot_capacities() == expected and m.memory_bytes() <= budget
    stream = [_zipf_batch(rng) for _ in range(32)]
    m.train()
    with torch.no_grad():
        for kjt in stream:
            m(kjt)  # counts the ids; refreshes every 4 forwards
    h = config.hysteresis  # an incumbent keeps its slot against ids up to h times hotter
    for k in ZIPF_CARDS:
        counts = Counter(torch.cat([kjt[k].values() for kjt in stream]).tolist())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        cap = expected[f"t_{k}"]
        hot = m.hot_set()[f"t_{k}"]
        assert len(hot) == cap
        clear = {i for i, c in ranked if c >= h * ranked[cap][1]}  # heavier than any id past the slots, by h
        assert clear and clear <= set(hot)
        assert all(counts[i] * h >= ranked[cap - 1][1] for i in hot)  # no hot id is much colder than the k-th


def test_gate_is_not_part_of_the_layout_but_its_decision_is():
    tables = _tables(SIDE_CARDS, 16)
    rng = np.random.default_rng(4)
    sample = [_side_batch(rng) for _ in range(16)]
    gated = FreqEBC.from_compression(tables, 100, sample, block_size=4)
    ungated = FreqEBC.from_compression(tables, 100, sample, block_size=4, config=FrequencyAwareConfig(gate=False))
    for m in (gated, ungated):
        assert set(m.state_dict()["_extra_state"]["frequency_aware"]["config"]) == PRE_GATE_CONFIG_KEYS
    with pytest.raises(ValueError, match="different layout"):  # 0 vs 7 hot rows: another array size
        gated.load_state_dict(ungated.state_dict())
    with pytest.raises(ValueError, match="different layout"):
        ungated.load_state_dict(gated.state_dict())
    # the same hot capacities: a checkpoint loads whatever the gate flag of either side
    caps = ungated.hot_capacities()
    budget = gated.memory_bytes()
    a = FreqEBC(tables, budget, caps, block_size=4, config=FrequencyAwareConfig(refresh_every=4, gate=True))
    b = FreqEBC(tables, budget, caps, block_size=4, config=FrequencyAwareConfig(refresh_every=4, gate=False))
    a.train()
    for kjt in sample:
        a(kjt)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.hot_set() == a.hot_set() and sum(map(len, a.hot_set().values())) > 0
    with pytest.raises(ValueError, match="gate must be a bool"):
        FrequencyAwareConfig(gate=1)  # type: ignore[arg-type]
