"""The C++ CPU kernel (robe_torchrec.ops.cpu) against the reference kernel API and torch.optim."""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from robe_torchrec.hashing import block_offsets, table_key
from robe_torchrec.ops import cpu
from robe_torchrec.ops import reference as ref
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs
from tests.test_hashing import GOLDEN


@pytest.fixture(scope="module")
def ext():
    try:
        return cpu.load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the CPU extension cannot be built here: {exc}")


# Forward sums in the reference's order (bit-identical in practice); backward sums a few
# contributions per element in another order, and torch's vectorised sqrt may differ by 1 ulp.
TOL = dict(rtol=2e-6, atol=2e-6)
EXTREME_IDS = [-(2**63), 2**63 - 1, -1, 0, 1, 2**32, -(2**32), 2**31 - 1, -(2**31)]


@dataclass
class Case:
    array: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor
    hash_keys: torch.Tensor
    mean: torch.Tensor
    weights: Optional[torch.Tensor]
    B: int
    D: int
    Z: int

    @property
    def m(self) -> int:
        return self.array.numel()

    def batch(self, **changes) -> LookupBatch:
        """The kernel API's lookup batch (fields replaced by ``changes``)."""
        b = LookupBatch(
            indices=self.indices, offsets=self.offsets, hash_keys=self.hash_keys, mean=self.mean, weights=self.weights,
            batch_size=self.B, dim=self.D, block_size=self.Z, num_elements=self.m,
        )
        return dataclasses.replace(b, **changes)

    def grad_out(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.B, self.hash_keys.shape[0] * self.D, generator=g)


def make_case(F, B, D, Z, m, max_len=4, weighted=False, mean="random", ids="random", empty_frac=0.2, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (F * B,), generator=g)
    lengths[torch.rand(F * B, generator=g) < empty_frac] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nnz = int(offsets[-1])
    if ids == "extreme":
        pick = torch.randint(0, len(EXTREME_IDS), (nnz,), generator=g)
        indices = torch.tensor(EXTREME_IDS, dtype=torch.int64)[pick]
    else:
        indices = torch.randint(-(10**6), 10**6, (nnz,), generator=g)
        # Repeats inside and across bags: the same blocks are hit several times.
        indices[torch.rand(nnz, generator=g) < 0.3] = 7
    if mean == "random":
        mean_t = torch.rand(F, generator=g) < 0.5
    else:
        mean_t = torch.full((F,), mean == "all")
    return Case(
        array=torch.randn(m, generator=g),
        indices=indices,
        offsets=offsets,
        hash_keys=torch.tensor([table_key(seed, f"table_{f}") for f in range(F)], dtype=torch.int64),
        mean=mean_t,
        weights=torch.rand(nnz, generator=g) * 4 - 2 if weighted else None,
        B=B,
        D=D,
        Z=Z,
    )


# (F, B, D, Z, m, options): wrap-around at small m, partial last chunks (a block then crosses
# three chunks), Z = 1, Z = D, m == Z (every block wraps inside chunk 0), Z < m < 2Z.
CASES = {
    "basic": (3, 6, 8, 4, 1000, {}),
    "wrap_m37": (2, 7, 16, 8, 37, {}),
    "z1_m53": (2, 9, 4, 1, 53, {}),
    "z_eq_d_m101": (3, 5, 16, 16, 101, {}),
    "d16_z4_m97": (2, 8, 16, 4, 97, {"max_len": 6}),
    "m_eq_z": (2, 5, 16, 8, 8, {}),
    "z_lt_m_lt_2z": (2, 5, 8, 8, 13, {}),
    "weighted_mean": (3, 6, 8, 2, 64, {"weighted": True, "mean": "all"}),
    "weighted_sum": (2, 6, 8, 4, 61, {"weighted": True, "mean": "none"}),
    "empty_bags": (3, 6, 8, 4, 59, {"empty_frac": 0.7, "mean": "all"}),
    "all_empty": (2, 4, 8, 4, 40, {"empty_frac": 1.0, "weighted": True}),
    "extreme_ids": (2, 6, 8, 4, 83, {"ids": "extreme", "weighted": True}),
    "larger": (4, 32, 16, 8, 5000, {"max_len": 8}),
    # Every bag SUM and unweighted: the chunk map's 16-byte list records.
    "sum_unweighted": (3, 40, 16, 8, 997, {"mean": "none", "max_len": 6}),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    F, B, D, Z, m, opts = CASES[request.param]
    return make_case(F, B, D, Z, m, seed=sum(map(ord, request.param)), **opts)


def _state(case: Case, optimizer: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if optimizer == "sgd":
        return torch.empty(0)
    if optimizer == "adagrad":
        return torch.rand(case.m, generator=g)
    return torch.rand((case.m + case.Z - 1) // case.Z, generator=g)


def _fused_at_threads(case: Case, go: torch.Tensor, optimizer: str, lr: float, threads_list) -> list:
    """(array, state, forward) after one fused step of a fresh copy, at each thread count."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in threads_list:
            torch.set_num_threads(n)
            a, s = case.array.clone(), _state(case, optimizer)
            cpu.pooled_backward_fused(go, a, case.batch(), OptimizerArgs(optimizer, s, lr, 1e-8))
            results.append((a, s, cpu.pooled_forward(case.array, case.batch())))
    finally:
        torch.set_num_threads(threads)
    return results


def _under_each(monkeypatch, variable: str, values, run) -> dict:
    """{value: run()} with the environment variable set to each value in turn."""
    results = {}
    for value in values:
        monkeypatch.setenv(variable, value)
        results[value] = run()
    return results


# ------------------------------------------------------------------------------------ the hash


@pytest.mark.parametrize("seed,name,idx,block,m,expected", GOLDEN)
def test_cpp_hash_golden(ext, seed, name, idx, block, m, expected):
    k0, k1 = table_key(seed, name)
    out = ext.block_offsets(torch.tensor([idx], dtype=torch.int64), k0, k1, block + 1, m)
    assert out[0, block].item() == expected


def _has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


ISAS = ["base", pytest.param("avx2", marks=pytest.mark.skipif(not _has_avx2(), reason="this CPU has no AVX2"))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "m",
    [1, 2, 7, 32, 37, 2**20, 1_000_003, 2**31 + 11, 2**32 + 1, 2**36 - 1, 2**36, 2**36 + 1, 2**40 + 7, 2**48 - 1, 2**48],
)
def test_cpp_hash_matches_torch(ext, monkeypatch, isa, m):
    """Both instruction-set paths give the spec's bits (the torch hash). ROBE_CPU_ISA=avx2 hashes
    eight ids at a time with an exact float64 reduction up to m = 2**36 (tested on both sides of
    it); 3009 ids, so the AVX2 loop's scalar tail is hashed too."""
    monkeypatch.setenv("ROBE_CPU_ISA", isa)
    g = torch.Generator().manual_seed(m % 9973)
    ids = torch.cat(
        [torch.tensor(EXTREME_IDS, dtype=torch.int64), torch.randint(-(2**63), 2**63 - 1, (3000,), generator=g)]
    )
    k0, k1 = table_key(11, "hash_check")
    expected = block_offsets(ids, torch.tensor([k0]), torch.tensor([k1]), 5, m)
    assert torch.equal(ext.block_offsets(ids, k0, k1, 5, m), expected)


# ------------------------------------------------------------------------ forward and backward


def test_forward_matches_reference(ext, case):
    out = cpu.pooled_forward(case.array, case.batch())
    expected = ref.pooled_forward(case.array, case.batch())
    assert out.shape == expected.shape == (case.B, case.hash_keys.shape[0] * case.D)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, **TOL)


def test_forward_empty_bags_are_zero(ext):
    c = make_case(2, 6, 8, 4, 50, empty_frac=0.6, mean="all", seed=3)
    out = cpu.pooled_forward(c.array, c.batch()).view(c.B, 2, c.D)
    lengths = (c.offsets[1:] - c.offsets[:-1]).view(2, c.B).t()
    assert bool((lengths == 0).any())
    assert bool((out[lengths == 0] == 0).all())


def test_dense_backward_matches_reference(ext, case):
    go = case.grad_out(5)
    grad = cpu.pooled_backward_dense(go, case.batch())
    expected = ref.pooled_backward_dense(go, case.batch())
    assert grad.shape == (case.m,)
    torch.testing.assert_close(grad, expected, **TOL)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_fused_step_matches_reference(ext, case, optimizer):
    go = case.grad_out(6)
    state = _state(case, optimizer)
    a_cpu, s_cpu = case.array.clone(), state.clone()
    a_ref, s_ref = case.array.clone(), state.clone()
    cpu.pooled_backward_fused(go, a_cpu, case.batch(), OptimizerArgs(optimizer, s_cpu, 0.05, 1e-8))
    ref.pooled_backward_fused(go, a_ref, case.batch(), OptimizerArgs(optimizer, s_ref, 0.05, 1e-8))
    torch.testing.assert_close(a_cpu, a_ref, **TOL)
    torch.testing.assert_close(s_cpu, s_ref, **TOL)
    # Elements with a zero gradient keep their exact bits (in a touched chunk too: M -= 0).
    untouched = ref.pooled_backward_dense(go, case.batch()) == 0
    assert torch.equal(a_cpu[untouched], case.array[untouched])


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_three_fused_steps_match_reference(ext, optimizer):
    c = make_case(3, 8, 16, 4, 89, max_len=5, weighted=True, seed=21)
    state = _state(c, optimizer)
    a_cpu, s_cpu = c.array.clone(), state.clone()
    a_ref, s_ref = c.array.clone(), state.clone()
    for step in range(3):
        go = c.grad_out(100 + step)
        cpu.pooled_backward_fused(go, a_cpu, c.batch(), OptimizerArgs(optimizer, s_cpu, 0.1, 1e-6))
        ref.pooled_backward_fused(go, a_ref, c.batch(), OptimizerArgs(optimizer, s_ref, 0.1, 1e-6))
    torch.testing.assert_close(a_cpu, a_ref, **TOL)
    torch.testing.assert_close(s_cpu, s_ref, **TOL)


# ---------------------------------------------------------------- against torch.optim / formulas


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_fused_equals_torch_optim(ext, optimizer):
    c = make_case(3, 10, 8, 4, 71, max_len=5, weighted=True, seed=31)
    lr, eps = 0.07, 1e-7
    param = torch.nn.Parameter(c.array.clone())
    if optimizer == "sgd":
        opt = torch.optim.SGD([param], lr=lr)
        state = torch.empty(0)
    else:
        opt = torch.optim.Adagrad([param], lr=lr, eps=eps, initial_accumulator_value=0.0)
        state = torch.zeros(c.m)
    array = c.array.clone()
    for step in range(2):
        go = c.grad_out(200 + step)
        param.grad = ref.pooled_backward_dense(go, c.batch())
        opt.step()
        cpu.pooled_backward_fused(go, array, c.batch(), OptimizerArgs(optimizer, state, lr, eps))
    torch.testing.assert_close(array, param.detach(), **TOL)
    if optimizer == "adagrad":
        torch.testing.assert_close(state, opt.state[param]["sum"], **TOL)


def test_rowwise_adagrad_formula(ext):
    """Per aligned chunk j (the last one partial): S[j] += mean(g[j]^2); M[j] -= lr g / (sqrt(S[j]) + eps)."""
    c = make_case(2, 9, 8, 4, 43, max_len=4, weighted=True, seed=41)  # 43 = 10 chunks of 4 + 3
    lr, eps = 0.3, 1e-5
    go = c.grad_out(7)
    g = ref.pooled_backward_dense(go, c.batch()).double()
    state = _state(c, "rowwise_adagrad")
    expected_m, expected_s = c.array.double().clone(), state.double().clone()
    for j in range(state.numel()):
        lo, hi = j * c.Z, min((j + 1) * c.Z, c.m)
        expected_s[j] += (g[lo:hi] ** 2).sum() / (hi - lo)
        expected_m[lo:hi] -= lr * g[lo:hi] / (expected_s[j].sqrt() + eps)
    array = c.array.clone()
    cpu.pooled_backward_fused(go, array, c.batch(), OptimizerArgs("rowwise_adagrad", state, lr, eps))
    torch.testing.assert_close(state, expected_s.float(), **TOL)
    torch.testing.assert_close(array, expected_m.float(), **TOL)


# ------------------------------------------------------------------------ determinism, threads


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_deterministic_and_thread_count_independent(ext, optimizer):
    # Many lookups into a small array: every chunk is hit by records from every thread's range,
    # and enough entries (~200k) that the radix sort splits its passes across threads.
    c = make_case(4, 2048, 16, 4, 997, max_len=8, weighted=True, seed=51)
    go = c.grad_out(9)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1, 3):
            torch.set_num_threads(n)
            a, s = c.array.clone(), _state(c, optimizer)
            cpu.pooled_backward_fused(go, a, c.batch(), OptimizerArgs(optimizer, s, 0.1, 1e-8))
            dense = cpu.pooled_backward_dense(go, c.batch())
            results.append((a, s, dense, cpu.pooled_forward(c.array, c.batch())))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)
    # ~500 contributions per element, summed in another order than the reference's: looser here.
    torch.testing.assert_close(results[0][2], ref.pooled_backward_dense(go, c.batch()), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- input validation


def test_rejects_bad_inputs(ext):
    c = make_case(2, 4, 8, 4, 40, seed=61)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        cpu.pooled_forward(c.array, c.batch(indices=c.indices.int()))
    with pytest.raises(RuntimeError, match="offsets"):
        cpu.pooled_forward(c.array, c.batch(offsets=c.offsets[:-1]))
    with pytest.raises(RuntimeError, match="float32"):
        cpu.pooled_forward(c.array.double(), c.batch())
    with pytest.raises(RuntimeError, match="multiple of block_size"):
        cpu.pooled_forward(c.array, c.batch(dim=6, block_size=4))
    with pytest.raises(RuntimeError, match="num_elements"):
        cpu.pooled_forward(c.array[:3], c.batch(num_elements=3))
    with pytest.raises(ValueError, match="num_elements"):
        cpu.pooled_forward(c.array[:3], c.batch())  # the array is not the batch's
    # an unknown optimizer cannot even be named: OptimizerArgs takes an OptimizerKind
    with pytest.raises(ValueError, match="unknown fused optimizer"):
        cpu.pooled_backward_fused(c.grad_out(0), c.array.clone(), c.batch(), OptimizerArgs("adam", torch.empty(0), 0.1, 1e-8))
    with pytest.raises(RuntimeError, match="rowwise_adagrad state"):
        bad_state = torch.zeros(c.m)  # adagrad's shape, not [ceil(m / Z)]
        cpu.pooled_backward_fused(c.grad_out(0), c.array.clone(), c.batch(), OptimizerArgs("rowwise_adagrad", bad_state, 0.1, 1e-8))
    with pytest.raises(RuntimeError, match="grad_out"):
        cpu.pooled_backward_dense(torch.zeros(c.B, 3), c.batch())


def test_offsets_window(ext):
    """Offsets may be a window of the ids (one group of a larger batch): the C++ call gets it cut out."""
    c = make_case(2, 5, 8, 4, 61, weighted=True, seed=81)
    ids = torch.cat([torch.tensor([3, -9]), c.indices, torch.tensor([17])])
    w = torch.cat([torch.ones(2), c.weights, torch.ones(1)])
    window = c.batch(indices=ids, offsets=c.offsets + 2, weights=w)
    go = c.grad_out(3)
    torch.testing.assert_close(cpu.pooled_forward(c.array, window), ref.pooled_forward(c.array, c.batch()), **TOL)
    torch.testing.assert_close(cpu.pooled_backward_dense(go, window), ref.pooled_backward_dense(go, c.batch()), **TOL)
    a_cpu, s_cpu, a_ref, s_ref = c.array.clone(), torch.zeros(c.m), c.array.clone(), torch.zeros(c.m)
    cpu.pooled_backward_fused(go, a_cpu, window, OptimizerArgs("adagrad", s_cpu, 0.1, 1e-8))
    ref.pooled_backward_fused(go, a_ref, c.batch(), OptimizerArgs("adagrad", s_ref, 0.1, 1e-8))
    torch.testing.assert_close(a_cpu, a_ref, **TOL)
    torch.testing.assert_close(s_cpu, s_ref, **TOL)


def test_fused_bumps_version_counter(ext):
    c = make_case(2, 4, 8, 4, 40, seed=71)
    array = c.array.clone()
    before = array._version
    cpu.pooled_backward_fused(c.grad_out(0), array, c.batch(), OptimizerArgs("sgd", torch.empty(0), 0.1, 1e-8))
    assert array._version > before


# ------------------------------------------------------------- both backward index preparations


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize(
    "name", ["wrap_m37", "d16_z4_m97", "m_eq_z", "weighted_mean", "extreme_ids", "larger", "sum_unweighted"]
)
def test_chunk_map_and_records_paths_agree(ext, monkeypatch, name, optimizer):
    """ROBE_CPU_BACKWARD forces the sort-free chunk map or the radix-sorted records: both match the
    reference and each other bit for bit (every element sums its contributions in record order)."""
    F, B, D, Z, m, opts = CASES[name]
    c = make_case(F, B, D, Z, m, seed=sum(map(ord, name)) + 3, **opts)
    go = c.grad_out(11)

    def run():
        a, s = c.array.clone(), _state(c, optimizer)
        cpu.pooled_backward_fused(go, a, c.batch(), OptimizerArgs(optimizer, s, 0.05, 1e-8))
        return a, s, cpu.pooled_backward_dense(go, c.batch())

    results = _under_each(monkeypatch, "ROBE_CPU_BACKWARD", ("map", "records"), run)
    a_ref, s_ref = c.array.clone(), _state(c, optimizer)
    ref.pooled_backward_fused(go, a_ref, c.batch(), OptimizerArgs(optimizer, s_ref, 0.05, 1e-8))
    for x, y in zip(results["map"], results["records"]):
        assert torch.equal(x, y)
    torch.testing.assert_close(results["map"][0], a_ref, **TOL)
    torch.testing.assert_close(results["map"][1], s_ref, **TOL)
    torch.testing.assert_close(results["map"][2], ref.pooled_backward_dense(go, c.batch()), **TOL)


@pytest.mark.parametrize("mode", ["map", "records"])
def test_each_path_thread_count_independent(ext, monkeypatch, mode):
    monkeypatch.setenv("ROBE_CPU_BACKWARD", mode)
    c = make_case(4, 1024, 16, 4, 997, max_len=8, weighted=True, seed=52)
    results = _fused_at_threads(c, c.grad_out(12), "rowwise_adagrad", 0.1, (1, 2, 3))
    for a, s, _ in results[1:]:
        assert torch.equal(a, results[0][0]) and torch.equal(s, results[0][1])


def test_unknown_backward_mode_is_refused(ext, monkeypatch):
    monkeypatch.setenv("ROBE_CPU_BACKWARD", "bogus")
    c = make_case(2, 4, 8, 4, 40, seed=62)
    with pytest.raises(RuntimeError, match="ROBE_CPU_BACKWARD"):
        cpu.pooled_backward_dense(c.grad_out(1), c.batch())


# ---------------------------------------------------- instruction sets: generic build vs AVX2


@pytest.mark.parametrize("name", ["basic", "wrap_m37", "d16_z4_m97", "weighted_mean", "extreme_ids", "larger"])
def test_isas_give_the_same_bits(ext, monkeypatch, name):
    """The generic build and the AVX2 path: forward (float32 and bfloat16 arrays), dense backward
    and a fused row-wise Adagrad step bit for bit (the hash is exact on both; the sums keep their
    order, eight floats per instruction or four)."""
    if not _has_avx2():
        pytest.skip("this CPU has no AVX2")
    F, B, D, Z, m, opts = CASES[name]
    c = make_case(F, B, D, Z, m, seed=sum(map(ord, name)) + 9, **opts)
    go = c.grad_out(21)

    def run():
        a, s = c.array.clone(), _state(c, "rowwise_adagrad")
        cpu.pooled_backward_fused(go, a, c.batch(), OptimizerArgs("rowwise_adagrad", s, 0.05, 1e-8))
        forward_bf16 = cpu.pooled_forward(c.array.to(torch.bfloat16), c.batch())
        return cpu.pooled_forward(c.array, c.batch()), cpu.pooled_backward_dense(go, c.batch()), a, s, forward_bf16

    results = _under_each(monkeypatch, "ROBE_CPU_ISA", ("base", "avx2"), run)
    for x, y in zip(results["base"], results["avx2"]):
        assert torch.equal(x, y)
    torch.testing.assert_close(results["avx2"][0], ref.pooled_forward(c.array, c.batch()), **TOL)


def test_unknown_isa_is_refused(ext, monkeypatch):
    monkeypatch.setenv("ROBE_CPU_ISA", "sse9")
    c = make_case(2, 4, 8, 4, 40, seed=63)
    with pytest.raises(RuntimeError, match="ROBE_CPU_ISA"):
        cpu.pooled_forward(c.array, c.batch())


@pytest.mark.parametrize("isa", ISAS)
def test_many_sample_tiles_match_reference(ext, monkeypatch, isa):
    """The kernels hash a tile of samples (about 1024 block starts, at least 16 samples) before
    using its starts: a batch of many tiles, on 1 and 3 threads, against the reference. Id 7 recurs
    in 30% of the lookups, so its elements sum hundreds of contributions: the fused step is compared
    at float32 summation-order tolerance, and across thread counts bit for bit."""
    monkeypatch.setenv("ROBE_CPU_ISA", isa)
    c = make_case(3, 300, 16, 4, 4099, max_len=6, weighted=True, seed=71)
    go = c.grad_out(13)
    a_ref, s_ref = c.array.clone(), _state(c, "adagrad")
    ref.pooled_backward_fused(go, a_ref, c.batch(), OptimizerArgs("adagrad", s_ref, 0.05, 1e-8))
    results = _fused_at_threads(c, go, "adagrad", 0.05, (1, 3))
    for x, y in zip(results[0], results[1]):
        assert torch.equal(x, y)
    a, s, out = results[0]
    torch.testing.assert_close(out, ref.pooled_forward(c.array, c.batch()), **TOL)
    torch.testing.assert_close(a, a_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s, s_ref, rtol=2e-5, atol=2e-5)


def test_many_owners_match_one_thread(ext, monkeypatch):
    """Above 16 owners the chunk map's backward finds a chunk's owner by binary search instead of
    counting cuts: 20 threads (oversubscribed here: correctness, not speed) give the 1-thread bits."""
    monkeypatch.setenv("ROBE_CPU_BACKWARD", "map")
    c = make_case(4, 4096, 16, 4, 20011, max_len=8, weighted=True, seed=81)  # ~300k records: 20 owners
    go = c.grad_out(14)
    results = _fused_at_threads(c, go, "rowwise_adagrad", 0.1, (1, 20))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    a_ref, s_ref = c.array.clone(), _state(c, "rowwise_adagrad")
    ref.pooled_backward_fused(go, a_ref, c.batch(), OptimizerArgs("rowwise_adagrad", s_ref, 0.1, 1e-8))
    torch.testing.assert_close(results[0][0], a_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(results[0][1], s_ref, rtol=2e-5, atol=2e-5)
