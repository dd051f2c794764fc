"""The float RobeEmbeddingBagCollection under torchrec's fx flow: torchrec.fx.symbolic_trace of the
module alone and inside a DLRM, then torch.jit.script, against the eager module (several groups
and dims, MEAN, weights, output reordering, any KJT key order, extra keys, gradients)."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.fx import symbolic_trace
from torchrec.models.dlrm import DLRM

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.ops.cpu import is_available as cpu_kernel_available
from robe_torchrec.optim import RobeFusedOptimizerConfig
from tests.test_serving import mixed_dim_ebc

KERNELS = ["reference"] + (["cpu"] if cpu_kernel_available() else [])
FEATURES = ["f0", "f1", "f2", "f3"]


def _kjt(batch: int, seed: int, weighted: bool, keys=FEATURES) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor(keys=list(keys), values=torch.randint(-(2**40), 2**40, (n,), generator=g),
                             lengths=lengths, weights=torch.rand(n, generator=g) if weighted else None)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("weighted", [False, True])
def test_traced_and_scripted_module_equal_eager(kernel: str, weighted: bool) -> None:
    ebc = mixed_dim_ebc(kernel, weighted)
    traced = symbolic_trace(ebc)
    targets = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function" and callable(n.target)]
    assert "robe_traced_lookup" in targets  # one opaque lookup node, not a leaf module
    scripted = torch.jit.script(traced)
    # torchrec's order, a shuffled order with an extra key, a batch of 1
    for keys, batch, seed in ((FEATURES, 3, 0), (["f3", "x", "f1", "f0", "f2"], 5, 1), (FEATURES, 1, 2)):
        kjt = _kjt(batch, seed, weighted, keys)
        want = ebc(kjt)
        for graph in (traced, scripted):
            got = graph(kjt)
            assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
            torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)


def test_scripted_graph_names_a_missing_feature() -> None:
    scripted = torch.jit.script(symbolic_trace(mixed_dim_ebc("reference")))
    with pytest.raises(Exception, match="missing configured feature f2"):
        scripted(_kjt(2, 0, False, ["f0", "f1", "f3"]))


@pytest.mark.parametrize("kernel", KERNELS)
def test_traced_dlrm_scripts_and_its_gradients_equal_eager(kernel: str) -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=100, feature_names=[f"f{i}"])
              for i in range(4)]
    torch.manual_seed(0)
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=203, block_size=4, seed=5), kernel=kernel)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                 over_arch_layer_sizes=[8, 1])
    traced = symbolic_trace(model)
    scripted = torch.jit.script(traced)
    for batch, seed in ((4, 0), (2, 1)):
        dense, kjt = torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed)), _kjt(batch, seed, False)
        want = model(dense, kjt)
        torch.testing.assert_close(scripted(dense, kjt), want, rtol=1e-6, atol=1e-6)
        got = traced(dense, kjt)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # the traced graph shares the model's parameters: compare the arrays' gradients
        (g_eager,) = torch.autograd.grad(want.sum(), ebc.arrays["default"])
        (g_traced,) = torch.autograd.grad(got.sum(), traced.get_parameter("sparse_arch.embedding_bag_collection.arrays.default"))
        torch.testing.assert_close(g_traced, g_eager, rtol=1e-5, atol=1e-7)
        assert g_eager.abs().sum() > 0


def test_bf16_array_traces_with_eager_output_dtype() -> None:
    ebc = mixed_dim_ebc("reference").to(torch.bfloat16)
    kjt = _kjt(3, 0, False)
    got, want = torch.jit.script(symbolic_trace(ebc))(kjt).values(), ebc(kjt).values()
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tracing_a_fused_optimizer_in_training_mode_is_refused() -> None:
    ebc = mixed_dim_ebc("reference", fused_optimizer=RobeFusedOptimizerConfig(optimizer="sgd", lr=0.1))
    with pytest.raises(NotImplementedError, match="fused optimizer in training mode"):
        symbolic_trace(ebc)
    kjt = _kjt(2, 0, False)
    torch.testing.assert_close(symbolic_trace(ebc.eval())(kjt).values(), ebc(kjt).values(), rtol=1e-6, atol=1e-6)
