"""Levers for ROBE's accuracy at a fixed budget: the array's lr, init range and optimizer.

``python -m robe_torchrec.bench.quality_levers [quality flags] --variants NAME=FLAGS;...`` generates
the same data as ``robe_torchrec.bench.quality`` (same flags, same seeds, ``--dataset`` too) once, then trains ROBE
(``--robe-ratios``, ``--block-sizes``, ``--seeds``) once per variant, each variant's flags applied on
top of the common ones, e.g.::

    python -m robe_torchrec.bench.quality_levers --samples 1048576 --seeds 1 --robe-ratios 1000 \\
        --block-sizes 1 --variants "lr0.1=--robe-lr 0.1;init0.01=--robe-init 0.01"

Results go to ``<out>/<tag>_results.json`` (one row per run, with the variant name; ``--tag``
defaults to ``quality_levers`` here, so the main benchmark's results are never overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import List, Optional, Sequence

from robe_torchrec.bench import quality as q


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True, help='"NAME=FLAGS;NAME=FLAGS" (flags of bench.quality)')
    if "-h" in argv or "--help" in argv:
        p.print_help()
        print("\nevery other flag is robe_torchrec.bench.quality's (python -m robe_torchrec.bench.quality --help)")
        return []
    ours, rest = p.parse_known_args(argv)
    if "--tag" not in rest:  # never overwrite the main benchmark's quality_results.json
        rest += ["--tag", "quality_levers" if "movielens100k" not in rest else "quality_levers_movielens100k"]
    variants = [v.split("=", 1) for v in ours.variants.split(";") if v.strip()]
    base = q.parse_args(rest + ["--methods", "robe"])
    splits = q.planted_splits if base.dataset == "planted" else q.movielens_splits
    train, test, tables, keys, data_meta = splits(base)
    teacher_auc = data_meta["teacher_auc"]
    if teacher_auc is not None:
        print(f"teacher AUC {teacher_auc:.4f}", flush=True)
    os.makedirs(base.out, exist_ok=True)
    path = os.path.join(base.out, f"{base.tag}_results.json")
    rows: List[dict] = []
    for name, flags in variants:
        args = q.parse_args(rest + ["--methods", "robe"] + shlex.split(flags))
        for spec in q.run_specs(args):
            t0 = time.perf_counter()
            r = q.run_one(spec, tables, train, test, keys, args)
            r.update(variant=name, flags=flags, teacher_auc=teacher_auc)
            rows.append(r)
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)
            print(f"{name:14s} {spec.key:22s} AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
