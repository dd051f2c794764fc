"""DLRM_DCN inference throughput: ROBE (1000x) vs full tables, both measured in one run.

The MLPerf DLRMv2 model (DLRM_DCN, D=128, bottom 512-256-128, top 1024-1024-512-256-1, 3 cross
layers of low rank 512) on the 26 MLPerf tables with multi-hot pooling. The full-table side uses
torchrec's stock EmbeddingBagCollection with every table's rows divided by ``--row-scale`` (the
real tables, 104 GB of float32, fit no single GPU); the ROBE side uses one array sized from the
UNSCALED tables (``--ratio`` x smaller, about 105 MB at 1000x). A third side, ``free``, replaces
the embedding layer by a constant (the KeyedTensor of one ROBE forward, returned as is): the
free-embedding bound, what the rest of the model costs. Prints samples/s of the whole model and
of the embedding layer alone, median of ``--iters`` batches, and each side against the bound.

``--precision`` sets the MLPs' math on every side alike: ``fp32``, ``tf32`` (TF32 matmuls) or
``bf16`` (bfloat16 autocast, a real serving set-up). ``--full-dtype bfloat16`` stores the full
tables in bf16 (52 GB for the unscaled MLPerf tables, which fit one H200 for inference:
``--row-scale 1``).

    python -m robe_torchrec.bench.inference --device cuda --batch 65536
    python -m robe_torchrec.bench.inference --device cuda --precision bf16 --row-scale 1 --full-dtype bfloat16
    python -m robe_torchrec.bench.inference --quick          # CPU smoke run

With the CPU build of fbgemm under a CUDA torch (no CUDA kernels for the stock EBC's offsets), run
it through the development shims from the repository root:
``python -m tools.fbgemm_shims robe_torchrec.bench.inference --device cuda``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from typing import Callable, ContextManager, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.models.dlrm import DLRM_DCN

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench.lookup import MLPERF_POOLING, MLPERF_ROWS, timed


def tables(row_scale: int, dim: int, data_type: DataType = DataType.FP32) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=max(1, rows // row_scale),
                           feature_names=[f"cat_{i}"], data_type=data_type)
        for i, rows in enumerate(MLPERF_ROWS)
    ]


class FreeEmbedding(torch.nn.Module):
    """An embedding layer that costs nothing: returns a fixed KeyedTensor whatever the ids.

    Stands in for the embedding collection in DLRM_DCN (which asks its configs for the feature
    names and dims) to measure the rest of the model alone.
    """

    def __init__(self, configs: List[EmbeddingBagConfig], output: KeyedTensor) -> None:
        super().__init__()
        self._configs = configs
        self.output = output

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.output


def precision_context(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The MLPs' math: sets TF32 globally (both sides alike); bf16 returns an autocast context."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"--precision must be fp32, tf32 or bf16, got {precision!r}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_batch(batch: int, row_scale: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(MLPERF_POOLING, dtype=torch.int64).repeat_interleave(batch)
    ids = torch.cat(
        [torch.randint(0, max(1, r // row_scale), (batch * pf,), generator=g) for r, pf in zip(MLPERF_ROWS, MLPERF_POOLING)]
    )
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    kjt = KeyedJaggedTensor(
        keys=[f"cat_{i}" for i in range(26)], values=ids.to(device), lengths=lengths.to(device), offsets=offsets.to(device)
    )
    dense = torch.rand(batch, 13, generator=g).to(device)
    return dense, kjt


def dlrm_dcn(ebc: torch.nn.Module, dim: int, device: torch.device, quick: bool) -> torch.nn.Module:
    bottom, top, rank = ([64, dim], [64, 1], 16) if quick else ([512, 256, dim], [1024, 1024, 512, 256, 1], 512)
    return DLRM_DCN(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=bottom,
        over_arch_layer_sizes=top,
        dcn_num_layers=3,
        dcn_low_rank_dim=rank,
        dense_device=device,
    ).to(device).eval()


def run(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ratio", type=float, default=1000.0)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--row-scale", type=int, default=4, help="full-table side: MLPerf rows divided by this")
    p.add_argument("--precision", default="tf32", choices=("fp32", "tf32", "bf16"), help="the MLPs' math, all sides")
    p.add_argument("--full-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage of the full tables")
    p.add_argument("--sides", default="robe,full,free", help="comma list of robe, full, free")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.dim, args.row_scale = min(args.batch, 256), 16, 10_000
        args.block_size = min(args.block_size, args.dim)
    autocast = precision_context(args.precision, device)
    sides = args.sides.split(",")
    if not set(sides) <= {"robe", "full", "free"} or not sides:
        raise SystemExit(f"--sides: choose from robe, full, free; got {args.sides!r}")
    full_type = {"float32": DataType.FP32, "bfloat16": DataType.BF16, "float16": DataType.FP16}[args.full_dtype]
    dense, kjt = make_batch(args.batch, args.row_scale, device)
    robe_cfg = RobeConfig.from_compression(tables(1, args.dim), ratio=args.ratio, block_size=args.block_size)
    results = {}
    for side in sides:
        torch.manual_seed(0)
        if side == "full":
            ebc = EmbeddingBagCollection(tables(args.row_scale, args.dim, full_type), device=device)
            mbytes = sum(p.numel() * p.element_size() for p in ebc.parameters()) / 1e6
        else:
            ebc = RobeEmbeddingBagCollection(tables(args.row_scale, args.dim), robe_cfg, device=device)
            mbytes = 4 * robe_cfg.num_elements / 1e6
            if side == "free":
                with torch.no_grad():
                    ebc = FreeEmbedding(ebc.embedding_bag_configs(), ebc(kjt))
                mbytes = 0.0
        model = dlrm_dcn(ebc, args.dim, device, args.quick)
        with torch.no_grad(), autocast():
            model_ms = timed(lambda: model(dense, kjt), args.iters, args.warmup, device)
            emb_ms = timed(lambda: ebc(kjt), args.iters, args.warmup, device)
        results[side] = dict(model_ms=model_ms, emb_ms=emb_ms, mbytes=mbytes)
        model = ebc = None  # free this side before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# DLRM_DCN inference, {name}, torch {torch.__version__}, batch {args.batch}, D={args.dim}, "
          f"MLPs {args.precision}, ROBE {args.ratio:g}x (Z={args.block_size}) of the full MLPerf tables; "
          f"full tables rows/{args.row_scale} in {args.full_dtype}; free = constant embeddings")
    print(f"| {'side':<12} | {'embedding MB':>12} | {'model ms':>9} | {'samples/s':>12} | {'embedding-only ms':>17} | {'vs free':>8} |")
    print(f"|{'-' * 14}|{'-' * 14}|{'-' * 11}|{'-' * 14}|{'-' * 19}|{'-' * 10}|")
    free_ms = results.get("free", {}).get("model_ms")
    for side, r in results.items():
        sps = args.batch / (r["model_ms"] * 1e-3)
        r["samples_per_s"] = sps
        vs_free = f"{r['model_ms'] / free_ms:.3f}x" if free_ms else "n/a"
        print(f"| {side:<12} | {r['mbytes']:>12.1f} | {r['model_ms']:>9.2f} | {sps:>12,.0f} | {r['emb_ms']:>17.2f} | {vs_free:>8} |")
    if "robe" in results and "full" in results:
        speedup = results["full"]["model_ms"] / results["robe"]["model_ms"]
        emb_speedup = results["full"]["emb_ms"] / results["robe"]["emb_ms"]
        print(f"ROBE / full: {speedup:.2f}x samples/s (model), {emb_speedup:.2f}x (embedding layer alone)")
        results["speedup"], results["embedding_speedup"] = speedup, emb_speedup
    if free_ms and "robe" in results:
        print(f"ROBE model time / free-embedding bound: {results['robe']['model_ms'] / free_ms:.3f} (goal <= 1.10)")
        if "full" in results:
            print(f"full tables model time / free-embedding bound: {results['full']['model_ms'] / free_ms:.3f}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
