"""Lookup benchmark: ROBE kernels vs FBGEMM's table-batched embedding vs torch nn.EmbeddingBag.

Both sides run in one process on the same ids, so ratios are comparable on a noisy machine.
It prints, per shape, the median time of a forward and of a training step (forward + backward +
optimizer) for:

- ``robe-<kernel>``: the ROBE op (reference / cpu / triton), array ``--ratio`` x smaller than the
  full tables, fused SGD and fused row-wise Adagrad (and exact Adagrad);
- ``fbgemm-tbe``: ``SplitTableBatchedEmbeddingBagsCodegen`` with EXACT_SGD / EXACT_ROWWISE_ADAGRAD
  fused in backward, full tables;
- ``torch-bag``: one ``nn.EmbeddingBag(sparse=True)`` per table + ``torch.optim.SGD`` (forward and
  SGD step only: torch has no row-wise Adagrad).

Shapes: (a) 26 tables x 100k rows x D=128, one id per bag; (b) the same with the MLPerf DLRMv2
multi-hot pooling factors; (c) 26 x 1M rows x D=64 (full tables far beyond cache).

    python -m robe_torchrec.bench.lookup                  # all shapes, CPU
    python -m robe_torchrec.bench.lookup --shapes a --iters 5 --quick
    python -m robe_torchrec.bench.lookup --device cuda    # triton kernel on a GPU
    python -m robe_torchrec.bench.lookup --interleave     # ROBE and TBE alternate step by step
    python -m robe_torchrec.bench.lookup --dtype float32,bfloat16   # bf16 arrays next to float32

``--mode`` (default ``both``) prints each shape twice: back to back (each side's iterations in a row,
as docs/benchmarks.md recorded first) and interleaved (the sides alternate on the same ids, so neither
finds its data left in cache by its own previous step, as in a model whose MLPs run between lookups).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.lookup import resolve_kernel, robe_pooled_lookup
from robe_torchrec.optim import RobeFusedOptimizer, RobeFusedOptimizerConfig, state_numel

MLPERF_POOLING = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
MLPERF_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
    11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)  # fmt: skip


@dataclass(frozen=True)
class Shape:
    name: str
    tables: int
    rows: Tuple[int, ...]  # rows per table
    dim: int
    batch: int
    pooling: Tuple[int, ...]  # ids per bag, per table

    @property
    def full_elements(self) -> int:
        return sum(self.rows) * self.dim

    @property
    def nnz(self) -> int:
        return self.batch * sum(self.pooling)


def shapes(batch: int, quick: bool, mlperf_row_scale: int = 4) -> Dict[str, Shape]:
    """(a), (b), (c) of the kernels issue, and (m): MLPerf DLRMv2's 26 tables, rows divided by
    ``mlperf_row_scale`` (the full tables, 104 GB in float32, fit no single GPU), multi-hot."""
    scale = 100 if quick else 1
    mlperf = tuple(max(1, r // (mlperf_row_scale * scale)) for r in MLPERF_ROWS)
    return {
        "a": Shape("a: 26x100k D128 1-hot", 26, (100_000 // scale,) * 26, 128, batch, (1,) * 26),
        "b": Shape("b: 26x100k D128 multi-hot", 26, (100_000 // scale,) * 26, 128, batch, MLPERF_POOLING),
        "c": Shape("c: 26x1M D64 1-hot", 26, (1_000_000 // scale,) * 26, 64, batch, (1,) * 26),
        "m": Shape(f"m: MLPerf DLRMv2 rows/{mlperf_row_scale * scale} D128 multi-hot", 26, mlperf, 128, batch, MLPERF_POOLING),
    }


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform ids in [0, rows) per table, fixed pooling factor per table; TBE/KJT layout."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(shape.pooling, dtype=torch.int64).repeat_interleave(shape.batch)
    ids = torch.cat(
        [torch.randint(0, rows, (shape.batch * pf,), generator=g, dtype=torch.int64) for rows, pf in zip(shape.rows, shape.pooling)]
    )
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return ids.to(device), offsets.to(device)


def timed(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def forward_floor_bytes(shape: Shape, array_elements: Optional[int]) -> int:
    """Fewest bytes a pooled forward must move through memory: ids and offsets read once, the
    embedding elements read once (full tables: every looked-up row; ROBE: at most the whole
    array), the output written once."""
    elements = shape.nnz * shape.dim
    if array_elements is not None:
        elements = min(elements, array_elements)
    bags = shape.tables * shape.batch
    return 8 * shape.nnz + 8 * (bags + 1) + 4 * elements + 4 * bags * shape.dim


def copy_bandwidth(device: torch.device, iters: int) -> float:
    """Device-to-device (or RAM-to-RAM) copy rate in GB/s, counting bytes read plus written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), iters, 2, device)
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def tbe_available(device: torch.device) -> bool:
    """FBGEMM's TBE runs on CPU with fbgemm-gpu-cpu, on CUDA only with the CUDA build: try it."""
    if device.type != "cuda":
        return True
    try:
        tiny = Shape("probe", 1, (4,), 4, 2, (1,))
        ids, offsets = make_inputs(tiny, device)
        case = tbe_side(tiny, ids, offsets, device)("train sgd")
        case.fn()
        return True
    except Exception:
        return False


# ----- sides ----------------------------------------------------------------------------------
#
# Each side is a factory ``make(step) -> Case | None`` (None: the side has no such step), so that a
# step's cases can be timed back to back or interleaved, and a side's full tables live only while
# its step is timed (two TBE copies of shape (c) would not fit next to each other).

STEPS = ("forward", "train sgd", "train rowwise_adagrad", "train adagrad")


@dataclass
class Case:
    """One timed thing: a side's step as a zero-argument callable, and what it holds in memory."""

    side: str
    step: str
    fn: Callable[[], None]
    mbytes: float
    floor_bytes: Optional[int] = None


ARRAY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {"float32": "", "bfloat16": "-bf16", "float16": "-fp16"}


def robe_side(shape, ids, offsets, kernel, ratio, block_size, device, dtype: str = "float32") -> Callable[[str], Optional[Case]]:
    m = max(block_size, shape.full_elements // ratio)
    layout = FeatureLayout(
        feature_names=tuple(f"f{t}" for t in range(shape.tables)),
        table_names=tuple(f"t{t}" for t in range(shape.tables)),
        dims=(shape.dim,) * shape.tables,
        mean=(False,) * shape.tables,
        block_size=block_size,
        num_elements=m,
        seed=0,
    )
    keys = layout.hash_keys(device)
    array = torch.nn.Parameter(torch.empty(m, device=device).uniform_(-0.01, 0.01).to(ARRAY_DTYPES[dtype]))
    grad = torch.randn(shape.batch, shape.tables * shape.dim, device=device)
    side = f"robe-{kernel}{_SHORT[dtype]}"
    elem_bytes = array.element_size()

    def make(step: str) -> Optional[Case]:
        if step == "forward":

            def fwd() -> None:
                with torch.no_grad():
                    robe_pooled_lookup(array, ids, offsets, layout, keys, shape.batch, kernel=kernel)

            return Case(side, step, fwd, elem_bytes * m / 1e6, forward_floor_bytes(shape, m))
        opt_name = step.replace("train ", "")
        opt = RobeFusedOptimizer({"array": array}, {"array": block_size}, RobeFusedOptimizerConfig(opt_name, lr=0.01))

        def train() -> None:
            out = robe_pooled_lookup(array, ids, offsets, layout, keys, shape.batch, kernel=kernel, fused_optimizer=opt)
            out.backward(grad)

        return Case(side, step, train, (elem_bytes * m + 4 * state_numel(opt_name, m, block_size)) / 1e6)

    return make


def tbe_side(shape, ids, offsets, device) -> Callable[[str], Optional[Case]]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    if device.type == "cuda":
        location, compute = EmbeddingLocation.DEVICE, ComputeDevice.CUDA
    else:
        location, compute = EmbeddingLocation.HOST, ComputeDevice.CPU
    grad = torch.randn(shape.batch, shape.tables * shape.dim, device=device)
    optimizers = {"forward": OptimType.EXACT_SGD, "train sgd": OptimType.EXACT_SGD,
                  "train rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD}
    full = 4 * shape.full_elements / 1e6

    def make(step: str) -> Optional[Case]:
        if step not in optimizers:
            return None
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(rows, shape.dim, location, compute) for rows in shape.rows],
            optimizer=optimizers[step],
            learning_rate=0.01,
            pooling_mode=PoolingMode.SUM,
        )
        if step == "forward":

            def fwd() -> None:
                with torch.no_grad():
                    tbe(ids, offsets)

            return Case("fbgemm-tbe", step, fwd, full, forward_floor_bytes(shape, None))

        def train() -> None:
            tbe(ids, offsets).backward(grad)

        return Case("fbgemm-tbe", step, train, full + (4 * sum(shape.rows) / 1e6 if "rowwise" in step else 0))

    return make


def torch_bag_side(shape, ids, offsets, device) -> Callable[[str], Optional[Case]]:
    bags = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(rows, shape.dim, mode="sum", sparse=True, device=device) for rows in shape.rows
    )
    per_table = []
    n = shape.batch
    for t in range(shape.tables):
        lo, hi = int(offsets[t * n]), int(offsets[(t + 1) * n])
        per_table.append((ids[lo:hi], offsets[t * n : (t + 1) * n] - lo))
    opt = torch.optim.SGD(bags.parameters(), lr=0.01)
    grad = torch.randn(shape.batch, shape.tables * shape.dim, device=device)
    full = 4 * shape.full_elements / 1e6

    def forward() -> torch.Tensor:
        return torch.cat([bag(i, o) for bag, (i, o) in zip(bags, per_table)], dim=1)

    def fwd() -> None:
        with torch.no_grad():
            forward()

    def train() -> None:
        opt.zero_grad()
        forward().backward(grad)
        opt.step()

    def make(step: str) -> Optional[Case]:
        if step == "forward":
            return Case("torch-bag", step, fwd, full, forward_floor_bytes(shape, None))
        if step == "train sgd":
            return Case("torch-bag", step, train, full)
        return None

    return make


def time_cases(cases: List[Case], iters: int, warmup: int, device: torch.device, interleave: bool) -> List[dict]:
    """Median ms per case. Back to back: each case runs all its iterations in turn (it keeps its
    data in cache between them). Interleaved: the cases alternate step by step on the same ids,
    as a real model runs MLPs between lookups, so no case finds its data left in cache by itself."""
    times: Dict[int, List[float]] = {i: [] for i in range(len(cases))}
    if interleave:
        for it in range(warmup + iters):
            for i, case in enumerate(cases):
                ms = timed(case.fn, 1, 0, device)
                if it >= warmup:
                    times[i].append(ms)
    else:
        for i, case in enumerate(cases):
            times[i] = [timed(case.fn, iters, warmup, device)]
    rows = []
    for i, case in enumerate(cases):
        row = dict(side=case.side, step=case.step, ms=statistics.median(times[i]), mbytes=case.mbytes,
                   mode="interleaved" if interleave else "back-to-back")
        if case.floor_bytes is not None:
            row["floor_bytes"] = case.floor_bytes
        rows.append(row)
    return rows


# ----- driver ---------------------------------------------------------------------------------


def run(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="a,b,c", help="comma-separated subset of a,b,c,m (m: MLPerf DLRMv2 tables, multi-hot)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--ratio", type=int, default=1000, help="full-table elements / ROBE array elements")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--kernels", default="auto", help="ROBE kernels to time, e.g. reference,cpu ('auto': the device's)")
    p.add_argument("--sides", default="robe,tbe,torch", help="which of robe,tbe,torch to run")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated ROBE array dtypes to time side by side: float32,bfloat16,float16 "
                        "(reduced precision: float32 accumulation and optimizer state)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of: {', '.join(STEPS)}")
    p.add_argument("--mode", default="both", choices=("back-to-back", "interleave", "both"),
                   help="back-to-back: each side's iterations in a row; interleave: the sides alternate step "
                        "by step on the same ids (as in a real model); both: one table per mode")
    p.add_argument("--interleave", action="store_true", help="same as --mode interleave")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="100x fewer rows (smoke test)")
    p.add_argument("--mlperf-row-scale", type=int, default=4, help="shape m: MLPerf rows divided by this")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sides = set(args.sides.split(","))
    steps = [s.strip() for s in args.steps.split(",")]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        p.error(f"unknown --steps {unknown}: choose from {', '.join(STEPS)}")
    dtypes = [d.strip() for d in args.dtype.split(",")]
    bad = [d for d in dtypes if d not in ARRAY_DTYPES]
    if bad:
        p.error(f"unknown --dtype {bad}: choose from {', '.join(ARRAY_DTYPES)}")
    mode = "interleave" if args.interleave else args.mode
    modes = [False, True] if mode == "both" else [mode == "interleave"]
    if "tbe" in sides and not tbe_available(device):
        print("# fbgemm-tbe skipped: this fbgemm build has no CUDA kernels (fbgemm-gpu-cpu)")
        sides.discard("tbe")
    all_shapes = shapes(args.batch, args.quick, args.mlperf_row_scale)
    kernels = [resolve_kernel(k, device) for k in args.kernels.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    copy_gbps = copy_bandwidth(device, max(args.iters, 5))
    print(f"# torch {torch.__version__}, {device} ({name}), batch {args.batch}, ROBE {args.ratio}x smaller, "
          f"Z={args.block_size}, median of {args.iters}; copy rate {copy_gbps:.0f} GB/s (read+write)")
    results: List[dict] = []
    for key in args.shapes.split(","):
        shape = all_shapes[key]
        ids, offsets = make_inputs(shape, device)
        makers: List[Callable[[str], Optional[Case]]] = []
        if "robe" in sides:
            makers += [
                robe_side(shape, ids, offsets, k, args.ratio, args.block_size, device, d)
                for k in dict.fromkeys(kernels)
                for d in dict.fromkeys(dtypes)
            ]
        if "tbe" in sides:
            makers.append(tbe_side(shape, ids, offsets, device))
        if "torch" in sides:
            makers.append(torch_bag_side(shape, ids, offsets, device))
        rows_by_mode: Dict[bool, List[dict]] = {m: [] for m in modes}
        for step in steps:
            cases = [c for c in (make(step) for make in makers) if c is not None]
            for interleave in modes:
                rows_by_mode[interleave] += time_cases(cases, args.iters, args.warmup, device, interleave)
            cases = []
            gc.collect()
        for interleave in modes:
            rows = rows_by_mode[interleave]
            for r in rows:
                r["shape"] = shape.name
            print_table(f"{shape.name}, {'interleaved' if interleave else 'back-to-back'}", rows, copy_gbps)
            results += rows
    return results


def print_table(title: str, rows: List[dict], copy_gbps: float) -> None:
    """Markdown table; speed-up against the baseline side (TBE if run, else torch-bag)."""
    base_side = "fbgemm-tbe" if any(r["side"] == "fbgemm-tbe" for r in rows) else "torch-bag"
    base = {r["step"]: r["ms"] for r in rows if r["side"] == base_side}
    head = f"{base_side} ms / this"
    print(f"\n## {title}")
    print(f"| {'side':<16} | {'step':<22} | {'median ms':>9} | {head:>20} | {'memory MB':>10} | {'floor GB/s (% copy)':>20} |")
    print(f"|{'-' * 18}|{'-' * 24}|{'-' * 11}|{'-' * 22}|{'-' * 12}|{'-' * 22}|")
    for r in rows:
        ref = base.get(r["step"])
        ratio = f"{ref / r['ms']:.2f}x" if ref else "-"
        bw = "-"
        if r.get("floor_bytes"):
            gbps = r["floor_bytes"] / (r["ms"] * 1e-3) / 1e9
            r["floor_gbps"] = gbps
            bw = f"{gbps:.0f} ({100 * gbps / copy_gbps:.0f}%)"
        print(f"| {r['side']:<16} | {r['step']:<22} | {r['ms']:>9.2f} | {ratio:>20} | {r['mbytes']:>10.1f} | {bw:>20} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
