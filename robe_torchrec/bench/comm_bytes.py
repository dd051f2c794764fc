"""Bytes a sharded ROBE collection moves per training step and rank, measured vs docs/sharding.md.

Spawns ``--world-size`` CPU processes (gloo). Per sharding type (data_parallel, table_wise,
row_wise) every rank builds the same RobeEmbeddingBagCollection (two array groups of
``--elements`` floats, ``--features`` features of dim ``--dim``, block ``--block``, all groups
constrained to that type), plans it with torchrec's planner, shards it with
DistributedModelParallel + RobeEmbeddingBagCollectionSharder (fused SGD for table_wise /
row_wise; DDP + torch SGD for data_parallel) and runs ``--warmup`` + ``--steps`` steps of
``loss = dmp(kjt).pow(2).mean(); loss.backward(); opt.step()`` on random bags (lengths uniform in
[0, 2 * --pool], ids uniform int64). During the measured steps a
:class:`robe_torchrec.bench.comm_count.CommCounter` records every collective (all-to-all bytes
exact from the split sizes, self part excluded; all-reduce: ring ``2 (W-1)/W * raw``, raw printed
too), split by phase (forward / backward) and by torchrec's KJT label (values = ids, lengths,
splits); DDP's bucket all-reduce is routed through ``dist.all_reduce`` with torch's default
allreduce hook. The last column is an independent check: the bytes this process wrote to its
sockets (``/proc/self/io`` wchar: gloo's TCP pairs, headers and gloo's own algorithm included).

The formula column evaluates docs/sharding.md with B, P, F, D, Z, m from this run (P = mean ids
per sample over the features, measured; k measured = ids routed / ids, the formula's k beside it).

    python -m robe_torchrec.bench.comm_bytes
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robe_torchrec.bench.comm_count import CommCounter, count_ddp_allreduce, wire_bytes
from robe_torchrec.bench.ports import free_port

TYPES = ("data_parallel", "table_wise", "row_wise")
GROUPS = ("g0", "g1")


class _Pooled(nn.Module):
    """The collection alone, returning its pooled ``[B, F D]`` (no dense parameters: no other traffic)."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: Any) -> torch.Tensor:
        return self.ebc(kjt).values()


def _build(stype: str, args: argparse.Namespace, world_size: int) -> Tuple[nn.Module, Optional[torch.optim.Optimizer]]:
    from torchrec import EmbeddingBagConfig
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
    from robe_torchrec.sharding import RobeEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=args.dim, num_embeddings=100_000, feature_names=[f"f{i}"])
        for i in range(args.features)
    ]
    groups = {g: RobeConfig(args.elements, block_size=args.block, seed=i + 1) for i, g in enumerate(GROUPS)}
    table_to_group = {t.name: GROUPS[i % len(GROUPS)] for i, t in enumerate(tables)}
    model = _Pooled(RobeEmbeddingBagCollection(tables, groups, table_to_group=table_to_group, kernel=args.kernel))
    sharders = [RobeEmbeddingBagCollectionSharder(fused_params={"optimizer": "sgd", "lr": 0.1})]
    topology = Topology(world_size=world_size, local_world_size=world_size, compute_device="cpu")
    constraints = {g: ParameterConstraints(sharding_types=[stype]) for g in GROUPS}
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    planned = {g: plan.plan["ebc"][g].sharding_type for g in GROUPS}
    if set(planned.values()) != {stype}:
        raise RuntimeError(f"planner did not honour the constraint {stype}: {planned}")
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    count_ddp_allreduce(dmp)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    return dmp, (torch.optim.SGD(dense, lr=0.1) if dense else None)


def _kjt(args: argparse.Namespace, step: int, rank: int) -> Any:
    from torchrec import KeyedJaggedTensor

    gen = torch.Generator().manual_seed(7919 * step + rank)
    lengths = torch.randint(0, 2 * args.pool + 1, (args.features * args.batch,), generator=gen, dtype=torch.int64)
    values = torch.randint(-(2**62), 2**62, (int(lengths.sum()),), generator=gen, dtype=torch.int64)
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(args.features)], values=values, lengths=lengths)


def _category(op: str, phase: str, label: str, dtype: torch.dtype) -> str:
    """Row name of one record: ids / lengths / splits / pooled values / gradients / array all-reduce."""
    if op == "all_reduce" and dtype.is_floating_point:
        return "array gradient all-reduce"
    if label in ("values", "lengths", "weights", "splits"):
        return {"values": "ids (KJT values, int64)", "lengths": "KJT lengths", "weights": "KJT weights",
                "splits": "KJT splits"}[label]
    if dtype.is_floating_point:
        return "pooled values (fwd)" if phase == "fwd" else "pooled gradients (bwd)"
    return f"other {op} {dtype}"


def _measure(stype: str, args: argparse.Namespace, rank: int, world_size: int) -> Dict[str, Any]:
    """Per-step means on this rank: {category: (calls, raw, sent, recv, rows_in)}, ids, wire bytes."""
    model, opt = _build(stype, args, world_size)
    counter = CommCounter()
    nnz: List[int] = []
    wire_w = 0
    for step in range(args.warmup + args.steps):
        kjt = _kjt(args, step, rank)
        measured = step >= args.warmup
        dist.barrier()
        w0 = wire_bytes()
        if measured:
            counter.__enter__()
        try:
            counter.phase = "fwd"
            loss = model(kjt).pow(2).mean()
            counter.phase = "bwd"
            loss.backward()
            counter.phase = "opt"
            if opt is not None:
                opt.step()
                opt.zero_grad()
        finally:
            if measured:
                counter.__exit__(None, None, None)
        w1 = wire_bytes()
        if measured:
            nnz.append(kjt.values().numel())
            wire_w += w1[0] - w0[0]
    cats: Dict[str, List[float]] = {}
    for r in counter.records:
        row = cats.setdefault(_category(r.op, r.phase, r.label, r.dtype), [0.0] * 5)
        for i, v in enumerate((1, r.raw, r.sent, r.recv, r.rows_in)):
            row[i] += v / args.steps
    # rchar is not reported: gloo receives with recv(), which /proc/self/io does not count.
    return {"cats": cats, "nnz": statistics.mean(nnz), "wire_sent": wire_w / args.steps}


def formulas(stype: str, w: int, b: int, p: float, f: int, d: int, z: int, m: int, k: Optional[float] = None) -> Dict[str, float]:
    """docs/sharding.md's bytes sent per rank and step, per category (lengths as int64 per bag).

    ``k`` defaults to the doc's ``W (1 - (1 - 1/W)^(D/Z))``."""
    frac = (w - 1) / w
    if k is None:
        k = w * (1 - (1 - 1 / w) ** (d / z))
    if stype == "data_parallel":
        return {"array gradient all-reduce": 2 * frac * 4 * m}
    if stype == "table_wise":
        pooled = 4 * b * f * d * frac
        return {"ids (KJT values, int64)": 8 * b * p * frac, "KJT lengths": 8 * b * f * frac,
                "pooled values (fwd)": pooled, "pooled gradients (bwd)": pooled}
    if stype == "row_wise":
        pooled = 4 * (w - 1) * b * f * d
        return {"ids (KJT values, int64)": 8 * b * p * k * frac, "KJT lengths": 8 * (w - 1) * b * f,
                "pooled values (fwd)": pooled, "pooled gradients (bwd)": pooled}
    raise ValueError(f"unknown sharding type {stype!r}")


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    try:
        out.put((rank, {stype: _measure(stype, args, rank, world_size) for stype in args.types.split(",")}))
    finally:
        dist.destroy_process_group()


def _table(stype: str, per_rank: List[Dict[str, Any]], args: argparse.Namespace) -> List[str]:
    w, b = len(per_rank), args.batch
    p = statistics.mean(r["nnz"] for r in per_rank) / b
    m = args.elements * len(GROUPS)
    cats = sorted({c for r in per_rank for c in r["cats"]})

    def col(c: str, i: int) -> List[float]:
        return [r["cats"].get(c, [0.0] * 5)[i] for r in per_rank]

    k_formula = w * (1 - (1 - 1 / w) ** (args.dim / args.block))
    k_meas = None
    if stype == "row_wise":
        k_meas = sum(col("ids (KJT values, int64)", 4)) / sum(r["nnz"] for r in per_rank)
    want = formulas(stype, w, b, p, args.features, args.dim, args.block, m)
    lines = [f"\n### {stype}: W={w}, B={b}, F={args.features}, D={args.dim}, Z={args.block}, m={m} "
             f"(2 arrays), P={p:.3f} (measured)"
             + (f", k measured {k_meas:.4f} vs formula {k_formula:.4f}" if k_meas is not None else ""),
             "| traffic | calls/step | raw bytes/rank | sent bytes per rank (" + ", ".join(f"r{i}" for i in range(w))
             + ") | sent mean | recv bytes per rank | formula (sent mean) | mean / formula |",
             "|---|---|---|---|---|---|---|---|"]
    tot_sent, tot_want = 0.0, 0.0
    for c in cats + [c for c in want if c not in cats]:
        sent, recv = col(c, 2), col(c, 3)
        ms = statistics.mean(sent)
        tot_sent += ms
        fw = want.get(c)
        tot_want += fw or 0.0
        ratio = f"{ms / fw:.4f}" if fw else "-"
        lines.append(f"| {c} | {statistics.mean(col(c, 0)):.0f} | {statistics.mean(col(c, 1)):.0f} | "
                     + ", ".join(f"{s:.0f}" for s in sent)
                     + f" | {ms:.0f} | " + ", ".join(f"{x:.0f}" for x in recv)
                     + f" | {'-' if fw is None else f'{fw:.0f}'} | {ratio} |")
    if k_meas is not None:
        fk = formulas(stype, w, b, p, args.features, args.dim, args.block, m, k=k_meas)["ids (KJT values, int64)"]
        ids = statistics.mean(col("ids (KJT values, int64)", 2))
        lines.append(f"| ids, formula with k measured | | | | {ids:.0f} | | {fk:.0f} | {ids / fk:.4f} |")
    lines.append(f"| total counted | | | | {tot_sent:.0f} | | {tot_want:.0f} | "
                 + (f"{tot_sent / tot_want:.4f}" if tot_want else "-") + " |")
    wire = [r["wire_sent"] for r in per_rank]
    lines.append(f"| socket bytes written (/proc/self/io wchar) | | | " + ", ".join(f"{x:.0f}" for x in wire)
                 + f" | {statistics.mean(wire):.0f} | - | | "
                 + (f"{statistics.mean(wire) / tot_sent:.4f} of counted" if tot_sent else "-") + " |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, Any]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--batch", type=int, default=256, help="per-rank batch size B")
    p.add_argument("--features", type=int, default=4, help="features F (one table each, alternating over 2 groups)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--block", type=int, default=4, help="Z")
    p.add_argument("--elements", type=int, default=8192, help="m of each of the 2 arrays")
    p.add_argument("--pool", type=int, default=2, help="mean ids per bag")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kernel", default="reference", help="lookup kernel (bytes do not depend on it)")
    args = p.parse_args(argv)
    for t in args.types.split(","):
        if t not in TYPES:
            p.error(f"unknown sharding type {t!r} (choose from {', '.join(TYPES)})")

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, args, out)) for r in range(args.world_size)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    by_type = {t: [results[r][t] for r in range(args.world_size)] for t in args.types.split(",")}
    print(f"{args.world_size} processes (gloo, CPU), torch {torch.__version__}; bytes per step and rank, "
          f"mean of {args.steps} steps after {args.warmup}. all-to-all: exact from split sizes (self part excluded); "
          "all-reduce sent = ring 2(W-1)/W * raw (assumed algorithm; raw measured)")
    for t, per_rank in by_type.items():
        print("\n".join(_table(t, per_rank, args)))
    return by_type


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
