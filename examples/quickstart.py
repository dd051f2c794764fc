"""Quickstart: torchrec's DLRM on synthetic clicks, with one ROBE array standing in for 26 tables.

    python examples/quickstart.py               # ROBE, 1000x smaller than the tables it replaces
    python examples/quickstart.py --full-tables # the same model on torchrec's uncompressed EBC

The whole plugin on one screen, on the public API only: nominal Criteo-shaped tables, a
``RobeConfig`` sized by a compression ratio, ``RobeEmbeddingBagCollection`` where torchrec's
``EmbeddingBagCollection`` would be, a stock ``torchrec.models.dlrm.DLRM`` on top, a plain torch
training loop (what your own loop looks like), and the app's evaluation function. The validation
AUC is printed next to the data's ceiling (the AUC of the hidden teacher that labelled it).
For configs, sharding, checkpoints and logs use the app: ``python -m robe_torchrec.train``.
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.app.metrics import evaluate_batches
from robe_torchrec.data import EVAL_FIRST_BATCH, SyntheticCriteoConfig, SyntheticCriteoDataset, make_tables


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps, one batch each")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dim", type=int, default=16, help="embedding dim of every table")
    p.add_argument("--compression", type=float, default=1000.0, help="nominal table size / ROBE size")
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-tables", action="store_true", help="baseline: torchrec's uncompressed EBC")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    # ROBE hashes any int64 id, so it gets Criteo-like scrambled ids; full tables need raw ranks.
    data = SyntheticCriteoConfig(seed=args.seed, scramble_ids=not args.full_tables)
    tables = make_tables(data, args.dim)

    if args.full_tables:
        embeddings = EmbeddingBagCollection(tables=tables)
    else:
        robe = RobeConfig.from_compression(tables, ratio=args.compression, block_size=args.dim, seed=args.seed)
        embeddings = RobeEmbeddingBagCollection(tables, robe)  # was: EmbeddingBagCollection(tables)
    model = DLRM(embedding_bag_collection=embeddings, dense_in_features=data.num_dense,
                 dense_arch_layer_sizes=[64, args.dim], over_arch_layer_sizes=[64, 32, 1])
    nominal = sum(t.num_embeddings * t.embedding_dim for t in tables) * 4
    used = sum(p.numel() * p.element_size() for p in embeddings.parameters())
    print(f"embeddings: {used:,} bytes for {nominal:,} nominal bytes of tables ({nominal / used:.0f}x smaller)")

    optimizer = torch.optim.Adagrad(model.parameters(), lr=args.lr)
    train = SyntheticCriteoDataset(data, args.batch_size, num_batches=args.steps, rank=0, world_size=1)
    for step, batch in enumerate(train, start=1):
        loss = F.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  train loss {loss.item():.4f}", flush=True)

    held_out = SyntheticCriteoDataset(data, args.batch_size, num_batches=args.eval_batches,
                                      first_batch=EVAL_FIRST_BATCH, rank=0, world_size=1)
    batches = list(held_out)
    result = evaluate_batches(model, batches, torch.device("cpu"))
    teacher = torch.cat([held_out.generator.teacher_probability(b) for b in batches])
    labels = torch.cat([b.labels for b in batches]).long()
    teacher_auc = binary_auroc(teacher, labels).item()
    print(f"validation AUC {result.auc:.4f} (teacher ceiling {teacher_auc:.4f}), "
          f"log loss {result.logloss:.4f}, on {result.num_samples:,} held-out samples")
    return {"auc": result.auc, "logloss": result.logloss, "teacher_auc": teacher_auc}


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
