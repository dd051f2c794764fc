"""Sharded ROBE under DistributedModelParallel equals the unsharded model (CPU, gloo, 2 processes).

torchrec's pattern: every rank builds the same global unsharded model, a copy of it is planned by
torchrec's EmbeddingShardingPlanner (constraints keyed by group name) and sharded by DMP; both
train on the same data (the unsharded one on the global batch, each rank of DMP on its half) and
predictions, arrays and optimizer state are compared after every step.

data_parallel arrays go through DDP and the dense optimizer (SGD here), so a case with a
data_parallel group uses fused SGD in the unsharded model (the same update rule).

Tolerance: float32, rtol = atol = 1e-5 (sharding only changes summation order: partial sums
over ranks, gradient averaging through the collectives instead of one batch mean).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.sharding.sharder import RobeEmbeddingBagCollectionSharder
from tests.test_sharding_harness import get_pool

RTOL = ATOL = 1e-5
DIM, BLOCK, B_LOCAL, LR = 8, 4, 8, 0.1
FEATURES = ["f0", "f1", "f2", "f3", "f4"]
EBC_PATH = "sparse_arch.embedding_bag_collection"


def robe_tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=1000, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=DIM, num_embeddings=500, feature_names=["f1"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t2", embedding_dim=DIM, num_embeddings=800, feature_names=["f2", "f3"]),
        EmbeddingBagConfig(name="t3", embedding_dim=DIM, num_embeddings=300, feature_names=["f4"], pooling=PoolingType.MEAN),
    ]


# Group a: 203 elements (not a multiple of Z: a partial last chunk, a padded planner view);
# group b: 160. Tiny arrays: many blocks straddle shard boundaries and wrap around.
GROUPS = {"g_a": RobeConfig(203, block_size=BLOCK, seed=1), "g_b": RobeConfig(160, block_size=BLOCK, seed=2)}
TABLE_TO_GROUP = {"t0": "g_a", "t1": "g_a", "t2": "g_b", "t3": "g_b"}


def robe_dlrm(fused: Optional[str], kernel: str = "auto") -> DLRM:
    ebc = RobeEmbeddingBagCollection(
        robe_tables(), GROUPS, table_to_group=TABLE_TO_GROUP, kernel=kernel,
        fused_optimizer=RobeFusedOptimizerConfig(fused, lr=LR) if fused else None,
    )
    return DLRM(embedding_bag_collection=ebc, dense_in_features=3, dense_arch_layer_sizes=[8, DIM], over_arch_layer_sizes=[8, 1])


def with_kernel(model: torch.nn.Module, kernel: str) -> torch.nn.Module:
    """``model`` with every ROBE collection in it set to run ``kernel`` (same parameters)."""
    for m in model.modules():
        if isinstance(m, RobeEmbeddingBagCollection):
            m._kernel = kernel
    return model


def make_kjt(bags: Dict[str, List[List[int]]], lo: int, hi: int) -> KeyedJaggedTensor:
    lengths, values = [], []
    for f in bags:
        for b in range(lo, hi):
            lengths.append(len(bags[f][b]))
            values.extend(bags[f][b])
    return KeyedJaggedTensor(
        keys=list(bags), values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths, dtype=torch.int64)
    )


def batch(step: int, world_size: int, features: List[str] = FEATURES) -> Tuple[torch.Tensor, Dict[str, List[List[int]]], torch.Tensor]:
    """A global batch (the same on every rank): dense [Bg, 3], per-feature bags of int64 ids, labels."""
    gen = torch.Generator().manual_seed(1000 + step)
    bg = B_LOCAL * world_size
    dense = torch.rand(bg, 3, generator=gen)
    bags = {
        f: [
            (torch.randint(-(2**40), 2**40, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen)).tolist()
            for _ in range(bg)
        ]
        for f in features
    }
    labels = (torch.rand(bg, generator=gen) < 0.5).float()
    return dense, bags, labels


def materialize(value: Any) -> torch.Tensor:
    """Full tensor of a ShardedTensor (collective: every rank calls it) or a plain tensor."""
    if not isinstance(value, ShardedTensor):
        return value.detach().clone()
    pieces = [(int(s.metadata.shard_offsets[0]), s.tensor.detach().clone()) for s in value.local_shards()]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    out = torch.full(tuple(value.size()), float("nan"))
    for rank_pieces in gathered:
        for offset, t in rank_pieces:
            out[offset : offset + t.numel()] = t
    assert not torch.isnan(out).any(), "shards do not cover the tensor"
    return out


def copy_state(dmp: torch.nn.Module, global_state: Dict[str, Any]) -> None:
    """torchrec's test pattern: copy the global model's state into the sharded one, shard by shard."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            src = global_state[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                    shard.tensor.copy_(src[index])
            elif isinstance(value, torch.Tensor):
                value.copy_(src)


def plan_and_shard(model: torch.nn.Module, types: Dict[str, str], world_size: int, sharders: Optional[List[Any]] = None, extra_constraints: Optional[Dict[str, ParameterConstraints]] = None):
    sharders = sharders or [RobeEmbeddingBagCollectionSharder(), *get_default_sharders()]
    constraints = {g: ParameterConstraints(sharding_types=[t]) for g, t in types.items()}
    constraints.update(extra_constraints or {})
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), plan=plan, sharders=sharders, device=torch.device("cpu")
    )
    return dmp, plan


def _train_and_compare(rank: int, world_size: int, types: Dict[str, str], fused: Optional[str], steps: int, kernel: str) -> Dict[str, str]:
    torch.manual_seed(0)
    reference = robe_dlrm(fused, "reference")  # the unsharded model on the obviously-correct kernel
    dmp, plan = plan_and_shard(with_kernel(copy.deepcopy(reference), kernel), types, world_size)
    copy_state(dmp, reference.state_dict())
    planned = {g: plan.plan[EBC_PATH][g].sharding_type for g in GROUPS}
    assert planned == types, planned

    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(reference.named_parameters())], lr=LR)
    dmp_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(steps):
        dense, bags, labels = batch(step, world_size)
        ref_logits = reference(dense, make_kjt(bags, 0, B_LOCAL * world_size)).squeeze(1)
        ref_opt.zero_grad()
        loss_fn(ref_logits, labels).backward()
        ref_opt.step()

        logits = dmp(dense[lo:hi], make_kjt(bags, lo, hi)).squeeze(1)
        dmp_opt.zero_grad()
        loss_fn(logits, labels[lo:hi]).backward()
        dmp_opt.step()

        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step} predictions: {m}")

    state = dmp.state_dict()
    ref_state = reference.state_dict()
    assert sorted(state) == sorted(ref_state)  # the unsharded keys, nothing more
    for g in GROUPS:
        key = f"{EBC_PATH}.arrays.{g}"
        kind = "ShardedTensor" if isinstance(state[key], ShardedTensor) else "Tensor"
        assert kind == ("Tensor" if types[g] == "data_parallel" else "ShardedTensor")
        torch.testing.assert_close(materialize(state[key]), ref_state[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{g}: {m}")
    assert state[f"{EBC_PATH}._extra_state"] == ref_state[f"{EBC_PATH}._extra_state"]
    # Fused optimizer state (table_wise / row_wise groups), same keys as the unsharded module's.
    if fused and fused != "sgd":
        opt_state = dmp.fused_optimizer.state_dict()["state"]
        ref_opt_state = reference.sparse_arch.embedding_bag_collection.fused_optimizer.state_dict()["state"]
        for g, t in types.items():
            if t == "data_parallel":
                continue
            got = materialize(opt_state[f"{EBC_PATH}.arrays.{g}"]["momentum1"])
            torch.testing.assert_close(got, ref_opt_state[f"arrays.{g}"]["momentum1"], rtol=RTOL, atol=ATOL)
            assert float(got.abs().sum()) > 0
    return planned


CASES = [
    pytest.param({"g_a": "data_parallel", "g_b": "data_parallel"}, "sgd", id="data_parallel"),
    pytest.param({"g_a": "table_wise", "g_b": "table_wise"}, "adagrad", id="table_wise-adagrad"),
    pytest.param({"g_a": "row_wise", "g_b": "row_wise"}, "adagrad", id="row_wise-adagrad"),
    pytest.param({"g_a": "row_wise", "g_b": "row_wise"}, "rowwise_adagrad", id="row_wise-rowwise_adagrad"),
    pytest.param({"g_a": "row_wise", "g_b": "table_wise"}, None, id="row_wise+table_wise-unfused"),
    pytest.param({"g_a": "data_parallel", "g_b": "row_wise"}, "sgd", id="data_parallel+row_wise-sgd"),
]


@pytest.mark.parametrize("types,fused", CASES)
def test_sharded_dlrm_equals_unsharded(types, fused):
    get_pool(2).run(_train_and_compare, types, fused, 3, "reference")


def test_fast_cpu_kernel_in_table_wise_and_data_parallel_groups():
    """kernel="auto" (the C++ kernel on CPU) on the owner / replicas, and on row_wise shards (its
    element_range path) with the fused step, against the unsharded reference-kernel model."""
    get_pool(2).run(_train_and_compare, {"g_a": "table_wise", "g_b": "data_parallel"}, "sgd", 3, "auto")
    get_pool(2).run(_train_and_compare, {"g_a": "table_wise", "g_b": "row_wise"}, "rowwise_adagrad", 3, "auto")


@pytest.mark.parametrize("fused", [None, "adagrad"], ids=["unfused", "adagrad"])
def test_row_wise_on_the_cpu_kernel(fused):
    """Both groups row_wise on the C++ kernel (dense shard gradient, or the fused step)."""
    get_pool(2).run(_train_and_compare, {"g_a": "row_wise", "g_b": "row_wise"}, fused, 3, "auto")


# ----- checkpoints: torch.distributed.checkpoint saves on N ranks and loads on M ranks ------------------


def _fused_optim_of_unsharded(model: DLRM):
    from torchrec.optim.keyed import CombinedOptimizer

    return CombinedOptimizer([(EBC_PATH, model.sparse_arch.embedding_bag_collection.fused_optimizer)])


def _train_steps(model: torch.nn.Module, rank: int, world_size: int, steps: int) -> None:
    opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(steps):
        dense, bags, labels = batch(step, world_size)
        logits = model(dense[lo:hi], make_kjt(bags, lo, hi)).squeeze(1)
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[lo:hi]).backward()
        opt.step()


def _full_state(model_sd: Dict[str, Any], optim_sd: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    out = {k: materialize(v) for k, v in sorted(model_sd.items()) if "arrays" in k}
    for k, v in sorted(optim_sd["state"].items()):
        out[f"optim:{k}"] = materialize(v["momentum1"])
    return out


def _dcp_save(rank: int, world_size: int, types: Dict[str, str], fused: str, path: str) -> Dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    dmp, _ = plan_and_shard(robe_dlrm(fused, "reference"), types, world_size)
    _train_steps(dmp, rank, world_size, 2)
    dcp.save({"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=path)
    return _full_state(dmp.state_dict(), dmp.fused_optimizer.state_dict())


def _dcp_load(rank: int, world_size: int, types: Dict[str, str], fused: str, path: str, groups: Optional[Dict[str, RobeConfig]] = None, fresh_optim_groups: Tuple[str, ...] = ()) -> Dict[str, torch.Tensor]:
    """Load a checkpoint into a DMP model planned with ``types``; ``fresh_optim_groups`` keep a fresh
    fused-optimizer state (their arrays were data_parallel when saved: the dense optimizer held it)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    model = robe_dlrm(fused, "reference")
    if groups is not None:
        model.sparse_arch.embedding_bag_collection = RobeEmbeddingBagCollection(
            robe_tables(), groups, table_to_group=TABLE_TO_GROUP, kernel="reference",
            fused_optimizer=RobeFusedOptimizerConfig(fused, lr=LR),
        )
    dmp, _ = plan_and_shard(model, types, world_size)
    sd = {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}
    wanted = {"model": sd["model"], "optim": {"state": {
        k: v for k, v in sd["optim"]["state"].items() if not any(k.endswith(f"arrays.{g}") for g in fresh_optim_groups)
    }}}
    dcp.load(wanted, checkpoint_id=path)  # in place: sd shares these tensors
    dmp.load_state_dict(sd["model"])
    dmp.fused_optimizer.load_state_dict(sd["optim"])
    state = _full_state(dmp.state_dict(), dmp.fused_optimizer.state_dict())
    # The loaded model keeps training (state really is in the parameters the lookups use).
    _train_steps(dmp, rank, world_size, 1)
    return state


def _assert_same_state(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        assert torch.equal(got[k], want[k]), k  # a checkpoint round trip is exact


RW = {"g_a": "row_wise", "g_b": "row_wise"}
TW_RW = {"g_a": "table_wise", "g_b": "row_wise"}


def test_checkpoint_2_ranks_to_1_rank_unsharded(tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = get_pool(2).run(_dcp_save, TW_RW, "rowwise_adagrad", str(tmp_path))[0]
    torch.manual_seed(123)
    model = robe_dlrm("rowwise_adagrad", "reference")
    optim = _fused_optim_of_unsharded(model)
    sd = {"model": model.state_dict(), "optim": optim.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path))  # one process, no process group
    model.load_state_dict(sd["model"])
    optim.load_state_dict(sd["optim"])
    _assert_same_state(_full_state(model.state_dict(), optim.state_dict()), saved)


def test_checkpoint_1_rank_unsharded_to_2_ranks(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(7)
    model = robe_dlrm("adagrad", "reference")
    _train_steps(model, 0, 2, 2)  # any training: the unsharded model on rank 0's half
    optim = _fused_optim_of_unsharded(model)
    dcp.save({"model": model.state_dict(), "optim": optim.state_dict()}, checkpoint_id=str(tmp_path))
    want = _full_state(model.state_dict(), optim.state_dict())
    for got in get_pool(2).run(_dcp_load, RW, "adagrad", str(tmp_path)):
        _assert_same_state(got, want)


def test_checkpoint_data_parallel_to_row_wise(tmp_path):
    dp = {"g_a": "data_parallel", "g_b": "table_wise"}
    saved = get_pool(2).run(_dcp_save, dp, "adagrad", str(tmp_path))[0]
    for got in get_pool(2).run(_dcp_load, RW, "adagrad", str(tmp_path), None, ("g_a",)):
        assert float(got.pop(f"optim:{EBC_PATH}.arrays.g_a").abs().sum()) == 0  # fresh: was in the dense optimizer
        _assert_same_state(got, saved)


def _dcp_load_other_layout(rank: int, world_size: int, path: str) -> str:
    other = dict(GROUPS, g_b=RobeConfig(160, block_size=BLOCK, seed=99))
    try:
        _dcp_load(rank, world_size, RW, "adagrad", path, groups=other)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_checkpoint_of_another_layout_is_refused(tmp_path):
    get_pool(2).run(_dcp_save, RW, "adagrad", str(tmp_path))
    for msg in get_pool(2).run(_dcp_load_other_layout, str(tmp_path)):
        assert "different layout" in msg, msg


# ----- a model mixing ROBE groups with a stock torchrec EmbeddingBagCollection -----------------------


class RobePlusEBC(torch.nn.Module):
    def __init__(self, robe: RobeEmbeddingBagCollection, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.robe = robe
        self.ebc = ebc
        self.over = torch.nn.Linear(DIM * (len(FEATURES) + 1), 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.over(torch.cat([self.robe(kjt).values(), self.ebc(kjt).values()], dim=1))


def _mixed_model() -> RobePlusEBC:
    robe = RobeEmbeddingBagCollection(
        robe_tables(), GROUPS, table_to_group=TABLE_TO_GROUP, kernel="reference",
        fused_optimizer=RobeFusedOptimizerConfig("sgd", lr=LR),
    )
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="s0", embedding_dim=DIM, num_embeddings=50, feature_names=["e0"])])
    return RobePlusEBC(robe, ebc)


def _mixed_bags(step: int, world_size: int) -> Dict[str, List[List[int]]]:
    _, bags, _ = batch(step, world_size)
    bags["e0"] = [[abs(i) % 50 for i in bag] for bag in bags["f0"]]
    return bags


def _train_mixed(rank: int, world_size: int, robe_types: Dict[str, str], ebc_type: str) -> Dict[str, str]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    torch.manual_seed(0)
    reference = _mixed_model()
    sharders = [
        RobeEmbeddingBagCollectionSharder(),
        EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}),
    ]
    dmp, plan = plan_and_shard(copy.deepcopy(reference), robe_types, world_size, sharders,
                               {"s0": ParameterConstraints(sharding_types=[ebc_type])})
    copy_state(dmp, reference.state_dict())
    planned = {g: plan.plan["robe"][g].sharding_type for g in GROUPS}
    planned["s0"] = plan.plan["ebc"]["s0"].sharding_type
    assert planned == dict(robe_types, s0=ebc_type), planned
    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(reference.named_parameters())], lr=LR)
    dmp_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(3):
        bags = _mixed_bags(step, world_size)
        labels = batch(step, world_size)[2]
        ref_logits = reference(make_kjt(bags, 0, B_LOCAL * world_size)).squeeze(1)
        ref_opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(ref_logits, labels).backward()
        ref_opt.step()
        logits = dmp(make_kjt(bags, lo, hi)).squeeze(1)
        dmp_opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[lo:hi]).backward()
        dmp_opt.step()
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=RTOL, atol=ATOL)
    state, ref_state = dmp.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(ref_state)
    for key in [f"robe.arrays.{g}" for g in GROUPS] + ["ebc.embedding_bags.s0.weight"]:
        torch.testing.assert_close(materialize(state[key]).reshape(ref_state[key].shape), ref_state[key], rtol=RTOL, atol=ATOL)
    return planned


def test_robe_groups_next_to_a_stock_ebc():
    get_pool(2).run(_train_mixed, {"g_a": "row_wise", "g_b": "table_wise"}, "table_wise")


# ----- planner ----------------------------------------------------------------------------------------


def _big_model(num_elements: int) -> torch.nn.Module:
    """Nominal tables of 10^9 x 64 floats (256 GB each), compressed into a small array; plus a stock EBC."""
    tables = [EmbeddingBagConfig(name=f"big{i}", embedding_dim=64, num_embeddings=10**9, feature_names=[f"b{i}"]) for i in range(2)]
    robe = RobeEmbeddingBagCollection(
        tables, {"robe_main": RobeConfig(num_elements, block_size=32)}, device="meta",
        fused_optimizer=RobeFusedOptimizerConfig("adagrad"),
    )
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="small", embedding_dim=64, num_embeddings=1000, feature_names=["s"])], device=torch.device("meta"))
    return torch.nn.ModuleDict({"robe": robe, "ebc": ebc})


def _plan(model: torch.nn.Module, hbm_bytes: int, constraints: Optional[Dict[str, ParameterConstraints]] = None):
    topology = Topology(world_size=2, local_world_size=2, compute_device="cuda", hbm_cap=hbm_bytes)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.plan(model, [RobeEmbeddingBagCollectionSharder(), *get_default_sharders()])


def test_planner_sizes_robe_by_its_true_memory_and_picks_row_wise_when_needed():
    gb = 1024**3
    # 64M elements: 256 MB array + 256 MB Adagrad state = 512 MB (the nominal tables: 512 GB).
    # On devices of 0.45 GB only row_wise (256 MB per device) fits.
    model = _big_model(64 * 2**20)
    plan = _plan(model, int(0.45 * gb))
    assert plan.plan["robe"]["robe_main"].sharding_type == "row_wise"
    assert "small" in plan.plan["ebc"]
    # With room for the whole array, a constraint keyed by the group name is honoured.
    for stype in ("data_parallel", "table_wise", "row_wise"):
        plan = _plan(model, 4 * gb, {"robe_main": ParameterConstraints(sharding_types=[stype])})
        assert plan.plan["robe"]["robe_main"].sharding_type == stype


def test_shardable_parameter_is_a_view_with_the_true_byte_count():
    from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler

    model = _big_model(64 * 2**20)
    sharder = RobeEmbeddingBagCollectionSharder()
    params = sharder.shardable_parameters(model["robe"])
    assert list(params) == ["robe_main"]
    view = params["robe_main"]
    assert tuple(view.shape) == (2**21, 32) and view.numel() * view.element_size() == 4 * 64 * 2**20
    assert _get_optimizer_multipler(view._optimizer_classes[0], view.shape) == 1  # adagrad: one float per element
    rw = RobeEmbeddingBagCollectionSharder(fused_params={"optimizer": "rowwise_adagrad"})
    view = rw.shardable_parameters(model["robe"])["robe_main"]
    assert _get_optimizer_multipler(view._optimizer_classes[0], view.shape) == 1 / 32  # one float per Z-chunk
    assert set(sharder.sharding_types("cpu")) == set(sharder.sharding_types("cuda")) == {"data_parallel", "table_wise", "row_wise"}


def test_array_elements_for_budget():
    from robe_torchrec.sharding.sizing import array_elements_for_budget, device_bytes

    gb = 1024**3
    m = array_elements_for_budget(gb, 8, "adagrad", "row_wise", block_size=32)
    assert m % 32 == 0 and device_bytes(m, 8, "adagrad", "row_wise", 32) <= gb
    assert device_bytes(m + 8 * 32, 8, "adagrad", "row_wise", 32) > gb  # the largest that fits
    assert m == 8 * (gb // 8 // 32) * 32
    assert array_elements_for_budget(gb, 8, "adagrad", "data_parallel", 32) == m // 8
    assert array_elements_for_budget(gb, 8, "sgd", "table_wise", 32) == gb // 4
    topology = Topology(world_size=4, local_world_size=4, compute_device="cuda", hbm_cap=2 * gb)
    assert array_elements_for_budget(None, topology, "rowwise_adagrad", "row_wise", 32) == 4 * ((2 * gb) // (32 * 4 + 4)) * 32
