"""Row-wise shards in the kernels: ``LookupBatch.element_range`` (robe_torchrec/ops/api.py).

For random tilings of ``[0, m)`` into Z-aligned shards (small m, so blocks wrap at m and shard
boundaries fall inside many blocks), each backend's result on each shard is checked against slow
element-by-element Python math, and against the whole-array reference path:

- forward: a shard's partial sums equal the slow masked sum, and the shards' partials add up to
  the whole-array lookup;
- dense backward: a shard's gradient equals the slice of the whole-array gradient;
- fused backward: a shard's step equals ``apply_optimizer_dense`` on the slice, with the slice of
  the whole-array gradient and of the state (sgd, adagrad, rowwise_adagrad).
"""

from __future__ import annotations

import dataclasses
import random
from typing import List, Tuple

import pytest
import torch

from robe_torchrec.hashing import block_offset_scalar, block_offsets, table_key
from robe_torchrec.ops import cpu as cpu_kernel
from robe_torchrec.ops import reference as ref
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs, state_numel

OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad"]
LR, EPS = 0.05, 1e-6

# F, B, D, Z, m, weighted, mean per feature
CASES = {
    "partial_chunk": dict(F=2, B=5, D=8, Z=4, m=37, weighted=True, mean=(True, False)),
    "aligned": dict(F=2, B=4, D=12, Z=4, m=40, weighted=False, mean=(False, False)),
    "z1": dict(F=3, B=3, D=4, Z=1, m=23, weighted=True, mean=(False, True, False)),
    "z_eq_d": dict(F=1, B=6, D=8, Z=8, m=27, weighted=False, mean=(True,)),
}

pytestmark = pytest.mark.skipif(not cpu_kernel.is_available(), reason="the CPU kernel cannot be built here")


def make_case(name: str, seed: int = 0) -> dict:
    c = CASES[name]
    g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    num_bags = c["F"] * c["B"]
    lengths = torch.randint(0, 5, (num_bags,), generator=g)
    lengths[1] = 0  # an empty bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    nnz = int(offsets[-1])
    pool = torch.cat([torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)]), torch.randint(-(2**40), 2**40, (12,), generator=g)])
    indices = pool[torch.randint(0, pool.numel(), (nnz,), generator=g)]  # repeats: colliding updates
    keys = [table_key(5, f"t{f}") for f in range(c["F"])]
    return dict(
        c,
        indices=indices,
        offsets=offsets,
        keys=keys,
        hash_keys=torch.tensor(keys, dtype=torch.int64),
        weights=torch.rand(nnz, generator=g) * 2 - 0.5 if c["weighted"] else None,
        array=torch.randn(c["m"], generator=g),
        grad_out=torch.randn(c["B"], c["F"] * c["D"], generator=g),
    )


def batch_of(k: dict, element_range=None) -> LookupBatch:
    return LookupBatch(
        indices=k["indices"], offsets=k["offsets"], hash_keys=k["hash_keys"], mean=torch.tensor(k["mean"]),
        weights=k["weights"], batch_size=k["B"], dim=k["D"], block_size=k["Z"], num_elements=k["m"],
        element_range=element_range,
    )


def tilings(m: int, z: int, seed: int) -> List[List[Tuple[int, int]]]:
    """Tilings of [0, m) into shards with Z-aligned bounds: random ones, one shard per chunk
    (a boundary inside every unaligned block), and the whole array as one shard."""
    rng = random.Random(seed)
    cuts = list(range(z, m, z))  # interior chunk boundaries
    out = []
    for _ in range(3):
        chosen = sorted(rng.sample(cuts, rng.randint(1, min(3, len(cuts)))))
        bounds = [0] + chosen + [m]
        out.append(list(zip(bounds[:-1], bounds[1:])))
    bounds = [0] + cuts + [m]
    out.append(list(zip(bounds[:-1], bounds[1:])))
    out.append([(0, m)])
    return out


def slow_shard_forward(k: dict, local: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Element by element: pooled[b, f*D + j] = scale * sum_i w_i * M[e] over e = (h(f, id_i, j // Z)
    + j % Z) mod m, with M[e] = local[e - lo] inside [lo, hi) and 0 outside."""
    F, B, D, Z, m = k["F"], k["B"], k["D"], k["Z"], k["m"]
    vals = local.double().tolist()
    off, ids = k["offsets"].tolist(), k["indices"].tolist()
    w = None if k["weights"] is None else k["weights"].double().tolist()
    out = torch.zeros(B, F * D, dtype=torch.float64)
    for f in range(F):
        for b in range(B):
            bag = f * B + b
            for i in range(off[bag], off[bag + 1]):
                for j in range(D):
                    e = (block_offset_scalar(k["keys"][f], ids[i], j // Z, m) + j % Z) % m
                    if lo <= e < hi:
                        out[b, f * D + j] += (1.0 if w is None else w[i]) * vals[e - lo]
            n = off[bag + 1] - off[bag]
            if k["mean"][f] and n:
                out[b, f * D : (f + 1) * D] /= n
    return out.float()


def test_cases_wrap_and_straddle():
    """The cases exercise what the masking must get right: blocks wrapping at m, and blocks
    straddling an aligned (hence a shard) boundary."""
    for name in CASES:
        k = make_case(name)
        if k["Z"] == 1:
            continue  # a block of one element neither wraps nor straddles
        nb = k["D"] // k["Z"]
        feats = torch.repeat_interleave(torch.arange(k["F"]), k["B"])
        feat_of_id = torch.repeat_interleave(feats, k["offsets"][1:] - k["offsets"][:-1])
        keys = k["hash_keys"][feat_of_id]
        starts = block_offsets(k["indices"], keys[:, 0], keys[:, 1], nb, k["m"])
        assert bool((starts + k["Z"] > k["m"]).any()), name
        assert bool((starts % k["Z"] != 0).any()), name


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_shards(name, seed):
    k = make_case(name, seed)
    whole = ref.pooled_forward(k["array"], batch_of(k))
    torch.testing.assert_close(slow_shard_forward(k, k["array"], 0, k["m"]), whole, rtol=1e-5, atol=1e-5)
    for tiling in tilings(k["m"], k["Z"], seed):
        total = torch.zeros_like(whole)
        for lo, hi in tiling:
            local = k["array"][lo:hi].clone()
            out = cpu_kernel.pooled_forward(local, batch_of(k, (lo, hi)))
            torch.testing.assert_close(out, slow_shard_forward(k, local, lo, hi), rtol=1e-5, atol=1e-5)
            total += out
        torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_backward_shards(name, seed):
    k = make_case(name, seed)
    whole = ref.pooled_backward_dense(k["grad_out"], batch_of(k))  # autograd through the reference
    for tiling in tilings(k["m"], k["Z"], seed):
        for lo, hi in tiling:
            grad = cpu_kernel.pooled_backward_dense(k["grad_out"], batch_of(k, (lo, hi)))
            assert grad.shape == (hi - lo,)
            torch.testing.assert_close(grad, whole[lo:hi], rtol=1e-5, atol=1e-6)


def _local_state(state: torch.Tensor, optimizer: str, lo: int, hi: int, z: int) -> torch.Tensor:
    if optimizer == "sgd":
        return state
    if optimizer == "adagrad":
        return state[lo:hi]
    return state[lo // z : -(-hi // z)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_backward_shards(name, optimizer):
    k = make_case(name, seed=2)
    m, z = k["m"], k["Z"]
    g = ref.pooled_backward_dense(k["grad_out"], batch_of(k))
    state0 = torch.rand(state_numel(optimizer, m, z), generator=torch.Generator().manual_seed(3))
    for tiling in tilings(m, z, seed=4):
        for lo, hi in tiling:
            local = k["array"][lo:hi].clone()
            state = _local_state(state0, optimizer, lo, hi, z).clone()
            assert state.numel() == state_numel(optimizer, hi - lo, z)  # the shard's own state size
            expected, expected_state = local.clone(), state.clone()
            ref.apply_optimizer_dense(expected, expected_state, g[lo:hi], optimizer, LR, EPS, z)
            cpu_kernel.pooled_backward_fused(
                k["grad_out"], local, batch_of(k, (lo, hi)), OptimizerArgs(optimizer, state, LR, EPS)
            )
            torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-6)
            # elements no lookup touched are left exactly as they were
            untouched = g[lo:hi] == 0
            if k["weights"] is None:
                assert torch.equal(local[untouched], k["array"][lo:hi][untouched])


def test_whole_range_is_the_unranged_lookup():
    """element_range = (0, m) is the ordinary lookup, bit for bit."""
    k = make_case("partial_chunk")
    plain, ranged = batch_of(k), batch_of(k, (0, k["m"]))
    assert torch.equal(cpu_kernel.pooled_forward(k["array"], plain), cpu_kernel.pooled_forward(k["array"], ranged))
    assert torch.equal(
        cpu_kernel.pooled_backward_dense(k["grad_out"], plain), cpu_kernel.pooled_backward_dense(k["grad_out"], ranged)
    )


@pytest.mark.parametrize(
    "element_range, numel, match",
    [
        ((2, 8), 6, "multiples of block_size"),
        ((0, 6), 6, "multiples of block_size"),
        ((8, 44), 36, "0 <= lo < hi <= num_elements"),
        ((8, 8), 0, "0 <= lo < hi <= num_elements"),
        ((8, 16), 9, "holds 8"),
    ],
)
def test_bad_range_is_refused(element_range, numel, match):
    k = make_case("partial_chunk")  # m = 37, Z = 4
    with pytest.raises(RuntimeError, match=match):
        cpu_kernel.pooled_forward(torch.zeros(numel), batch_of(k, element_range))


def test_bad_local_state_is_refused():
    k = make_case("partial_chunk")
    lo, hi = 8, 20
    batch = batch_of(k, (lo, hi))
    with pytest.raises(RuntimeError, match=r"adagrad state must be a contiguous \[array elements\] = \[12\]"):
        cpu_kernel.pooled_backward_fused(k["grad_out"], torch.zeros(12), batch, OptimizerArgs("adagrad", torch.zeros(37), LR))
    with pytest.raises(RuntimeError, match=r"rowwise_adagrad state .* = \[3\]"):
        cpu_kernel.pooled_backward_fused(
            k["grad_out"], torch.zeros(12), batch, OptimizerArgs("rowwise_adagrad", torch.zeros(10), LR)
        )


def test_replace_keeps_range():
    """LookupBatch.features / narrowed keep the range (the lookup op splits batches by dim)."""
    k = make_case("aligned")
    b = batch_of(k, (8, 24))
    assert b.features(0, 1, k["D"]).element_range == (8, 24)
    assert dataclasses.replace(b, offsets=b.offsets).narrowed().element_range == (8, 24)
