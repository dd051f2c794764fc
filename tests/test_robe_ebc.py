"""RobeEmbeddingBagCollection (reference path) against slow per-element math and torchrec's EBC."""

import random
from typing import List

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.modules import robe_embedding_bag_collection as rebc
from robe_torchrec.hashing import block_offset_scalar, table_key
from robe_torchrec.optim import RobeFusedOptimizerConfig
from tests.slow_reference import bags_of, pooled_slow, weights_of

EDGE_IDS = [0, -1, 2**63 - 1, -(2**63), 2**32, -(2**31)]


def _random_kjt(keys: List[str], batch: int, rng: random.Random, weighted: bool, max_len: int = 3, num_ids: int = 0):
    """Random multi-hot KJT; ids are any int64 (with edge values), or in [0, num_ids) if given."""
    lengths, values, weights = [], [], []
    for _ in keys:
        for _ in range(batch):
            n = rng.randint(0, max_len)
            lengths.append(n)
            for _ in range(n):
                if num_ids:
                    values.append(rng.randrange(num_ids))
                else:
                    values.append(rng.choice(EDGE_IDS) if rng.random() < 0.2 else rng.randint(-(10**6), 10**6))
                weights.append(rng.uniform(-2, 2))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        weights=torch.tensor(weights) if weighted else None,
    )


def _expected(module: RobeEmbeddingBagCollection, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Slow per-element answer in torchrec's output order (tables, then their features)."""
    cfgs, groups = module.robe_configs(), module.table_to_group()
    cols = []
    for t in module.embedding_bag_configs():
        cfg = cfgs[groups[t.name]]
        for f in t.feature_names:
            feat = dict(
                table=t.name,
                dim=t.embedding_dim,
                mean=t.pooling == PoolingType.MEAN,
                ids=bags_of(kjt, f),
                weights=weights_of(kjt, f) if module.is_weighted() else None,
            )
            cols.append(pooled_slow(module.arrays[groups[t.name]], cfg.seed, cfg.block_size, [feat], kjt.stride()))
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])  # D=8: Z in {1, 2, D/2, D}
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_slow_reference(block_size, weighted):
    rng = random.Random(block_size * 10 + weighted)
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=50, feature_names=["f0", "f1"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=20, feature_names=["f2"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=30, feature_names=["f3"]),
    ]
    robe = RobeConfig(num_elements=37, block_size=block_size, seed=11)
    module = RobeEmbeddingBagCollection(tables, robe, is_weighted=weighted)
    kjt = _random_kjt(["f3", "f2", "f1", "f0", "unused"], batch=5, rng=rng, weighted=weighted)
    out = module(kjt)
    assert out.keys() == ["f0", "f1", "f2", "f3"]
    assert out.length_per_key() == [8, 8, 8, 16]
    torch.testing.assert_close(out.values().double(), _expected(module, kjt), rtol=1e-5, atol=1e-6)


def test_wrap_around_is_exercised_and_correct():
    """With m=37 and Z=8 some blocks start within Z of the end and must wrap to M[0..]."""
    tables = [EmbeddingBagConfig(name="w", embedding_dim=8, num_embeddings=10, feature_names=["f"])]
    module = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=37, block_size=8, seed=0))
    with torch.no_grad():
        module.arrays["default"].copy_(torch.arange(37, dtype=torch.float32))
    key = table_key(0, "w")
    ids = [i for i in range(200) if block_offset_scalar(key, i, 0, 37) > 37 - 8][:3]
    assert len(ids) == 3
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor(ids), lengths=torch.ones(3, dtype=torch.int64))
    out = module(kjt).values()
    for row, i in zip(out.tolist(), ids):
        start = block_offset_scalar(key, i, 0, 37)
        assert row == [float((start + k) % 37) for k in range(8)]


def test_shared_feature_across_tables_gets_torchrec_names():
    tables = [
        EmbeddingBagConfig(name="ta", embedding_dim=4, num_embeddings=5, feature_names=["f"]),
        EmbeddingBagConfig(name="tb", embedding_dim=4, num_embeddings=5, feature_names=["f", "g"]),
    ]
    module = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=64, block_size=2))
    reference = EmbeddingBagCollection(tables)
    kjt = _random_kjt(["f", "g"], batch=3, rng=random.Random(0), weighted=False, num_ids=5)
    out, ref = module(kjt), reference(kjt)
    assert out.keys() == ref.keys() == ["f@ta", "f@tb", "g"]
    # The same feature through two tables reads different blocks (the hash keys by table name).
    assert kjt.values().numel() > 0  # the comparison below needs ids to mean anything
    assert not torch.equal(out["f@ta"], out["f@tb"])


def test_output_matches_torchrec_ebc_keys_and_shapes():
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=100, feature_names=[f"f{i}"])
        for i, d in enumerate([16, 32, 16, 64])
    ]
    module = RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio=10, block_size=16))
    reference = EmbeddingBagCollection(tables)
    kjt = _random_kjt([f"f{i}" for i in range(4)], batch=6, rng=random.Random(1), weighted=False, num_ids=100)
    out, ref = module(kjt), reference(kjt)
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    assert out.values().shape == ref.values().shape
    assert out.values().dtype == ref.values().dtype == torch.float32
    for k in ref.keys():
        assert out[k].shape == ref[k].shape


def test_empty_bags_give_zeros():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["f"], pooling=PoolingType.MEAN)]
    module = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=32, block_size=2))
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([], dtype=torch.int64), lengths=torch.zeros(3, dtype=torch.int64))
    out = module(kjt).values()
    assert out.shape == (3, 4) and bool((out == 0).all())


def test_array_groups_match_separate_collections():
    """Two named arrays behave exactly like two collections, one per array."""
    t_a = EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=9, feature_names=["fa"])
    t_b = EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=9, feature_names=["fb"])
    t_c = EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=9, feature_names=["fc"])
    g1, g2 = RobeConfig(num_elements=40, block_size=4, seed=1), RobeConfig(num_elements=60, block_size=2, seed=2)
    grouped = RobeEmbeddingBagCollection([t_a, t_b, t_c], {"g1": g1, "g2": g2}, table_to_group={"a": "g1", "b": "g2", "c": "g1"})
    only1 = RobeEmbeddingBagCollection([t_a, t_c], g1)
    only2 = RobeEmbeddingBagCollection([t_b], g2)
    with torch.no_grad():
        only1.arrays["default"].copy_(grouped.arrays["g1"])
        only2.arrays["default"].copy_(grouped.arrays["g2"])
    kjt = _random_kjt(["fa", "fb", "fc"], batch=4, rng=random.Random(2), weighted=False)
    out = grouped(kjt)
    assert out.keys() == ["fa", "fb", "fc"]
    one, two = only1(kjt), only2(kjt)
    torch.testing.assert_close(out["fa"], one["fa"])
    torch.testing.assert_close(out["fc"], one["fc"])
    torch.testing.assert_close(out["fb"], two["fb"])


def test_adding_or_reordering_tables_never_moves_blocks():
    t_a = EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=9, feature_names=["fa"])
    t_b = EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=9, feature_names=["fb"])
    t_new = EmbeddingBagConfig(name="new", embedding_dim=8, num_embeddings=9, feature_names=["fn"])
    cfg = RobeConfig(num_elements=101, block_size=4, seed=5)
    first = RobeEmbeddingBagCollection([t_a, t_b], cfg)
    second = RobeEmbeddingBagCollection([t_new, t_b, t_a], cfg)
    second.arrays["default"].data.copy_(first.arrays["default"].data)
    kjt = _random_kjt(["fa", "fb", "fn"], batch=4, rng=random.Random(3), weighted=False)
    a, b = first(kjt), second(kjt)
    torch.testing.assert_close(a["fa"], b["fa"])
    torch.testing.assert_close(a["fb"], b["fb"])


def test_gradcheck_float64():
    tables = [
        EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["f"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="u", embedding_dim=4, num_embeddings=5, feature_names=["g"]),
    ]
    module = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=11, block_size=2), is_weighted=True)
    kjt = _random_kjt(["f", "g"], batch=3, rng=random.Random(4), weighted=True)
    from robe_torchrec.ops.reference import robe_pooled_lookup_reference

    layout = module.feature_layouts()["default"]
    keys = layout.hash_keys(torch.device("cpu"))
    array = torch.randn(11, dtype=torch.float64, requires_grad=True)
    weights = kjt.weights().double().requires_grad_(True)

    def fn(arr, w):
        return robe_pooled_lookup_reference(arr, kjt.values(), kjt.offsets(), layout, keys, 3, w)

    assert torch.autograd.gradcheck(fn, (array, weights))


def test_gradient_matches_slow_reference():
    """d(sum(out * g))/dM[e] = sum over every (lookup, element) reading e of weight * g / len."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=5, feature_names=["f"], pooling=PoolingType.MEAN)]
    cfg = RobeConfig(num_elements=13, block_size=2, seed=9)
    module = RobeEmbeddingBagCollection(tables, cfg)
    kjt = _random_kjt(["f"], batch=4, rng=random.Random(5), weighted=False)
    g = torch.randn(4, 4)
    (module(kjt).values() * g).sum().backward()
    expected = torch.zeros(13, dtype=torch.float64)
    key = table_key(9, "t")
    for b, ids in enumerate(bags_of(kjt, "f")):
        for idx in ids:
            for j in range(4):
                e = (block_offset_scalar(key, idx, j // 2, 13) + j % 2) % 13
                expected[e] += g[b, j].item() / len(ids)
    torch.testing.assert_close(module.arrays["default"].grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_parameter_is_exactly_num_elements():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=10**9, feature_names=["f"])]
    cfg = RobeConfig(num_elements=1000, block_size=32)
    module = RobeEmbeddingBagCollection(tables, cfg)
    params = list(module.parameters())
    assert len(params) == 1
    assert params[0].numel() == 1000 and params[0].element_size() * params[0].numel() == 4000
    assert params[0].requires_grad
    r = cfg.resolved_init_range(tables)
    assert float(params[0].abs().max()) <= r


def test_meta_construction_then_reset_parameters():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    cfg = RobeConfig(num_elements=500, block_size=4)
    module = RobeEmbeddingBagCollection(tables, cfg, device="meta")
    assert module.device.type == "meta" and module.arrays["default"].is_meta
    module = module.to_empty(device="cpu")
    module.reset_parameters()
    arr = module.arrays["default"]
    r = cfg.resolved_init_range(tables)
    assert arr.device.type == "cpu" and float(arr.abs().max()) <= r and float(arr.std()) > r / 4
    kjt = _random_kjt(["f"], batch=2, rng=random.Random(6), weighted=False)
    assert module(kjt).values().shape == (2, 8)


def test_state_dict_round_trip():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    cfg = RobeConfig(num_elements=64, block_size=4, seed=1)
    src, dst = RobeEmbeddingBagCollection(tables, cfg), RobeEmbeddingBagCollection(tables, cfg)
    assert not torch.equal(src.arrays["default"], dst.arrays["default"])
    dst.load_state_dict(src.state_dict())
    assert torch.equal(src.arrays["default"], dst.arrays["default"])
    kjt = _random_kjt(["f"], batch=3, rng=random.Random(7), weighted=False)
    torch.testing.assert_close(src(kjt).values(), dst(kjt).values())


@pytest.mark.parametrize(
    "other",
    [
        RobeConfig(num_elements=65, block_size=4, seed=1),
        RobeConfig(num_elements=64, block_size=8, seed=1),
        RobeConfig(num_elements=64, block_size=4, seed=2),
    ],
)
def test_refuses_state_dict_of_another_layout(other):
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])]
    src = RobeEmbeddingBagCollection(tables, other)
    dst = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=64, block_size=4, seed=1))
    before = dst.arrays["default"].detach().clone()
    with pytest.raises(ValueError, match="different layout"):
        dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.arrays["default"], before), "a refused load must not change the module"


# ----- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def module():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f", "g"])]
    return RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=40, block_size=2))


def test_missing_feature_is_named(module):
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="missing configured feature.*'g'"):
        module(kjt)


def test_lengths_not_summing_to_values(module):
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lengths sum to 2 but it has 3 ids"):
        module(kjt)


def test_non_integer_ids(module):
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="int64 or int32.*float32"):
        module(kjt)


def test_weights_on_unweighted_collection(module):
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]), weights=torch.ones(2))
    with pytest.raises(ValueError, match="is_weighted=True"):
        module(kjt)


def test_weighted_collection_needs_weights():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
    m = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=40, block_size=2), is_weighted=True)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="has no weights"):
        m(kjt)


def test_int32_ids_equal_int64_ids(module):
    k64 = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([5, -7]), lengths=torch.tensor([1, 1]))
    k32 = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([5, -7], dtype=torch.int32), lengths=torch.tensor([1, 1]))
    torch.testing.assert_close(module(k64).values(), module(k32).values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(robe={"g1": RobeConfig(num_elements=40, block_size=2), "g2": RobeConfig(num_elements=40, block_size=2)}), "table_to_group"),
        (dict(robe={"g1": RobeConfig(num_elements=40, block_size=2)}, table_to_group={"t": "nope"}), "unknown group"),
        (dict(robe={"g1": RobeConfig(num_elements=40, block_size=2)}, table_to_group={"zz": "g1"}), "unknown table"),
        (dict(robe=RobeConfig(num_elements=40, block_size=3)), "'t'.*block_size 3"),
    ],
)
def test_bad_group_configs(kwargs, match):
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
    with pytest.raises(ValueError, match=match):
        RobeEmbeddingBagCollection(tables, **kwargs)


def test_duplicate_table_names():
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])] * 2
    with pytest.raises(ValueError, match="duplicate table"):
        RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=40, block_size=2))


# ----- no host reads in the forward (issue 10.2) ---------------------------------------------

_GROUP_TABLES = [
    EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=50, feature_names=["fa", "fb"]),
    EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=20, feature_names=["fc"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=30, feature_names=["fd"]),
]
_GROUPS = {"g1": RobeConfig(num_elements=41, block_size=4, seed=1), "g2": RobeConfig(num_elements=29, block_size=2, seed=2)}


def _grouped(kernel: str, weighted: bool = False, **kw) -> RobeEmbeddingBagCollection:
    return RobeEmbeddingBagCollection(
        _GROUP_TABLES, _GROUPS, table_to_group={"a": "g2", "b": "g1", "c": "g1"}, is_weighted=weighted, kernel=kernel, **kw
    )


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("weighted", [False, True])
def test_several_groups_match_slow_reference(kernel, weighted):
    """Each group pools its window of the KJT's offsets (the ids are not cut on the host)."""
    module = _grouped(kernel, weighted)
    kjt = _random_kjt(["fd", "fc", "fb", "fa"], batch=4, rng=random.Random(21 + weighted), weighted=weighted)
    torch.testing.assert_close(module(kjt).values().double(), _expected(module, kjt), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [None, RobeFusedOptimizerConfig("adagrad", lr=0.1)])
def test_forward_reads_no_tensor_on_the_host(monkeypatch, fused):
    """With the data checks off (the GPU default), a multi-group forward (and the reference fused
    path) never turns a tensor into a Python value: no device sync per forward."""
    module = _grouped("reference", fused_optimizer=fused)
    kjt = _random_kjt(["fa", "fb", "fc", "fd"], batch=4, rng=random.Random(3), weighted=False)
    expected = module(kjt).values()  # warm-up (caches keys and flags) with the CPU checks on
    monkeypatch.setattr(rebc, "_data_checks_on", lambda module, device: False)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host during the forward")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = module(kjt).values()
    monkeypatch.undo()
    torch.testing.assert_close(out, expected)


def test_data_checks_policy(monkeypatch):
    monkeypatch.delenv("ROBE_TORCHREC_DEBUG_CHECKS", raising=False)
    module = _grouped("reference")
    assert rebc._data_checks_on(module, torch.device("cpu"))  # free on CPU: always
    assert not rebc._data_checks_on(module, torch.device("cuda"))
    module.debug_checks = True
    assert rebc._data_checks_on(module, torch.device("cuda"))
    monkeypatch.setenv("ROBE_TORCHREC_DEBUG_CHECKS", "1")
    assert _grouped("reference").debug_checks
    assert rebc._data_checks_on(torch.nn.Module(), torch.device("cuda"))  # borrowers of _validated: the env
    monkeypatch.setenv("ROBE_TORCHREC_DEBUG_CHECKS", "0")
    assert not _grouped("reference").debug_checks


def test_negative_lengths_are_named(module):
    kjt = KeyedJaggedTensor(keys=["f", "g"], values=torch.tensor([1, 2]), lengths=torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="negative lengths"):
        module(kjt)


def test_offsets_not_matching_lengths_are_named(module):
    kjt = KeyedJaggedTensor(
        keys=["f", "g"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]), offsets=torch.tensor([0, 1, 2, 2])
    )
    with pytest.raises(ValueError, match="offsets"):
        module(kjt)
