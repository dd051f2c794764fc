"""robe_ify on torchrec's DLRM, DLRM_DCN and a model with two EmbeddingBagCollections: same output
keys/shapes, forward and a training step work, memory shrinks by ~ratio, small tables stay full."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.models.dlrm import DLRM, DLRM_DCN

import robe_torchrec
from robe_torchrec import RobeEmbeddingBagCollection, RobeHybridEmbeddingBagCollection, robe_ify

D, B = 16, 8
ROWS = [50_000, 20_000, 300, 40, 10_000]


def tables(rows=ROWS, prefix="t", feat="f", dim=D, mean=True) -> List[EmbeddingBagConfig]:
    out = [
        EmbeddingBagConfig(name=f"{prefix}{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"{feat}{i}"],
                           pooling=PoolingType.MEAN if i == 1 and mean else PoolingType.SUM)
        for i, n in enumerate(rows)
    ]
    out[0].feature_names = [f"{feat}0", f"{feat}0b"]  # a table serving two features
    return out


def kjt(features: List[str], seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(features) * B,), generator=g)
    values = torch.randint(0, 20, (int(lengths.sum()),), generator=g)  # valid ids of every table
    return KeyedJaggedTensor(keys=features, values=values, lengths=lengths)


def features_of(ts):
    return [f for t in ts for f in t.feature_names]


def embedding_numel(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, RobeEmbeddingBagCollection)):
            n += sum(p.numel() for p in m.parameters())
    return n


def dlrm(arch: str) -> nn.Module:
    ebc = EmbeddingBagCollection(tables(), device=torch.device("cpu"))
    kw = dict(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, D], over_arch_layer_sizes=[8, 1])
    if arch == "dlrm_dcn":
        return DLRM_DCN(dcn_num_layers=2, dcn_low_rank_dim=4, **kw)
    return DLRM(**kw)


def train_step(model: nn.Module, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> float:
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = nn.functional.binary_cross_entropy_with_logits(model(dense, sparse).squeeze(-1), torch.ones(B))
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any("arrays" in k for k in changed), changed  # the ROBE array trained
    return loss.item()


@pytest.mark.parametrize("arch", ["dlrm", "dlrm_dcn"])
@pytest.mark.parametrize("min_rows", [0, 1000])
def test_robe_ify_torchrec_dlrm(arch, min_rows):
    torch.manual_seed(0)
    model = dlrm(arch)
    original = copy.deepcopy(model)
    full_numel = embedding_numel(model)
    sparse, dense = kjt(features_of(tables())), torch.randn(B, 4)
    want = original.sparse_arch.embedding_bag_collection(sparse)

    out = robe_ify(model, ratio=100, block_size=8, seed=3, min_rows=min_rows)
    assert out is model
    ebc = model.sparse_arch.embedding_bag_collection
    if min_rows:
        assert isinstance(ebc, RobeHybridEmbeddingBagCollection)
        assert sorted(t.name for t in ebc.full.embedding_bag_configs()) == ["t2", "t3"]
        # the full tables keep their weights: their columns of the output are unchanged
        got = ebc(sparse).to_dict()
        for key in ("f2", "f3"):
            torch.testing.assert_close(got[key], want.to_dict()[key])
    else:
        assert isinstance(ebc, RobeEmbeddingBagCollection)
    summary = lambda ts: [(t.name, t.num_embeddings, t.embedding_dim, t.feature_names, t.pooling) for t in ts]  # noqa: E731
    assert summary(ebc.embedding_bag_configs()) == summary(original.sparse_arch.embedding_bag_collection.embedding_bag_configs())
    kt = ebc(sparse)
    assert kt.keys() == want.keys() and kt.length_per_key() == want.length_per_key()
    assert kt.values().shape == want.values().shape

    logits = model(dense, sparse)
    assert logits.shape == (B, 1) and torch.isfinite(logits).all()
    assert torch.isfinite(torch.tensor(train_step(model, dense, sparse)))

    small = 300 * D + 40 * D if min_rows else 0
    robe_numel = embedding_numel(model) - small
    assert robe_numel == pytest.approx((full_numel - small) / 100, rel=0.01)


class TwoTowers(nn.Module):
    """A model with two EmbeddingBagCollections (user / item), one of them weighted, in a ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({
            "user": EmbeddingBagCollection(tables([30_000, 5_000, 100], "u", "uf"), device=torch.device("cpu")),
            "item": EmbeddingBagCollection(tables([80_000, 20], "i", "if", mean=False), is_weighted=True, device=torch.device("cpu")),
        })
        self.head = nn.Linear(3 * D + 2 * D + D, 1)  # user: uf0, uf0b, uf1, uf2; item: if0, if0b, if1 -> 4 + 3 keys

    def forward(self, user: KeyedJaggedTensor, item: KeyedJaggedTensor) -> torch.Tensor:
        u = self.towers["user"](user).values()
        i = self.towers["item"](item).values()
        return self.head(torch.cat([u, i], dim=1)[:, : self.head.in_features])


def test_robe_ify_model_with_two_collections():
    torch.manual_seed(0)
    model = TwoTowers()
    full_numel = embedding_numel(model)
    uf, itf = features_of(tables([30_000, 5_000, 100], "u", "uf")), features_of(tables([80_000, 20], "i", "if", mean=False))
    user = kjt(uf, 1)
    item = kjt(itf, 2)
    item = KeyedJaggedTensor(keys=item.keys(), values=item.values(), lengths=item.lengths(),
                             weights=torch.rand(item.values().numel()))
    want_u, want_i = model.towers["user"](user), model.towers["item"](item)

    robe_torchrec.robe_ify(model, ratio=50, seed=7, min_rows=1000)  # block_size: default (16)
    u, i = model.towers["user"], model.towers["item"]
    assert isinstance(u, RobeHybridEmbeddingBagCollection) and isinstance(i, RobeHybridEmbeddingBagCollection)
    assert i.is_weighted() and i.robe.is_weighted() and not u.is_weighted()
    assert u.robe.robe_configs()["default"].seed == 7 and i.robe.robe_configs()["default"].seed == 8
    assert u.robe.robe_configs()["default"].block_size == 16
    for got, want in ((u(user), want_u), (i(item), want_i)):
        assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
        assert got.values().shape == want.values().shape
    out = model(user, item)
    out.sum().backward()
    assert u.robe.arrays["default"].grad is not None and i.robe.arrays["default"].grad is not None
    small = 100 * D + 20 * D
    assert embedding_numel(model) - small == pytest.approx((full_numel - small) / 50, rel=0.01)


def test_robe_ify_meta_and_bare_collection():
    ebc = EmbeddingBagCollection(tables(), device=torch.device("meta"))
    robe = robe_ify(ebc, ratio=1000, min_rows=1000)
    assert isinstance(robe, RobeHybridEmbeddingBagCollection)
    assert robe.robe.arrays["default"].is_meta and robe.device.type == "meta"
    assert all(p.is_meta for p in robe.full.parameters())
    with pytest.raises(ValueError, match="block_size"):
        robe_ify(EmbeddingBagCollection(tables(dim=12)), block_size=8)
    # all tables small: the collection is kept as is
    small = EmbeddingBagCollection(tables([10, 20, 30, 40, 50]))
    assert robe_ify(small, min_rows=1000) is small


def test_robe_ified_dlrm_under_dmp_planner_sees_robe_and_full_parts():
    """The hybrid's parts are ordinary submodules: the planner plans both (CPU topology, no process group)."""
    from torchrec.distributed.model_parallel import get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from robe_torchrec.sharding import RobeEmbeddingBagCollectionSharder

    model = robe_ify(dlrm("dlrm"), ratio=100, block_size=8, min_rows=1000)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=2, compute_device="cpu"))
    plan = planner.plan(model, [RobeEmbeddingBagCollectionSharder(), *get_default_sharders()])
    assert "default" in plan.plan["sparse_arch.embedding_bag_collection.robe"]
    assert set(plan.plan["sparse_arch.embedding_bag_collection.full"]) == {"t2", "t3"}
