"""Data for training, tests, benchmarks and the quickstart: a deterministic synthetic Criteo-shaped
stream, and readers of the real Criteo data (TSV files and torchrec's preprocessed binary format).
MovieLens-100k (``robe_torchrec.data.movielens``, the quality benchmark's real data) is imported
from its own module only: it is a benchmark dataset, not a training input."""

from robe_torchrec.data.criteo import (
    CRITEO_FEATURE_NAMES,
    CriteoTSVDataset,
    dense_log1p,
    detect_has_label,
    hex_to_id,
)
from robe_torchrec.data.criteo_binary import BinaryCriteoDataset, batch_plan, binary_criteo_paths
from robe_torchrec.data.errors import DataError
from robe_torchrec.data.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    DEFAULT_CARDINALITIES,
    EVAL_FIRST_BATCH,
    SyntheticCriteoConfig,
    SyntheticCriteoDataset,
    SyntheticCriteoGenerator,
    feature_names,
    make_tables,
)

__all__ = [
    "BinaryCriteoDataset",
    "CRITEO_FEATURE_NAMES",
    "CRITEO_KAGGLE_CARDINALITIES",
    "CriteoTSVDataset",
    "DEFAULT_CARDINALITIES",
    "DataError",
    "EVAL_FIRST_BATCH",
    "SyntheticCriteoConfig",
    "SyntheticCriteoDataset",
    "SyntheticCriteoGenerator",
    "batch_plan",
    "binary_criteo_paths",
    "dense_log1p",
    "detect_has_label",
    "feature_names",
    "hex_to_id",
    "make_tables",
]
