"""Quickstart: train torchrec's DLRM on synthetic clicks with ROBE-compressed embeddings.

Run ``python -m robe_torchrec.quickstart`` (a minute or two on a laptop CPU). It shows the whole
plugin in one screen: nominal Criteo-shaped tables, one ROBE array 1000x smaller standing in for all
of them, a stock ``torchrec.models.dlrm.DLRM`` on top, and the validation AUC next to the data's
ceiling (the AUC of the hidden teacher that labelled the data).
``--full-tables`` trains the same model with torchrec's uncompressed EmbeddingBagCollection for
comparison.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.data import SyntheticCriteoConfig, SyntheticCriteoDataset, make_tables

# Validation batches start far past any training index, so changing --steps never makes them overlap.
EVAL_FIRST_BATCH = 1_000_000_000
BYTES_PER_FLOAT = 4


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300, help="training steps, one batch each")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--embedding-dim", type=int, default=16, help="D of every table")
    p.add_argument("--compression", type=float, default=1000.0, help="nominal size / ROBE size")
    p.add_argument("--block-size", type=int, default=None, help="ROBE Z, divides D (default D)")
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate")
    p.add_argument("--seed", type=int, default=0, help="data, model init and ROBE hash seed")
    p.add_argument("--eval-batches", type=int, default=20, help="held-out validation batches")
    p.add_argument("--log-every", type=int, default=50, help="print the train loss every N steps")
    p.add_argument("--full-tables", action="store_true", help="baseline: uncompressed tables")
    return p.parse_args(argv)


def data_config(args: argparse.Namespace) -> SyntheticCriteoConfig:
    """Full tables index raw ranks; ROBE hashes any int64, so it gets Criteo-like scrambled ids.

    The teacher scores (feature, rank), so both see the same problem.
    """
    return SyntheticCriteoConfig(seed=args.seed, scramble_ids=not args.full_tables)


def build_embeddings(tables: List[EmbeddingBagConfig], args: argparse.Namespace) -> torch.nn.Module:
    if args.full_tables:
        return EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    robe = RobeConfig.from_compression(
        tables,
        ratio=args.compression,
        block_size=args.block_size or args.embedding_dim,
        seed=args.seed,
    )
    return RobeEmbeddingBagCollection(tables=tables, robe=robe, device=torch.device("cpu"))


def build_model(embeddings: torch.nn.Module, num_dense: int, dim: int) -> DLRM:
    return DLRM(
        embedding_bag_collection=embeddings,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=[64, dim],
        over_arch_layer_sizes=[64, 32, 1],
    )


def embedding_bytes(embeddings: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in embeddings.parameters())


def nominal_bytes(tables: Sequence[EmbeddingBagConfig]) -> int:
    return sum(t.num_embeddings * t.embedding_dim for t in tables) * BYTES_PER_FLOAT


def train(model: DLRM, dataset: SyntheticCriteoDataset, lr: float, log_every: int) -> float:
    """Adagrad on every parameter (the usual choice for sparse embeddings, and the fastest to learn
    here); returns the samples/s of the loop."""
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    model.train()
    start, running, seen = time.perf_counter(), 0.0, 0
    for step, batch in enumerate(dataset, start=1):
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running += loss.item()
        seen += batch.labels.numel()
        if step % log_every == 0 or step == len(dataset):
            n = log_every if step % log_every == 0 else step % log_every
            print(f"step {step:5d}  train loss {running / n:.4f}", flush=True)
            running = 0.0
    return seen / max(time.perf_counter() - start, 1e-9)


@dataclass
class EvalResult:
    auc: float
    logloss: float
    teacher_auc: float
    teacher_logloss: float
    constant_logloss: float  # predicting the label mean: what "no learning" scores


@torch.no_grad()
def evaluate(model: DLRM, dataset: SyntheticCriteoDataset) -> EvalResult:
    """Model and teacher metrics on the same held-out batches."""
    model.eval()
    logits, teacher, labels = [], [], []
    for index in dataset.batch_indices():
        batch, prob = dataset.generator.batch_with_teacher(index, dataset.batch_size)
        logits.append(model(batch.dense_features, batch.sparse_features).squeeze(-1))
        teacher.append(prob)
        labels.append(batch.labels)
    y, z, t = torch.cat(labels), torch.cat(logits), torch.cat(teacher).double()
    rate = torch.full_like(y, y.mean().item())
    return EvalResult(
        auc=binary_auroc(torch.sigmoid(z), y.long()).item(),
        logloss=F.binary_cross_entropy_with_logits(z, y).item(),
        teacher_auc=binary_auroc(t, y.long()).item(),
        teacher_logloss=F.binary_cross_entropy(t.clamp(1e-7, 1 - 1e-7), y.double()).item(),
        constant_logloss=F.binary_cross_entropy(rate, y).item(),
    )


def print_memory(
    tables: Sequence[EmbeddingBagConfig], embeddings: torch.nn.Module, args: argparse.Namespace
) -> None:
    full, used = nominal_bytes(tables), embedding_bytes(embeddings)
    rows = sum(t.num_embeddings for t in tables)
    z = args.block_size or args.embedding_dim
    kind = "full tables" if args.full_tables else f"ROBE array (Z={z})"
    print(f"{len(tables)} tables, {rows:,} nominal rows of dim {args.embedding_dim}")
    print(f"embedding memory: nominal {full:,} bytes ({full / 2**20:.2f} MiB)")
    print(f"                  {kind}: {used:,} bytes ({used / 2**20:.3f} MiB), {full / used:.0f}x smaller")


def print_result(result: EvalResult, num_samples: int) -> None:
    print(f"validation on {num_samples:,} held-out samples:")
    print(f"  model                AUC {result.auc:.4f}  logloss {result.logloss:.4f}")
    print(f"  teacher (ceiling)    AUC {result.teacher_auc:.4f}  logloss {result.teacher_logloss:.4f}")
    print(f"  constant predictor   AUC 0.5000  logloss {result.constant_logloss:.4f}")


def main(argv: Optional[Sequence[str]] = None) -> EvalResult:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = data_config(args)
    tables = make_tables(config, args.embedding_dim)
    embeddings = build_embeddings(tables, args)
    model = build_model(embeddings, config.num_dense, args.embedding_dim)

    print_memory(tables, embeddings, args)
    train_data = SyntheticCriteoDataset(
        config, args.batch_size, num_batches=args.steps, rank=0, world_size=1
    )
    eval_data = SyntheticCriteoDataset(
        config,
        args.batch_size,
        num_batches=args.eval_batches,
        first_batch=EVAL_FIRST_BATCH,
        rank=0,
        world_size=1,
    )
    start = time.perf_counter()
    throughput = train(model, train_data, args.lr, args.log_every)
    elapsed = time.perf_counter() - start
    print(f"trained {args.steps} steps in {elapsed:.1f}s ({throughput:,.0f} samples/s)")
    result = evaluate(model, eval_data)
    print_result(result, args.eval_batches * args.batch_size)
    return result


if __name__ == "__main__":
    main()
