"""Frequency-aware ROBE sharded by DMP (data_parallel, table_wise) on 2 gloo ranks, against the
unsharded module trained on the global batch.

Each step of a DLRM holding the module, sharded with ``FrequencyAwareRobeEmbeddingBagCollectionSharder``,
must give the predictions of the unsharded copy on the global batch (within float32 noise), with
refreshes in between (so hot ids are promoted while training); afterwards the hot set, every
tensor of the state dict (same keys as unsharded) and the fused optimizer state match. Checkpoints
saved with torch.distributed.checkpoint load under the other sharding type and unsharded.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection as FreqEBC,
)
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.sharding.frequency_aware import (
    PLAN_NAME,
    FrequencyAwareRobeEmbeddingBagCollectionSharder,
    ShardedFrequencyAwareRobeEmbeddingBagCollection,
)
from tests.test_sharding_harness import get_pool

CARDS = [40, 3000, 20_000]
DIM, B_LOCAL, LR, STEPS = 8, 16, 0.1, 6
EBC = "sparse_arch.embedding_bag_collection"


def tables() -> List[EmbeddingBagConfig]:
    pools = [PoolingType.SUM, PoolingType.MEAN, PoolingType.SUM]
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=c, feature_names=[f"f{i}"], pooling=p)
        for i, (c, p) in enumerate(zip(CARDS, pools))
    ]


def zipf_bags(rng: np.random.Generator, n: int) -> Tuple[List[List[int]], List[int]]:
    """Per feature: ids of n bags (1-3 ids each, Zipf-skewed), flattened, and the lengths."""
    values: List[List[int]] = []
    lengths: List[int] = []
    for c in CARDS:
        ln = rng.integers(1, 4, size=n)
        p = 1.0 / np.arange(1, c + 1) ** 1.2
        values.append((rng.choice(c, size=int(ln.sum()), p=p / p.sum()) * 7919 - 3).tolist())
        lengths.extend(ln.tolist())
    return values, lengths


def global_batch(step: int, world_size: int):
    """dense [Bg, 3], per-feature per-bag ids, labels: the same on every rank."""
    rng = np.random.default_rng(500 + step)
    bg = B_LOCAL * world_size
    bags: List[List[List[int]]] = []
    for c in CARDS:
        p = 1.0 / np.arange(1, c + 1) ** 1.2
        lens = rng.integers(1, 4, size=bg)
        ids = rng.choice(c, size=int(lens.sum()), p=p / p.sum()) * 7919 - 3
        out, pos = [], 0
        for n in lens:
            out.append(ids[pos : pos + n].tolist())
            pos += n
        bags.append(out)
    gen = torch.Generator().manual_seed(900 + step)
    return torch.rand(bg, 3, generator=gen), bags, (torch.rand(bg, generator=gen) < 0.5).float()


def kjt_of(bags: List[List[List[int]]], lo: int, hi: int) -> KeyedJaggedTensor:
    values, lengths = [], []
    for f in bags:
        for b in range(lo, hi):
            values.extend(f[b])
            lengths.append(len(f[b]))
    return KeyedJaggedTensor(
        keys=[f"f{i}" for i in range(len(bags))], values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def freq_dlrm(fused: Optional[str]) -> DLRM:
    rng = np.random.default_rng(7)
    sample = []
    for _ in range(6):
        values, lengths = zipf_bags(rng, 32)
        sample.append(KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor(sum(values, []), dtype=torch.int64),
                                        lengths=torch.tensor(lengths, dtype=torch.int64)))
    torch.manual_seed(0)
    ebc = FreqEBC.from_compression(
        tables(), 20, sample, block_size=2, seed=3, config=FrequencyAwareConfig(refresh_every=2, gate=False), kernel="auto",
        fused_optimizer=RobeFusedOptimizerConfig(fused, lr=LR) if fused else None,
    )
    assert sum(ebc.hot_capacities().values()) > 0  # the test must exercise hot rows
    return DLRM(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])


def shard(model: torch.nn.Module, stype: str, world_size: int, owner: Optional[int] = None):
    sharders = [FrequencyAwareRobeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    constraints = {PLAN_NAME: ParameterConstraints(sharding_types=[stype])}
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    (ps,) = [entries[PLAN_NAME] for path, entries in plan.plan.items() if path.endswith(EBC)]
    assert ps.sharding_type == stype
    if owner is not None and stype == "table_wise":
        ps.ranks = [owner]
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    return dmp


def sharded_module(dmp: Any) -> ShardedFrequencyAwareRobeEmbeddingBagCollection:
    mods = [m for m in dmp.modules() if isinstance(m, ShardedFrequencyAwareRobeEmbeddingBagCollection)]
    assert len(mods) == 1
    return mods[0]


def optimizers(model: torch.nn.Module, fused_opt: Any):
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    return CombinedOptimizer([fused_opt, dense])


def _train_and_compare(rank: int, world_size: int, stype: str, fused: Optional[str], owner: int) -> Dict[str, Any]:
    reference = freq_dlrm(fused)
    dmp = shard(copy.deepcopy(reference), stype, world_size, owner)
    ref_opt = optimizers(reference, reference.sparse_arch.embedding_bag_collection.fused_optimizer)
    dmp_opt = optimizers(dmp, dmp.fused_optimizer)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(STEPS):
        dense, bags, labels = global_batch(step, world_size)
        ref_logits = reference(dense, kjt_of(bags, 0, B_LOCAL * world_size)).squeeze(1)
        ref_opt.zero_grad()
        loss_fn(ref_logits, labels).backward()
        ref_opt.step()
        logits = dmp(dense[lo:hi], kjt_of(bags, lo, hi)).squeeze(1)
        dmp_opt.zero_grad()
        loss_fn(logits, labels[lo:hi]).backward()
        dmp_opt.step()
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")

    ref_ebc = reference.sparse_arch.embedding_bag_collection
    sm = sharded_module(dmp)
    if sm.module() is not None:
        assert sm.module().hot_set() == ref_ebc.hot_set()
        assert sum(len(h) for h in ref_ebc.hot_set().values()) > 0  # ids were promoted while training
    state, ref_state = dmp.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(ref_state)
    for key, want in ref_state.items():
        if isinstance(want, torch.Tensor):
            got = materialize(state[key])
            torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        else:
            assert state[key] == want, key
    if fused and stype == "table_wise":
        got = dmp.fused_optimizer.state_dict()["state"][f"{EBC}.arrays.default"]["momentum1"]
        want = ref_ebc.fused_optimizer.state_dict()["state"]["arrays.default"]["momentum1"]
        torch.testing.assert_close(materialize(got), want, rtol=1e-4, atol=1e-6)
    return {"holds": sm.module() is not None}


def materialize(value: Any) -> torch.Tensor:
    """The full tensor of a plain tensor, or of a ShardedTensor with one whole shard (table_wise
    state; collective: every rank calls it)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if not isinstance(value, ShardedTensor):
        return value.detach().clone()
    pieces = [s.tensor.detach().clone() for s in value.local_shards()]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    (whole,) = [t for ps in gathered for t in ps]
    return whole


@pytest.mark.parametrize(
    "stype,fused,owner",
    [
        pytest.param("data_parallel", None, 0, id="data_parallel"),
        pytest.param("table_wise", "adagrad", 1, id="table_wise-adagrad-owner1"),
        pytest.param("table_wise", None, 0, id="table_wise-dense-owner0"),
    ],
)
def test_sharded_frequency_aware_equals_unsharded(stype, fused, owner):
    held = get_pool(2).run(_train_and_compare, stype, fused, owner)
    assert [h["holds"] for h in held] == ([True, True] if stype == "data_parallel" else [r == owner for r in range(2)])


def _dcp_save(rank: int, world_size: int, stype: str, path: str) -> Dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    dmp = shard(freq_dlrm("adagrad"), stype, world_size, owner=1)  # (data_parallel drops the fused optimizer)
    opt = optimizers(dmp, dmp.fused_optimizer)
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(3):
        dense, bags, labels = global_batch(step, world_size)
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense[lo:hi], kjt_of(bags, lo, hi)).squeeze(1), labels[lo:hi]).backward()
        opt.step()
    dcp.save({"model": dmp.state_dict()}, checkpoint_id=path)
    return {k: materialize(v) for k, v in dmp.state_dict().items() if isinstance(v, torch.Tensor) or hasattr(v, "local_shards")}


def _dcp_load(rank: int, world_size: int, stype: str, path: str) -> Dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(99)
    model = freq_dlrm("adagrad")
    for p in model.parameters():
        torch.nn.init.uniform_(p, -1, 1)  # everything must come from the checkpoint
    dmp = shard(model, stype, world_size, owner=0)
    sd = {"model": dmp.state_dict()}
    dcp.load(sd, checkpoint_id=path)
    dmp.load_state_dict(sd["model"])
    return {k: materialize(v) for k, v in dmp.state_dict().items() if isinstance(v, torch.Tensor) or hasattr(v, "local_shards")}


def test_checkpoint_table_wise_to_data_parallel_and_to_unsharded(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = get_pool(2).run(_dcp_save, "table_wise", str(tmp_path))[0]
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if k.endswith("hot_rows"))
    for got in get_pool(2).run(_dcp_load, "data_parallel", str(tmp_path)):
        assert sorted(got) == sorted(saved)
        for k in saved:
            assert torch.equal(got[k], saved[k]), k
    model = freq_dlrm("adagrad")  # unsharded, one process, no process group
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    model.load_state_dict(sd["model"])
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, saved[k]), k


def test_sharder_refuses_a_different_fused_optimizer_and_bad_plans():
    sharder = FrequencyAwareRobeEmbeddingBagCollectionSharder(fused_params={"optimizer": "sgd", "lr": 0.1})
    module = freq_dlrm("adagrad").sparse_arch.embedding_bag_collection
    with pytest.raises(ValueError, match="differ from the module's own fused optimizer"):
        sharder.shard(module, {}, env=None)  # type: ignore[arg-type]
    assert FrequencyAwareRobeEmbeddingBagCollectionSharder().sharding_types("cpu") == ["data_parallel", "table_wise"]
    view = FrequencyAwareRobeEmbeddingBagCollectionSharder().shardable_parameters(module)[PLAN_NAME]
    assert view.numel() * 4 >= module.memory_bytes() > (view.numel() - DIM) * 4  # the planner sees the true bytes


def _pipeline_equals_plain(rank: int, world_size: int, stype: str, fused: Optional[str]) -> int:
    """torchrec's TrainPipelineSparseDist on the sharded module (batch i+1's input dist started
    before batch i's backward) gives the unsharded plain loop's predictions on the global batch."""
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRMTrain

    reference = DLRMTrain(freq_dlrm(fused))
    dmp = shard(copy.deepcopy(reference), stype, world_size, owner=1)
    ref_opt = optimizers(reference, reference.model.sparse_arch.embedding_bag_collection.fused_optimizer)
    pipeline = TrainPipelineSparseDist(dmp, optimizers(dmp, dmp.fused_optimizer), torch.device("cpu"))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL

    def batch_of(step: int, a: int, b: int) -> Batch:
        dense, bags, labels = global_batch(step, world_size)
        return Batch(dense_features=dense[a:b], sparse_features=kjt_of(bags, a, b), labels=labels[a:b])

    it = iter([batch_of(step, lo, hi) for step in range(STEPS)])
    for step in range(STEPS):
        ref_opt.zero_grad()
        loss, (_, ref_logits, _) = reference(batch_of(step, 0, B_LOCAL * world_size))  # DLRMTrain's output
        loss.backward()
        ref_opt.step()
        _, logits, _ = pipeline.progress(it)
        if step == 0:  # the sharded module really is pipelined (its input dist runs a batch ahead)
            assert [type(m) for m in pipeline._pipelined_modules] == [ShardedFrequencyAwareRobeEmbeddingBagCollection]
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    return STEPS


@pytest.mark.parametrize("stype,fused", [("data_parallel", None), ("table_wise", "rowwise_adagrad")])
def test_train_pipeline_sparse_dist(stype, fused):
    assert get_pool(2).run(_pipeline_equals_plain, stype, fused) == [STEPS, STEPS]
