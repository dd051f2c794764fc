"""Training and validation batches per rank, and the data position used by checkpoints.

Step ``s`` (0-based) of rank ``r`` of ``W`` reads synthetic batch ``s * W + r`` (per-rank batch
size = global / W), so the data position is just the step: resume continues at the next batch.
Criteo TSV is a stream: resume skips the batches already consumed (correct, not instant).
torchrec's binary format is indexed by torchrec's batch plan: resume starts at the next batch.
"""

from __future__ import annotations

import itertools
from typing import Iterator, List


from torchrec.datasets.utils import Batch

from robe_torchrec.app.config import TrainConfig
from robe_torchrec.data import BinaryCriteoDataset, CriteoTSVDataset, SyntheticCriteoConfig, SyntheticCriteoDataset
from robe_torchrec.data.synthetic import DEFAULT_CARDINALITIES, EVAL_FIRST_BATCH


def synthetic_config(cfg: TrainConfig) -> SyntheticCriteoConfig:
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
        raise ValueError(
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
        raise ValueError("data.source criteo_tsv needs data.train_paths (e.g. --data.train_paths /data/train.txt)")
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
        raise ValueError("data.source criteo_tsv needs data.val_paths (e.g. --data.val_paths /data/val.txt)")
    ds = CriteoTSVDataset(
        cfg.data.val_paths, bs, skip_malformed=cfg.data.skip_malformed, rank=0, world_size=1
    )
    return list(itertools.islice(iter(ds), n))


def _binary(cfg: TrainConfig, days: List[int], bs: int, stage: str, rank: int, world_size: int) -> BinaryCriteoDataset:
    if not cfg.data.binary_dir:
        raise ValueError("data.source criteo_binary needs data.binary_dir (torchrec's day_<i>_*.npy files)")
    return BinaryCriteoDataset.from_directory(
        cfg.data.binary_dir, days, bs, multi_hot=cfg.data.multi_hot, stage=stage,
        drop_last=stage == "train", rank=rank, world_size=world_size,
    )
