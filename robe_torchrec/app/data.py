"""Training and validation batches per rank, and the data position used by checkpoints.

Step ``s`` (0-based) of rank ``r`` of ``W`` reads synthetic batch ``s * W + r`` (per-rank batch
size = global / W), so the data position is just the step: resume continues at the next batch.
Criteo TSV is a stream: resume skips the batches already consumed (correct, not instant).
torchrec's binary format is indexed by torchrec's batch plan: resume starts at the next batch.

:func:`check_data` is the pre-flight check the trainer runs before building anything: every data
file exists, is readable and non-empty, binary labels are 0 or 1, and there is at least one
training batch. Every problem raises :class:`~robe_torchrec.data.DataError` naming the file.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List, Sequence

from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from robe_torchrec.app.config import ConfigError, TrainConfig
from robe_torchrec.data import (
    BinaryCriteoDataset,
    CriteoTSVDataset,
    DataError,
    SyntheticCriteoConfig,
    SyntheticCriteoDataset,
    detect_has_label,
    make_tables,
)
from robe_torchrec.data.synthetic import DEFAULT_CARDINALITIES, EVAL_FIRST_BATCH


def embedding_tables(cfg: TrainConfig) -> List[EmbeddingBagConfig]:
    """The embedding tables of the configured data, whatever its source: one per categorical
    feature (``t_cat_<i>`` for feature ``cat_<i>``, the names every reader here uses), of
    ``data.cardinalities`` nominal rows (empty: the synthetic default) and ``model.embedding_dim``."""
    return make_tables(synthetic_config(cfg), cfg.model.embedding_dim)


def synthetic_config(cfg: TrainConfig) -> SyntheticCriteoConfig:
    """The synthetic generator's config (feature count and cardinalities as :func:`embedding_tables`)."""
    d = cfg.data
    return SyntheticCriteoConfig(
        num_dense=d.num_dense,
        cardinalities=tuple(d.cardinalities) or DEFAULT_CARDINALITIES,
        pooling_factors=tuple(d.pooling_factors) or None,
        teacher_strength=d.teacher_strength,
        zipf_exponent=d.zipf_exponent,
        seed=cfg.train.seed,
    )


def per_rank_batch_size(cfg: TrainConfig, world_size: int) -> int:
    if cfg.train.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size {cfg.train.global_batch_size} is not divisible by world size {world_size}"
        )
    return cfg.train.global_batch_size // world_size


def train_batches(cfg: TrainConfig, start_step: int, rank: int, world_size: int) -> Iterator[Batch]:
    """This rank's batches for steps ``start_step, start_step + 1, ...``."""
    bs = per_rank_batch_size(cfg, world_size)
    if cfg.data.source == "synthetic":
        ds = SyntheticCriteoDataset(
            synthetic_config(cfg), bs, num_batches=None, first_batch=start_step * world_size,
            rank=rank, world_size=world_size,
        )
        return iter(ds)
    if cfg.data.source == "criteo_binary":
        ds = _binary(cfg, cfg.data.train_days, bs, "train", rank, world_size)
        ds.plan = ds.plan[start_step:]  # resume: torchrec's batch plan is indexed by batch
        return iter(ds)
    if not cfg.data.train_paths:
        raise ConfigError("data.source criteo_tsv needs data.train_paths (e.g. --data.train_paths /data/train.txt)")
    ds = CriteoTSVDataset(
        cfg.data.train_paths, bs, drop_last=True, skip_malformed=cfg.data.skip_malformed,
        rank=rank, world_size=world_size,
    )
    return itertools.islice(iter(ds), start_step, None)


def eval_batches(cfg: TrainConfig) -> List[Batch]:
    """The validation batches (the same on every rank)."""
    n, bs = cfg.eval.batches, cfg.eval.batch_size
    if cfg.data.source == "synthetic":
        ds = SyntheticCriteoDataset(
            synthetic_config(cfg), bs, num_batches=n, first_batch=EVAL_FIRST_BATCH, rank=0, world_size=1
        )
        return list(ds)
    if cfg.data.source == "criteo_binary":
        return list(itertools.islice(iter(_binary(cfg, cfg.data.val_days, bs, "val", 0, 1)), n))
    if not cfg.data.val_paths:
        raise ConfigError("data.source criteo_tsv needs data.val_paths (e.g. --data.val_paths /data/val.txt)")
    ds = CriteoTSVDataset(
        cfg.data.val_paths, bs, skip_malformed=cfg.data.skip_malformed, rank=0, world_size=1
    )
    return list(itertools.islice(iter(ds), n))


def validation_batches(cfg: TrainConfig) -> List[Batch]:
    """:func:`eval_batches`, and an error naming the files when they hold no sample."""
    batches = eval_batches(cfg)
    if not batches or not sum(int(b.labels.numel()) for b in batches):
        raise DataError(f"{describe_data(cfg, 'val')}: no validation sample; the validation data is empty")
    return batches


def describe_data(cfg: TrainConfig, stage: str) -> str:
    """The files of ``stage`` (train or val), comma-separated, for error messages."""
    d = cfg.data
    if d.source == "criteo_tsv":
        return ", ".join(d.train_paths if stage == "train" else d.val_paths)
    if d.source == "criteo_binary":
        days = d.train_days if stage == "train" else d.val_days[:1]
        return ", ".join(p for group in _binary_paths(cfg, days) for p in group)
    return "synthetic data"


def _binary_paths(cfg: TrainConfig, days: Sequence[int]) -> "tuple[List[str], List[str], List[str]]":
    from robe_torchrec.data import binary_criteo_paths

    return binary_criteo_paths(cfg.data.binary_dir, days, cfg.data.multi_hot)


def _check_tsv_files(paths: Sequence[str], what: str) -> None:
    for path in paths:
        has_label = detect_has_label(path)  # opens it and reads its first line (DataError naming it)
        if has_label is None:
            raise DataError(f"{path}: empty {what} file (no lines)")


def check_data(cfg: TrainConfig, world_size: int) -> None:
    """Pre-flight check of the configured data (before the model is built or a step runs).

    Criteo TSV: every training and validation file exists, opens and has a first line of the
    right shape. Binary: every day's three files exist and are valid ``.npy`` / ``.npz`` of
    consistent shapes, every label (training and validation) is 0 or 1, the training days hold
    at least one full batch per rank and the validation half-day is not empty. Raises
    :class:`~robe_torchrec.data.DataError` (naming the file) or ``ConfigError``.
    """
    d = cfg.data
    bs = per_rank_batch_size(cfg, world_size)
    if d.source == "criteo_tsv":
        if not d.train_paths:
            raise ConfigError("data.source criteo_tsv needs data.train_paths (e.g. --data.train_paths /data/train.txt)")
        if not d.val_paths:
            raise ConfigError("data.source criteo_tsv needs data.val_paths (e.g. --data.val_paths /data/val.txt)")
        _check_tsv_files(d.train_paths, "training")
        _check_tsv_files(d.val_paths, "validation")
    elif d.source == "criteo_binary":
        train = _binary(cfg, d.train_days, bs, "train", 0, world_size)
        train.check_labels()
        if len(train) == 0:
            raise DataError(
                f"{describe_data(cfg, 'train')}: {train.total_rows:,} training rows, fewer than one batch of "
                f"{bs} per rank ({world_size} rank(s))"
            )
        val = _binary(cfg, d.val_days, cfg.eval.batch_size, "val", 0, 1)
        val.check_labels()
        if val.total_rows == 0:
            raise DataError(f"{describe_data(cfg, 'val')}: no validation rows (the first half of day {d.val_days[0]})")


def _binary(cfg: TrainConfig, days: List[int], bs: int, stage: str, rank: int, world_size: int) -> BinaryCriteoDataset:
    if not cfg.data.binary_dir:
        raise ConfigError("data.source criteo_binary needs data.binary_dir (torchrec's day_<i>_*.npy files)")
    return BinaryCriteoDataset.from_directory(
        cfg.data.binary_dir, days, bs, multi_hot=cfg.data.multi_hot, stage=stage,
        drop_last=stage == "train", rank=rank, world_size=world_size,
    )
