"""Step time of a sharded DLRM + ROBE: the plain training loop vs torchrec's TrainPipelineSparseDist.

Spawns ``--world-size`` CPU processes (gloo); per ROBE sharding type, every rank builds the same
DLRMTrain (DLRM + one ROBE array 1000x smaller than 26 Criteo-shaped tables), plans it with
torchrec's planner under that type, shards it with DistributedModelParallel and times
``--steps`` steps of (a) the plain loop ``loss, _ = model(batch); loss.backward(); opt.step()`` and
(b) ``TrainPipelineSparseDist.progress`` on the same batches. Both sides run in one process
group, one after the other, so their ratio is comparable on a noisy machine. A side that fails
prints its error instead of a time.

    python -m robe_torchrec.bench.pipeline --world-size 2 --steps 30
    python -m robe_torchrec.bench.pipeline --types row_wise --kernels auto,reference   # kernel vs masked path
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
import traceback
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from robe_torchrec.bench.ports import free_port

TYPES = ("data_parallel", "table_wise", "row_wise")


def _build(sharding_type: str, fused: str, batch_size: int, world_size: int, kernel: str = "auto") -> Any:
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
    from robe_torchrec.data import SyntheticCriteoConfig, make_tables
    from robe_torchrec.optim import RobeFusedOptimizerConfig
    from robe_torchrec.sharding import RobeEmbeddingBagCollectionSharder

    torch.manual_seed(0)
    data = SyntheticCriteoConfig(seed=0)
    tables = make_tables(data, 16)
    robe = RobeConfig.from_compression(tables, ratio=1000, block_size=16)
    ebc = RobeEmbeddingBagCollection(tables, robe, kernel=kernel)
    model = DLRMTrain(DLRM(embedding_bag_collection=ebc, dense_in_features=data.num_dense,
                           dense_arch_layer_sizes=[64, 16], over_arch_layer_sizes=[64, 32, 1]))
    fused_params = None if fused == "none" else {"optimizer": fused, "lr": 0.05}
    sharders = [RobeEmbeddingBagCollectionSharder(fused_params=fused_params), *get_default_sharders()]
    topology = Topology(world_size=world_size, compute_device="cpu")
    constraints = {"default": ParameterConstraints(sharding_types=[sharding_type])}
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD), plan=plan,
                                   sharders=sharders, device=torch.device("cpu"))
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return dmp, optimizer, data


def _batches(data: Any, batch_size: int, rank: int, world_size: int, n: int) -> List[Any]:
    from robe_torchrec.data import SyntheticCriteoDataset

    return list(SyntheticCriteoDataset(data, batch_size, num_batches=n * world_size, rank=rank, world_size=world_size))


def _plain(model: Any, optimizer: Any, batches: List[Any]) -> List[float]:
    times = []
    for b in batches:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = model(b)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def _pipelined(model: Any, optimizer: Any, batches: List[Any]) -> List[float]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"))
    it: Iterator[Any] = iter(batches)
    times = []
    while True:
        t0 = time.perf_counter()
        try:
            pipeline.progress(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300))
    rows: List[Dict[str, Any]] = []
    try:
        for stype, kernel in [(t, k) for t in args.types.split(",") for k in args.kernels.split(",")]:
            row: Dict[str, Any] = {"type": stype, "kernel": kernel}
            for side, loop in (("plain", _plain), ("pipeline", _pipelined)):
                try:
                    model, optimizer, data = _build(stype, args.fused, args.batch, world_size, kernel)
                    batches = _batches(data, args.batch, rank, world_size, args.steps + args.warmup)
                    times = loop(model, optimizer, batches)[args.warmup:]
                    row[side] = 1e3 * statistics.median(times)
                except Exception as exc:  # noqa: BLE001 - report it in the table
                    row[side] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    if args.verbose:
                        traceback.print_exc()
                dist.barrier()
            rows.append(row)
    finally:
        if rank == 0:
            out.put(rows)
        dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--fused", default="rowwise_adagrad", help="sharder fused_params optimizer, or 'none'")
    p.add_argument("--kernels", default="auto", help="module kernels to time, comma-separated (auto: C++ on CPU; "
                   "reference: PyTorch, which is also what row_wise ran before it had the C++ element_range path)")
    p.add_argument("--batch", type=int, default=512, help="per-rank batch size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--verbose", action="store_true", help="print a failing side's traceback")
    args = p.parse_args(argv)

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, args, out)) for r in range(args.world_size)]
    for proc in procs:
        proc.start()
    rows = out.get(timeout=1800)
    for proc in procs:
        proc.join()
    print(f"\n{args.world_size} processes (gloo, CPU, {args.threads} thread(s) each), per-rank batch {args.batch}, "
          f"ROBE 1000x, fused {args.fused}; median ms per step over {args.steps} steps after {args.warmup}")
    print("| sharding type | kernel | plain loop ms | TrainPipelineSparseDist ms | plain / pipeline |")
    print("|---|---|---|---|---|")
    for r in rows:
        plain, pipe = r["plain"], r["pipeline"]
        ratio = f"{plain / pipe:.2f}x" if isinstance(plain, float) and isinstance(pipe, float) else "-"
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else v  # noqa: E731
        print(f"| {r['type']} | {r['kernel']} | {fmt(plain)} | {fmt(pipe)} | {ratio} |")
    return rows


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
