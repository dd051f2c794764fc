"""Sharded ROBE inside torchrec's own TrainPipelineSparseDist (CPU, gloo, 2 processes).

Every sharding type, with a fused optimizer and without, and a model mixing ROBE groups with a
stock torchrec EmbeddingBagCollection (sharded by torchrec's own sharder): the pipeline (which
starts batch i+1's input dist, fusing the splits all-to-alls of all sharded modules, before batch
i's backward) must give the same predictions, step by step, and the same arrays as the plain
loop of the unsharded model on the global batch (torchrec's equality pattern, see
tests/test_sharding.py). Tolerance: float32 noise, rtol = atol = 1e-5.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, Optional

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.optim import apply_optimizer_in_backward
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_torchrec import RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.sharding.sharded_module import ShardedRobeEmbeddingBagCollection
from robe_torchrec.sharding.sharder import RobeEmbeddingBagCollectionSharder
from tests.test_sharding import (
    ATOL, B_LOCAL, DIM, GROUPS, LR, RTOL, TABLE_TO_GROUP, batch, copy_state, make_kjt, materialize, plan_and_shard,
    robe_dlrm, robe_tables, with_kernel,
)
from tests.test_sharding_harness import get_pool

STEPS = 4


class MixedTrain(torch.nn.Module):
    """ROBE groups next to a stock EBC, fed the same KJT; returns (loss, logits) like DLRMTrain."""

    def __init__(self, fused: Optional[str]) -> None:
        super().__init__()
        self.robe = RobeEmbeddingBagCollection(
            robe_tables(), GROUPS, table_to_group=TABLE_TO_GROUP, kernel="reference",
            fused_optimizer=RobeFusedOptimizerConfig(fused, lr=LR) if fused else None,
        )
        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="s0", embedding_dim=DIM, num_embeddings=50, feature_names=["e0"])])
        self.over = torch.nn.Linear(DIM * 6 + 3, 1)

    def forward(self, b: Batch) -> Any:
        x = torch.cat([self.robe(b.sparse_features).values(), self.ebc(b.sparse_features).values(), b.dense_features], dim=1)
        logits = self.over(x).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        return loss, logits.detach()


def _batch(step: int, world_size: int, lo: int, hi: int, mixed: bool) -> Batch:
    dense, bags, labels = batch(step, world_size)
    if mixed:
        bags["e0"] = [[abs(i) % 50 for i in bag] for bag in bags["f0"]]
    return Batch(dense_features=dense[lo:hi], sparse_features=make_kjt(bags, lo, hi), labels=labels[lo:hi])



class BackendCalls:
    """Counts calls into each lookup path: the C++ kernel, and the PyTorch ones (the reference
    lookup of a whole array, the reference backend of the custom ops, the masked row-wise path)."""

    PATHS = {
        "cpu.forward": ("robe_torchrec.ops.cpu", "pooled_forward"),
        "cpu.backward_fused": ("robe_torchrec.ops.cpu", "pooled_backward_fused"),
        "reference.lookup": ("robe_torchrec.ops.lookup", "robe_pooled_lookup_reference"),
        "reference.forward": ("robe_torchrec.ops.reference", "pooled_forward"),
        "reference.op_forward": ("robe_torchrec.ops.library", "_reference_forward"),
        "reference.masked": ("robe_torchrec.sharding.rw", "partial_pooled"),
        "reference.masked_fused": ("robe_torchrec.sharding.rw", "partial_pooled_fused"),
    }

    def __init__(self) -> None:
        import importlib

        self.counts: Dict[str, int] = {key: 0 for key in self.PATHS}
        self._originals = []
        for key, (module_name, name) in self.PATHS.items():
            module = importlib.import_module(module_name)
            original = getattr(module, name)
            self._originals.append((module, name, original))
            setattr(module, name, self._counted(key, original))

    def _counted(self, key: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[key] += 1
            return original(*args, **kwargs)

        return counted

    def restore(self) -> None:
        for module, name, original in self._originals:
            setattr(module, name, original)

    def snapshot(self) -> Dict[str, int]:
        return dict(self.counts)


def _pipeline_equals_plain(
    rank: int, world_size: int, types: Dict[str, str], fused: Optional[str], mixed: bool,
    pipeline_cls: type = TrainPipelineSparseDist, in_backward: bool = False, kernel: str = "reference",
) -> int:
    """The pipeline over the sharded model (its ROBE lookups on ``kernel``) vs the plain loop over
    the unsharded model on the reference kernel."""
    torch.manual_seed(0)
    reference: torch.nn.Module = MixedTrain(fused) if mixed else DLRMTrain(robe_dlrm(fused, "reference"))
    if in_backward:  # torchrec's example idiom: the optimizer comes from the parameters' tag
        model = DLRMTrain(robe_dlrm(None, kernel))
        apply_optimizer_in_backward(torch.optim.Adagrad, model.model.sparse_arch.parameters(), {"lr": LR, "eps": 1e-8})
        dmp, _ = plan_and_shard(model, types, world_size)
    elif mixed:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        # The stock EBC: torchrec's fused SGD (the reference steps it with the same plain SGD);
        # "unfused" is about the ROBE arrays.
        ebc_fused = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
        sharders = [RobeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder(fused_params=ebc_fused)]
        dmp, _ = plan_and_shard(with_kernel(copy.deepcopy(reference), kernel), types, world_size, sharders,
                                {"s0": ParameterConstraints(sharding_types=["table_wise"])})
    else:
        dmp, _ = plan_and_shard(with_kernel(copy.deepcopy(reference), kernel), types, world_size)
    copy_state(dmp, reference.state_dict())
    sharded = [m for m in dmp.modules() if isinstance(m, ShardedRobeEmbeddingBagCollection)]
    assert len(sharded) == 1 and sharded[0].sharding_types() == types

    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(reference.named_parameters())], lr=LR)
    dmp_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    pipeline = pipeline_cls(dmp, dmp_opt, torch.device("cpu"))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    batches: Iterator[Batch] = iter([_batch(s, world_size, lo, hi, mixed) for s in range(STEPS)])
    calls = BackendCalls()
    sharded_calls = {key: 0 for key in calls.counts}
    for step in range(STEPS):
        full = _batch(step, world_size, 0, B_LOCAL * world_size, mixed)
        ref_opt.zero_grad()
        ref_loss, ref_out = reference(full)
        ref_loss.backward()
        ref_opt.step()
        ref_logits = ref_out[1] if isinstance(ref_out, tuple) else ref_out

        before = calls.snapshot()
        out = pipeline.progress(batches)
        sharded_calls = {k: sharded_calls[k] + calls.counts[k] - before[k] for k in sharded_calls}
        if step == 0 and pipeline_cls is TrainPipelineSparseDist:  # input dist really runs a batch ahead
            assert any(m is sharded[0] for m in pipeline._pipelined_modules), pipeline._pipelined_modules
            assert len(pipeline._pipelined_modules) == (2 if mixed else 1)
        logits = out[1] if isinstance(out, tuple) else out
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")
    with pytest.raises(StopIteration):
        pipeline.progress(batches)
    calls.restore()
    _check_backend_calls(sharded_calls, types, kernel, fused or in_backward)

    state, ref_state = dmp.state_dict(), reference.state_dict()
    assert sorted(state) == sorted(ref_state)
    arrays = [k for k in ref_state if ".arrays." in k] + (["ebc.embedding_bags.s0.weight"] if mixed else [])
    for key in arrays:
        torch.testing.assert_close(materialize(state[key]).reshape(ref_state[key].shape), ref_state[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
    return STEPS


def _check_backend_calls(calls: Dict[str, int], types: Dict[str, str], kernel: str, fused: Any) -> None:
    """Every ROBE lookup of the sharded model ran on ``kernel``'s path and none on the other
    (row_wise on ``cpu``: the C++ element_range path, never the masked PyTorch one), and a fused
    optimizer stepped inside the C++ backward for table_wise / row_wise groups."""
    fast = calls["cpu.forward"] + calls["cpu.backward_fused"]
    slow = sum(v for k, v in calls.items() if k.startswith("reference."))
    if kernel == "cpu":
        assert calls["cpu.forward"] > 0 and slow == 0, calls
        if fused and set(types.values()) - {"data_parallel"}:
            assert calls["cpu.backward_fused"] > 0, calls
    else:
        assert slow > 0 and fast == 0, calls


CASES = [
    pytest.param({"g_a": "data_parallel", "g_b": "data_parallel"}, "sgd", False, id="data_parallel-sgd"),
    pytest.param({"g_a": "data_parallel", "g_b": "data_parallel"}, None, False, id="data_parallel-unfused"),
    pytest.param({"g_a": "table_wise", "g_b": "table_wise"}, "adagrad", False, id="table_wise-adagrad"),
    pytest.param({"g_a": "table_wise", "g_b": "table_wise"}, None, False, id="table_wise-unfused"),
    pytest.param({"g_a": "row_wise", "g_b": "row_wise"}, "rowwise_adagrad", False, id="row_wise-rowwise_adagrad"),
    pytest.param({"g_a": "row_wise", "g_b": "row_wise"}, None, False, id="row_wise-unfused"),
    pytest.param({"g_a": "data_parallel", "g_b": "row_wise"}, "sgd", True, id="mixed-ebc-data_parallel+row_wise-sgd"),
    pytest.param({"g_a": "row_wise", "g_b": "table_wise"}, "sgd", True, id="mixed-ebc-row_wise+table_wise-sgd"),
    pytest.param({"g_a": "table_wise", "g_b": "row_wise"}, None, True, id="mixed-ebc-table_wise+row_wise-unfused"),
]


@pytest.mark.parametrize("types,fused,mixed", CASES)
def test_train_pipeline_sparse_dist_equals_plain_loop(types, fused, mixed):
    assert get_pool(2).run(_pipeline_equals_plain, types, fused, mixed) == [STEPS, STEPS]


FAST_KERNEL_CASES = [
    pytest.param({"g_a": "table_wise", "g_b": "row_wise"}, "rowwise_adagrad", False, id="table_wise+row_wise-rowwise_adagrad"),
    pytest.param({"g_a": "row_wise", "g_b": "row_wise"}, "adagrad", False, id="row_wise-adagrad"),
    pytest.param({"g_a": "table_wise", "g_b": "data_parallel"}, None, False, id="table_wise+data_parallel-unfused"),
    pytest.param({"g_a": "row_wise", "g_b": "table_wise"}, "sgd", True, id="mixed-ebc-row_wise+table_wise-sgd"),
]


@pytest.mark.parametrize("types,fused,mixed", FAST_KERNEL_CASES)
def test_train_pipeline_on_the_cpu_kernel_equals_plain_loop_on_the_reference(types, fused, mixed):
    """The sharded lookups (table_wise pooling, row_wise element_range partial sums, fused steps)
    on the C++ kernel inside the pipeline match the reference kernel's plain loop."""
    result = get_pool(2).run(_pipeline_equals_plain, types, fused, mixed, TrainPipelineSparseDist, False, "cpu")
    assert result == [STEPS, STEPS]


def test_train_pipeline_base_equals_plain_loop():
    assert get_pool(2).run(_pipeline_equals_plain, {"g_a": "row_wise", "g_b": "table_wise"}, "sgd", True, TrainPipelineBase) == [STEPS, STEPS]


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_train_pipeline_with_optimizer_in_backward(kernel):
    """apply_optimizer_in_backward(Adagrad) before DMP, then TrainPipelineSparseDist == fused adagrad."""
    assert get_pool(2).run(_pipeline_equals_plain, {"g_a": "table_wise", "g_b": "row_wise"}, "adagrad", False,
                           TrainPipelineSparseDist, True, kernel) == [STEPS, STEPS]


class WeightedTrain(torch.nn.Module):
    """A weighted ROBE collection (per-id weights in the KJT) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.robe = RobeEmbeddingBagCollection(robe_tables(), GROUPS, table_to_group=TABLE_TO_GROUP, kernel="reference", is_weighted=True)
        self.over = torch.nn.Linear(DIM * 5, 1)

    def forward(self, b: Batch) -> Any:
        logits = self.over(self.robe(b.sparse_features).values()).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels), logits.detach()


def _weighted_batch(step: int, world_size: int, lo: int, hi: int) -> Batch:
    """``_batch`` plus per-id weights drawn for the global batch, this rank's bags sliced out."""
    b = _batch(step, world_size, lo, hi, False)
    kjt = b.sparse_features
    full = _batch(step, world_size, 0, B_LOCAL * world_size, False).sparse_features
    all_w = torch.rand(full.values().numel(), generator=torch.Generator().manual_seed(step))
    offs, bg = full.offsets(), B_LOCAL * world_size
    weights = torch.cat([all_w[int(offs[f * bg + lo]) : int(offs[f * bg + hi])] for f in range(len(kjt.keys()))])
    sparse = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)
    return Batch(dense_features=b.dense_features, sparse_features=sparse, labels=b.labels)


def _weighted_pipeline(rank: int, world_size: int, types: Dict[str, str]) -> int:
    torch.manual_seed(0)
    reference = WeightedTrain()
    dmp, _ = plan_and_shard(copy.deepcopy(reference), types, world_size)
    copy_state(dmp, reference.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    dmp_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    pipeline = TrainPipelineSparseDist(dmp, dmp_opt, torch.device("cpu"))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    batches = iter([_weighted_batch(s, world_size, lo, hi) for s in range(STEPS)])
    for step in range(STEPS):
        ref_opt.zero_grad()
        ref_loss, ref_logits = reference(_weighted_batch(step, world_size, 0, B_LOCAL * world_size))
        ref_loss.backward()
        ref_opt.step()
        logits = pipeline.progress(batches)
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits)
        torch.testing.assert_close(torch.cat(everyone), ref_logits, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")
    return STEPS


def test_weighted_features_under_the_pipeline():
    """Per-id weights travel with the ids through the table_wise and row_wise input dists."""
    assert get_pool(2).run(_weighted_pipeline, {"g_a": "row_wise", "g_b": "table_wise"}) == [STEPS, STEPS]
