"""Row-wise shards in the Triton kernels (``LookupBatch.element_range``), against slow math.

The same cases and checks as tests/test_element_range.py (the C++ kernel): a shard's forward
partial sums against the element-by-element masked sum, its dense gradient against the slice of
the whole-array gradient, its fused step against ``apply_optimizer_dense`` on the slice (sgd,
adagrad, rowwise_adagrad), on both fused-backward paths (the sort-free chunk map and the
record path, also in deterministic mode). Without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set before the kernels are imported); the ``cuda`` variants need a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from robe_torchrec.ops import reference as ref  # noqa: E402
from robe_torchrec.ops import triton as tk  # noqa: E402
from robe_torchrec.ops.api import OptimizerArgs, state_numel  # noqa: E402
from robe_torchrec.ops.triton import fused as tk_fused  # noqa: E402
from robe_torchrec.ops.triton import launch  # noqa: E402
from tests.test_element_range import CASES, EPS, LR, OPTIMIZERS, _local_state, batch_of, make_case, slow_shard_forward, tilings  # noqa: E402

if not _HAS_CUDA and not tk.interpreted() and os.environ.get("TRITON_INTERPRET") == "1":
    tk = tk.reload()  # decorated for a GPU by an earlier import: re-decorate for the interpreter
if not _HAS_CUDA and not tk.interpreted():
    pytest.skip("no CUDA and the Triton kernels are compiled for a GPU (set TRITON_INTERPRET=1)", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return torch.device(request.param)


def on(k: dict, device: torch.device) -> dict:
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in k.items()}


def some_tilings(m: int, z: int, seed: int):
    """A random tiling, one shard per chunk, and the whole array (the interpreter is slow)."""
    all_tilings = tilings(m, z, seed)
    return [all_tilings[0], all_tilings[-2], all_tilings[-1]]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_dense_backward_shards(name, device):
    k = on(make_case(name, seed=0), device)
    whole = ref.pooled_forward(k["array"].cpu(), batch_of(on(k, torch.device("cpu"))))
    whole_grad = ref.pooled_backward_dense(k["grad_out"].cpu(), batch_of(on(k, torch.device("cpu"))))
    for tiling in some_tilings(k["m"], k["Z"], 0):
        total = torch.zeros_like(whole)
        for lo, hi in tiling:
            local = k["array"][lo:hi].clone()
            out = tk.pooled_forward(local, batch_of(k, (lo, hi))).cpu()
            slow = slow_shard_forward(on(k, torch.device("cpu")), local.cpu(), lo, hi)
            torch.testing.assert_close(out, slow, rtol=1e-5, atol=1e-5)
            total += out
            grad = tk.pooled_backward_dense(k["grad_out"], batch_of(k, (lo, hi))).cpu()
            assert grad.shape == (hi - lo,)
            torch.testing.assert_close(grad, whole_grad[lo:hi], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["touched_map", "records", "deterministic"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", ["partial_chunk", "z1"])
def test_fused_backward_shards(name, optimizer, path, device, monkeypatch):
    if path == "records":
        monkeypatch.setattr(tk_fused, "TOUCHED_MAP_MIN", 0)
        monkeypatch.setattr(tk_fused, "TOUCHED_MAP_RATIO", 0)
    monkeypatch.setattr(launch, "DETERMINISTIC", path == "deterministic")
    cpu = torch.device("cpu")
    k = make_case(name, seed=2)
    m, z = k["m"], k["Z"]
    g = ref.pooled_backward_dense(k["grad_out"], batch_of(k))
    state0 = torch.rand(state_numel(optimizer, m, z), generator=torch.Generator().manual_seed(3))
    kd = on(k, device)
    for tiling in some_tilings(m, z, seed=4):
        for lo, hi in tiling:
            local = k["array"][lo:hi].clone()
            state = _local_state(state0, optimizer, lo, hi, z).clone()
            expected, expected_state = local.clone(), state.clone()
            ref.apply_optimizer_dense(expected, expected_state, g[lo:hi], optimizer, LR, EPS, z)
            local_d, state_d = local.to(device), state.to(device)
            tk.pooled_backward_fused(kd["grad_out"], local_d, batch_of(kd, (lo, hi)), OptimizerArgs(optimizer, state_d, LR, EPS))
            torch.testing.assert_close(local_d.to(cpu), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state_d.to(cpu), expected_state, rtol=1e-5, atol=1e-6)


def test_bad_range_and_state_are_refused():
    k = make_case("partial_chunk")  # m = 37, Z = 4
    with pytest.raises(ValueError, match="multiples of block_size"):
        tk.pooled_forward(torch.zeros(6), batch_of(k, (2, 8)))
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        tk.pooled_forward(torch.zeros(36), batch_of(k, (8, 44)))
    with pytest.raises(ValueError, match="holds 8"):
        tk.pooled_forward(torch.zeros(9), batch_of(k, (8, 16)))
    with pytest.raises(ValueError, match=r"rowwise_adagrad state must be a contiguous \[3\]"):
        tk.pooled_backward_fused(
            k["grad_out"], torch.zeros(12), batch_of(k, (8, 20)), OptimizerArgs("rowwise_adagrad", torch.zeros(10), LR)
        )


@pytest.mark.parametrize("optimizer", [None, "rowwise_adagrad"])
def test_shard_lookup_op_on_triton_matches_the_cpu_kernel(optimizer):
    """``robe_shard_lookup(kernel="triton")`` (what row_wise runs on CUDA) equals the C++ kernel's."""
    from robe_torchrec.ops import cpu as cpu_kernel
    from robe_torchrec.ops.layout import FeatureLayout
    from robe_torchrec.ops.shard_lookup import robe_shard_lookup

    if not cpu_kernel.is_available():
        pytest.skip("the CPU kernel cannot be built here")
    z, m, b = 4, 53, 4
    layout = FeatureLayout(("f0", "f1", "f2"), ("t0", "t1", "t2"), (8, 4, 4), (False,) * 3, z, m, seed=3)
    keys = layout.hash_keys(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (3 * b,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(-(2**40), 2**40, (int(offsets[-1]),), generator=g)
    array = torch.randn(m, generator=g)
    grad_out = torch.randn(b, layout.total_dim, generator=g)
    lo, hi = 12, 36
    results = {}
    for kernel in ("cpu", "triton"):
        local = torch.nn.Parameter(array[lo:hi].clone())
        state = torch.zeros(state_numel(optimizer, hi - lo, z)) if optimizer else None
        fused = OptimizerArgs(optimizer, state, LR, EPS) if optimizer else None
        out = robe_shard_lookup(local, (lo, hi), ids, offsets, layout, keys, b, kernel=kernel, fused_optimizer=fused)
        out.backward(grad_out)
        results[kernel] = (out.detach(), local.data.clone() if optimizer else local.grad.clone())
    torch.testing.assert_close(results["triton"][0], results["cpu"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["cpu"][1], rtol=1e-5, atol=1e-6)
