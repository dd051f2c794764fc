"""Synthetic data generation vs the training step it feeds, both measured in one run.

The generator must stay well below the step it feeds (it was a wall-clock test; timing belongs in a
benchmark, not in a test on a noisy machine). Prints ms per batch of generation and of one DLRM +
ROBE forward/backward/Adagrad step on the same batch.

    python -m robe_torchrec.bench.data_gen --batch 2048 --iters 10
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRM

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench.lookup import timed
from robe_torchrec.data import SyntheticCriteoConfig, SyntheticCriteoGenerator, make_tables


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dim", type=int, default=16)
    args = p.parse_args(argv)

    config = SyntheticCriteoConfig(seed=0, scramble_ids=True)
    gen = SyntheticCriteoGenerator(config)
    tables = make_tables(config, args.dim)
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio=1000, block_size=args.dim))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=config.num_dense,
                 dense_arch_layer_sizes=[64, args.dim], over_arch_layer_sizes=[64, 32, 1])
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    batch = gen.batch(0, args.batch)
    counter = iter(range(1 << 30))

    def generate() -> None:
        gen.batch(next(counter), args.batch)

    def step() -> None:
        loss = F.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()

    cpu = torch.device("cpu")
    gen_ms = timed(generate, args.iters, args.warmup, cpu)
    step_ms = timed(step, args.iters, args.warmup, cpu)
    print(f"| batch {args.batch} | generate {gen_ms:.2f} ms | DLRM+ROBE train step {step_ms:.2f} ms "
          f"| generation / step {gen_ms / step_ms:.2f} | threads {torch.get_num_threads()} |")


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
