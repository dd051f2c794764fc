"""The training lookup under torch.compile(fullgraph=True) and torch.export: the robe:: custom ops
(opcheck), compiled forward / training steps (dense gradient and fused optimizer) against the eager
module, dynamic batch size and id count without recompiling per shape, no graph breaks, and an
exported training DLRM against eager."""

from __future__ import annotations

import copy
from typing import List

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.ops import library  # noqa: F401  (registers torch.ops.robe.*)
from robe_torchrec.ops.api import mean_flags, state_numel
from robe_torchrec.ops.cpu import is_available as cpu_kernel_available
from robe_torchrec.optim import RobeFusedOptimizerConfig

KERNELS = ["reference"] + (["cpu"] if cpu_kernel_available() else [])
FEATURES = ["f0", "f1", "f2"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tables() -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=500, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=500, feature_names=["f1", "f2"],
                           pooling=PoolingType.MEAN),
    ]


def _ebc(kernel: str = "auto", fused: str = "", weighted: bool = False) -> RobeEmbeddingBagCollection:
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(
        _tables(), RobeConfig(num_elements=301, block_size=4, seed=7), is_weighted=weighted, kernel=kernel,
        fused_optimizer=RobeFusedOptimizerConfig(optimizer=fused, lr=0.05) if fused else None,
    )


def _kjt(batch: int, seed: int, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(FEATURES) * batch,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor(keys=FEATURES, values=torch.randint(-(2**40), 2**40, (n,), generator=g), lengths=lengths,
                             weights=torch.rand(n, generator=g) if weighted else None)


def _dlrm(ebc: RobeEmbeddingBagCollection) -> DLRM:
    torch.manual_seed(1)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                over_arch_layer_sizes=[8, 1])


def _dense(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(100 + seed))


# ----- the ops ------------------------------------------------------------------------------------


def _op_args(kernel: str, weighted: bool):
    kjt = _kjt(3, seed=4, weighted=weighted)
    m, z, dim = 301, 4, 8
    array = torch.randn(m)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), kjt.lengths().cumsum(0)])
    keys = torch.tensor([[11, 12], [13, 14], [15, 16]], dtype=torch.int64)
    mean = mean_flags((False, True, True), torch.device("cpu"))
    return array, kjt.values(), offsets, keys, mean, kjt.weights_or_none(), 3, dim, z, m, kernel


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_forward_and_dense_backward(kernel: str, weighted: bool) -> None:
    args = list(_op_args(kernel, weighted))
    args[0] = args[0].requires_grad_()
    torch.library.opcheck(torch.ops.robe.pooled_forward.default, tuple(args))
    grad_out = torch.randn(3, 24)
    torch.library.opcheck(torch.ops.robe.pooled_backward_dense.default, (grad_out, *args[1:]))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adagrad"])
def test_opcheck_fused_backward(kernel: str, kind: str) -> None:
    array, ids, offsets, keys, mean, weights, b, dim, z, m, _ = _op_args(kernel, weighted=True)
    state = torch.rand(state_numel(kind, m, z))
    torch.library.opcheck(
        torch.ops.robe.pooled_backward_fused.default,
        (torch.randn(3, 24), array, state, ids, offsets, keys, mean, weights, b, dim, z, m, kind, 0.1, 1e-8, kernel),
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [False, True])
def test_op_dense_backward_equals_autograd_reference(kernel: str, window: bool) -> None:
    """Against autograd through the reference forward (outside any op), also on an offsets window."""
    from robe_torchrec.ops import reference
    from robe_torchrec.ops.api import LookupBatch

    array, ids, offsets, keys, mean, weights, b, dim, z, m, _ = _op_args(kernel, weighted=True)
    if window:  # features 1..2 only, with the whole batch's ids
        offsets, keys, mean = offsets[b:], keys[1:], mean[1:]
    grad_out = torch.randn(b, keys.shape[0] * dim)
    got = torch.ops.robe.pooled_backward_dense(grad_out, ids, offsets, keys, mean, weights, b, dim, z, m, kernel)
    batch = LookupBatch(ids, offsets, keys, mean, weights, b, dim, z, m)
    want = reference.pooled_backward_dense(grad_out, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fwd = torch.ops.robe.pooled_forward(array, ids, offsets, keys, mean, weights, b, dim, z, m, kernel)
    torch.testing.assert_close(fwd, reference.pooled_forward(array, batch), rtol=1e-5, atol=1e-6)


def test_ops_name_bad_kernel() -> None:
    args = list(_op_args("cpu", weighted=False))
    args[-1] = "cuda_magic"
    with pytest.raises(ValueError, match="kernel must be one of"):
        torch.ops.robe.pooled_forward(*args)


# ----- torch.compile of the module ---------------------------------------------------------------


def test_no_graph_breaks_in_the_module() -> None:
    for fused in ("", "rowwise_adagrad"):
        explanation = torch._dynamo.explain(_ebc(fused=fused))(_kjt(4, 0))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_forward_equals_eager_with_dynamic_sizes(kernel: str, weighted: bool) -> None:
    ebc = _ebc(kernel, weighted=weighted)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(ebc, fullgraph=True, backend=counter)
    for batch, seed in [(2, 0), (5, 1), (7, 2), (3, 3)]:  # a new batch size and id count every call
        kjt = _kjt(batch, seed, weighted)
        got = compiled(kjt)
        want = ebc(kjt)
        assert got.keys() == want.keys()
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    assert counter.frame_count <= 2  # the static first shape, then one dynamic graph


def _train(model, batches, optimizer, compiled: bool, backend: str = "aot_eager"):
    step = model
    if compiled:
        step = torch.compile(model, fullgraph=True, backend=backend)
    losses = []
    for kjt in batches:
        if optimizer is not None:
            optimizer.zero_grad()
        out = step(kjt).values()
        loss = (out**2).sum() + out.sum()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiled_dense_training_equals_eager(kernel: str) -> None:
    batches = [_kjt(b, s) for s, b in enumerate([3, 5, 4])]
    eager, comp = _ebc(kernel), _ebc(kernel)
    le = _train(eager, batches, torch.optim.Adagrad(eager.parameters(), lr=0.1), compiled=False)
    lc = _train(comp, batches, torch.optim.Adagrad(comp.parameters(), lr=0.1), compiled=True)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.arrays["default"], eager.arrays["default"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager.arrays["default"], _ebc(kernel).arrays["default"])  # it did train


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad"])
def test_compiled_fused_training_equals_eager(kernel: str, kind: str) -> None:
    batches = [_kjt(b, s) for s, b in enumerate([3, 5, 4])]
    eager, comp = _ebc(kernel, fused=kind), _ebc(kernel, fused=kind)
    start = eager.arrays["default"].detach().clone()
    le = _train(eager, batches, None, compiled=False)
    lc = _train(comp, batches, None, compiled=True)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.arrays["default"], eager.arrays["default"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager.arrays["default"], start)  # the fused step ran
    assert comp.arrays["default"].grad is None  # and left no gradient
    se = eager.fused_optimizer.state_dict()["state"]
    sc = comp.fused_optimizer.state_dict()["state"]
    for key in se:
        for name in se[key]:
            torch.testing.assert_close(sc[key][name], se[key][name], rtol=1e-5, atol=1e-7)


def _mixed_dim_ebc(kernel: str, fused: str) -> RobeEmbeddingBagCollection:
    """One array read at two embedding dims (8 and 4): two dim runs, one optimizer step."""
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=500, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=500, feature_names=["f1", "f2"],
                           pooling=PoolingType.MEAN),
    ]
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(
        tables, RobeConfig(num_elements=301, block_size=4, seed=7), kernel=kernel,
        fused_optimizer=RobeFusedOptimizerConfig(optimizer=fused, lr=0.05) if fused else None,
    )


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_dims_have_no_graph_breaks(kernel: str) -> None:
    # the reference kernel's dense multi-dim path (plain torch math that also differentiates the
    # per-sample weights) selects each dim's ids by mask, data-dependent: it is not compiled whole
    for fused in ("rowwise_adagrad",) if kernel == "reference" else ("", "rowwise_adagrad"):
        explanation = torch._dynamo.explain(_mixed_dim_ebc(kernel, fused))(_kjt(4, 0))
        assert explanation.graph_break_count == 0, (fused, explanation.break_reasons)
        assert explanation.graph_count == 1


def _slow_fused_steps(kind: str, batches) -> torch.Tensor:
    """Independent reference: autograd through the reference forward gives the dense gradient of the
    whole multi-dim lookup; the optimizer rule is written out here (lr 0.05, eps 1e-8 as the config)."""
    from robe_torchrec.ops.reference import robe_pooled_lookup_reference

    module = _mixed_dim_ebc("reference", "")
    layout = module.feature_layouts()["default"]
    array = module.arrays["default"].detach().clone()
    m, z, lr, eps = array.numel(), 4, 0.05, 1e-8
    state = torch.zeros(m if kind == "adagrad" else -(-m // z))
    for kjt in batches:
        canon = kjt.permute([kjt.keys().index(f) for f in layout.feature_names])
        leaf = array.clone().requires_grad_(True)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), canon.lengths().cumsum(0)])
        out = robe_pooled_lookup_reference(leaf, canon.values(), offsets, layout, module._keys_for("default"),
                                           canon.stride())
        ((out**2).sum() + out.sum()).backward()
        g = leaf.grad
        if kind == "sgd":
            array -= lr * g
        elif kind == "adagrad":
            state += g * g
            array -= lr * g / (state.sqrt() + eps)
        else:  # rowwise_adagrad: one state per Z-chunk, the mean of its squared gradient
            sq = torch.zeros(state.numel() * z)
            sq[:m] = g * g
            count = torch.full((state.numel(),), float(z))
            count[-1] = m - (state.numel() - 1) * z
            state += sq.view(-1, z).sum(1) / count
            array -= lr * g / (state.repeat_interleave(z)[:m].sqrt() + eps)
    return array


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adagrad"])
def test_compiled_mixed_dim_fused_training_equals_eager_and_slow_math(kernel: str, kind: str) -> None:
    batches = [_kjt(b, s) for s, b in enumerate([3, 5, 4])]
    eager, comp = _mixed_dim_ebc(kernel, kind), _mixed_dim_ebc(kernel, kind)
    start = eager.arrays["default"].detach().clone()
    le = _train(eager, batches, None, compiled=False)
    lc = _train(comp, batches, None, compiled=True)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp.arrays["default"], eager.arrays["default"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager.arrays["default"], start) and comp.arrays["default"].grad is None
    torch.testing.assert_close(eager.arrays["default"].detach(), _slow_fused_steps(kind, batches), rtol=1e-4, atol=1e-6)


def test_opcheck_apply_optimizer_dense() -> None:
    for kind in ("sgd", "rowwise_adagrad", "adagrad"):
        m, z = 301, 4
        torch.library.opcheck(
            torch.ops.robe.apply_optimizer_dense.default,
            (torch.randn(m), torch.rand(state_numel(kind, m, z)), torch.randn(m), kind, 0.1, 1e-8, z),
        )


def test_fused_lr_change_is_honoured_when_compiled() -> None:
    """A changed lr is read again (dynamo guards on it), never silently kept from the first trace."""
    batches = [_kjt(4, s) for s in range(3)]
    eager, comp = _ebc(fused="sgd"), _ebc(fused="sgd")
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    for i, kjt in enumerate(batches):
        for module in (eager, comp):
            for group in module.fused_optimizer.param_groups:
                group["lr"] = 0.05 * (i + 1)
        eager(kjt).values().sum().backward()
        compiled(kjt).values().sum().backward()
    torch.testing.assert_close(comp.arrays["default"], eager.arrays["default"], rtol=1e-6, atol=1e-7)


def test_inductor_dlrm_forward_and_fused_training_equal_eager() -> None:
    """The default inductor backend on a small DLRM: forward, then two fused-optimizer + SGD steps."""
    eager = _dlrm(_ebc("auto", fused="rowwise_adagrad"))
    comp = copy.deepcopy(eager)
    compiled = torch.compile(comp, fullgraph=True)
    dense_opt = {id(m): torch.optim.SGD(m.dense_arch.parameters(), lr=0.1) for m in (eager, comp)}
    for batch, seed in [(4, 0), (4, 1)]:  # one shape: inductor compiles once (slow on 2 cores)
        dense, kjt = _dense(batch, seed), _kjt(batch, seed)
        want, got = eager(dense, kjt), compiled(dense, kjt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for model, out in ((eager, want), (comp, got)):
            dense_opt[id(model)].zero_grad()
            out.sum().backward()
            dense_opt[id(model)].step()
    for (name, p), (_, q) in zip(eager.named_parameters(), comp.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


# ----- torch.export of the training module --------------------------------------------------------


def test_export_training_dlrm_with_dynamic_batch_matches_eager() -> None:
    from torch.export import Dim

    model = _dlrm(_ebc("auto"))
    dense, kjt = _dense(5, 0), _kjt(5, 0)
    # a KJT flattens to its tensors: each non-scalar one (ids, lengths, ...) gets a dynamic size
    leaves, _ = torch.utils._pytree.tree_flatten(kjt)
    kjt_spec = [{0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None for x in leaves]
    dynamic = ({0: Dim("batch", min=1, max=4096)}, kjt_spec)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(model, (dense, kjt), dynamic_shapes=dynamic, strict=False)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "robe.pooled_forward.default" in targets
    exported = program.module()
    for b, seed in [(5, 0), (2, 3), (9, 4)]:
        dense, kjt = _dense(b, seed), _kjt(b, seed)
        torch.testing.assert_close(exported(dense, kjt), model(dense, kjt), rtol=1e-6, atol=1e-6)
