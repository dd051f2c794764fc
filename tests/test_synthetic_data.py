"""The synthetic Criteo stream: reproducible, shardable, Criteo-shaped and learnable."""

from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from robe_torchrec.data import (
    DEFAULT_CARDINALITIES,
    SyntheticCriteoConfig,
    SyntheticCriteoDataset,
    SyntheticCriteoGenerator,
    feature_names,
    make_tables,
)

B = 1024


@pytest.fixture(scope="module")
def gen() -> SyntheticCriteoGenerator:
    return SyntheticCriteoGenerator(SyntheticCriteoConfig(seed=3))


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def fingerprint(batch: Batch) -> int:
    return hash(batch.sparse_features.values()[:64].numpy().tobytes())


def test_same_seed_and_index_give_identical_batches(gen: SyntheticCriteoGenerator) -> None:
    other = SyntheticCriteoGenerator(SyntheticCriteoConfig(seed=3))
    assert_same_batch(gen.batch(7, B), other.batch(7, B))
    assert_same_batch(gen.batch(7, B), gen.batch(7, B))  # no hidden state between calls


def test_different_indices_and_seeds_differ(gen: SyntheticCriteoGenerator) -> None:
    a, b = gen.batch(0, B), gen.batch(1, B)
    assert not torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert not torch.equal(a.dense_features, b.dense_features)
    c = SyntheticCriteoGenerator(SyntheticCriteoConfig(seed=4)).batch(0, B)
    assert not torch.equal(a.sparse_features.values(), c.sparse_features.values())


@pytest.mark.parametrize("world_size,num_batches", [(1, 5), (3, 10), (4, 2)])
def test_rank_split_is_disjoint_and_covering(world_size: int, num_batches: int) -> None:
    config = SyntheticCriteoConfig(cardinalities=(50, 1000), num_dense=2)
    per_rank: List[List[int]] = []
    for rank in range(world_size):
        ds = SyntheticCriteoDataset(
            config, 8, num_batches=num_batches, first_batch=100, rank=rank, world_size=world_size
        )
        per_rank.append(list(ds.batch_indices()))
        assert len(ds) == len(per_rank[-1])
    flat = [i for r in per_rank for i in r]
    assert sorted(flat) == list(range(100, 100 + num_batches))  # covering and disjoint


def test_rank_yields_the_global_batches_it_owns() -> None:
    config = SyntheticCriteoConfig(cardinalities=(50, 1000), num_dense=2)
    ds = SyntheticCriteoDataset(config, 8, num_batches=6, rank=1, world_size=2)
    got = list(ds)
    assert len(got) == 3
    for batch, index in zip(got, [1, 3, 5]):
        assert_same_batch(batch, ds.generator.batch(index, 8))


def test_workers_split_batches_without_overlap() -> None:
    config = SyntheticCriteoConfig(cardinalities=(50, 1000), num_dense=2)
    ds = SyntheticCriteoDataset(config, 8, num_batches=7, rank=0, world_size=1)
    sequential = [fingerprint(b) for b in ds]
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    # workers take indices 0,2,4,.. and 1,3,5,..; the loader interleaves them back into order
    assert [fingerprint(b) for b in loader] == sequential


def test_infinite_dataset_streams() -> None:
    ds = SyntheticCriteoDataset(SyntheticCriteoConfig(cardinalities=(5,), num_dense=1), 4)
    it = iter(ds)
    assert len([next(it) for _ in range(5)]) == 5
    with pytest.raises(TypeError):
        len(ds)


def test_label_rate_near_target() -> None:
    for target in (0.25, 0.05):
        g = SyntheticCriteoGenerator(SyntheticCriteoConfig(positive_rate=target, seed=1))
        rate = torch.cat([g.batch(i, 2048).labels for i in range(20)]).mean().item()
        assert abs(rate - target) < 0.02, (target, rate)


def test_batch_shape_keys_and_id_dtype(gen: SyntheticCriteoGenerator) -> None:
    batch = gen.batch(0, B)
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(26)] == feature_names(gen.config)
    assert kjt.stride() == B
    assert kjt.values().dtype == torch.int64
    assert torch.equal(kjt.lengths(), torch.ones(26 * B, dtype=kjt.lengths().dtype))
    assert batch.dense_features.shape == (B, 13) and batch.dense_features.dtype == torch.float32
    assert (batch.dense_features >= 0).all()  # log(1 + count)
    assert batch.labels.shape == (B,) and batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    ids = kjt.values()
    assert (ids < 0).any() and (ids.abs() > 2**40).float().mean() > 0.9  # hashed-looking ids


def test_multi_hot_bags() -> None:
    pf = [1, 3, 5]
    config = SyntheticCriteoConfig(cardinalities=(10, 100, 1000), pooling_factors=pf)
    fixed = SyntheticCriteoGenerator(config)
    lengths = fixed.batch(0, 64).sparse_features.lengths().view(3, 64)
    assert torch.equal(lengths, torch.tensor(pf).view(3, 1).expand(3, 64).to(lengths.dtype))
    var = SyntheticCriteoGenerator(
        SyntheticCriteoConfig(cardinalities=(10, 100, 1000), pooling_factors=pf, variable_pooling=True)
    )
    batch = var.batch(0, 512)
    lengths = batch.sparse_features.lengths().view(3, 512)
    for f, p in enumerate(pf):
        assert lengths[f].min() >= 1 and lengths[f].max() == p
    assert batch.sparse_features.values().numel() == int(lengths.sum())


def test_custom_feature_names_and_tables() -> None:
    config = SyntheticCriteoConfig(cardinalities=(7, 9), feature_names=("a", "b"))
    assert SyntheticCriteoGenerator(config).batch(0, 4).sparse_features.keys() == ["a", "b"]
    tables = make_tables(config, embedding_dim=8)
    assert [(t.name, t.feature_names, t.num_embeddings, t.embedding_dim) for t in tables] == [
        ("t_a", ["a"], 7, 8),
        ("t_b", ["b"], 9, 8),
    ]
    assert len(make_tables(SyntheticCriteoConfig(), 16)) == len(DEFAULT_CARDINALITIES) == 26


def test_ids_follow_a_power_law() -> None:
    """The most frequent id of a 100k-row feature is rank 0's, and the head outweighs the tail."""
    unscrambled = SyntheticCriteoGenerator(SyntheticCriteoConfig(seed=3, scramble_ids=False))
    ranks = unscrambled.batch(0, 8192).sparse_features["cat_2"].values().numpy()
    assert DEFAULT_CARDINALITIES[2] == 100_000
    assert ranks.min() >= 0 and ranks.max() < 100_000
    counts = np.bincount(ranks, minlength=100_000)
    assert counts.argmax() == 0
    assert counts[:100].sum() > counts[50_000:].sum()


def test_scrambling_relabels_ids_but_keeps_the_problem(gen: SyntheticCriteoGenerator) -> None:
    plain = SyntheticCriteoGenerator(SyntheticCriteoConfig(seed=3, scramble_ids=False))
    a, b = gen.batch(2, B), plain.batch(2, B)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.sparse_features.values(), b.sparse_features.values())
    cards = torch.tensor(DEFAULT_CARDINALITIES).repeat_interleave(B)
    assert (b.sparse_features.values() < cards).all()


def test_teacher_is_recoverable_from_the_batch_and_learnable(gen: SyntheticCriteoGenerator) -> None:
    labels, probs = [], []
    for i in range(8):
        batch, prob = gen.batch_with_teacher(i, 2048)
        assert torch.allclose(gen.teacher_probability(batch), prob, atol=1e-6)
        labels.append(batch.labels)
        probs.append(prob)
    auc = binary_auroc(torch.cat(probs), torch.cat(labels).long()).item()
    assert auc > 0.75, auc


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError):
        SyntheticCriteoConfig(cardinalities=(10, 10), pooling_factors=[1])
    with pytest.raises(ValueError):
        SyntheticCriteoConfig(positive_rate=1.0)
    with pytest.raises(ValueError):
        SyntheticCriteoDataset(SyntheticCriteoConfig(cardinalities=(3,)), 4, rank=2, world_size=2)
