"""DLRM_DCN inference throughput: ROBE (1000x) vs full tables, both measured in one run.

The MLPerf DLRMv2 model (DLRM_DCN, D=128, bottom 512-256-128, top 1024-1024-512-256-1, 3 cross
layers of low rank 512) on the 26 MLPerf tables with multi-hot pooling. The full-table side uses
torchrec's stock EmbeddingBagCollection with every table's rows divided by ``--row-scale`` (the
real tables, 104 GB of float32, fit no single GPU); the ROBE side uses one array sized from the
UNSCALED tables (``--ratio`` x smaller, about 105 MB at 1000x). Prints samples/s of the whole
model and of the embedding layer alone, median of ``--iters`` batches.

    python -m robe_torchrec.bench.inference --device cuda --batch 65536
    python -m robe_torchrec.bench.inference --quick          # CPU smoke run

With the CPU build of fbgemm under a CUDA torch (no CUDA kernels for the stock EBC's offsets), run
it through the development shims from the repository root:
``python -m tools.fbgemm_shims robe_torchrec.bench.inference --device cuda``.
"""

from __future__ import annotations

import argparse
import gc
from typing import List, Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM_DCN

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench.lookup import MLPERF_POOLING, MLPERF_ROWS, timed


def tables(row_scale: int, dim: int) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=max(1, rows // row_scale), feature_names=[f"cat_{i}"])
        for i, rows in enumerate(MLPERF_ROWS)
    ]


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
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.dim, args.row_scale = min(args.batch, 256), 16, 10_000
        args.block_size = min(args.block_size, args.dim)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # both sides alike
    dense, kjt = make_batch(args.batch, args.row_scale, device)
    robe_cfg = RobeConfig.from_compression(tables(1, args.dim), ratio=args.ratio, block_size=args.block_size)
    results = {}
    for side in ("robe", "full"):
        torch.manual_seed(0)
        if side == "robe":
            ebc = RobeEmbeddingBagCollection(tables(args.row_scale, args.dim), robe_cfg, device=device)
            mbytes = 4 * robe_cfg.num_elements / 1e6
        else:
            ebc = EmbeddingBagCollection(tables(args.row_scale, args.dim), device=device)
            mbytes = sum(p.numel() * 4 for p in ebc.parameters()) / 1e6
        model = dlrm_dcn(ebc, args.dim, device, args.quick)
        with torch.no_grad():
            model_ms = timed(lambda: model(dense, kjt), args.iters, args.warmup, device)
            emb_ms = timed(lambda: ebc(kjt), args.iters, args.warmup, device)
        results[side] = dict(model_ms=model_ms, emb_ms=emb_ms, mbytes=mbytes)
        model = ebc = None  # free this side before building the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# DLRM_DCN inference, {name}, torch {torch.__version__}, batch {args.batch}, D={args.dim}, "
          f"ROBE {args.ratio:g}x (Z={args.block_size}) of the full MLPerf tables; full tables rows/{args.row_scale}")
    print(f"| {'side':<12} | {'embedding MB':>12} | {'model ms':>9} | {'samples/s':>12} | {'embedding-only ms':>17} |")
    print(f"|{'-' * 14}|{'-' * 14}|{'-' * 11}|{'-' * 14}|{'-' * 19}|")
    for side, r in results.items():
        sps = args.batch / (r["model_ms"] * 1e-3)
        r["samples_per_s"] = sps
        print(f"| {side:<12} | {r['mbytes']:>12.1f} | {r['model_ms']:>9.2f} | {sps:>12,.0f} | {r['emb_ms']:>17.2f} |")
    speedup = results["full"]["model_ms"] / results["robe"]["model_ms"]
    emb_speedup = results["full"]["emb_ms"] / results["robe"]["emb_ms"]
    print(f"ROBE / full: {speedup:.2f}x samples/s (model), {emb_speedup:.2f}x (embedding layer alone)")
    results["speedup"], results["embedding_speedup"] = speedup, emb_speedup
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(argv)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
