"""torchrec's quantize_inference_model(model) WITHOUT a quantization_mapping converts ROBE modules
(robe_torchrec registers them in torchrec's default mapping), beside torchrec's own EBCs; a mapping
that lacks ROBE leaves them float, and export_model says so."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.modules.quant_robe_embedding_bag_collection import QuantRobeEmbeddingBagCollection


class _RobeAndStock(nn.Module):
    """A ROBE collection and a stock torchrec EBC side by side (features f0, f1 and g0)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        robe_tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=100, feature_names=[f"f{i}"])
                       for i in range(2)]
        self.robe = RobeEmbeddingBagCollection(robe_tables, RobeConfig(num_elements=97, block_size=4, seed=1))
        self.stock = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="s0", embedding_dim=8, num_embeddings=50, feature_names=["g0"])]
        )

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return torch.cat([self.robe(features).values(), self.stock(features).values()], dim=1)


def _kjt(batch: int, seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * batch,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor(keys=["f0", "f1", "g0"], values=torch.randint(0, 50, (n,), generator=g), lengths=lengths)


def test_default_mapping_converts_robe_and_keeps_torchrecs_entries() -> None:
    from torchrec.inference.modules import DEFAULT_QUANT_MAPPING, quantize_inference_model

    assert DEFAULT_QUANT_MAPPING["torchrec.modules.embedding_modules.EmbeddingBagCollection"] is QuantEBC
    assert DEFAULT_QUANT_MAPPING[torch.typename(EmbeddingCollection)] is QuantEC
    model = _RobeAndStock().eval()
    quant = quantize_inference_model(copy.deepcopy(model))  # no quantization_mapping
    assert isinstance(quant.robe, QuantRobeEmbeddingBagCollection) and quant.robe.storage == "int8"
    assert isinstance(quant.stock, QuantEBC)
    kjt = _kjt(5, 0)
    with torch.no_grad():
        want = model(kjt)
        got = quant(kjt)
    # both halves int8: per-element errors ~1e-4 of ~1e-1 values (the float model is the reference)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=5e-3)


def test_a_mapping_without_robe_leaves_it_float_and_export_model_warns() -> None:
    from torchrec.inference.modules import DEFAULT_QUANT_MAPPING, quantize_inference_model

    # the check export_model runs first (exporting torchrec's QuantEBC itself fails on CPU: fbgemm's
    # AtomicCounter script object has no fake class)
    from robe_torchrec.export import _warn_if_robe_left_float

    stock_only = {k: v for k, v in DEFAULT_QUANT_MAPPING.items() if not k.startswith("robe_torchrec.")}
    quant = quantize_inference_model(_RobeAndStock().eval(), quantization_mapping=stock_only)
    assert type(quant.robe) is RobeEmbeddingBagCollection and isinstance(quant.stock, QuantEBC)
    with pytest.warns(UserWarning, match="lacks ROBE"):
        _warn_if_robe_left_float(quant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_robe_left_float(_RobeAndStock())  # float ROBE alone (no quantized tables): a float export, silent
