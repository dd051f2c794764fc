"""GPU checks of the whole module (skipped without CUDA): Triton kernel through
RobeEmbeddingBagCollection against the reference on CUDA, and DLRM training on CUDA."""

import random

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.optim import RobeFusedOptimizerConfig

pytestmark = pytest.mark.gpu

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=64, num_embeddings=10**6, feature_names=["f0", "f1"]),
    EmbeddingBagConfig(name="t1", embedding_dim=64, num_embeddings=10**5, feature_names=["f2"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t2", embedding_dim=32, num_embeddings=10**4, feature_names=["f3"]),
]


def _kjt(seed: int, batch: int, device: str, weighted: bool = False) -> KeyedJaggedTensor:
    rng = random.Random(seed)
    lengths = [rng.randint(0, 5) for _ in range(4 * batch)]
    values = [rng.randint(-(2**63), 2**63 - 1) for _ in range(sum(lengths))]
    return KeyedJaggedTensor(
        keys=["f0", "f1", "f2", "f3"],
        values=torch.tensor(values, device=device),
        lengths=torch.tensor(lengths, device=device),
        weights=torch.rand(sum(lengths), device=device) if weighted else None,
    )


@pytest.mark.parametrize("block_size", [1, 8, 32])
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_module_matches_reference_on_cuda(block_size, weighted):
    robe = RobeConfig(num_elements=100_003, block_size=block_size, seed=1)
    fast = RobeEmbeddingBagCollection(TABLES, robe, is_weighted=weighted, device="cuda", kernel="triton")
    ref = RobeEmbeddingBagCollection(TABLES, robe, is_weighted=weighted, device="cuda", kernel="reference")
    ref.load_state_dict(fast.state_dict())
    kjt = _kjt(block_size, 256, "cuda", weighted)
    a, b = fast(kjt).values(), ref(kjt).values()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(fast.arrays["default"].grad, ref.arrays["default"].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_triton_fused_optimizer_matches_reference_on_cuda(optimizer):
    robe = RobeConfig(num_elements=5_003, block_size=8, seed=2)  # small: many collisions and wraps
    cfg = RobeFusedOptimizerConfig(optimizer, lr=0.05)
    fast = RobeEmbeddingBagCollection(TABLES, robe, device="cuda", kernel="triton", fused_optimizer=cfg)
    ref = RobeEmbeddingBagCollection(TABLES, robe, device="cuda", kernel="reference", fused_optimizer=cfg)
    ref.load_state_dict(fast.state_dict())
    for step in range(3):
        kjt = _kjt(100 + step, 512, "cuda")
        g = torch.randn(512, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        (fast(kjt).values() * g).sum().backward()
        (ref(kjt).values() * g).sum().backward()
    torch.testing.assert_close(fast.arrays["default"], ref.arrays["default"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        fast.fused_optimizer.state_of(fast.arrays["default"]),
        ref.fused_optimizer.state_of(ref.arrays["default"]),
        rtol=1e-4,
        atol=1e-6,
    )


def test_dlrm_trains_on_cuda_with_triton_kernel():
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(0)
    cards, dim, batch = 1000, 32, 1024
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=cards, feature_names=[f"f{i}"]) for i in range(8)
    ]
    ebc = RobeEmbeddingBagCollection(
        tables, RobeConfig.from_compression(tables, ratio=10, block_size=8), device="cuda",
        fused_optimizer=RobeFusedOptimizerConfig("rowwise_adagrad", lr=0.05),
    )
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[32, dim], over_arch_layer_sizes=[32, 1]).cuda()
    dense_params = [p for n, p in model.named_parameters() if "arrays" not in n]
    opt = torch.optim.Adagrad(dense_params, lr=0.05)
    gen = torch.Generator("cuda").manual_seed(1)
    scores = torch.randn(8, cards, device="cuda", generator=gen)
    losses = []
    for _ in range(300):
        ids = torch.randint(0, cards, (8, batch), device="cuda", generator=gen)
        labels = (torch.rand(batch, device="cuda", generator=gen) < torch.sigmoid(2 * scores.gather(1, ids).sum(0))).float()
        kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(8)], values=ids.flatten(), lengths=torch.ones(8 * batch, dtype=torch.int64, device="cuda"))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.rand(batch, 4, device="cuda", generator=gen), kjt).squeeze(1), labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) / 30 < 0.85 * sum(losses[:10]) / 10


@pytest.mark.parametrize("grouped", [False, True])
def test_triton_forward_does_not_sync_on_cuda(grouped):
    """No device-to-host sync in a forward (issue 10.2): one group with two dims (per-dim runs) or
    two groups (offset windows), after a warm-up that compiles and caches keys and flags."""
    if grouped:
        robe = {"g1": RobeConfig(num_elements=100_003, block_size=8, seed=1), "g2": RobeConfig(num_elements=50_021, block_size=32, seed=2)}
        module = RobeEmbeddingBagCollection(
            TABLES, robe, table_to_group={"t0": "g1", "t1": "g2", "t2": "g2"}, device="cuda", kernel="triton"
        )
    else:
        module = RobeEmbeddingBagCollection(TABLES, RobeConfig(num_elements=100_003, block_size=8), device="cuda", kernel="triton")
    kjt = _kjt(7, 256, "cuda")
    expected = module(kjt).values()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = module(kjt).values()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected)
