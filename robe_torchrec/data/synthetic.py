"""Deterministic, learnable, Criteo-shaped synthetic click data.

Why: tests, benchmarks and the quickstart need click data that (a) has Criteo's shape (13 dense
counts, 26 categorical features with power-law id frequencies and large hashed int64 ids), (b) is
reproducible bit for bit from a seed and a batch index, so any rank or DataLoader worker can
generate its own share with no coordination and no files, and (c) has a known ceiling: labels come
from a hidden "teacher" whose probability is exposed, so a benchmark can report how close a model
gets to the best achievable AUC.

The generative story of one sample:

* for every categorical feature ``f``, a bag of ids (one id by default, ``pooling_factors`` for
  multi-hot bags) whose *ranks* follow a Zipf-like law over ``[0, cardinality_f)``;
  each rank is mapped to an int64 id by a fixed bijection (splitmix64's finaliser), so ids look like
  Criteo's hashed hex ids: large, spread over all of int64, often negative;
* 13 dense features: log-normal counts with some zeros, fed to the model as ``log(1 + x)``;
* the teacher's logit: ``strength * (sparse + dense_weight * dense + interaction_weight * z_a * z_b)
  + bias``, where ``sparse`` is a weighted sum over features of each bag's mean latent score,
  a latent score being a standard normal derived from a hash of ``(seed, feature, rank)``;
  ``dense`` is a random unit-norm linear function of the standardised dense features; ``z_a * z_b``
  is the product of two features' bag scores (a pairwise interaction, which DLRM's dot
  interaction can represent); the bias is solved for so the positive rate hits the target;
* the label is ``Bernoulli(sigmoid(logit))``.

Everything is vectorised numpy: a batch of 2048 one-hot samples takes a few milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Criteo Kaggle (Display Advertising Challenge) cardinalities, as used by the DLRM reference.
CRITEO_KAGGLE_CARDINALITIES: Tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

# The same tables capped at 100k rows: Criteo's mix of tiny and huge tables, small enough that a
# full-table baseline fits a laptop (about 850k rows in all).
DEFAULT_CARDINALITIES: Tuple[int, ...] = tuple(min(c, 100_000) for c in CRITEO_KAGGLE_CARDINALITIES)

#: First batch index of held-out (validation / test) synthetic batches: far past any training
#: index, so no number of training steps makes them overlap. The one definition (app, bench, examples).
EVAL_FIRST_BATCH = 1_000_000_000

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_M1 = 0xBF58476D1CE4E5B9  # splitmix64 finaliser constants
_M2 = 0x94D049BB133111EB
_M1_INV = pow(_M1, -1, 1 << 64)
_M2_INV = pow(_M2, -1, 1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15
_RANK_BITS = 48  # an id's pre-image is (feature << 48) | rank, so ranks must stay below 2**48
_RANK_MASK = (1 << _RANK_BITS) - 1

# Stream tags: independent random streams derived from one seed.
_TAG_BATCH = 0x0B47C4
_TAG_TEACHER = 0x7EAC4E
_TAG_CALIBRATION = 0xCA11B
_TAG_ID_KEY = 0x1D5
_TAG_LATENT_KEY = 0x1A7E
_CALIBRATION_SAMPLES = 32_768


@dataclass(frozen=True)
class SyntheticCriteoConfig:
    """What the synthetic data looks like; the data is a pure function of this and a batch index.

    ``teacher_strength`` is the standard deviation of the sparse part of the teacher's logit (for
    one-hot bags); the dense and interaction parts are scaled relative to it. Larger means an
    easier problem with a higher AUC ceiling.
    """

    num_dense: int = 13
    cardinalities: Sequence[int] = DEFAULT_CARDINALITIES
    zipf_exponent: float = 1.1
    seed: int = 0
    positive_rate: float = 0.25
    teacher_strength: float = 2.0
    dense_weight: float = 0.3
    interaction_weight: float = 0.5
    # ids per bag per feature; None means one-hot everywhere
    pooling_factors: Optional[Sequence[int]] = None
    # bags of uniform length in 1..pooling_factor instead of exactly pooling_factor
    variable_pooling: bool = False
    # False keeps raw ranks in [0, cardinality) as ids (for plain, unhashed embedding tables)
    scramble_ids: bool = True
    # None means "cat_0", "cat_1", ...
    feature_names: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in self.cardinalities))
        num_features = len(self.cardinalities)
        if num_features == 0:
            raise ValueError("need at least one categorical feature")
        if any(c < 1 or c > _RANK_MASK for c in self.cardinalities):
            raise ValueError(f"cardinalities must be in [1, 2**{_RANK_BITS}]")
        if self.pooling_factors is not None:
            object.__setattr__(self, "pooling_factors", tuple(int(p) for p in self.pooling_factors))
            if len(self.pooling_factors) != num_features or min(self.pooling_factors) < 1:
                raise ValueError("pooling_factors needs one positive int per feature")
        if self.feature_names is not None:
            object.__setattr__(self, "feature_names", tuple(self.feature_names))
            names = self.feature_names
            if len(names) != num_features or len(set(names)) != num_features:
                raise ValueError("feature_names needs one distinct name per feature")
        if not 0.0 < self.positive_rate < 1.0:
            raise ValueError("positive_rate must be in (0, 1)")
        if self.zipf_exponent < 0:
            raise ValueError("zipf_exponent must be non-negative")
        if self.num_dense < 0 or self.seed < 0:
            raise ValueError("num_dense and seed must be non-negative")

    @property
    def num_features(self) -> int:
        return len(self.cardinalities)


def feature_names(config: SyntheticCriteoConfig) -> List[str]:
    """The KJT keys, in order: ``config.feature_names`` or ``cat_0 .. cat_{F-1}``."""
    if config.feature_names is not None:
        return list(config.feature_names)
    return [f"cat_{i}" for i in range(config.num_features)]


def make_tables(
    config: SyntheticCriteoConfig,
    embedding_dim: int,
    pooling: PoolingType = PoolingType.SUM,
) -> List[EmbeddingBagConfig]:
    """One table per feature (``t_<feature>``), sized to the feature's cardinality (nominal size)."""
    return [
        EmbeddingBagConfig(
            name=f"t_{name}",
            embedding_dim=embedding_dim,
            num_embeddings=card,
            feature_names=[name],
            pooling=pooling,
        )
        for name, card in zip(feature_names(config), config.cardinalities)
    ]


# ---------------------------------------------------------------------------------------------
# Bijective 64-bit mixing (numpy, wraparound arithmetic)
# ---------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that scatters nearby inputs everywhere."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(_M1)
    x = x ^ (x >> _U64(27))
    x = x * _U64(_M2)
    return x ^ (x >> _U64(31))


def _unmix64(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_mix64`, so the teacher can score ids read back from any batch."""
    x = x ^ (x >> _U64(31)) ^ (x >> _U64(62))
    x = x * _U64(_M2_INV)
    x = x ^ (x >> _U64(27)) ^ (x >> _U64(54))
    x = x * _U64(_M1_INV)
    return x ^ (x >> _U64(30)) ^ (x >> _U64(60))


def _seed_key(seed: int, tag: int) -> int:
    """A 64-bit key for one purpose (ids, latents) of one seed."""
    x = np.array([(seed * _GOLDEN + tag) & _MASK64], dtype=np.uint64)
    return int(_mix64(_mix64(x))[0])


def _uniform53(h: np.ndarray) -> np.ndarray:
    """Top 53 bits of a uint64 hash as a float in (0, 1)."""
    return ((h >> _U64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------------------------
# Sampling pieces
# ---------------------------------------------------------------------------------------------


def _zipf_ranks(u: np.ndarray, cardinality: np.ndarray, exponent: float) -> np.ndarray:
    """Inverse CDF of a power law ``x**-s`` on ``[1, N + 1)``, floored to ranks in ``[0, N)``.

    Closed form, so it needs no per-feature tables and works for any cardinality; rank ``k`` has
    probability proportional to the integral of ``x**-s`` over ``[k + 1, k + 2)``, i.e. about
    ``(k + 1.5)**-s``: Zipf-like.
    """
    n1 = cardinality.astype(np.float64) + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(n1, u)
    else:
        a = 1.0 - exponent
        x = np.power(1.0 + u * (np.power(n1, a) - 1.0), 1.0 / a)
    ranks = np.floor(x).astype(np.int64) - 1
    return np.clip(ranks, 0, cardinality - 1)


def _bag_lengths(
    config: SyntheticCriteoConfig, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Bag lengths as a ``[F, B]`` int64 array (all ones for one-hot)."""
    num_features = config.num_features
    if config.pooling_factors is None:
        return np.ones((num_features, batch_size), dtype=np.int64)
    pf = np.asarray(config.pooling_factors, dtype=np.int64)[:, None]
    if config.variable_pooling:
        return rng.integers(1, pf + 1, size=(num_features, batch_size), dtype=np.int64)
    return np.broadcast_to(pf, (num_features, batch_size)).copy()


@dataclass(frozen=True)
class _DenseLaw:
    """Per-column log-normal count parameters: ``floor(exp(mu + sigma * N))``, zero w.p. ``p0``."""

    mu: np.ndarray
    sigma: np.ndarray
    p_zero: np.ndarray

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """``log(1 + count)`` as float32 ``[B, num_dense]``, DLRM's usual transform."""
        d = self.mu.shape[0]
        counts = np.floor(np.exp(self.mu + self.sigma * rng.standard_normal((batch_size, d))))
        counts *= rng.random((batch_size, d)) >= self.p_zero
        return np.log1p(counts).astype(np.float32)


@dataclass
class _Teacher:
    """The hidden labelling function's parameters (all derived from the seed)."""

    feature_weights: np.ndarray  # [F], unit L2 norm
    dense_weights: np.ndarray  # [num_dense], unit L2 norm
    dense_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dense_std: np.ndarray = field(default_factory=lambda: np.ones(0))
    pair: Tuple[int, int] = (0, 0)
    bias: float = 0.0


@dataclass
class _RawSample:
    """A generated batch before it becomes tensors: what the teacher needs."""

    lengths: np.ndarray  # [F, B] int64
    value_feature: np.ndarray  # [sum(lengths)] feature index of each value
    ranks: np.ndarray  # [sum(lengths)]
    dense: np.ndarray  # [B, num_dense] float32, log1p-transformed


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class SyntheticCriteoGenerator:
    """Generates batch ``i`` of a :class:`SyntheticCriteoConfig` and scores it with the teacher.

    Constructing one draws the teacher and calibrates its bias on a fixed sample (about 0.1 s);
    after that, :meth:`batch` is a pure function of ``(config, batch_index, batch_size)``.
    """

    def __init__(self, config: SyntheticCriteoConfig) -> None:
        self.config = config
        self.keys: List[str] = feature_names(config)
        self._cards = np.asarray(config.cardinalities, dtype=np.int64)
        self._id_key = _seed_key(config.seed, _TAG_ID_KEY)
        self._latent_key = _seed_key(config.seed, _TAG_LATENT_KEY)
        rng = np.random.default_rng([config.seed, _TAG_TEACHER])
        self._dense_law = _DenseLaw(
            mu=rng.uniform(0.0, 4.0, config.num_dense),
            sigma=rng.uniform(0.5, 1.5, config.num_dense),
            p_zero=rng.uniform(0.0, 0.3, config.num_dense),
        )
        self.teacher = self._draw_teacher(rng)
        self._calibrate()

    # -- teacher ---------------------------------------------------------------------------

    def _draw_teacher(self, rng: np.random.Generator) -> _Teacher:
        """Feature importances are log-normal so some features matter much more than others."""
        num_features = self.config.num_features
        fw = np.exp(0.5 * rng.standard_normal(num_features))
        dw = rng.standard_normal(self.config.num_dense)
        pair = rng.choice(num_features, size=2, replace=False) if num_features > 1 else [0, 0]
        return _Teacher(
            feature_weights=fw / np.linalg.norm(fw),
            dense_weights=dw / max(np.linalg.norm(dw), 1e-12),
            pair=(int(pair[0]), int(pair[1])),
        )

    def _calibrate(self) -> None:
        """Standardise the dense columns, then bisect the bias to hit the target positive rate."""
        rng = np.random.default_rng([self.config.seed, _TAG_CALIBRATION])
        raw = self._sample_raw(_CALIBRATION_SAMPLES, rng)
        self.teacher.dense_mean = raw.dense.mean(axis=0).astype(np.float64)
        self.teacher.dense_std = np.maximum(raw.dense.std(axis=0).astype(np.float64), 1e-6)
        self.teacher.bias = 0.0
        logits = self._teacher_logit(raw)
        lo, hi = -50.0, 50.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(logits + mid).mean() < self.config.positive_rate:
                lo = mid
            else:
                hi = mid
        self.teacher.bias = 0.5 * (lo + hi)

    def _latent(self, value_feature: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Standard-normal latent score of each (feature, rank): Box-Muller on two hashes."""
        key = (value_feature.astype(np.uint64) << _U64(_RANK_BITS)) | ranks.astype(np.uint64)
        h1 = _mix64(key ^ _U64(self._latent_key))
        h2 = _mix64(h1 + _U64(_GOLDEN))
        return np.sqrt(-2.0 * np.log(_uniform53(h1))) * np.cos(2.0 * math.pi * _uniform53(h2))

    def _teacher_logit(self, raw: _RawSample) -> np.ndarray:
        """The teacher's logit per sample, float64 ``[B]``."""
        t, cfg = self.teacher, self.config
        num_features, batch_size = raw.lengths.shape
        segment = np.repeat(np.arange(num_features * batch_size), raw.lengths.reshape(-1))
        latent = self._latent(raw.value_feature, raw.ranks)
        sums = np.bincount(segment, weights=latent, minlength=num_features * batch_size)
        # bag means (lengths are always >= 1), [F, B]
        z = sums.reshape(num_features, batch_size) / raw.lengths
        sparse = t.feature_weights @ z
        dense = ((raw.dense - t.dense_mean) / t.dense_std) @ t.dense_weights
        a, b = t.pair
        interaction = z[a] * z[b] if a != b else np.zeros(batch_size)
        unit = sparse + cfg.dense_weight * dense + cfg.interaction_weight * interaction
        return cfg.teacher_strength * unit + t.bias

    # -- sampling --------------------------------------------------------------------------

    def _sample_raw(self, batch_size: int, rng: np.random.Generator) -> _RawSample:
        lengths = _bag_lengths(self.config, batch_size, rng)
        value_feature = np.repeat(np.arange(self.config.num_features), lengths.sum(axis=1))
        u = rng.random(value_feature.shape[0])
        ranks = _zipf_ranks(u, self._cards[value_feature], self.config.zipf_exponent)
        dense = self._dense_law.sample(batch_size, rng)
        return _RawSample(lengths=lengths, value_feature=value_feature, ranks=ranks, dense=dense)

    def _encode_ids(self, value_feature: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """(feature, rank) -> int64 id, a bijection; identity on ranks when ids are not scrambled."""
        if not self.config.scramble_ids:
            return ranks.astype(np.int64)
        key = (value_feature.astype(np.uint64) << _U64(_RANK_BITS)) | ranks.astype(np.uint64)
        return _mix64(key + _U64(self._id_key)).view(np.int64)

    def _decode_ranks(self, ids: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`_encode_ids` (the feature is known from the KJT key)."""
        if not self.config.scramble_ids:
            return ids.astype(np.int64)
        key = _unmix64(ids.astype(np.int64).view(np.uint64)) - _U64(self._id_key)
        return (key & _U64(_RANK_MASK)).astype(np.int64)

    def _to_batch(self, raw: _RawSample, labels: np.ndarray) -> Batch:
        values = self._encode_ids(raw.value_feature, raw.ranks)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.from_numpy(values),
            lengths=torch.from_numpy(raw.lengths.reshape(-1).astype(np.int32)),
        )
        return Batch(
            dense_features=torch.from_numpy(raw.dense),
            sparse_features=kjt,
            labels=torch.from_numpy(labels.astype(np.float32)),
        )

    def batch_with_teacher(self, batch_index: int, batch_size: int) -> Tuple[Batch, torch.Tensor]:
        """Batch ``batch_index`` and the teacher's click probability of each sample (float32 ``[B]``)."""
        if batch_index < 0 or batch_size < 1:
            raise ValueError("batch_index must be >= 0 and batch_size >= 1")
        rng = np.random.default_rng([self.config.seed, _TAG_BATCH, batch_index])
        raw = self._sample_raw(batch_size, rng)
        prob = _sigmoid(self._teacher_logit(raw))
        labels = rng.random(batch_size) < prob
        return self._to_batch(raw, labels), torch.from_numpy(prob.astype(np.float32))

    def batch(self, batch_index: int, batch_size: int) -> Batch:
        """Batch ``batch_index``: the same tensors for the same (config, index, size), anywhere."""
        return self.batch_with_teacher(batch_index, batch_size)[0]

    def teacher_probability(self, batch: Batch) -> torch.Tensor:
        """The teacher's click probability for any batch of this config (e.g. one read back from disk)."""
        kjt = batch.sparse_features
        if list(kjt.keys()) != self.keys:
            raise ValueError(f"batch keys {kjt.keys()} differ from the config's {self.keys}")
        lengths = kjt.lengths().cpu().numpy().astype(np.int64).reshape(len(self.keys), -1)
        value_feature = np.repeat(np.arange(len(self.keys)), lengths.sum(axis=1))
        raw = _RawSample(
            lengths=lengths,
            value_feature=value_feature,
            ranks=self._decode_ranks(kjt.values().cpu().numpy()),
            dense=batch.dense_features.cpu().numpy().astype(np.float64),
        )
        return torch.from_numpy(_sigmoid(self._teacher_logit(raw)).astype(np.float32))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


# ---------------------------------------------------------------------------------------------
# Streaming dataset
# ---------------------------------------------------------------------------------------------


def resolve_rank_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """(rank, world_size), defaulting to torch.distributed's when it is initialised, checked."""
    default_rank, default_world = (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {rank}, {world_size}")
    return rank, world_size


class SyntheticCriteoDataset(IterableDataset):
    """Streams batches ``first_batch, first_batch + 1, ...`` split round-robin over ranks and workers.

    Shard ``s = rank * num_workers + worker_id`` of ``S = world_size * num_workers`` generates the
    global batch indices ``i`` with ``(i - first_batch) % S == s``, so shards never overlap, together
    cover every index, and no one reads or communicates anything. Use it with
    ``DataLoader(dataset, batch_size=None)``: items are already batches.
    ``rank``/``world_size`` default to torch.distributed's when it is initialised.
    """

    def __init__(
        self,
        config: SyntheticCriteoConfig,
        batch_size: int,
        num_batches: Optional[int] = None,
        first_batch: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        if batch_size < 1 or first_batch < 0 or (num_batches is not None and num_batches < 0):
            raise ValueError("batch_size must be >= 1, first_batch and num_batches >= 0")
        self.config = config
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.first_batch = first_batch
        self.generator = SyntheticCriteoGenerator(config)

    def batch_indices(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[int]:
        """The global batch indices this rank's ``worker_id`` generates, in order."""
        num_shards = self.world_size * num_workers
        index = self.first_batch + self.rank * num_workers + worker_id
        stop = None if self.num_batches is None else self.first_batch + self.num_batches
        while stop is None or index < stop:
            yield index
            index += num_shards

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.batch_indices(worker_id, num_workers):
            yield self.generator.batch(index, self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields over all its workers (only for a finite dataset)."""
        if self.num_batches is None:
            raise TypeError("an infinite SyntheticCriteoDataset has no length")
        return max(0, -(-(self.num_batches - self.rank) // self.world_size))
