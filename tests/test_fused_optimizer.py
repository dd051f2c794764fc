"""Fused optimizers through the module: equal to torch's optimizers on the dense gradient, driven
by LR schedulers, state moved with the module, excluded from dense optimizers."""

import random

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig
from robe_torchrec.ops.lookup import resolve_kernel

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=40, feature_names=["f2"], pooling=PoolingType.MEAN),
]
ROBE = RobeConfig(num_elements=53, block_size=4, seed=3)


def _kjt(seed: int, batch: int = 6) -> KeyedJaggedTensor:
    rng = random.Random(seed)
    lengths = [rng.randint(0, 3) for _ in range(3 * batch)]
    values = [rng.randint(-(2**62), 2**62) for _ in range(sum(lengths))]
    return KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.tensor(values), lengths=torch.tensor(lengths))


def _kernels():
    out = ["reference"]
    if resolve_kernel("cpu", torch.device("cpu")) == "cpu":
        out.append("cpu")
    return out


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("name,torch_opt", [("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)])
def test_fused_step_equals_torch_optimizer(kernel, name, torch_opt):
    torch.manual_seed(0)
    fused = RobeEmbeddingBagCollection(
        TABLES, ROBE, kernel=kernel, fused_optimizer=RobeFusedOptimizerConfig(name, lr=0.1, eps=1e-8)
    )
    plain = RobeEmbeddingBagCollection(TABLES, ROBE, kernel="reference")
    plain.load_state_dict(fused.state_dict())
    kwargs = dict(lr=0.1) if name == "sgd" else dict(lr=0.1, eps=1e-8, initial_accumulator_value=0.0)
    opt = torch_opt(plain.parameters(), **kwargs)
    for step in range(3):
        kjt = _kjt(step)
        g = torch.randn(6, 24, generator=torch.Generator().manual_seed(step))
        (fused(kjt).values() * g).sum().backward()
        opt.zero_grad()
        (plain(kjt).values() * g).sum().backward()
        opt.step()
        assert fused.arrays["default"].grad is None
        torch.testing.assert_close(fused.arrays["default"].data, plain.arrays["default"].data, rtol=1e-5, atol=1e-6)
    if name == "adagrad":
        torch.testing.assert_close(
            fused.fused_optimizer.state_of(fused.arrays["default"]), opt.state[plain.arrays["default"]]["sum"]
        )


@pytest.mark.parametrize("kernel", _kernels())
def test_rowwise_adagrad_against_written_out_formula(kernel):
    module = RobeEmbeddingBagCollection(
        TABLES, ROBE, kernel=kernel, fused_optimizer=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05, eps=1e-6)
    )
    plain = RobeEmbeddingBagCollection(TABLES, ROBE, kernel="reference")
    plain.load_state_dict(module.state_dict())
    m, z = 53, 4
    chunks = (m + z - 1) // z  # 14: the last chunk holds only 1 element
    state = torch.zeros(chunks, dtype=torch.float64)
    expected = plain.arrays["default"].detach().double().clone()
    for step in range(2):
        kjt = _kjt(10 + step)
        gout = torch.randn(6, 24, generator=torch.Generator().manual_seed(step))
        plain.arrays["default"].grad = None
        (plain(kjt).values() * gout).sum().backward()
        g = plain.arrays["default"].grad.double()
        for j in range(chunks):
            elems = list(range(j * z, min((j + 1) * z, m)))
            state[j] += sum(float(g[e]) ** 2 for e in elems) / len(elems)
            for e in elems:
                expected[e] -= 0.05 * float(g[e]) / (float(state[j]) ** 0.5 + 1e-6)
        (module(kjt).values() * gout).sum().backward()
    torch.testing.assert_close(module.arrays["default"].data.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.fused_optimizer.state_of(module.arrays["default"]).double(), state, rtol=1e-5, atol=1e-7)


def test_lr_scheduler_drives_the_fused_optimizer():
    module = RobeEmbeddingBagCollection(TABLES, ROBE, kernel="reference", fused_optimizer=RobeFusedOptimizerConfig("sgd", lr=1.0))
    sched = torch.optim.lr_scheduler.StepLR(module.fused_optimizer, step_size=1, gamma=0.0)
    kjt = _kjt(0)
    (module(kjt).values().sum()).backward()
    after_first = module.arrays["default"].detach().clone()
    module.fused_optimizer.step()
    sched.step()  # lr -> 0
    assert module.fused_optimizer.lr == 0.0
    (module(kjt).values().sum()).backward()
    assert torch.equal(module.arrays["default"].detach(), after_first)


def test_fused_arrays_are_kept_out_of_dense_optimizers():
    module = RobeEmbeddingBagCollection(TABLES, ROBE, fused_optimizer=RobeFusedOptimizerConfig("adagrad"))
    assert dict(in_backward_optimizer_filter(module.named_parameters())) == {}
    plain = RobeEmbeddingBagCollection(TABLES, ROBE)
    assert list(dict(in_backward_optimizer_filter(plain.named_parameters()))) == ["arrays.default"]


def test_meta_then_to_empty_rebinds_optimizer_state():
    module = RobeEmbeddingBagCollection(TABLES, ROBE, device="meta", fused_optimizer=RobeFusedOptimizerConfig("adagrad", lr=0.1))
    module = module.to_empty(device="cpu")
    module.reset_parameters()
    array = module.arrays["default"]
    state = module.fused_optimizer.state_of(array)
    assert state.device.type == "cpu" and state.shape == (53,) and bool((state == 0).all())
    module(_kjt(1)).values().sum().backward()
    assert float(module.fused_optimizer.state_of(array).sum()) > 0
    assert "arrays.default" in module.fused_optimizer.state_dict()["state"]


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match="fused optimizer must be one of"):
        RobeFusedOptimizerConfig("adam")
    with pytest.raises(ValueError, match="kernel must be one of"):
        RobeEmbeddingBagCollection(TABLES, ROBE, kernel="cuda")


def test_dmp_style_materialisation_initialises_arrays_and_state():
    """DMP replaces meta parameters in the module that owns them and calls its reset_parameters."""
    module = RobeEmbeddingBagCollection(TABLES, ROBE, device="meta", fused_optimizer=RobeFusedOptimizerConfig("adagrad", lr=0.1))

    def init_parameters(m: torch.nn.Module) -> None:  # the logic of DistributedModelParallel.init_parameters
        has_meta = False
        for name, p in m._parameters.items():
            if isinstance(p, torch.Tensor) and p.is_meta:
                m._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"))
                has_meta = True
        if has_meta and hasattr(m, "reset_parameters"):
            m.reset_parameters()

    module.apply(init_parameters)
    array = module.arrays["default"]
    r = ROBE.resolved_init_range(TABLES)
    assert not array.is_meta and float(array.abs().max()) <= r and float(array.std()) > r / 4
    module(_kjt(2)).values().sum().backward()
    state = module.fused_optimizer.state_of(module.arrays["default"])
    assert state.device.type == "cpu" and float(state.sum()) > 0


def test_empty_fused_optimizer_without_fusion():
    module = RobeEmbeddingBagCollection(TABLES, ROBE)
    assert len(module.fused_optimizer.params) == 0


def test_int32_offsets_are_accepted():
    kjt = _kjt(3)
    kjt32 = KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values(), offsets=kjt.offsets().to(torch.int32)
    )
    module = RobeEmbeddingBagCollection(TABLES, ROBE)
    torch.testing.assert_close(module(kjt).values(), module(kjt32).values())


@pytest.mark.parametrize("kernel", _kernels())
@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad"])
def test_mixed_dims_in_one_array_take_one_fused_step(kernel, name):
    """Tables of different dims share the array: the fused step sees their summed gradient."""
    tables = TABLES + [EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=40, feature_names=["f3"])]
    cfg = RobeFusedOptimizerConfig(name, lr=0.1)
    fused = RobeEmbeddingBagCollection(tables, ROBE, kernel=kernel, fused_optimizer=cfg)
    ref = RobeEmbeddingBagCollection(tables, ROBE, kernel="reference", fused_optimizer=cfg)
    ref.load_state_dict(fused.state_dict())
    for step in range(2):
        rng = random.Random(step)
        lengths = [rng.randint(0, 3) for _ in range(4 * 6)]
        kjt = KeyedJaggedTensor(
            keys=["f0", "f1", "f2", "f3"],
            values=torch.tensor([rng.randint(-(2**40), 2**40) for _ in range(sum(lengths))], dtype=torch.int64),
            lengths=torch.tensor(lengths),
        )
        g = torch.randn(6, 28, generator=torch.Generator().manual_seed(step))
        (fused(kjt).values() * g).sum().backward()
        (ref(kjt).values() * g).sum().backward()
    torch.testing.assert_close(fused.arrays["default"].data, ref.arrays["default"].data, rtol=1e-5, atol=1e-6)
