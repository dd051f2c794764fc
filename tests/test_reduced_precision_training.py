"""bfloat16 / float16 ROBE arrays for training (kernels, custom ops, module), against float32 math.

What is claimed, and tested here:
- forward: a bf16 / fp16 array gives exactly the float32 lookup of its upcast array (the C++
  kernel reads it as float32 and sums in the float32 kernel's order; the reference upcasts);
- dense backward: the float32 gradient (it does not depend on the array), rounded once to the
  array's dtype at the autograd boundary;
- fused steps: exactly the float32 step from the upcast values, rounded to nearest even into the
  array (what ``tensor.to(dtype)`` does), with the float32 state updated exactly as in float32;
- stochastic rounding (``OptimizerArgs.rounding_seed``): each new value is one of its two dtype
  neighbours, rounded up with probability equal to its relative distance (z-test), deterministic
  given the seed and independent of the number of threads; small updates that round-to-nearest
  loses accumulate in expectation;
- the module in bf16 (``data_type`` or ``.to``): float32 state, checkpoints, training that
  learns and tracks a float32 run; clear errors for other dtypes.
"""

import dataclasses
import random

import pytest
import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.config import RobeConfig
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection
from robe_torchrec.ops import cpu
from robe_torchrec.ops import reference as ref
from robe_torchrec.ops.api import OptimizerArgs
from robe_torchrec.optim import RobeFusedOptimizerConfig
from tests.test_ops_cpu import CASES, TOL, _state, make_case

LOW = [torch.bfloat16, torch.float16]
OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad"]
SOME_CASES = ["basic", "wrap_m37", "z1_m53", "d16_z4_m97", "weighted_mean", "empty_bags", "extreme_ids", "larger"]


@pytest.fixture(scope="module")
def ext():
    try:
        return cpu.load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the CPU extension cannot be built here: {exc}")


def _case(name: str, dtype: torch.dtype):
    F, B, D, Z, m, opts = CASES[name]
    c = make_case(F, B, D, Z, m, seed=sum(map(ord, name)), **opts)
    return dataclasses.replace(c, array=(c.array * 0.1).to(dtype))  # embedding-sized values


def _ids(idx) -> str:
    return str(idx).replace("torch.", "")


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("name", SOME_CASES)
def test_forward_is_the_float32_lookup_of_the_upcast_array(ext, name, dtype):
    c = _case(name, dtype)
    got = cpu.pooled_forward(c.array, c.batch())
    assert got.dtype == torch.float32
    # Same float32 values in the same summation order: bit for bit the float32 kernel.
    assert torch.equal(got, cpu.pooled_forward(c.array.float(), c.batch()))
    torch.testing.assert_close(got, ref.pooled_forward(c.array.float(), c.batch()), **TOL)
    # The reference on the reduced array upcasts too: exactly its float32 lookup.
    assert torch.equal(ref.pooled_forward(c.array, c.batch()), ref.pooled_forward(c.array.float(), c.batch()))


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_ranged_forward_reads_reduced_shards(ext, dtype):
    c = _case("d16_z4_m97", dtype)
    lo, hi = 32, 72
    b = dataclasses.replace(c.batch(), element_range=(lo, hi))
    got = cpu.pooled_forward(c.array[lo:hi].clone(), b)
    assert torch.equal(got, cpu.pooled_forward(c.array[lo:hi].float(), b))


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_custom_op_dense_gradient_is_the_float32_gradient_rounded(ext, kernel, dtype):
    c = _case("weighted_mean", dtype)
    b = c.batch()
    go = c.grad_out(3)

    def grad_of(array: torch.Tensor) -> torch.Tensor:
        leaf = array.clone().requires_grad_(True)
        out = torch.ops.robe.pooled_forward(
            leaf, b.indices, b.offsets, b.hash_keys, b.mean, b.weights, b.batch_size, b.dim, b.block_size,
            b.num_elements, kernel,
        )
        assert out.dtype == torch.float32
        (out * go).sum().backward()
        return leaf.grad

    g = grad_of(c.array)
    assert g.dtype == dtype
    g32 = grad_of(c.array.float())  # the float32 gradient (it does not depend on the array)
    torch.testing.assert_close(g32, ref.pooled_backward_dense(go, b), **TOL)
    assert torch.equal(g, g32.to(dtype))


# --------------------------------------------------------------------------- fused, round to nearest


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", SOME_CASES)
def test_fused_step_is_the_float32_step_rounded_to_nearest(ext, name, optimizer, dtype):
    c = _case(name, dtype)
    go = c.grad_out(5)
    lr, eps = 0.3, 1e-3
    state0 = _state(c, optimizer)

    low, low_state = c.array.clone(), state0.clone()
    cpu.pooled_backward_fused(go, low, c.batch(), OptimizerArgs(optimizer, low_state, lr, eps))
    f32, f32_state = c.array.float(), state0.clone()
    cpu.pooled_backward_fused(go, f32, c.batch(), OptimizerArgs(optimizer, f32_state, lr, eps))

    assert low.dtype == dtype and low_state.dtype == torch.float32
    assert torch.equal(low, f32.to(dtype))  # exact: the same float32 step, rounded to nearest even
    assert torch.equal(low_state, f32_state)  # the state does not see the array's precision

    # The reference on a reduced array: its own float32 step (other summation order), rounded.
    r, r_state = c.array.clone(), state0.clone()
    ref.pooled_backward_fused(go, r, c.batch(), OptimizerArgs(optimizer, r_state, lr, eps))
    assert r.dtype == dtype
    ulp = torch.finfo(dtype).eps  # values differ at most by one rounding step of the dtype
    torch.testing.assert_close(r.float(), low.float(), rtol=ulp, atol=1e-6)
    torch.testing.assert_close(r_state, low_state, **TOL)


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ranged_fused_step_on_a_reduced_shard(ext, optimizer, dtype):
    c = _case("d16_z4_m97", dtype)
    lo, hi, z = 32, 72, c.Z
    b = dataclasses.replace(c.batch(), element_range=(lo, hi))
    go = c.grad_out(7)
    full_state = _state(c, optimizer)
    local_state = {"sgd": full_state, "adagrad": full_state[lo:hi], "rowwise_adagrad": full_state[lo // z : hi // z]}[optimizer]
    low, s_low = c.array[lo:hi].clone(), local_state.clone()
    cpu.pooled_backward_fused(go, low, b, OptimizerArgs(optimizer, s_low, 0.2, 1e-3))
    f32, s_f32 = c.array[lo:hi].float(), local_state.clone()
    cpu.pooled_backward_fused(go, f32, b, OptimizerArgs(optimizer, s_f32, 0.2, 1e-3))
    assert torch.equal(low, f32.to(dtype)) and torch.equal(s_low, s_f32)


# --------------------------------------------------------------------------- fused, stochastic rounding


def _neighbours(v: torch.Tensor, dtype: torch.dtype):
    """(lo, hi): the dtype values just below and above each float32 value (equal where exact)."""
    n = v.to(dtype)
    exact = n.float() == v
    other = torch.nextafter(n, torch.where(n.float() < v, float("inf"), float("-inf")).to(dtype))
    other = torch.where(exact, n, other)
    return torch.minimum(n, other).float(), torch.maximum(n, other).float()


def _sgd_step(c, go, array, lr, seed):
    cpu.pooled_backward_fused(go, array, c.batch(), OptimizerArgs("sgd", torch.empty(0), lr, rounding_seed=seed))
    return array


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_stochastic_rounding_picks_a_neighbour_without_bias(ext, dtype):
    c = _case("larger", dtype)
    go = c.grad_out(11)
    lr = 0.05
    v = _sgd_step(c, go, c.array.float(), lr, None)  # the float32 step
    lo, hi = _neighbours(v, dtype)
    inexact = lo != hi
    assert inexact.sum() > 1000  # enough touched, inexact elements for the statistics
    p_up = torch.where(inexact, (v - lo) / (hi - lo), torch.zeros_like(v)).double()
    ups = torch.zeros_like(p_up)
    seeds = range(20)
    for seed in seeds:
        r = _sgd_step(c, go, c.array.clone(), lr, seed).float()
        assert bool(((r == lo) | (r == hi)).all()), "stochastic rounding must give a neighbour"
        assert torch.equal(r[~inexact], v[~inexact])  # exact values are kept exactly
        ups += (r == hi).double() * inexact
    # z-test of the number of round-ups against its expectation (Bernoulli(p) per element, seed)
    expected = p_up.sum() * len(seeds)
    sd = (p_up * (1 - p_up)).sum().sqrt() * len(seeds) ** 0.5
    z = float((ups.sum() - expected) / sd)
    assert abs(z) < 5, z
    # and per element, over seeds, the mean result approaches v: its error is far below nearest's bound
    mean_err = ((ups / len(seeds)) - p_up)[inexact].abs().mean()
    assert mean_err < 0.2


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_stochastic_rounding_is_deterministic_and_thread_independent(ext, dtype):
    c = _case("larger", dtype)
    go = c.grad_out(13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _sgd_step(c, go, c.array.clone(), 0.05, 42)
        torch.set_num_threads(max(2, threads))
        two = _sgd_step(c, go, c.array.clone(), 0.05, 42)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    other = _sgd_step(c, go, c.array.clone(), 0.05, 43)
    assert not torch.equal(one, other)  # another seed, other choices


def test_small_updates_vanish_to_nearest_but_accumulate_stochastically(ext):
    """Updates below half a bf16 step: round-to-nearest keeps the array frozen, stochastic rounding
    follows the float32 trajectory in expectation (FBGEMM's reason to offer it for 16-bit weights)."""
    c = _case("larger", torch.bfloat16)
    c = dataclasses.replace(c, array=torch.full_like(c.array, 1.0))  # bf16 step at 1.0: 2**-7 (down: 2**-8)
    go = c.grad_out(17)
    lr, steps = 2e-4, 30
    nearest, sr, f32 = c.array.clone(), c.array.clone(), c.array.float()
    for step in range(steps):
        _sgd_step(c, go, nearest, lr, None)
        _sgd_step(c, go, sr, lr, 1000 + step)
        _sgd_step(c, go, f32, lr, None)
    moved = (f32 - 1.0).abs()
    touched = moved > 0
    small = touched & (moved < 2**-10 * steps)  # each step well below half a bf16 step
    assert small.sum() > 500
    assert torch.equal(nearest[small].float(), torch.ones(int(small.sum())))  # frozen
    # Drifts along the float32 direction: E = sum |float32 drift|; the rounding noise over the
    # elements is about sqrt(n * steps) * 2**-9, a few percent of it here.
    d32 = f32[small] - 1.0
    drift_f32 = float(d32.abs().sum())
    drift_sr = float((torch.sign(d32) * (sr[small].float() - 1.0)).sum())
    assert abs(drift_sr - drift_f32) < 0.15 * drift_f32, (drift_sr, drift_f32)


def test_rounding_seed_is_validated():
    with pytest.raises(ValueError, match="rounding_seed"):
        OptimizerArgs("sgd", torch.empty(0), 0.1, rounding_seed=-3)
    with pytest.raises(ValueError, match="rounding_seed"):
        OptimizerArgs("sgd", torch.empty(0), 0.1, rounding_seed=1.5)  # type: ignore[arg-type]


def test_reference_refuses_stochastic_rounding():
    c = _case("basic", torch.bfloat16)
    with pytest.raises(NotImplementedError, match="stochastic rounding"):
        ref.pooled_backward_fused(c.grad_out(0), c.array.clone(), c.batch(), OptimizerArgs("sgd", torch.empty(0), 0.1, rounding_seed=1))


# --------------------------------------------------------------------------- unsupported dtypes


def test_other_dtypes_are_refused_clearly(ext):
    c = _case("basic", torch.float32)
    for dtype in (torch.float64, torch.int32):
        arr = c.array.to(dtype)
        with pytest.raises(RuntimeError, match="float32, bfloat16 or float16, got"):
            cpu.pooled_forward(arr, c.batch())
        with pytest.raises(RuntimeError, match="float32, bfloat16 or float16, got"):
            cpu.pooled_backward_fused(c.grad_out(0), arr.clone(), c.batch(), OptimizerArgs("sgd", torch.empty(0), 0.1))
        with pytest.raises(TypeError, match="float32, bfloat16 or float16, got"):
            ref.pooled_forward(arr, c.batch())
    with pytest.raises(RuntimeError, match="state must be float32"):
        bad = torch.zeros(c.m, dtype=torch.bfloat16)  # state never follows the array's dtype
        cpu.pooled_backward_fused(c.grad_out(0), c.array.bfloat16(), c.batch(), OptimizerArgs("adagrad", bad, 0.1))


# --------------------------------------------------------------------------- the module


TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=400, feature_names=["f0"]),
    EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=400, feature_names=["f1"]),
]


def _tables(data_type: DataType):
    return [dataclasses.replace(t, data_type=data_type, feature_names=list(t.feature_names)) for t in TABLES]


def _kjt(rng: random.Random, batch: int, vocab: int = 400) -> KeyedJaggedTensor:
    lengths, values = [], []
    for _ in range(2):
        for _ in range(batch):
            n = rng.randint(1, 3)
            lengths.append(n)
            values.extend(rng.randrange(vocab) for _ in range(n))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor(values), lengths=torch.tensor(lengths)
    )


def _module(kernel="cpu", fused=None, data_type=DataType.FP32, m=1024):
    return RobeEmbeddingBagCollection(_tables(data_type), RobeConfig(num_elements=m, block_size=8, seed=3), kernel=kernel, fused_optimizer=fused)


@pytest.mark.parametrize("data_type,dtype", [(DataType.BF16, torch.bfloat16), (DataType.FP16, torch.float16)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_module_data_type_and_output_dtype(ext, kernel, data_type, dtype):
    low = _module(kernel, data_type=data_type)
    assert low.arrays["default"].dtype == dtype
    f32 = _module(kernel)
    f32.arrays["default"].data.copy_(low.arrays["default"].data.float())
    kjt = _kjt(random.Random(0), 8)
    out = low(kjt).values()
    assert out.dtype == dtype  # as torchrec's EmbeddingBagCollection returns its tables' dtype
    assert torch.equal(out, f32(kjt).values().to(dtype))  # float32 pooling, one rounding at the end


def test_module_rejects_unsupported_data_types():
    with pytest.raises(ValueError, match="data_type INT8 is not supported"):
        _module(data_type=DataType.INT8)
    mixed = _tables(DataType.FP32)
    mixed[1] = dataclasses.replace(mixed[1], data_type=DataType.BF16)
    with pytest.raises(ValueError, match="need one data_type"):
        RobeEmbeddingBagCollection(mixed, RobeConfig(num_elements=1024, block_size=8))


def test_module_float64_fails_clearly(ext):
    kjt = _kjt(random.Random(1), 4)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        _module("cpu").to(torch.float64)(kjt)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.float64"):
        _module("reference").to(torch.float64)(kjt)


def test_to_bfloat16_keeps_float32_state_and_checkpoints(ext):
    module = _module("cpu", fused=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05))
    kjt = _kjt(random.Random(2), 16)
    module(kjt).values().sum().backward()  # some state
    state32 = module.fused_optimizer.state_of(module.arrays["default"]).clone()
    array32 = module.arrays["default"].detach().clone()
    module.to(torch.bfloat16)
    arr = module.arrays["default"]
    state = module.fused_optimizer.state_of(arr)
    assert arr.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert torch.equal(state, state32)  # not rounded through bf16
    assert torch.equal(arr, array32.to(torch.bfloat16))

    module(kjt).values().float().sum().backward()  # a fused step on the bf16 array
    sd = module.state_dict()
    opt_sd = module.fused_optimizer.state_dict()
    assert sd["arrays.default"].dtype == torch.bfloat16
    fresh = _module("cpu", fused=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05), data_type=DataType.BF16)
    fresh.load_state_dict(sd)
    fresh.fused_optimizer.load_state_dict(opt_sd)
    assert torch.equal(fresh.arrays["default"], module.arrays["default"])
    assert torch.equal(fresh.fused_optimizer.state_of(fresh.arrays["default"]), module.fused_optimizer.state_of(arr))
    # a float32 checkpoint loads into a bf16 module (rounded), and back
    f32 = _module("cpu")
    fresh.load_state_dict(f32.state_dict())
    assert torch.equal(fresh.arrays["default"], f32.arrays["default"].detach().to(torch.bfloat16))


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_dense_gradient_of_a_bf16_module(ext, kernel):
    low = _module(kernel, data_type=DataType.BF16)
    f32 = _module(kernel)
    f32.arrays["default"].data.copy_(low.arrays["default"].data.float())
    kjt = _kjt(random.Random(4), 8)
    w = torch.randn(8, 32)
    (low(kjt).values().float() * w).sum().backward()
    # The output is bf16, so the gradient reaching it is bf16 too (w rounded), upcast for the kernel
    (f32(kjt).values() * w.to(torch.bfloat16).float()).sum().backward()
    g = low.arrays["default"].grad
    assert g.dtype == torch.bfloat16
    # The float32 gradient for that grad_out, rounded once
    torch.testing.assert_close(g.float(), f32.arrays["default"].grad.to(torch.bfloat16).float(), rtol=0, atol=0)


def _train(data_type: DataType, kernel: str, steps: int = 60, seed: int = 0):
    """A planted task: the label is a fixed random function of the ids; a linear head on the
    pooled embeddings, fused row-wise Adagrad on the array, SGD on the head (float32)."""
    torch.manual_seed(seed)
    module = _module(kernel, fused=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.1), data_type=data_type, m=4096)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    planted = torch.randn(400)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        kjt = _kjt(rng, 64)
        ids = kjt.values()
        bag = torch.repeat_interleave(torch.arange(128), kjt.lengths())
        score = torch.zeros(128).index_add(0, bag, planted[ids]).view(2, 64).sum(0)
        label = (score > 0).float()
        logit = head(module(kjt).values().float()).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_bf16_training_learns_and_tracks_float32(ext, kernel):
    f32 = _train(DataType.FP32, kernel)
    bf16 = _train(DataType.BF16, kernel)
    first = sum(f32[:10]) / 10
    last32, last16 = sum(f32[-10:]) / 10, sum(bf16[-10:]) / 10
    assert last32 < 0.8 * first and last16 < 0.8 * sum(bf16[:10]) / 10  # both learn
    # and bf16 tracks float32 step by step (measured: max difference 5e-4 on the C++ kernel)
    assert abs(last16 - last32) < 0.01, (last16, last32)
    assert max(abs(a - b) for a, b in zip(f32, bf16)) < 0.01
    assert f32 != bf16  # the bf16 run did round (it is not secretly float32)


# --------------------------------------------------------------------------- stochastic rounding in the module


def _sr_run(stochastic: bool, seed: int = 0, lr: float = 0.1, steps: int = 5):
    fused = RobeFusedOptimizerConfig("sgd", lr=lr, stochastic_rounding=stochastic, rounding_seed=seed)
    torch.manual_seed(0)  # the same init every time
    module = _module("cpu", fused=fused, data_type=DataType.BF16)
    rng = random.Random(9)
    for _ in range(steps):
        module(_kjt(rng, 16)).values().float().sum().backward()
    return module.arrays["default"].detach().clone()


def test_module_stochastic_rounding_is_reproducible_and_moves_small_updates(ext):
    a, b = _sr_run(True), _sr_run(True)
    assert torch.equal(a, b)  # same config, data and call order: the same bits
    assert not torch.equal(a, _sr_run(True, seed=1))
    torch.manual_seed(0)
    start = _module("cpu", data_type=DataType.BF16).arrays["default"].detach()  # the same seeded init
    # lr 1e-6: a step moves an element by lr * (its reads in the batch, a few) ~ 1e-5, below half
    # a bf16 step (3e-5) of every value with |x| >= 0.01 (near 0 the bf16 grid is finer)
    nearest, sr = _sr_run(False, lr=1e-6), _sr_run(True, lr=1e-6)
    big = start.float().abs() >= 0.01
    assert torch.equal(nearest[big], start[big])  # round-to-nearest loses them all
    assert int((sr[big] != start[big]).sum()) > 10  # stochastic rounding keeps some, unbiased in expectation


def test_stochastic_rounding_is_refused_where_it_is_not_implemented(ext):
    fused = RobeFusedOptimizerConfig("sgd", lr=0.1, stochastic_rounding=True)
    module = _module("reference", fused=fused, data_type=DataType.BF16)
    with pytest.raises(NotImplementedError, match="stochastic rounding"):
        module(_kjt(random.Random(1), 4)).values().float().sum().backward()
    with pytest.raises(ValueError, match="rounding_seed"):
        RobeFusedOptimizerConfig("sgd", rounding_seed=-1)


# --------------------------------------------------------------------------- torch.compile / opcheck


def _op_case(dtype, kernel):
    c = _case("weighted_mean", dtype)
    b = c.batch()
    return c, (c.array, b.indices, b.offsets, b.hash_keys, b.mean, b.weights, b.batch_size, b.dim, b.block_size, b.num_elements, kernel)


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_opcheck_on_reduced_arrays(ext, kernel, dtype):
    c, args = _op_case(dtype, kernel)
    leaf = c.array.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.robe.pooled_forward.default, (leaf, *args[1:]))
    state = _state(c, "rowwise_adagrad")
    for seed in ([-1, 5] if kernel == "cpu" else [-1]):
        torch.library.opcheck(
            torch.ops.robe.pooled_backward_fused.default,
            (c.grad_out(1), c.array.clone(), state.clone(), *args[1:-1], "rowwise_adagrad", 0.1, 1e-8, kernel, seed),
        )


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_compiled_bf16_fused_training_equals_eager(ext, kernel):
    def run(compiled: bool):
        torch.manual_seed(0)
        module = _module(kernel, fused=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05), data_type=DataType.BF16)
        step = torch.compile(module, fullgraph=True, backend="aot_eager") if compiled else module
        rng = random.Random(5)
        for _ in range(3):
            out = step(_kjt(rng, 8)).values()
            assert out.dtype == torch.bfloat16
            (out.float() ** 2).sum().backward()
        return module.arrays["default"].detach(), module.fused_optimizer.state_of(module.arrays["default"])

    torch._dynamo.reset()
    (a_eager, s_eager), (a_comp, s_comp) = run(False), run(True)
    torch._dynamo.reset()
    assert a_comp.dtype == torch.bfloat16 and s_comp.dtype == torch.float32
    assert torch.equal(a_comp, a_eager) and torch.equal(s_comp, s_eager)


def test_compiled_stochastic_rounding_is_refused(ext):
    fused = RobeFusedOptimizerConfig("sgd", lr=0.1, stochastic_rounding=True)
    module = _module("cpu", fused=fused, data_type=DataType.BF16)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="stochastic rounding of ROBE arrays runs eagerly only"):
        compiled(_kjt(random.Random(0), 4))
    torch._dynamo.reset()


def test_a_bf16_trained_module_quantizes_for_serving(ext):
    from robe_torchrec.modules.quant_robe_embedding_bag_collection import QuantRobeEmbeddingBagCollection

    module = _module("cpu", fused=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05), data_type=DataType.BF16)
    rng = random.Random(6)
    module(_kjt(rng, 8)).values().float().sum().backward()
    kjt = _kjt(rng, 8)
    with torch.no_grad():
        train_out = module(kjt).values()
        served = QuantRobeEmbeddingBagCollection.from_float(module, storage="bfloat16")(kjt).values()
        int8 = QuantRobeEmbeddingBagCollection.from_float(module, storage="int8")(kjt).values()
    assert served.dtype == torch.float32
    # the same stored values, the same reader and summation order: the training output, unrounded
    assert torch.equal(served.to(torch.bfloat16), train_out)
    torch.testing.assert_close(int8, served, rtol=0, atol=0.05 * float(served.abs().max()))


def test_sharding_a_bf16_module_is_refused_clearly():
    from robe_torchrec.sharding.sharder import RobeEmbeddingBagCollectionSharder

    module = _module("reference", data_type=DataType.BF16)
    with pytest.raises(NotImplementedError, match="sharding bf16 / fp16 ROBE arrays is not supported yet"):
        RobeEmbeddingBagCollectionSharder().shard(module, params=None, env=None)  # type: ignore[arg-type]
