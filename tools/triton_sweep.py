"""Tuning sweep of the Triton ROBE kernels (``robe_torchrec/ops/triton/``) on CUDA (a development tool).

For the shapes of the lookup benchmark, (a) 26 features one-hot and (b) the MLPerf DLRMv2 multi-hot
pooling factors, batch 65536, D = 128, Z in {32, 128}, m in {26*100000*128/1000, 26,135,627}, it
times, for a grid of launch parameters of each kernel kind (``robe_torchrec.ops.triton.BagConfig`` /
``UpdateConfig``: block_bags, unroll, num_warps, num_stages / block_chunks):

- ``forward``: ``pooled_forward``; every candidate's output must be bit-identical to the default
  configuration's (torch.equal: the forward adds each bag's lookups in input order);
- ``mark`` / ``scatter`` / ``update``: the three kernels of the fused backward (touched-chunk map,
  atomic scatter into the compact gradient, optimizer step); candidates checked against the
  default (touched map and update: equal; scatter: allclose, float atomics reorder sums);
- the whole fused step (rowwise_adagrad and sgd) with the defaults and with the best configs, and
  the record (sort-based) path, checked against each other.

Then a phase profile of the fused backward (CUDA events around each phase), a weighted + MEAN
check against the reference on a small batch, and a torch.profiler kernel table. Kernels are compiled up front by a pool of processes (Triton's disk
cache), so the measuring process finds them compiled. Prints compact tables last; writes every
measurement to ``$OUT/sweep.csv`` (or ``--out``) and the best configurations to ``best.json``.

    python -m tools.triton_sweep                      # from the repository root, on a CUDA machine
    TRITON_INTERPRET=1 python -m tools.triton_sweep --device cpu --tiny --batch 8 --m 997 --workers 0  # smoke test
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from robe_torchrec.ops.api import LookupBatch, OptimizerArgs

MLPERF_POOLING = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)
SHAPES = {"a": (1,) * 26, "b": MLPERF_POOLING}
TINY_SHAPES = {"a": (1,) * 3, "b": (3, 1, 7, 2)}  # --tiny: a smoke test under the interpreter
M_VALUES = (26 * 100_000 * 128 // 1000, 26_135_627)
Z_VALUES = (32, 128)
DIM = 128
LR, EPS = 0.01, 1e-8
OPTS = ("sgd", "rowwise_adagrad")


def _tk():
    """The Triton backend package (imported late: TRITON_INTERPRET may be set by then)."""
    from robe_torchrec.ops import triton as tk

    return tk


def _update_mode(opt: str):
    from robe_torchrec.ops.api import OptimizerKind
    from robe_torchrec.ops.triton.fused import UpdateMode

    return UpdateMode.of(OptimizerKind.parse(opt))


# ---- grids -------------------------------------------------------------------------------------


def bag_grid(kind: str, shape: str, z: int, tiny: bool) -> list:
    tk = _tk()
    C = tk.BagConfig
    if tiny:
        return [C(2, 1, 4), C(4, 2, 4), C(8, 4, 4, 2)] if shape == "b" else [C(2, 1, 4), C(8, 1, 4)]
    full = z == 32  # Z = 128: a smaller grid
    if kind == "mark":
        if shape == "a":
            return [C(bb, 1, 4) for bb in ((32, 64, 128, 256) if full else (32, 128))]
        return [C(bb, u, 4) for bb in ((16, 32, 64) if full else (32,)) for u in (2, 4, 8)]
    if shape == "a":
        bbs, warps = ((8, 16, 32, 64, 128), (2, 4, 8)) if full else ((8, 16, 32, 64), (4, 8))
        grid = [C(bb, 1, w) for bb in bbs for w in warps if 4 <= bb * 128 // (32 * w) <= 64]
        return grid + ([C(16, 1, 4, 3), C(32, 1, 8, 3)] if kind == "forward" and full else [])
    grid = []
    for bb in (8, 16, 32, 64) if full else (8, 16, 32):
        for u in (2, 4, 8):
            if bb * u > 256:
                continue
            for w in (4, 8) if full else (4,):
                per_thread = bb * 128 // (32 * w) * u  # gathered elements per thread and step
                if per_thread <= 64 or (w == 8 and per_thread <= 128):  # more spills registers
                    grid.append(C(bb, u, w))
    return grid + ([C(16, 4, 4, 3)] if kind == "forward" and full else [])


def update_grid(tiny: bool) -> list:
    tk = _tk()
    return [tk.UpdateConfig(4, 4)] if tiny else [tk.UpdateConfig(b, w) for b, w in ((16, 4), (64, 4), (256, 4), (64, 8))]


def cfg_str(cfg) -> str:
    if cfg is None:
        return "default"
    if isinstance(cfg, str):
        return cfg
    return "/".join(f"{k}={v}" for k, v in asdict(cfg).items())


# ---- inputs --------------------------------------------------------------------------------------


class Case:
    """One (shape, Z, m) combination with its inputs on the device."""

    def __init__(self, shape: str, z: int, m: int, batch: int, device: torch.device, seed: int = 0, tiny: bool = False):
        from robe_torchrec.hashing import table_key

        self.shape, self.z, self.m, self.batch, self.device = shape, z, m, batch, device
        pooling = TINY_SHAPES[shape] if tiny else SHAPES[shape]
        self.F = len(pooling)
        g = torch.Generator().manual_seed(seed)
        lengths = torch.tensor(pooling, dtype=torch.int64).repeat_interleave(batch)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        self.nnz = int(offsets[-1])
        self.ids = torch.randint(0, 100_000, (self.nnz,), generator=g, dtype=torch.int64).to(device)
        self.offsets = offsets.to(device)
        self.keys = torch.tensor([table_key(seed, f"t{f}") for f in range(self.F)], dtype=torch.int64).to(device)
        self.mean = torch.zeros(self.F, dtype=torch.bool, device=device)
        gd = torch.Generator(device=device).manual_seed(seed + 1)
        self.array = (torch.randn(m, generator=gd, device=device) * 0.01).contiguous()
        self.gout = torch.randn(batch, self.F * DIM, generator=gd, device=device)
        self.num_chunks = (m + z - 1) // z
        bags = self.F * batch
        self.fwd_floor = 8 * self.nnz + 8 * (bags + 1) + 4 * min(self.nnz * DIM, m) + 4 * bags * DIM
        self.bwd_floor = 4 * bags * DIM + 8 * self.nnz + 8 * (bags + 1) + 8 * min(self.nnz * DIM, m)

    @property
    def name(self) -> str:
        return f"{self.shape}/Z{self.z}/m{self.m}"

    def lookup(self, **changes) -> LookupBatch:
        b = LookupBatch(indices=self.ids, offsets=self.offsets, hash_keys=self.keys, mean=self.mean, weights=None,
                        batch_size=self.batch, dim=DIM, block_size=self.z, num_elements=self.m)
        return replace(b, **changes)

    def opt(self, opt: str, state: torch.Tensor) -> OptimizerArgs:
        return OptimizerArgs(opt, state, LR, EPS)

    def state(self, opt: str) -> torch.Tensor:
        if opt == "sgd":
            return torch.empty(0, device=self.device)
        return torch.zeros(self.num_chunks, device=self.device)


# ---- timing ------------------------------------------------------------------------------------


def bench(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU, host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)
    torch.cuda.synchronize()
    evs = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


class Marks:
    """Phase timing: named marks on the stream, durations between consecutive ones."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: List[Tuple[str, object]] = []

    def __call__(self, name: str) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append((name, e))
        else:
            self.points.append((name, time.perf_counter()))

    def durations(self) -> Dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.points, self.points[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


# ---- the sweep of one case -----------------------------------------------------------------------


class Sweep:
    def __init__(self, args, device, writer=None, shard: Optional[Tuple[int, int]] = None):
        self.args, self.device, self.writer = args, device, writer
        self.measure = shard is None
        self.shard = shard
        self.counter = 0
        self.rows: List[dict] = []
        self.seen: set = set()
        self.deadline = time.time() + args.budget_s
        self.copy_gbps = float("nan")

    # each item (one kernel variant) runs in exactly one precompile worker; all run when measuring
    def mine(self) -> bool:
        self.counter += 1
        if self.shard is None:
            return time.time() < self.deadline
        return (self.counter - 1) % self.shard[1] == self.shard[0]

    def reps(self, heavy: bool = False) -> int:
        return max(2, self.args.reps // (2 if heavy else 1))

    def record(self, case: Case, kind: str, opt: str, cfg, ms: float, floor: Optional[int] = None,
               check: str = "", maxdiff: float = float("nan"), note: str = "") -> dict:
        gbps = floor / (ms * 1e-3) / 1e9 if floor and ms == ms else float("nan")
        row = dict(case=case.name, shape=case.shape, Z=case.z, m=case.m, kind=kind, opt=opt, config=cfg_str(cfg),
                   ms=round(ms, 5), floor_gbps=round(gbps, 1), pct_copy=round(100 * gbps / self.copy_gbps, 1),
                   check=check, maxdiff=maxdiff, note=note)
        self.rows.append(row)
        if self.writer is not None:
            self.writer.writerow(row)
            self.args.csv_file.flush()
        return row

    def run_case(self, case: Case) -> None:
        from robe_torchrec.ops.triton import bags, fused, tuning

        tk, dev = _tk(), self.device
        lb = case.lookup()
        # the bag kernel does not specialise on m: when precompiling, its grid once per (shape, Z)
        grids = self.measure or (case.shape, case.z) not in self.seen
        self.seen.add((case.shape, case.z))
        z = case.z
        # ---- forward --------------------------------------------------------------------------
        tk.set_kernel_config("forward", None)
        ref = tk.pooled_forward(case.array, lb)
        if self.measure:
            self.record(case, "forward", "", None, bench(lambda: tk.pooled_forward(case.array, lb), dev, self.reps()),
                        case.fwd_floor, check="ref")
        for cfg in bag_grid("forward", case.shape, z, self.args.tiny) if grids else []:
            if not self.mine():
                continue
            tk.set_kernel_config("forward", cfg)
            try:
                out = tk.pooled_forward(case.array, lb)
                if self.measure:
                    ok = torch.equal(out, ref)
                    ms = bench(lambda: tk.pooled_forward(case.array, lb), dev, self.reps())
                    self.record(case, "forward", "", cfg, ms, case.fwd_floor, check="equal" if ok else "DIFF",
                                maxdiff=float((out - ref).abs().max()))
                del out
            except Exception as exc:  # a config that does not compile (resources) is skipped
                self.record(case, "forward", "", cfg, float("nan"), note=f"error: {type(exc).__name__}: {exc}"[:200])
        tk.set_kernel_config("forward", None)
        del ref

        # ---- fused backward: the three kernels one by one -------------------------------------
        gout = case.gout
        touched = torch.zeros(case.num_chunks, dtype=torch.int8, device=dev)
        bags.launch_bags("mark", bags.BagMode.MARK_CHUNKS, lb, touched, gout=gout)
        rank = torch.cumsum(touched, 0, dtype=torch.int32)
        num_uniq = int(rank[-1])
        compact_ref = torch.zeros(num_uniq, z, device=dev)
        bags.launch_bags("scatter", bags.BagMode.COMPACT_GRAD, lb, compact_ref, gout=gout, rank=rank)

        def mark_fn():
            bags.launch_bags("mark", bags.BagMode.MARK_CHUNKS, lb, t2, gout=gout)

        def scatter_fn():
            bags.launch_bags("scatter", bags.BagMode.COMPACT_GRAD, lb, c2, gout=gout, rank=rank)

        if self.measure:
            t2 = torch.zeros_like(touched)
            self.record(case, "mark", "", None, bench(mark_fn, dev, self.reps()), check="ref", note=f"U={num_uniq}")
        if self.mine():  # the other marking variant (store only / load first), default launch parameters
            saved = tuning.MARK_LOAD_FIRST
            tuning.MARK_LOAD_FIRST = not saved
            try:
                t2 = torch.zeros_like(touched)
                mark_fn()
                if self.measure:
                    ok = torch.equal(t2, touched)
                    self.record(case, "mark", "", f"load_first={not saved}", bench(mark_fn, dev, self.reps()),
                                check="equal" if ok else "DIFF")
            finally:
                tuning.MARK_LOAD_FIRST = saved
            c2 = torch.zeros_like(compact_ref)
            self.record(case, "scatter", "", None, bench(scatter_fn, dev, self.reps()), check="ref")
        for kind in ("mark", "scatter"):
            for cfg in bag_grid(kind, case.shape, z, self.args.tiny) if grids else []:
                if not self.mine():
                    continue
                tk.set_kernel_config(kind, cfg)
                try:
                    if kind == "mark":
                        t2 = torch.zeros_like(touched)
                        mark_fn()
                        ok, diff = torch.equal(t2, touched), float("nan")
                        fn = mark_fn
                    else:
                        c2 = torch.zeros_like(compact_ref)
                        scatter_fn()
                        diff = float((c2 - compact_ref).abs().max()) if c2.numel() else 0.0
                        ok = bool(torch.allclose(c2, compact_ref, rtol=1e-4, atol=1e-3))
                        fn = scatter_fn
                    if self.measure:
                        self.record(case, kind, "", cfg, bench(fn, dev, self.reps()),
                                    check=("equal" if kind == "mark" else "close") if ok else "DIFF", maxdiff=diff)
                except Exception as exc:
                    self.record(case, kind, "", cfg, float("nan"), note=f"error: {type(exc).__name__}: {exc}"[:200])
                tk.set_kernel_config(kind, None)

        for opt in OPTS:
            mode = _update_mode(opt)
            st0 = case.state(opt)
            arr_ref, st_ref = case.array.clone(), st0.clone()
            fused.launch_chunk_update(arr_ref, st_ref if opt != "sgd" else arr_ref, compact_ref, rank, mode, LR, EPS,
                                      touched=touched)
            for cfg in [None] + update_grid(self.args.tiny):
                if cfg is not None and not self.mine():
                    continue
                tk.set_kernel_config("update", cfg)
                arr, st = case.array.clone(), st0.clone()
                st_arg = st if opt != "sgd" else arr
                fused.launch_chunk_update(arr, st_arg, compact_ref, rank, mode, LR, EPS, touched=touched)
                ok = torch.equal(arr, arr_ref) and torch.equal(st, st_ref)
                if self.measure:
                    ms = bench(lambda: fused.launch_chunk_update(arr, st_arg, compact_ref, rank, mode, LR, EPS,
                                                                 touched=touched), dev, self.reps())
                    self.record(case, "update", opt, cfg, ms, check="ref" if cfg is None else "equal" if ok else "DIFF")
                tk.set_kernel_config("update", None)
        compact_ref = None  # free it before the whole-step timings

        # ---- whole fused step: default, best, record path; checked against each other -------
        for opt in OPTS:
            st0 = case.state(opt)
            arr, st = case.array.clone(), st0.clone()
            tk.pooled_backward_fused(gout, arr, lb, case.opt(opt, st))
            if self.measure:
                a2, s2 = case.array.clone(), st0.clone()
                ms = bench(lambda: tk.pooled_backward_fused(gout, a2, lb, case.opt(opt, s2)), dev, self.reps(True))
                self.record(case, "fused", opt, None, ms, case.bwd_floor, check="ref")
                ms = bench(lambda: (tk.pooled_forward(a2, lb), tk.pooled_backward_fused(gout, a2, lb, case.opt(opt, s2))),
                           dev, self.reps(True))
                self.record(case, "train", opt, None, ms, check="ref")
                best = self.best_configs(case)
                for kind, cfg in best.items():
                    tk.set_kernel_config(kind, cfg)
                a3, s3 = case.array.clone(), st0.clone()
                tk.pooled_backward_fused(gout, a3, lb, case.opt(opt, s3))
                diff = float((a3 - arr).abs().max())
                ok = bool(torch.allclose(a3, arr, rtol=1e-4, atol=1e-5)) and bool(torch.allclose(s3, st, rtol=1e-4, atol=1e-6))
                ms = bench(lambda: tk.pooled_backward_fused(gout, a3, lb, case.opt(opt, s3)), dev, self.reps(True))
                self.record(case, "fused", opt, "best", ms, case.bwd_floor, check="close" if ok else "DIFF", maxdiff=diff,
                            note=";".join(f"{k}:{cfg_str(c)}" for k, c in best.items()))
                # a training step: forward + fused backward, best configs
                fwd_best = self.best_of(case, "forward")
                tk.set_kernel_config("forward", fwd_best)
                ms = bench(lambda: (tk.pooled_forward(a3, lb), tk.pooled_backward_fused(gout, a3, lb, case.opt(opt, s3))),
                           dev, self.reps(True))
                self.record(case, "train", opt, "best", ms, check="close" if ok else "DIFF",
                            note=f"forward:{cfg_str(fwd_best)}")
                for kind in ("forward", "mark", "scatter", "update"):
                    tk.set_kernel_config(kind, None)
            if z == 32 and self.mine():  # the sort-based record path (for huge, sparse arrays)
                saved = fused.TOUCHED_MAP_MIN, fused.TOUCHED_MAP_RATIO
                fused.TOUCHED_MAP_MIN, fused.TOUCHED_MAP_RATIO = 0, 0
                try:
                    a5, s5 = case.array.clone(), st0.clone()
                    tk.pooled_backward_fused(gout, a5, lb, case.opt(opt, s5))
                    if self.measure:
                        ok = bool(torch.allclose(a5, arr, rtol=1e-4, atol=1e-5)) and bool(torch.allclose(s5, st, rtol=1e-4, atol=1e-6))
                        diff = float((a5 - arr).abs().max())
                        ms = bench(lambda: tk.pooled_backward_fused(gout, a5, lb, case.opt(opt, s5)), dev, self.reps(True))
                        self.record(case, "fused", opt, "sortpath", ms, case.bwd_floor, check="close" if ok else "DIFF",
                                    maxdiff=diff, note="unique/searchsorted record path")
                finally:
                    fused.TOUCHED_MAP_MIN, fused.TOUCHED_MAP_RATIO = saved

    def best_of(self, case: Case, kind: str, opt: str = ""):
        tk = _tk()
        cands = [r for r in self.rows if r["case"] == case.name and r["kind"] == kind and r["opt"] == opt
                 and r["check"] in ("equal", "close") and r["ms"] == r["ms"] and r["config"] not in ("best", "sortpath")
                 and "=" in r["config"] and "load_first" not in r["config"]]
        default = [r for r in self.rows if r["case"] == case.name and r["kind"] == kind and r["opt"] == opt
                   and r["config"] == "default"]
        if not cands or (default and min(c["ms"] for c in cands) >= default[0]["ms"]):
            return None
        best = min(cands, key=lambda r: r["ms"])
        vals = dict(kv.split("=") for kv in best["config"].split("/"))
        cls = tk.UpdateConfig if kind == "update" else tk.BagConfig
        return cls(**{k: int(v) for k, v in vals.items()})

    def best_configs(self, case: Case) -> dict:
        out = {}
        for kind, opt in (("mark", ""), ("scatter", ""), ("update", "rowwise_adagrad")):
            cfg = self.best_of(case, kind, opt)
            if cfg is not None:
                out[kind] = cfg
        return out


# ---- phase profile -----------------------------------------------------------------------------


def profile_phases(case: Case, opt: str, reps: int) -> Dict[str, Dict[str, float]]:
    """Median milliseconds of each phase of the default (touched-map) fused backward."""
    from robe_torchrec.ops.triton import bags, fused

    dev, z, lb, gout = case.device, case.z, case.lookup(), case.gout
    mode = _update_mode(opt)
    runs = []
    for _ in range(reps):
        arr, st = case.array.clone(), case.state(opt)
        st_arg = st if opt != "sgd" else arr
        mk = Marks(dev)
        mk("start")
        touched = torch.zeros(case.num_chunks, dtype=torch.int8, device=dev)
        bags.launch_bags("mark", bags.BagMode.MARK_CHUNKS, lb, touched, gout=gout)
        mk("1 mark touched chunks (hash)")
        rank = torch.cumsum(touched, 0, dtype=torch.int32)
        num_uniq = int(rank[-1])
        mk("2 cumsum + host sync for U")
        compact = torch.zeros(num_uniq, z, device=dev)
        mk("3 zero compact [U,Z]")
        bags.launch_bags("scatter", bags.BagMode.COMPACT_GRAD, lb, compact, gout=gout, rank=rank)
        mk("4 scatter (hash + atomics)")
        fused.launch_chunk_update(arr, st_arg, compact, rank, mode, LR, EPS, touched=touched)
        mk("5 optimizer")
        runs.append(mk.durations())
    return {"touched map": {k: statistics.median(r[k] for r in runs) for k in runs[0]}}


def torch_profile(case: Case, opt: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    tk = _tk()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.type == "cuda" else [])
    arr, st = case.array.clone(), case.state(opt)
    tk.pooled_forward(arr, case.lookup())
    tk.pooled_backward_fused(case.gout, arr, case.lookup(), case.opt(opt, st))
    with profile(activities=acts) as prof:
        tk.pooled_forward(arr, case.lookup())
        tk.pooled_backward_fused(case.gout, arr, case.lookup(), case.opt(opt, st))
        if case.device.type == "cuda":
            torch.cuda.synchronize()
    for key in ("self_device_time_total", "self_cuda_time_total", "cpu_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50)
        except Exception:
            continue
    return "(profiler table unavailable)"


# ---- driver --------------------------------------------------------------------------------------


def cases_list(args) -> List[Tuple[str, int, int]]:
    shapes = args.shapes.split(",")
    zs = [int(z) for z in args.z.split(",")]
    ms = [int(m) for m in args.m.split(",")] if args.m else list(M_VALUES)
    out = []
    for z in zs:  # most informative first: Z = 32, the small array, multi-hot
        for m in ms:
            for s in sorted(shapes, key=lambda x: x != "b"):
                out.append((s, z, m))
    return out


def _precompile_worker(argv: List[str], shard: Tuple[int, int]) -> str:
    args = parse(argv)
    device = torch.device(args.device)
    sw = Sweep(args, device, shard=shard)
    t0 = time.time()
    n_err = 0
    for s, z, m in cases_list(args):
        try:
            case = Case(s, z, m, args.warm_batch, device, tiny=args.tiny)
            sw.run_case(case)
            if s == "b" and z == int(args.z.split(",")[0]):
                if shard[0] == 0:
                    profile_phases(case, "rowwise_adagrad", 1)
                if shard[0] == 1 % shard[1]:
                    check_weighted(case)
        except Exception as exc:  # compiled on demand later
            n_err += 1
            print(f"# precompile shard {shard}: {s}/{z}/{m}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return f"shard {shard[0]}: {sw.counter} items, {time.time() - t0:.1f}s, {n_err} errors"


def check_mod(device: torch.device) -> str:
    """Block starts of the Triton hash (exact fp64 modular reduction) vs the torch hash."""
    from robe_torchrec.hashing import block_offsets, table_key

    tk = _tk()
    g = torch.Generator().manual_seed(5)
    bad = total = 0
    for m in (37, 332_800, 26_135_627, 2**31 + 11, 2**47 + 5, 2**48):
        ids = torch.cat([torch.randint(-(2**63), 2**63 - 1, (20000,), generator=g),
                         torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
        k0, k1 = table_key(3, "t")
        exp = block_offsets(ids, torch.full_like(ids, k0), torch.full_like(ids, k1), 4, m)
        got = tk.block_offsets_triton(ids.to(device), k0, k1, 4, m).cpu()
        bad += int((exp != got).sum())
        total += exp.numel()
    return f"hash block starts vs torch: {bad} mismatches of {total}"


def check_weighted(case: Case, batch: int = 64) -> str:
    """Weighted + MEAN pooling on a small batch of the case's shape: Triton forward, dense gradient
    and fused rowwise_adagrad step against the reference kernel API (default launch parameters)."""
    from robe_torchrec.ops import reference as ref

    tk = _tk()
    small = Case(case.shape, case.z, case.m, batch, case.device, seed=3, tiny=case.F != len(SHAPES[case.shape]))
    g = torch.Generator(device=case.device).manual_seed(9)
    w = torch.rand(small.nnz, generator=g, device=case.device) * 2 - 0.5
    mean = torch.tensor([f % 2 == 0 for f in range(small.F)], device=case.device)
    lb = small.lookup(weights=w, mean=mean)
    out, expected = tk.pooled_forward(small.array, lb), ref.pooled_forward(small.array, lb)
    arr, st = small.array.clone(), small.state("rowwise_adagrad")
    tk.pooled_backward_fused(small.gout, arr, lb, small.opt("rowwise_adagrad", st))
    arr2, st2 = small.array.clone(), small.state("rowwise_adagrad")
    ref.pooled_backward_fused(small.gout, arr2, lb, small.opt("rowwise_adagrad", st2))
    dense, dense2 = tk.pooled_backward_dense(small.gout, lb), ref.pooled_backward_dense(small.gout, lb)
    return (f"weighted+mean {small.name} batch {batch} vs reference: forward max|diff| {float((out - expected).abs().max()):.3g}, "
            f"fused array {float((arr - arr2).abs().max()):.3g} state {float((st - st2).abs().max()):.3g}, "
            f"dense grad max|diff| {float((dense - dense2).abs().max()):.3g} (max|g| {float(dense2.abs().max()):.3g})")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--warm-batch", type=int, default=256, help="batch of the precompile runs")
    p.add_argument("--shapes", default="a,b")
    p.add_argument("--z", default="32,128")
    p.add_argument("--m", default="", help="comma-separated array sizes (default: the two of the issue)")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--workers", type=int, default=-1, help="precompile processes (-1: cores - 2, 0: none)")
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting new measurements after this")
    p.add_argument("--precompile-timeout-s", type=float, default=75.0)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny grids (use with a small --batch and --m)")
    p.add_argument("--no-profile", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    t_start = time.time()
    args = parse(argv)
    device = torch.device(args.device)
    tk = _tk()
    os.makedirs(args.out, exist_ok=True)
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)" if tk.interpreted() else "cpu"
    print(f"# triton sweep: {name}, torch {torch.__version__}, triton {triton.__version__}, batch {args.batch}, D {DIM}", flush=True)

    # 1. compile every kernel variant in parallel processes (Triton's disk cache)
    workers = args.workers if args.workers >= 0 else max(1, (os.cpu_count() or 2) - 2)
    if workers > 0:
        argv_list = list(argv) if argv is not None else sys.argv[1:]
        t0 = time.time()
        try:
            from concurrent.futures import ProcessPoolExecutor, wait

            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            futs = [pool.submit(_precompile_worker, argv_list, (i, workers)) for i in range(workers)]
            done, pending = wait(futs, timeout=args.precompile_timeout_s)
            res = [f.result() if not f.exception() else repr(f.exception()) for f in done]
            for proc in list(getattr(pool, "_processes", {}).values()):  # stragglers: compiled on demand
                if proc.is_alive():
                    proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"# precompile: {workers} processes, {time.time() - t0:.1f}s, {len(pending)} unfinished; "
                  + "; ".join(res[:4]) + " ...", flush=True)
        except Exception as exc:
            print(f"# precompile failed ({type(exc).__name__}: {exc}); compiling on demand", flush=True)

    # 2. ceilings and exactness
    sw_args = args
    sw_args.csv_file = open(os.path.join(args.out, "sweep.csv"), "w", newline="")
    fields = ["case", "shape", "Z", "m", "kind", "opt", "config", "ms", "floor_gbps", "pct_copy", "check", "maxdiff", "note"]
    writer = csv.DictWriter(sw_args.csv_file, fieldnames=fields)
    writer.writeheader()
    sw = Sweep(sw_args, device, writer=writer)
    sw.deadline = t_start + args.budget_s
    if device.type == "cuda":
        n = 1 << 28
        src = torch.empty(n, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src), device, 10, 2)
        sw.copy_gbps = 8 * n / (ms * 1e-3) / 1e9
        del src, dst
    notes = [f"copy rate {sw.copy_gbps:.0f} GB/s (read+write)", check_mod(device)]
    print("# " + notes[0] + "; " + notes[1], flush=True)

    # 3. the cases
    phase_tables = []
    for s, z, m in cases_list(args):
        if time.time() > sw.deadline:
            notes.append(f"skipped {s}/Z{z}/m{m}: over budget")
            continue
        t0 = time.time()
        case = Case(s, z, m, args.batch, device, tiny=args.tiny)
        try:
            sw.run_case(case)
        except Exception as exc:
            notes.append(f"{case.name}: {type(exc).__name__}: {exc}")
            print(f"# {case.name} failed: {exc!r}", flush=True)
        if s == "b" and z == 32 and time.time() < sw.deadline:
            for opt in ("rowwise_adagrad",):
                phase_tables.append((case.name, opt, profile_phases(case, opt, 3)))
            notes.append(check_weighted(case))
            if not args.no_profile and m == M_VALUES[0]:
                try:
                    phase_tables.append((case.name, "torch.profiler", torch_profile(case, "rowwise_adagrad")))
                except Exception as exc:
                    notes.append(f"torch.profiler failed: {exc!r}")
        print(f"# {case.name}: {time.time() - t0:.1f}s", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 4. summary
    best_all = {}
    print("\n## best vs default (median ms; floor GB/s and % of copy for forward / fused)")
    print(f"| {'case':<20} | {'kind':<8} | {'opt':<15} | {'default':>8} | {'best':>8} | {'best GB/s (%copy)':>17} | best config")
    print("|" + "|".join("-" * w for w in (22, 10, 17, 10, 10, 19, 40)) + "|")
    for s, z, m in cases_list(args):
        cname = f"{s}/Z{z}/m{m}"
        for kind, opt in (("forward", ""), ("mark", ""), ("scatter", ""), ("update", "rowwise_adagrad"),
                          ("update", "sgd"), ("fused", "rowwise_adagrad"), ("fused", "sgd"), ("train", "rowwise_adagrad"),
                          ("train", "sgd")):
            rows = [r for r in sw.rows if r["case"] == cname and r["kind"] == kind and r["opt"] == opt]
            if not rows:
                continue
            get = lambda c: next((r for r in rows if r["config"] == c), None)  # noqa: E731
            dflt = get("default")
            good = [r for r in rows if r["check"] in ("equal", "close", "ref") and r["ms"] == r["ms"]
                    and r["config"] != "sortpath"]
            bad = [r for r in rows if r["check"] == "DIFF"]
            best = min(good, key=lambda r: r["ms"]) if good else None
            if best is not None and kind in ("forward", "mark", "scatter", "update"):
                best_all.setdefault(cname, {})[kind + (f":{opt}" if opt else "")] = dict(config=best["config"], ms=best["ms"])
            f = lambda r: f"{r['ms']:.3f}" if r else "-"  # noqa: E731
            bw = f"{best['floor_gbps']:.0f} ({best['pct_copy']:.0f}%)" if best and best["floor_gbps"] == best["floor_gbps"] else "-"
            cfg = best["config"] if best else "-"
            if kind in ("fused", "train") and best and best["config"] == "best":
                cfg = best["note"] or "defaults"
            print(f"| {cname:<20} | {kind:<8} | {opt:<15} | {f(dflt):>8} | {f(best):>8} | {bw:>17} | {cfg}"
                  + (f"  !! {len(bad)} DIFF" if bad else ""))
    for cname, title, tab in phase_tables:
        print(f"\n## fused backward phases, {cname}, {title}")
        if isinstance(tab, str):
            print(tab)
            continue
        for side, d in tab.items():
            tot = sum(d.values())
            print(f"{side:>7}: total {tot:.3f} ms | " + " | ".join(f"{k} {v:.3f}" for k, v in d.items()))
    diffs = [r for r in sw.rows if r["check"] == "DIFF"]
    print(f"\n# checks: {len(diffs)} DIFF of {sum(1 for r in sw.rows if r['check'])} checked rows")
    for r in diffs[:10]:
        print(f"#   DIFF {r['case']} {r['kind']} {r['opt']} {r['config']} maxdiff {r['maxdiff']}")
    for n in notes:
        print("# " + n)
    with open(os.path.join(args.out, "best.json"), "w") as fh:
        json.dump(dict(device=name, copy_gbps=sw.copy_gbps, best=best_all, notes=notes), fh, indent=1)
    sw_args.csv_file.close()
    print(f"# total {time.time() - t_start:.1f}s; rows {len(sw.rows)} -> {os.path.join(args.out, 'sweep.csv')}")


if __name__ == "__main__":
    main()
