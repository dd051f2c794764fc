"""torchrec's optimizer-in-backward idiom selects the fused ROBE optimizer (plain module and sharder).

Reference: the same module with that fused optimizer configured directly
(``fused_optimizer=RobeFusedOptimizerConfig(...)``), trained on the same batches.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_torchrec import RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec import apply_optimizer_in_backward as robe_apply_optimizer_in_backward
from robe_torchrec.optim_in_backward import config_from_optimizer, tag_optimizer_in_backward
from robe_torchrec.sharding.sharder import RobeEmbeddingBagCollectionSharder
from tests.test_sharding import (
    ATOL, B_LOCAL, EBC_PATH, GROUPS, LR, RTOL, TABLE_TO_GROUP, batch, copy_state, make_kjt, materialize,
    plan_and_shard, robe_dlrm, robe_tables,
)
from tests.test_sharding_harness import get_pool


def _ebc(fused: Optional[RobeFusedOptimizerConfig]) -> RobeEmbeddingBagCollection:
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(robe_tables(), GROUPS, table_to_group=TABLE_TO_GROUP, kernel="reference", fused_optimizer=fused)


# (api, class, kwargs, the fused config it must select). torchrec's RowWiseAdagrad cannot be
# constructed on a 1-D tensor, so torch's/torchrec's apply_* cannot tag a ROBE array with it; the
# tag helper sets the same attributes (see robe_torchrec.optim_in_backward).
PLAIN_CASES = [
    pytest.param("torch", torch.optim.SGD, {"lr": 0.3}, RobeFusedOptimizerConfig("sgd", lr=0.3), id="torch-SGD"),
    pytest.param("torchrec", torch.optim.SGD, {"lr": 0.3}, RobeFusedOptimizerConfig("sgd", lr=0.3), id="torchrec-SGD"),
    pytest.param("torch", torch.optim.Adagrad, {"lr": 0.2, "eps": 1e-6}, RobeFusedOptimizerConfig("adagrad", lr=0.2, eps=1e-6), id="torch-Adagrad"),
    pytest.param("torchrec", trec_optim.Adagrad, {"lr": 0.2, "eps": 1e-6}, RobeFusedOptimizerConfig("adagrad", lr=0.2, eps=1e-6), id="torchrec-trec.Adagrad"),
    pytest.param("robe-tag", trec_optim.RowWiseAdagrad, {"lr": 0.5, "eps": 1e-4}, RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.5, eps=1e-4), id="tag-RowWiseAdagrad"),
    pytest.param("robe", trec_optim.RowWiseAdagrad, {"lr": 0.5, "eps": 1e-4}, RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.5, eps=1e-4), id="robe-RowWiseAdagrad"),
    pytest.param("robe", torch.optim.Adagrad, {"lr": 0.2, "eps": 1e-6}, RobeFusedOptimizerConfig("adagrad", lr=0.2, eps=1e-6), id="robe-Adagrad"),
]
APPLY = {
    "torch": _apply_optimizer_in_backward, "torchrec": apply_optimizer_in_backward, "robe-tag": tag_optimizer_in_backward,
    "robe": robe_apply_optimizer_in_backward,
}


@pytest.mark.parametrize("api,cls,kwargs,expected", PLAIN_CASES)
def test_plain_module_trains_like_the_fused_optimizer_configured_directly(api, cls, kwargs, expected):
    model = _ebc(None)
    reference = _ebc(expected)
    assert torch.equal(model.arrays["g_a"], reference.arrays["g_a"])
    APPLY[api](cls, model.parameters(), kwargs)
    assert model.fused_optimizer.config == expected  # adopted before the first forward
    for step in range(3):
        _, bags, _ = batch(step, 2)
        kjt = make_kjt(bags, 0, 2 * B_LOCAL)
        for m in (model, reference):
            (m(kjt).values() ** 2).sum().backward()
    for g in GROUPS:
        assert model.arrays[g].grad is None  # fused: no gradient left, the torch optimizer never ran
        torch.testing.assert_close(model.arrays[g], reference.arrays[g], rtol=0, atol=0)
        assert not torch.equal(model.arrays[g], _ebc(None).arrays[g])  # it did train
    assert set(model.fused_optimizer.state_dict()["state"]) == set(reference.fused_optimizer.state_dict()["state"])
    for key, st in reference.fused_optimizer.state_dict()["state"].items():
        torch.testing.assert_close(model.fused_optimizer.state_dict()["state"][key]["momentum1"], st["momentum1"], rtol=0, atol=0)
    # torchrec's filter keeps the arrays out of a dense optimizer
    assert not [n for n, _ in in_backward_optimizer_filter(model.named_parameters())]


def test_torchrec_rowwise_adagrad_cannot_take_a_1d_array_but_the_drop_in_can():
    """Why the drop-in exists: torchrec's RowWiseAdagrad is built per parameter and averages over dim 1."""
    with pytest.raises(IndexError):
        apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, _ebc(None).parameters(), {"lr": 0.1})
    model = _ebc(None)
    robe_apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, model.parameters(), {"lr": 0.1})
    assert model.fused_optimizer.config == RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.1)


def test_drop_in_on_a_whole_dlrm_fuses_the_arrays_and_steps_the_rest_with_torch():
    """One call on every parameter of a DLRM: ROBE arrays get the fused Adagrad, the MLP weights
    torch's Adagrad stepped in backward. Reference: the fused optimizer configured directly plus
    a plain torch Adagrad over the MLP parameters, stepped after backward."""
    torch.manual_seed(0)
    model = robe_dlrm(None, "reference")
    reference = robe_dlrm("adagrad", "reference")
    reference.load_state_dict(model.state_dict())
    kwargs = {"lr": 0.05, "eps": 1e-6}
    ref_ebc = reference.sparse_arch.embedding_bag_collection
    ref_ebc.fused_optimizer.param_groups[0]["lr"] = kwargs["lr"]
    ref_ebc.fused_optimizer.param_groups[0]["eps"] = kwargs["eps"]
    dense = [p for n, p in reference.named_parameters() if ".arrays." not in n]
    ref_opt = torch.optim.Adagrad(dense, **kwargs)
    robe_apply_optimizer_in_backward(torch.optim.Adagrad, model.parameters(), kwargs)
    for step in range(3):
        d, bags, labels = batch(step, 1)
        kjt = make_kjt(bags, 0, B_LOCAL)
        ref_opt.zero_grad()
        for m in (model, reference):
            torch.nn.functional.binary_cross_entropy_with_logits(m(d, kjt).squeeze(1), labels).backward()
        ref_opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(p.grad is None for p in model.parameters())  # every update ran in backward


def test_drop_in_refuses_an_unsupported_class_on_a_robe_array_before_tagging():
    model = _ebc(None)
    with pytest.raises(ValueError, match=r"torch\.optim\.adam\.Adam is not supported.*RowWiseAdagrad"):
        robe_apply_optimizer_in_backward(torch.optim.Adam, model.parameters(), {"lr": 0.1})
    assert not any(hasattr(p, "_optimizer_classes") for p in model.parameters())


def test_unsupported_optimizers_and_options_raise_clearly():
    model = _ebc(None)
    _apply_optimizer_in_backward(torch.optim.Adam, model.parameters(), {"lr": 0.1})
    _, bags, _ = batch(0, 1)
    with pytest.raises(ValueError, match=r"torch\.optim\.adam\.Adam is not supported.*torch\.optim\.SGD.*torch\.optim\.Adagrad.*RowWiseAdagrad"):
        model(make_kjt(bags, 0, B_LOCAL))
    with pytest.raises(ValueError, match="momentum=0.9 is not supported"):
        config_from_optimizer(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="weight_decay"):
        config_from_optimizer(trec_optim.RowWiseAdagrad, {"lr": 0.1, "weight_decay": 1e-4})
    mixed = _ebc(None)
    _apply_optimizer_in_backward(torch.optim.SGD, [mixed.arrays["g_a"]], {"lr": 0.1})
    with pytest.raises(ValueError, match="same optimizer in backward"):
        mixed.fused_optimizer  # noqa: B018 - g_b untagged


# ----- through the sharder (2 gloo ranks) ---------------------------------------------------------------


def _sharded_in_backward(rank: int, world_size: int, types: Dict[str, str], cls: Any, kwargs: Dict[str, Any], fused: str, sharder_fused: Optional[Dict[str, Any]]) -> str:
    torch.manual_seed(0)
    reference = robe_dlrm(fused, "reference")  # the fused optimizer configured directly, unsharded
    # the kernels read lr / eps from param_groups (as LR schedulers set them)
    reference.sparse_arch.embedding_bag_collection.fused_optimizer.param_groups[0]["eps"] = kwargs.get("eps", RobeFusedOptimizerConfig().eps)
    model = robe_dlrm(None, "reference")
    # torchrec's examples tag the whole sparse arch; RowWiseAdagrad needs the drop-in (see above)
    apply = robe_apply_optimizer_in_backward if cls is trec_optim.RowWiseAdagrad else apply_optimizer_in_backward
    apply(cls, model.sparse_arch.parameters(), kwargs)
    sharders = [RobeEmbeddingBagCollectionSharder(fused_params=sharder_fused)]
    from torchrec.distributed.model_parallel import get_default_sharders

    dmp, _ = plan_and_shard(model, types, world_size, [*sharders, *get_default_sharders()])
    copy_state(dmp, reference.state_dict())
    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(reference.named_parameters())], lr=LR)
    dmp_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=LR))
    lo, hi = rank * B_LOCAL, (rank + 1) * B_LOCAL
    for step in range(3):
        dense, bags, labels = batch(step, world_size)
        ref_logits = reference(dense, make_kjt(bags, 0, B_LOCAL * world_size)).squeeze(1)
        ref_opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(ref_logits, labels).backward()
        ref_opt.step()
        logits = dmp(dense[lo:hi], make_kjt(bags, lo, hi)).squeeze(1)
        dmp_opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[lo:hi]).backward()
        dmp_opt.step()
        everyone = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(everyone, logits.detach())
        torch.testing.assert_close(torch.cat(everyone), ref_logits.detach(), rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")
    opt_state = dmp.fused_optimizer.state_dict()["state"]
    ref_opt_state = reference.sparse_arch.embedding_bag_collection.fused_optimizer.state_dict()["state"]
    for g in GROUPS:
        torch.testing.assert_close(materialize(opt_state[f"{EBC_PATH}.arrays.{g}"]["momentum1"]), ref_opt_state[f"arrays.{g}"]["momentum1"], rtol=RTOL, atol=ATOL)
    (pg,) = [grp for grp in dmp.fused_optimizer.param_groups if grp.get("optimizer")]
    return f"{pg['optimizer']} lr={pg['lr']} eps={pg['eps']}"


def test_sharder_reads_the_optimizer_in_backward():
    got = get_pool(2).run(_sharded_in_backward, {"g_a": "table_wise", "g_b": "row_wise"}, trec_optim.RowWiseAdagrad,
                          {"lr": LR, "eps": 1e-6}, "rowwise_adagrad", None)
    assert got == ["rowwise_adagrad lr=0.1 eps=1e-06"] * 2


def test_optimizer_in_backward_wins_over_sharder_fused_params():
    # torchrec's rule: per-parameter optimizer kwargs take precedence over the sharder's fused_params.
    got = get_pool(2).run(_sharded_in_backward, {"g_a": "row_wise", "g_b": "row_wise"}, torch.optim.Adagrad,
                          {"lr": LR}, "adagrad", {"optimizer": "sgd", "lr": 0.5})
    assert got == [f"adagrad lr=0.1 eps={RobeFusedOptimizerConfig().eps}"] * 2


def _tag_on_data_parallel(rank: int, world_size: int) -> list:
    import warnings

    torch.manual_seed(0)
    model = robe_dlrm(None, "reference")
    robe_apply_optimizer_in_backward(torch.optim.Adagrad, model.sparse_arch.parameters(), {"lr": LR})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_and_shard(model, {"g_a": "data_parallel", "g_b": "row_wise"}, world_size)
    return [str(w.message) for w in caught if "data_parallel" in str(w.message)]


def test_a_tag_on_a_data_parallel_group_is_reported():
    """data_parallel arrays go to DDP + the dense optimizer (torchrec's rule): the tag's fused
    optimizer cannot reach them, and the sharder says so, naming the group."""
    for messages in get_pool(2).run(_tag_on_data_parallel):
        assert len(messages) == 1 and "['g_a']" in messages[0] and "adagrad" in messages[0], messages
