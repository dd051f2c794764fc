"""RobeEmbeddingBagCollection inside torchrec's DLRM and DLRM_DCN: builds, trains, loss goes down."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection

NUM_FEATURES, CARD, DIM, BATCH = 4, 50, 8, 128


def _planted_batch(gen: torch.Generator, scores: torch.Tensor):
    """Labels depend on the ids through hidden per-(feature, id) scores: learnable by embeddings."""
    ids = torch.randint(0, CARD, (NUM_FEATURES, BATCH), generator=gen)
    logit = scores.gather(1, ids).sum(0)
    labels = (torch.rand(BATCH, generator=gen) < torch.sigmoid(3 * logit)).float()
    dense = torch.rand(BATCH, 3, generator=gen)
    kjt = KeyedJaggedTensor(
        keys=[f"f{i}" for i in range(NUM_FEATURES)],
        values=ids.flatten() * 7919 - 10**12,  # arbitrary int64 ids: no vocabulary needed
        lengths=torch.ones(NUM_FEATURES * BATCH, dtype=torch.int64),
    )
    return dense, kjt, labels


@pytest.mark.parametrize("model_cls", [DLRM, DLRM_DCN])
def test_dlrm_trains_with_robe(model_cls):
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=DIM, num_embeddings=CARD, feature_names=[f"f{i}"])
        for i in range(NUM_FEATURES)
    ]
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio=2, block_size=4), device="cpu")
    kwargs = dict(
        embedding_bag_collection=ebc,
        dense_in_features=3,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )
    if model_cls is DLRM_DCN:
        kwargs.update(dcn_num_layers=2, dcn_low_rank_dim=4)
    model = model_cls(**kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(NUM_FEATURES, CARD, generator=gen)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(150):
        dense, kjt, labels = _planted_batch(gen, scores)
        loss = loss_fn(model(dense, kjt).squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert ebc.arrays["default"].grad is not None
    assert last < 0.8 * first, (first, last)
