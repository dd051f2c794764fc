"""The ROBE hash: golden vectors (checkpoints depend on them), backend agreement, dispersion."""

import numpy as np
import pytest
import torch

from robe_torchrec.hashing import (
    HASH_VERSION,
    block_offset_scalar,
    block_offsets,
    element_indices,
    table_key,
)

# (seed, table name, id, block, num_elements) -> offset. Frozen: if one of these changes, the hash
# changed and every checkpoint ever written is garbage. Bump HASH_VERSION instead.
GOLDEN = [
    (0, "t_cat_0", 0, 0, 1048576, 938207),
    (0, "t_cat_0", 1, 0, 1048576, 670933),
    (0, "t_cat_0", 1, 1, 1048576, 676176),
    (0, "t_cat_1", 1, 0, 1048576, 784150),
    (1, "t_cat_0", 1, 0, 1048576, 920107),
    (0, "t_cat_0", -1, 0, 1048576, 534331),
    (0, "t_cat_0", -9223372036854775808, 3, 1048576, 443391),
    (0, "t_cat_0", 9223372036854775807, 3, 1048576, 643323),
    (0, "t_cat_0", 4294967296, 0, 1048576, 327875),
    (0, "t_cat_0", 123456789012345, 7, 1000003, 763943),
    (42, "user_id", 987654321, 2, 1099511627776, 237041569997),
    (42, "user_id", -987654321, 2, 1099511627783, 412097793501),
    (7, "ünïcode", 5, 0, 281474976710656, 49300437365228),
    (0, "t", 0, 0, 1, 0),
    (3, "item", 99, 15, 27000000, 18054537),
]
GOLDEN_KEYS = {(0, "t_cat_0"): (2521988567, 118611613), (42, "user_id"): (899876645, 396449407)}


def test_hash_version_is_1():
    assert HASH_VERSION == 1, "a new hash version needs new golden vectors and a migration note"


@pytest.mark.parametrize("seed,name,expected", [(s, n, k) for (s, n), k in GOLDEN_KEYS.items()])
def test_golden_table_keys(seed, name, expected):
    assert table_key(seed, name) == expected


@pytest.mark.parametrize("seed,name,idx,block,m,expected", GOLDEN)
def test_golden_offsets_scalar(seed, name, idx, block, m, expected):
    assert block_offset_scalar(table_key(seed, name), idx, block, m) == expected


@pytest.mark.parametrize("seed,name,idx,block,m,expected", GOLDEN)
def test_golden_offsets_torch(seed, name, idx, block, m, expected):
    k0, k1 = table_key(seed, name)
    ids = torch.tensor([idx], dtype=torch.int64)
    out = block_offsets(ids, torch.tensor([k0]), torch.tensor([k1]), block + 1, m)
    assert out[0, block].item() == expected


def _fmix32_numpy(h: np.ndarray) -> np.ndarray:
    """murmur3 fmix32 on numpy uint32 (wrapping arithmetic): an implementation independent of the
    Python-int and split-int64 versions under test."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _offsets_numpy(key, ids: np.ndarray, block: int, m: int) -> np.ndarray:
    k0, k1 = (np.uint32(k) for k in key)
    u = ids.astype(np.int64).view(np.uint64)
    lo = (u & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (u >> np.uint64(32)).astype(np.uint32)
    c = np.uint32(block)
    with np.errstate(over="ignore"):
        a = _fmix32_numpy(_fmix32_numpy(_fmix32_numpy(k0 ^ c) ^ lo) ^ hi)
        b = _fmix32_numpy(_fmix32_numpy(_fmix32_numpy(_fmix32_numpy(k1 ^ c) ^ hi) ^ lo) ^ a)
    v = ((a.astype(np.uint64) & np.uint64(0x3FFFFFFF)) << np.uint64(32)) | b.astype(np.uint64)
    return (v % np.uint64(m)).astype(np.int64)


def _extreme_and_random_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    edges = torch.tensor(
        [0, 1, -1, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, -(2**32), 2**63 - 1, -(2**63)],
        dtype=torch.int64,
    )
    return torch.cat([edges, rand, torch.arange(100, dtype=torch.int64)])


@pytest.mark.parametrize("m", [1, 7, 2**20, 2**31 + 11, 2**40, 2**48])
def test_torch_matches_numpy_and_scalar(m):
    ids = _extreme_and_random_ids(300, seed=m % 1000)
    key = table_key(5, "some_table")
    out = block_offsets(ids, torch.tensor([key[0]]), torch.tensor([key[1]]), 4, m)
    assert out.dtype == torch.int64
    assert bool((out >= 0).all()) and bool((out < m).all())
    for c in range(4):
        np.testing.assert_array_equal(out[:, c].numpy(), _offsets_numpy(key, ids.numpy(), c, m))
    for i in range(0, ids.numel(), 37):
        for c in range(4):
            assert out[i, c].item() == block_offset_scalar(key, int(ids[i]), c, m)


def test_key_depends_on_name_and_seed_only():
    assert table_key(0, "a") == table_key(0, "a")
    assert table_key(0, "a") != table_key(0, "b")
    assert table_key(0, "a") != table_key(1, "a")
    with pytest.raises(ValueError):
        table_key(0, "")


def test_block_offsets_rejects_bad_input():
    with pytest.raises(TypeError, match="int64"):
        block_offsets(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]), 1, 10)
    with pytest.raises(ValueError, match="num_elements"):
        block_offsets(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]), 1, 0)


def test_element_indices_wrap_at_the_end():
    m, z = 10, 4
    idx = element_indices(torch.tensor([[8, 0]]), z, m)
    assert idx.tolist() == [[8, 9, 0, 1, 0, 1, 2, 3]]


def test_offsets_are_uniform_chi_square():
    """Offsets of 50k consecutive ids x 4 blocks spread evenly over 256 buckets of the array."""
    m, buckets = 1_000_003, 256
    key = table_key(0, "uniformity")
    ids = torch.arange(50_000, dtype=torch.int64)
    offs = block_offsets(ids, torch.tensor([key[0]]), torch.tensor([key[1]]), 4, m).flatten()
    counts = torch.bincount(offs * buckets // m, minlength=buckets).double()
    expected = offs.numel() / buckets
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond 6 sd.
    assert chi2 < 400, chi2


@pytest.mark.parametrize("stride", [1, 2**32, 1024])
def test_consecutive_ids_do_not_collide_more_than_chance(stride):
    """Blocks of ids 0, s, 2s, ... overlap (start within Z of another) about as often as random."""
    m, z, n = 1 << 24, 32, 20_000
    key = table_key(0, "collisions")
    ids = torch.arange(n, dtype=torch.int64) * stride
    starts = block_offsets(ids, torch.tensor([key[0]]), torch.tensor([key[1]]), 1, m).flatten()
    s = torch.sort(starts).values
    gaps = torch.cat([s[1:] - s[:-1], (s[:1] + m - s[-1:])])
    overlapping_neighbours = int((gaps < z).sum())
    exact = n - torch.unique(starts).numel()
    # Random starts: P(gap < Z) = 1 - (1 - Z/m)^n ~ 0.0374 -> ~748 overlaps; exact ~ n^2/2m = 11.9.
    expected_overlap = n * (1 - (1 - z / m) ** (n - 1))
    assert abs(overlapping_neighbours - expected_overlap) < 6 * expected_overlap**0.5
    assert exact < 11.9 + 6 * 11.9**0.5


def test_blocks_of_one_id_are_independent():
    """The D/Z blocks of one id land at unrelated places (no fixed stride between them)."""
    m = 1 << 30
    key = table_key(0, "blocks")
    offs = block_offsets(torch.arange(2000, dtype=torch.int64), torch.tensor([key[0]]), torch.tensor([key[1]]), 2, m)
    diffs = (offs[:, 1] - offs[:, 0]) % m
    assert torch.unique(diffs).numel() > 1990
