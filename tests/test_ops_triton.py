"""Triton ROBE kernels against the reference kernel API (robe_torchrec/ops/reference.py).

Without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before
``robe_torchrec.ops.triton`` is first imported (``triton.jit`` picks the interpreter at
decoration time), so it is set here, at the top, before that import. Shapes are tiny because the
interpreter is slow. The ``cuda`` variants (marked ``gpu``) run the compiled kernels on a GPU.
"""

import dataclasses
import os

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from robe_torchrec.hashing import block_offsets, table_key  # noqa: E402
from robe_torchrec.ops import reference as ref  # noqa: E402
from robe_torchrec.ops import triton as tk  # noqa: E402
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs, state_numel  # noqa: E402
from robe_torchrec.ops.triton import launch  # noqa: E402
from tests.test_hashing import GOLDEN  # noqa: E402

if not _HAS_CUDA and not tk.interpreted() and os.environ.get("TRITON_INTERPRET") == "1":
    # Another test module imported the kernels before TRITON_INTERPRET=1 was set, so they were
    # decorated for a GPU. Re-executing the kernel modules re-decorates them for the interpreter
    # (the module objects are reused, so every reference to their functions sees the new kernels).
    tk = tk.reload()
if not _HAS_CUDA and not tk.interpreted():
    pytest.skip(
        "no CUDA, and the Triton kernels are not in interpreter mode (TRITON_INTERPRET is set to "
        f"{os.environ.get('TRITON_INTERPRET')!r}, not 1): they are compiled for a GPU. "
        "Run `TRITON_INTERPRET=1 pytest tests/test_ops_triton.py`.",
        allow_module_level=True,
    )


# Triton's interpreter converts 1-element arrays to ints in loops (numpy >= 1.25 warns about it)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cpu":
        if not tk.interpreted():
            pytest.skip("CPU tensors need the interpreter (TRITON_INTERPRET=1 before importing triton_kernels)")
    else:
        if not _HAS_CUDA:
            pytest.skip("needs a CUDA device")
        if tk.interpreted():
            pytest.skip("TRITON_INTERPRET=1: the compiled CUDA kernels are not in use")
    return torch.device(request.param)


# name, F, B, D, Z, m, weighted, mean per feature
CASES = {
    "wrap_z4": dict(F=2, B=5, D=8, Z=4, m=37, weighted=True, mean=(True, False)),
    "z1": dict(F=3, B=4, D=4, Z=1, m=53, weighted=False, mean=(False, True, False)),
    "z_eq_d": dict(F=1, B=6, D=16, Z=16, m=101, weighted=True, mean=(True,)),
    # m % Z != 0: a wrapping block touches three chunks; D/Z = 3 is padded to 4 in the kernel
    "partial_chunk": dict(F=2, B=4, D=12, Z=4, m=10, weighted=True, mean=(False, True)),
    # m == Z: every block not starting at 0 wraps within chunk 0
    "m_eq_z": dict(F=2, B=3, D=8, Z=8, m=8, weighted=False, mean=(True, True)),
}
EDGE_IDS = [0, 1, -1, 2**31, -(2**31), 2**32, 2**63 - 1, -(2**63), 2**63 - 2, -(2**63) + 1]
OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad"]
LR, EPS = 0.05, 1e-6


def make_case(name, device, seed=0, batch=None):
    """The inputs of one case; ``batch`` overrides its B (then every bag has 1-4 ids)."""
    c = dict(CASES[name], B=batch) if batch is not None else CASES[name]
    g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
    num_bags = c["F"] * c["B"]
    if batch is None:
        lengths = torch.randint(0, 5, (num_bags,), generator=g)
        lengths[1] = 0  # an empty bag, whatever the draw
    else:
        lengths = torch.randint(1, 5, (num_bags,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nnz = int(offsets[-1])
    pool = torch.cat(
        [
            torch.tensor(EDGE_IDS, dtype=torch.int64),
            torch.randint(-(2**63), 2**63 - 1, (6,), generator=g, dtype=torch.int64),
            torch.arange(4, dtype=torch.int64),
        ]
    )
    # ids drawn from a small pool: repeated ids in several bags exercise colliding atomics
    indices = pool[torch.randint(0, pool.numel(), (nnz,), generator=g)]
    keys = torch.tensor([table_key(3, f"table_{f}") for f in range(c["F"])], dtype=torch.int64)
    weights = torch.rand(nnz, generator=g) * 2 - 0.5 if c["weighted"] else None
    array = torch.randn(c["m"], generator=g)
    grads = [torch.randn(c["B"], c["F"] * c["D"], generator=g) for _ in range(3)]
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(
        array=to(array), indices=to(indices), offsets=to(offsets), hash_keys=to(keys),
        mean=to(torch.tensor(c["mean"])), weights=to(weights), grads=[to(x) for x in grads],
        B=c["B"], D=c["D"], Z=c["Z"], m=c["m"],
    )


def batch_of(k, **changes):
    """The case's LookupBatch (fields replaced by ``changes``)."""
    b = LookupBatch(
        indices=k["indices"], offsets=k["offsets"], hash_keys=k["hash_keys"], mean=k["mean"], weights=k["weights"],
        batch_size=k["B"], dim=k["D"], block_size=k["Z"], num_elements=k["m"],
    )
    return dataclasses.replace(b, **changes)


def initial_state(k, optimizer, device):
    m, z = k["m"], k["Z"]
    g = torch.Generator().manual_seed(7)
    if optimizer == "sgd":
        return torch.empty(0, device=device)
    return torch.rand(state_numel(optimizer, m, z), generator=g).to(device)


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 2e-5), atol=kw.get("atol", 2e-6))


# ---------------------------------------------------------------------------------------------


def test_is_available():
    assert tk.is_available()


def test_golden_offsets(device):
    for seed, name, idx, block, m, expected in GOLDEN:
        k0, k1 = table_key(seed, name)
        ids = torch.tensor([idx], dtype=torch.int64, device=device)
        out = tk.block_offsets_triton(ids, k0, k1, block + 1, m)
        assert out[0, block].item() == expected, (seed, name, idx, block, m)


@pytest.mark.parametrize("m", [37, 2**31 + 11, 2**48])
def test_offsets_match_torch_hash(device, m):
    g = torch.Generator().manual_seed(m % 1000)
    ids = torch.cat([torch.tensor(EDGE_IDS), torch.randint(-(2**63), 2**63 - 1, (50,), generator=g)])
    k0 = torch.tensor([table_key(1, f"t{i % 3}")[0] for i in range(ids.numel())])
    k1 = torch.tensor([table_key(1, f"t{i % 3}")[1] for i in range(ids.numel())])
    expected = block_offsets(ids, k0, k1, 5, m)
    out = tk.block_offsets_triton(ids.to(device), k0.to(device), k1.to(device), 5, m)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_forward(device, name):
    k = make_case(name, device)
    out = tk.pooled_forward(k["array"], batch_of(k))
    expected = ref.pooled_forward(k["array"], batch_of(k))
    assert out.shape == (k["B"], k["hash_keys"].shape[0] * k["D"]) and out.dtype == torch.float32
    close(out, expected, rtol=1e-6, atol=1e-6)
    empty_bag = 1  # bag 1 = (feature 0, sample 1) is always empty
    assert torch.all(out[empty_bag % k["B"], : k["D"]] == 0)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_dense(device, name):
    k = make_case(name, device)
    grad = tk.pooled_backward_dense(k["grads"][0], batch_of(k))
    expected = ref.pooled_backward_dense(k["grads"][0], batch_of(k))
    assert grad.shape == (k["m"],)
    close(grad, expected)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_step(device, name, optimizer):
    k = make_case(name, device)
    state = initial_state(k, optimizer, device)
    array, expected_array = k["array"].clone(), k["array"].clone()
    expected_state = state.clone()
    tk.pooled_backward_fused(k["grads"][0], array, batch_of(k), OptimizerArgs(optimizer, state, LR, EPS))
    ref.pooled_backward_fused(k["grads"][0], expected_array, batch_of(k), OptimizerArgs(optimizer, expected_state, LR, EPS))
    close(array, expected_array)
    close(state, expected_state)
    # elements no lookup touched are bit-identical (the reference leaves them alone too)
    untouched = ref.pooled_backward_dense(torch.ones_like(k["grads"][0]), batch_of(k)) == 0
    if k["weights"] is None:  # with weights a touched element can have a zero sum by chance
        assert torch.equal(array[untouched], k["array"][untouched])


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", ["wrap_z4", "partial_chunk"])
def test_fused_three_steps(device, name, optimizer):
    k = make_case(name, device, seed=1)
    state = initial_state(k, optimizer, device)
    array, expected_array, expected_state = k["array"].clone(), k["array"].clone(), state.clone()
    for grad_out in k["grads"]:
        tk.pooled_backward_fused(grad_out, array, batch_of(k), OptimizerArgs(optimizer, state, LR, EPS))
        ref.pooled_backward_fused(grad_out, expected_array, batch_of(k), OptimizerArgs(optimizer, expected_state, LR, EPS))
    close(array, expected_array)
    close(state, expected_state)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_matches_torch_optim(device, optimizer):
    k = make_case("wrap_z4", device, seed=2)
    g = ref.pooled_backward_dense(k["grads"][0], batch_of(k))
    param = torch.nn.Parameter(k["array"].clone())
    param.grad = g.clone()
    if optimizer == "sgd":
        opt = torch.optim.SGD([param], lr=LR)
        state = torch.empty(0, device=device)
    else:
        opt = torch.optim.Adagrad([param], lr=LR, eps=EPS, initial_accumulator_value=0.0)
        state = torch.zeros(k["m"], device=device)
    opt.step()
    array = k["array"].clone()
    tk.pooled_backward_fused(k["grads"][0], array, batch_of(k), OptimizerArgs(optimizer, state, LR, EPS))
    close(array, param.detach())
    if optimizer == "adagrad":
        close(state, opt.state[param]["sum"])


def test_rowwise_adagrad_formula(device):
    """rowwise: S[j] += mean over the chunk's valid elements of g^2; M[e] -= lr g / (sqrt(S[j]) + eps)."""
    k = make_case("partial_chunk", device, seed=3)
    m, z = k["m"], k["Z"]
    g = ref.pooled_backward_dense(k["grads"][0], batch_of(k)).cpu().tolist()
    state0 = initial_state(k, "rowwise_adagrad", device)
    expected_array, expected_state = k["array"].cpu().tolist(), state0.cpu().tolist()
    for j in range((m + z - 1) // z):
        elems = range(j * z, min((j + 1) * z, m))
        expected_state[j] += sum(g[e] ** 2 for e in elems) / len(elems)
        for e in elems:
            expected_array[e] -= LR * g[e] / (expected_state[j] ** 0.5 + EPS)
    array, state = k["array"].clone(), state0.clone()
    tk.pooled_backward_fused(k["grads"][0], array, batch_of(k), OptimizerArgs("rowwise_adagrad", state, LR, EPS))
    close(array.cpu(), torch.tensor(expected_array))
    close(state.cpu(), torch.tensor(expected_state))


@pytest.mark.parametrize("name", ["wrap_z4", "partial_chunk", "m_eq_z"])
def test_deterministic_mode(device, name, monkeypatch):
    """The atomic-free path matches the reference and is bitwise repeatable."""
    monkeypatch.setattr(launch, "DETERMINISTIC", True)
    k = make_case(name, device, seed=4)
    grads = [tk.pooled_backward_dense(k["grads"][0], batch_of(k)) for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    close(grads[0], ref.pooled_backward_dense(k["grads"][0], batch_of(k)))
    state = initial_state(k, "rowwise_adagrad", device)
    runs = []
    for _ in range(2):
        array, st = k["array"].clone(), state.clone()
        tk.pooled_backward_fused(k["grads"][0], array, batch_of(k), OptimizerArgs("rowwise_adagrad", st, LR, EPS))
        runs.append((array, st))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    expected_array, expected_state = k["array"].clone(), state.clone()
    ref.pooled_backward_fused(k["grads"][0], expected_array, batch_of(k), OptimizerArgs("rowwise_adagrad", expected_state, LR, EPS))
    close(runs[0][0], expected_array)
    close(runs[0][1], expected_state)


def test_torch_deterministic_algorithms_select_the_atomic_free_path(device, monkeypatch):
    k = make_case("partial_chunk", device, seed=5)
    monkeypatch.setattr(launch, "DETERMINISTIC", True)
    expected = tk.pooled_backward_dense(k["grads"][0], batch_of(k))
    monkeypatch.setattr(launch, "DETERMINISTIC", False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grad = tk.pooled_backward_dense(k["grads"][0], batch_of(k))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(grad, expected)


def test_no_lookups(device):
    k = make_case("wrap_z4", device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    offsets = torch.zeros(2 * k["B"] + 1, dtype=torch.int64, device=device)
    b = batch_of(k, indices=empty, offsets=offsets, weights=None)
    out = tk.pooled_forward(k["array"], b)
    assert out.shape == (k["B"], 2 * k["D"]) and torch.all(out == 0)
    assert torch.all(tk.pooled_backward_dense(k["grads"][0], b) == 0)
    array = k["array"].clone()
    tk.pooled_backward_fused(k["grads"][0], array, b, OptimizerArgs("adagrad", torch.zeros(k["m"], device=device), LR, EPS))
    assert torch.equal(array, k["array"])
    no_batch = batch_of(k, indices=empty, offsets=torch.zeros(1, dtype=torch.int64, device=device), weights=None,
                        batch_size=0, dim=8, block_size=4)
    assert tk.pooled_forward(k["array"], no_batch).shape == (0, 16)


def test_rejects_bad_input(device):
    k = make_case("wrap_z4", device)
    b = batch_of(k)
    with pytest.raises(TypeError, match="indices"):
        tk.pooled_forward(k["array"], batch_of(k, indices=k["indices"].to(torch.int32)))
    with pytest.raises(TypeError, match="array"):
        tk.pooled_forward(k["array"].double(), b)
    with pytest.raises(TypeError, match="mean"):
        tk.pooled_forward(k["array"], batch_of(k, mean=k["mean"].float()))
    with pytest.raises(TypeError, match="per_sample_weights"):
        tk.pooled_forward(k["array"], batch_of(k, weights=k["weights"].double()))
    with pytest.raises(ValueError, match="offsets"):
        tk.pooled_forward(k["array"], batch_of(k, offsets=k["offsets"][:-1]))
    with pytest.raises(ValueError, match="divide"):
        tk.pooled_forward(k["array"], batch_of(k, dim=8, block_size=3))
    with pytest.raises(ValueError, match="num_elements"):
        tk.pooled_forward(k["array"][:3], batch_of(k, num_elements=3))
    with pytest.raises(ValueError, match="num_elements"):
        tk.pooled_forward(k["array"][:3], b)  # the array is not the batch's
    with pytest.raises(ValueError, match="on meta"):
        tk.pooled_forward(k["array"], batch_of(k, indices=k["indices"].to("meta")))
    with pytest.raises(ValueError, match="unknown fused optimizer"):
        tk.pooled_backward_fused(k["grads"][0], k["array"].clone(), b, OptimizerArgs("adam", torch.empty(0, device=device), LR, EPS))
    with pytest.raises(ValueError, match="state"):
        tk.pooled_backward_fused(k["grads"][0], k["array"].clone(), b, OptimizerArgs("adagrad", torch.zeros(5, device=device), LR, EPS))
    with pytest.raises(ValueError, match="grad_out"):
        tk.pooled_backward_dense(k["grads"][0][:, :3], b)


# ---- batch sizes 1 and 2 (issue 11.8) --------------------------------------------------------
# With B = 1 and D/Z, Z powers of two (no padding), the bag kernel's element mask was [1, 1, 1]:
# the interpreter's atomic_add applied it to one element, so the backward updated 1 element per
# block instead of Z. Every mask is now built to the full tile; every (D, Z) shape of CASES, at
# B = 1 and 2, for the forward, the dense backward and each fused optimizer.


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_small_batch_forward_and_dense_backward(device, name, batch):
    k = make_case(name, device, seed=11, batch=batch)
    close(tk.pooled_forward(k["array"], batch_of(k)), ref.pooled_forward(k["array"], batch_of(k)), rtol=1e-6, atol=1e-6)
    close(tk.pooled_backward_dense(k["grads"][0], batch_of(k)), ref.pooled_backward_dense(k["grads"][0], batch_of(k)))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_small_batch_fused_step(device, name, batch, optimizer):
    k = make_case(name, device, seed=12, batch=batch)
    state = initial_state(k, optimizer, device)
    array, expected_array, expected_state = k["array"].clone(), k["array"].clone(), state.clone()
    tk.pooled_backward_fused(k["grads"][0], array, batch_of(k), OptimizerArgs(optimizer, state, LR, EPS))
    ref.pooled_backward_fused(k["grads"][0], expected_array, batch_of(k), OptimizerArgs(optimizer, expected_state, LR, EPS))
    close(array, expected_array)
    close(state, expected_state)


@pytest.mark.parametrize("deterministic", [False, True])
def test_offsets_window(device, deterministic, monkeypatch):
    """Offsets may be a window of the ids (one group of a larger batch): the ids outside are ignored."""
    k = make_case("wrap_z4", device, seed=13)
    pad_front = torch.tensor([5, -3, 2**40], dtype=torch.int64, device=device)
    pad_back = torch.tensor([9, 11], dtype=torch.int64, device=device)
    ids = torch.cat([pad_front, k["indices"], pad_back])
    w = torch.cat([torch.ones(3, device=device), k["weights"], torch.ones(2, device=device)])
    window = batch_of(k, indices=ids, offsets=k["offsets"] + 3, weights=w)
    close(tk.pooled_forward(k["array"], window), ref.pooled_forward(k["array"], batch_of(k)), rtol=1e-6, atol=1e-6)
    close(ref.pooled_forward(k["array"], window), ref.pooled_forward(k["array"], batch_of(k)), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(launch, "DETERMINISTIC", deterministic)  # the record path narrows the window
    close(tk.pooled_backward_dense(k["grads"][0], window), ref.pooled_backward_dense(k["grads"][0], batch_of(k)))
    state = initial_state(k, "rowwise_adagrad", device)
    array, expected_array, expected_state = k["array"].clone(), k["array"].clone(), state.clone()
    tk.pooled_backward_fused(k["grads"][0], array, window, OptimizerArgs("rowwise_adagrad", state, LR, EPS))
    ref.pooled_backward_fused(
        k["grads"][0], expected_array, batch_of(k), OptimizerArgs("rowwise_adagrad", expected_state, LR, EPS)
    )
    close(array, expected_array)
    close(state, expected_state)


def test_kernel_modes_are_named():
    """The mode constexprs are enums (no bare integers at the launch sites)."""
    from robe_torchrec.ops.triton.bags import BagMode
    from robe_torchrec.ops.triton.fused import UpdateMode

    assert [m.name for m in BagMode] == ["FORWARD", "DENSE_GRAD", "MARK_CHUNKS", "COMPACT_GRAD"]
    assert [m.name for m in UpdateMode] == ["SGD", "ADAGRAD", "ROWWISE_ADAGRAD", "WRITE_DENSE"]


def test_kernel_config_overrides(device, monkeypatch):
    """set_kernel_config / ROBE_TRITON_CONFIG force launch parameters; results do not change."""
    from robe_torchrec.ops.triton import tuning

    monkeypatch.setattr(tuning, "_OVERRIDES", {})
    k = make_case("wrap_z4", device, seed=14)
    expected = tk.pooled_forward(k["array"], batch_of(k))
    tuning._parse_env_config("forward=2,2,4,1; update=4,4")
    assert tk.kernel_config("forward", 8, 4, 1.0) == tk.BagConfig(2, 2, 4, 1)
    assert tk.kernel_config("update", 4, 4, 1.0) == tk.UpdateConfig(4, 4)
    assert torch.equal(tk.pooled_forward(k["array"], batch_of(k)), expected)
    tk.set_kernel_config("forward", None)
    assert "forward" not in tuning._OVERRIDES
    with pytest.raises(ValueError, match="powers of two"):
        tk.set_kernel_config("mark", tk.BagConfig(3))
    with pytest.raises(TypeError, match="UpdateConfig"):
        tk.set_kernel_config("update", tk.BagConfig(2))
