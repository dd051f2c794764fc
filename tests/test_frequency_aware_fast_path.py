"""Frequency-aware ROBE with and without its C++ bookkeeping (``cpu_ops``): the same outputs,
fused updates, gradients, sketches and hot sets, bit for bit, over training with refreshes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.ops import frequency_cpu
from robe_torchrec.optim import RobeFusedOptimizerConfig
from tests.test_frequency_aware import _batch, _module

pytestmark = pytest.mark.skipif(not frequency_cpu.is_available(), reason="frequency-aware CPU ops did not build")


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb[k]), k


def _with_weights(kjt: KeyedJaggedTensor, rng: np.random.Generator) -> KeyedJaggedTensor:
    w = torch.from_numpy(rng.uniform(0.1, 2.0, size=kjt.values().numel()).astype(np.float32))
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("decay", [1.0, 0.8])
def test_fast_path_trains_identically(pooling, fused, decay):
    opt = RobeFusedOptimizerConfig("adagrad", lr=0.05, eps=1e-8) if fused else None
    fast = _module(pooling=pooling, fused=opt, refresh=3, decay=decay)
    slow = copy.deepcopy(fast)
    slow._cpu_ops = False
    assert fast._fast_ops(torch.zeros(1, dtype=torch.int64)) and not slow._fast_ops(torch.zeros(1, dtype=torch.int64))
    opts = None if fused else [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fast, slow)]
    ra, rb = np.random.default_rng(5), np.random.default_rng(5)
    for step in range(14):
        ka, kb = _batch(ra, b=32, max_len=3), _batch(rb, b=32, max_len=3)
        outs = []
        for m, kjt in ((fast, ka), (slow, kb)):
            m.train()
            out = m(kjt).values()
            outs.append(out.detach().clone())
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(step)))
        assert torch.equal(outs[0], outs[1]), step
        if not fused:
            assert torch.equal(fast.hot_rows.grad, slow.hot_rows.grad)
            for o in opts:
                o.step()
                o.zero_grad()
        _state_equal(fast, slow)
    assert fast.hot_set() == slow.hot_set() and sum(map(len, fast.hot_set().values())) > 0


def test_fast_path_weighted_and_observe_ids():
    """Weighted KJTs (MEAN and SUM) and the sharding's observe_ids entry point agree too."""
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        fast = _module(pooling=pooling, fused=RobeFusedOptimizerConfig("adagrad", lr=0.05), refresh=2)
        fast.robe._is_weighted = True  # same tables, weighted lookups
        slow = copy.deepcopy(fast)
        slow._cpu_ops = False
        rng = np.random.default_rng(9)
        for step in range(6):
            kjt = _with_weights(_batch(rng, b=16, max_len=4), rng)
            per_feature = list(kjt.values().split(kjt.length_per_key()))
            outs = []
            for m in (fast, slow):
                m.observe_ids(per_feature)
                out = m.pool(kjt, observe=False).values()
                outs.append(out.detach().clone())
                out.sum().backward()
            assert torch.equal(outs[0], outs[1]), (pooling, step)
            _state_equal(fast, slow)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_split_matches_torch_split_with_tables_without_hot_ids(pooling, weighted):
    """hot_cold_split against the module's torch split, one table's hot set emptied, empty bags."""
    m = _module(pooling=pooling, fused=RobeFusedOptimizerConfig("adagrad", lr=0.05), refresh=2)
    rng = np.random.default_rng(3)
    m.train()
    for _ in range(4):
        m(_batch(rng, b=16, max_len=3)).values().sum().backward()
    m.hot_size[0] = 0
    assert int(m.hot_size[1:].sum()) > 0
    kjt = _batch(rng, b=16, max_len=3)
    ids, offsets = kjt.values(), kjt.offsets().to(torch.int64)
    weights = torch.from_numpy(rng.uniform(0.1, 2, size=ids.numel()).astype(np.float32)) if weighted else None
    bounds = offsets[::16].tolist()
    ref = m._split_batch(ids, offsets, bounds, weights, 16)
    got = frequency_cpu.hot_cold_split(ids, offsets, 16, m._feature_hot, m.hot_ids, m.hot_slots, m._hot_base,
                                       m.hot_size, m._feature_mean, weights)
    for r, g in zip(ref, got):
        assert (r is None) == (g is None)
        if r is not None:
            assert r.dtype == g.dtype and torch.equal(r, g)
    assert got[3].numel() > 0 and got[0].numel() > 0
    with pytest.raises(RuntimeError, match="offsets"):
        frequency_cpu.hot_cold_split(ids, offsets[:-1], 16, m._feature_hot, m.hot_ids, m.hot_slots, m._hot_base,
                                     m.hot_size, m._feature_mean, weights)
