"""Training-step time of frequency-aware ROBE vs plain ROBE on CPU (embedding layer only).

``python -m robe_torchrec.bench.quality_freq_step [--ratio 1000] [--block-size 1] [--steps 40]``:
the planted benchmark's 26 tables (Criteo Kaggle cardinalities capped at 1M, Zipf ids, D 32,
batch 2048), both modules with the fused exact Adagrad, the frequency-aware one planned from the
first 16 batches and warmed up for ``--warmup`` steps (its hot set filled, refreshes included in
the timed steps). Steps alternate between the two sides on the same batches, so machine noise hits
both; prints the median and mean milliseconds per step (forward + backward + update) of each side
and their ratio. The embedding layer alone is the strict comparison (a model's MLPs add the same
time to both sides).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import List, Optional, Sequence

import numpy as np
import torch

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench import quality as q
from robe_torchrec.bench.quality_methods import first_batches
from robe_torchrec.data.synthetic import SyntheticCriteoConfig, SyntheticCriteoGenerator, make_tables
from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig, plan_summary
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection,
)
from robe_torchrec.optim import RobeFusedOptimizerConfig


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=1000)
    p.add_argument("--block-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=64, help="untimed frequency-aware steps first")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sketch-every", type=int, default=1, help="FrequencyAwareConfig.sketch_every")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    qargs = q.parse_args([])
    cards = q.cardinalities(qargs)
    config = SyntheticCriteoConfig(cardinalities=cards, seed=0)
    gen = SyntheticCriteoGenerator(config)
    tables = make_tables(config, qargs.dim)
    n_batches = max(args.warmup, args.steps) + 16
    split = q.generate(gen, [np.arange(c) for c in cards], 0, n_batches * args.batch_size, args.batch_size)
    batches = list(first_batches(split.raw_ids, gen.keys, args.batch_size, n_batches))
    opt = RobeFusedOptimizerConfig("adagrad", lr=0.05, eps=1e-8)
    torch.manual_seed(0)
    plain = RobeEmbeddingBagCollection(
        tables, RobeConfig.from_compression(tables, args.ratio, block_size=args.block_size), fused_optimizer=opt
    )
    freq = FrequencyAwareRobeEmbeddingBagCollection.from_compression(
        tables, args.ratio, batches[:16], block_size=args.block_size, config=FrequencyAwareConfig(sketch_every=args.sketch_every),
        fused_optimizer=opt
    )
    grad = torch.randn(args.batch_size, sum(t.embedding_dim for t in tables)) * 1e-3

    def step(module: torch.nn.Module, kjt) -> float:
        t0 = time.perf_counter()
        out = module(kjt).values()
        out.backward(grad)
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(freq, batches[i % len(batches)])
    for i in range(3):
        step(plain, batches[i])
    times: dict = {"plain": [], "freq": []}
    for i in range(args.steps):
        kjt = batches[i % len(batches)]
        times["plain"].append(step(plain, kjt))
        times["freq"].append(step(freq, kjt))
    hot = sum(len(v) for v in freq.hot_set().values())
    res = {k: (statistics.median(v) * 1e3, statistics.fmean(v) * 1e3) for k, v in times.items()}
    print(f"ratio {args.ratio:g}x, Z={args.block_size}, batch {args.batch_size}, {len(tables)} tables, "
          f"threads {args.threads}; frequency-aware (sketch_every {args.sketch_every}): {plan_summary(freq.hot_capacities())}, {hot} hot now")
    for k, (med, mean) in res.items():
        print(f"{k:6s} median {med:8.2f} ms/step   mean {mean:8.2f} ms/step")
    print(f"freq / plain: median {res['freq'][0] / res['plain'][0]:.2f}x   mean {res['freq'][1] / res['plain'][1]:.2f}x")
    return res


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
