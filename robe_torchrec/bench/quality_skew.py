"""How skewed the MovieLens-100k ids are, and which ids frequency-aware ROBE's plan makes hot.

Why: ``robe_freq`` can only help when a few ids carry much of the traffic. ``python -m
robe_torchrec.bench.quality_skew [--dim 16] [--ratios 2,10,100]`` prints, over one pass of the
benchmark's training ratings: the share of lookups of the top 1% / top 10% / 10 most frequent ids
of ``user_id`` and ``movie_id``; and per compression ratio the module's hot-row plan (made from
the same first batches as in ``bench.quality``), its share of the byte budget, and the share of all
lookups that the exact top ids of each table, as many as it has hot rows, cover. A side
computation for docs/quality.md, not part of the benchmark.
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import numpy as np

from robe_torchrec.bench import quality as q
from robe_torchrec.modules.frequency_aware_plan import FrequencyAwareConfig
from robe_torchrec.modules.frequency_aware_robe_embedding_bag_collection import (
    FrequencyAwareRobeEmbeddingBagCollection,
)


def top_shares(ids: np.ndarray) -> Dict[str, float]:
    """Share of ``ids`` (one lookup each) taken by the top 1%, the top 10% and the top 10 distinct ids."""
    counts = np.sort(np.unique(ids, return_counts=True)[1])[::-1]
    total = counts.sum()
    n = len(counts)
    return {"distinct": n, "top1pct": counts[: max(1, n // 100)].sum() / total,
            "top10pct": counts[: max(1, n // 10)].sum() / total, "top10": counts[:10].sum() / total}


def _feature_lookups(train: q.Split, f: int, num_one_hot: int) -> np.ndarray:
    if f < num_one_hot:
        return train.raw_ids[:, f].numpy()
    assert train.bag_ids is not None
    bag = train.bag_ids.numpy()
    return bag[bag >= 0]


def plan_coverage(train: q.Split, tables: List, keys: List[str], ratio: float, args: argparse.Namespace) -> Dict:
    """The hot-row plan at ``ratio`` and what it covers (see the module docstring)."""
    bs = args.batch_size
    batches = min(args.freq_calib_batches, -(-len(train) // bs))  # as bench.quality's run_one
    calibration = [train.kjt(i * bs, (i + 1) * bs, keys, vocab=False) for i in range(batches)]
    config = FrequencyAwareConfig(min_traffic_per_byte=args.freq_alpha, max_hot_fraction=args.freq_max_hot,
                                  refresh_every=args.freq_refresh, gate=not args.freq_no_gate)
    module = FrequencyAwareRobeEmbeddingBagCollection.from_compression(
        tables, ratio, calibration, block_size=1, seed=0, config=config)
    caps = module.hot_capacities()
    num_one_hot = train.raw_ids.shape[1]
    covered = lookups = 0
    for f, table in enumerate(tables):
        counts = np.sort(np.unique(_feature_lookups(train, f, num_one_hot), return_counts=True)[1])[::-1]
        covered += counts[: caps.get(table.name, 0)].sum()
        lookups += counts.sum()
    budget = sum(t.num_embeddings * t.embedding_dim for t in tables) / ratio
    hot = sum(caps.get(t.name, 0) * t.embedding_dim for t in tables)
    return {"hot_rows": {k: v for k, v in caps.items() if v}, "budget_share": hot / budget,
            "lookup_share": covered / lookups,
            "array_elements": module.robe.robe_configs()["default"].num_elements}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--ratios", type=q._ints, default=[2, 10, 100])
    p.add_argument("--no-gate", action="store_true", help="the plan without its gate (as before the gate)")
    ours = p.parse_args(argv)
    args = q.parse_args(["--dataset", "movielens100k", "--dim", str(ours.dim), "--passes", "1", "--block-sizes", "1"]
                        + (["--freq-no-gate"] if ours.no_gate else []))
    train, _, tables, keys, _ = q.movielens_splits(args)
    out: Dict = {"skew": {}, "plans": {}}
    for f, key in enumerate(keys[:2]):
        s = out["skew"][key] = top_shares(train.raw_ids[:, f].numpy())
        print(f"{key}: {s['distinct']} ids in train; top 1% {s['top1pct']:.1%}, top 10% {s['top10pct']:.1%}, "
              f"top 10 ids {s['top10']:.1%} of the lookups")
    for ratio in ours.ratios:
        c = out["plans"][ratio] = plan_coverage(train, tables, keys, float(ratio), args)
        print(f"{ratio}x: array {c['array_elements']:,} elements; hot rows {c['hot_rows']}: {c['budget_share']:.1%} of "
              f"the budget, exact top ids cover {c['lookup_share']:.1%} of all lookups")
    return out


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
