"""Data for tests, benchmarks and the quickstart: a deterministic synthetic Criteo-shaped stream."""

from robe_torchrec.data.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    DEFAULT_CARDINALITIES,
    SyntheticCriteoConfig,
    SyntheticCriteoDataset,
    SyntheticCriteoGenerator,
    feature_names,
    make_tables,
)

__all__ = [
    "CRITEO_KAGGLE_CARDINALITIES",
    "DEFAULT_CARDINALITIES",
    "SyntheticCriteoConfig",
    "SyntheticCriteoDataset",
    "SyntheticCriteoGenerator",
    "feature_names",
    "make_tables",
]
