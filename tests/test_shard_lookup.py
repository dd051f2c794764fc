"""``robe_shard_lookup`` (a row-wise shard on the C++ kernel) against whole-array reference math.

For a Z-aligned tiling of a small array (blocks wrap at m and straddle shard boundaries), with one
or two embedding dims, weighted or not:

- forward: the shards' partial sums add up to the whole-array SUM lookup of the reference path,
  and each equals the masked PyTorch partial sum (``partial_pooled``);
- dense backward: each shard's gradient is the slice of the whole-array reference gradient;
- fused backward: each shard's step is ``apply_optimizer_dense`` on its slice with the slice of
  the whole-array gradient and of the state (sgd, adagrad, rowwise_adagrad).
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from robe_torchrec.ops import cpu as cpu_kernel
from robe_torchrec.ops.api import OptimizerArgs, state_numel
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.reference import apply_optimizer_dense, robe_pooled_lookup_reference
from robe_torchrec.ops.shard_lookup import robe_shard_lookup
from robe_torchrec.sharding.rw_lookup import partial_pooled

pytestmark = pytest.mark.skipif(not cpu_kernel.is_available(), reason="the CPU kernel cannot be built here")

Z, M, B, LR, EPS = 4, 53, 5, 0.05, 1e-6


def layout_of(dims: Tuple[int, ...]) -> FeatureLayout:
    names = tuple(f"f{i}" for i in range(len(dims)))
    return FeatureLayout(names, tuple(f"t{i}" for i in range(len(dims))), dims, (False,) * len(dims), Z, M, seed=3)


def batch_of(layout: FeatureLayout, weighted: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (layout.num_features * B,), generator=g)
    lengths[0] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ids = torch.randint(-(2**40), 2**40, (int(offsets[-1]),), generator=g)
    weights = torch.rand(ids.numel(), generator=g) + 0.5 if weighted else None
    return ids, offsets, lengths, weights


def tiling() -> List[Tuple[int, int]]:
    cuts = [0, 3 * Z, 4 * Z, 9 * Z, M]  # includes a one-chunk shard and a partial last chunk
    return list(zip(cuts[:-1], cuts[1:]))


CASES = [pytest.param((8, 8), True, id="one-dim-weighted"), pytest.param((8, 4, 4), False, id="two-dims")]


@pytest.mark.parametrize("dims,weighted", CASES)
def test_partial_sums_add_up_and_gradients_are_slices(dims, weighted):
    layout = layout_of(dims)
    keys = layout.hash_keys(torch.device("cpu"))
    ids, offsets, lengths, weights = batch_of(layout, weighted)
    array = torch.randn(M, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(B, layout.total_dim, generator=torch.Generator().manual_seed(2))

    whole = array.clone().requires_grad_(True)
    want = robe_pooled_lookup_reference(whole, ids, offsets, layout, keys, B, weights)
    (want_grad,) = torch.autograd.grad(want, whole, grad_out)

    total = torch.zeros_like(want)
    for lo, hi in tiling():
        local = array[lo:hi].clone().requires_grad_(True)
        got = robe_shard_lookup(local, (lo, hi), ids, offsets, layout, keys, B, weights)
        masked = partial_pooled(array[lo:hi], lo, ids, lengths, layout, keys, B, weights)
        torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(got, local, grad_out)
        torch.testing.assert_close(grad, want_grad[lo:hi], rtol=1e-5, atol=1e-5)
        total += got.detach()
    torch.testing.assert_close(total, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("dims,weighted", CASES)
def test_fused_step_is_the_slice_of_the_whole_array_step(dims, weighted, optimizer):
    layout = layout_of(dims)
    keys = layout.hash_keys(torch.device("cpu"))
    ids, offsets, _, weights = batch_of(layout, weighted, seed=4)
    array = torch.randn(M, generator=torch.Generator().manual_seed(5))
    state = torch.rand(state_numel(optimizer, M, Z), generator=torch.Generator().manual_seed(6))
    grad_out = torch.randn(B, layout.total_dim, generator=torch.Generator().manual_seed(7))

    whole = array.clone().requires_grad_(True)
    out = robe_pooled_lookup_reference(whole, ids, offsets, layout, keys, B, weights)
    (g,) = torch.autograd.grad(out, whole, grad_out)

    for lo, hi in tiling():
        want, want_state = array[lo:hi].clone(), state[state_numel(optimizer, lo, Z) : state_numel(optimizer, hi, Z)].clone()
        apply_optimizer_dense(want, want_state, g[lo:hi], optimizer, LR, EPS, Z)

        local = torch.nn.Parameter(array[lo:hi].clone())
        local_state = state[state_numel(optimizer, lo, Z) : state_numel(optimizer, hi, Z)].clone()
        fused = OptimizerArgs(optimizer, local_state, LR, EPS)
        got = robe_shard_lookup(local, (lo, hi), ids, offsets, layout, keys, B, weights, fused_optimizer=fused)
        got.backward(grad_out)
        assert local.grad is None  # the step happened in backward, no gradient left
        torch.testing.assert_close(local.data, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(local_state, want_state, rtol=1e-5, atol=1e-6)


def test_bad_shard_is_refused_with_a_clear_error():
    layout = layout_of((8,))
    ids, offsets, _, _ = batch_of(layout, False)
    keys = layout.hash_keys(torch.device("cpu"))
    with pytest.raises(ValueError, match="shard holds 5 elements"):
        robe_shard_lookup(torch.zeros(5), (0, 8), ids, offsets, layout, keys, B)
    with pytest.raises(ValueError, match="element_range kernel"):
        robe_shard_lookup(torch.zeros(8), (0, 8), ids, offsets, layout, keys, B, kernel="reference")
