"""RobeConfig validation and sizing."""

import math

import pytest
from torchrec import EmbeddingBagConfig

from robe_torchrec import RobeConfig


def _tables():
    return [
        EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=1000, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=32, num_embeddings=3001, feature_names=["fb"]),
    ]


def test_from_compression_sizes_by_ratio():
    cfg = RobeConfig.from_compression(_tables(), ratio=100, block_size=8, seed=3)
    assert cfg.num_elements == math.ceil((1000 * 16 + 3001 * 32) / 100)
    assert (cfg.block_size, cfg.seed) == (8, 3)


def test_from_compression_never_below_one_block():
    cfg = RobeConfig.from_compression(_tables(), ratio=1e9, block_size=16)
    assert cfg.num_elements == 16


def test_block_size_must_divide_every_dim_and_names_the_table():
    with pytest.raises(ValueError, match="'a'.*16.*block_size 32"):
        RobeConfig.from_compression(_tables(), ratio=10, block_size=32)
    with pytest.raises(ValueError, match="'b'"):
        RobeConfig(num_elements=100, block_size=3).validate_tables(
            [EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=1, feature_names=["f"])]
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_elements=10, block_size=0), "block_size must be >= 1"),
        (dict(num_elements=4, block_size=8), "must be >= block_size"),
        (dict(num_elements=2**48 + 1, block_size=8), "2\\*\\*48"),
        (dict(num_elements=100, block_size=8, init_range=-1.0), "init_range"),
    ],
)
def test_invalid_values_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobeConfig(**kwargs)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="num_elements"):
        RobeConfig(num_elements=10.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio"):
        RobeConfig.from_compression(_tables(), ratio=0, block_size=8)


def test_default_init_range_is_sqrt_one_over_largest_table():
    assert RobeConfig(num_elements=64, block_size=8).resolved_init_range(_tables()) == pytest.approx(
        math.sqrt(1 / 3001)
    )
    assert RobeConfig(num_elements=64, block_size=8, init_range=0.5).resolved_init_range(_tables()) == 0.5
