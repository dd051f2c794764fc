"""The GPU gather limit: ROBE's memory access pattern without the hash, measured beside the real forward.

The ROBE forward reads each bag's ids, gathers D/Z blocks of Z contiguous array elements per id
from random positions, sums them per bag and writes one [D] row per bag. This benchmark runs a
Triton kernel that does exactly those memory operations with the same tile shape (a program per
BLOCK_BAGS bags of one feature, the Z elements of a block on consecutive lanes) but replaces the
hash by one multiply and a mask into a power-of-two array: what the memory system can give to
that access pattern, the ceiling for the real kernel. It prints, for each shape, the rate of both
(gathered GB/s: ``nnz * D * element bytes / time``) and their ratio, in one run.

    python -m robe_torchrec.bench.gather_limit --device cuda --batch 65536 --shapes a,b,m
    TRITON_INTERPRET=1 python -m robe_torchrec.bench.gather_limit --quick   # CPU smoke run

The gather array has the largest power of two of elements not above the ROBE array's m (so the
ceiling is never helped by a larger footprint), plus Z elements so no block wraps. ``--dtype
bfloat16`` halves the bytes per element on both sides where the ROBE kernel accepts bf16 arrays
(otherwise its column reads ``n/a``).
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch

from robe_torchrec.bench.lookup import Shape, make_inputs, shapes, timed
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.lookup import robe_pooled_lookup
from robe_torchrec.ops.triton.common import MAX_COMBINE, next_pow2, tl, triton

# Knuth's multiplicative constant: spreads consecutive ids over the array like the hash does.
_MULT = 2654435761

if triton is not None:

    @triton.jit
    def gather_bags_kernel(
        array_ptr, indices_ptr, offsets_ptr, out_ptr, B, mask_m, row_stride,
        DIM: tl.constexpr, Z: tl.constexpr, NB_PAD: tl.constexpr, Z_PAD: tl.constexpr, BLOCK_BAGS: tl.constexpr,
        MULT: tl.constexpr,
    ):
        """Program (bag group, feature): for each id, D/Z blocks at ``((id*NB + c) * MULT) & mask_m``."""
        NB: tl.constexpr = DIM // Z
        f = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_BAGS + tl.arange(0, BLOCK_BAGS)
        bag_ok = bags < B
        gbag = f.to(tl.int64) * B + bags
        start = tl.load(offsets_ptr + gbag, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + gbag + 1, mask=bag_ok, other=0) - start
        c = tl.arange(0, NB_PAD)
        k = tl.arange(0, Z_PAD)
        blk_ok = tl.broadcast_to(((c < NB)[:, None] & (k < Z)[None, :])[None, :, :], (BLOCK_BAGS, NB_PAD, Z_PAD))
        acc = tl.full([BLOCK_BAGS, NB_PAD, Z_PAD], 0.0, tl.float32)
        max_len = tl.reduce(length, 0, MAX_COMBINE)
        for i in range(0, max_len):
            live = bag_ok & (i < length)
            ids = tl.load(indices_ptr + start + i, mask=live, other=0)
            s = ((ids[:, None] * NB + c[None, :].to(tl.int64)) * MULT) & mask_m  # [BLOCK_BAGS, NB_PAD]
            ok = blk_ok & tl.broadcast_to(live[:, None, None], (BLOCK_BAGS, NB_PAD, Z_PAD))
            acc += tl.load(array_ptr + s[:, :, None] + k[None, None, :], mask=ok, other=0.0).to(tl.float32)
        col = f * DIM + c[:, None] * Z + k[None, :]
        out_off = bags.to(tl.int64)[:, None, None] * row_stride + col[None, :, :]
        store_ok = blk_ok & tl.broadcast_to(bag_ok[:, None, None], (BLOCK_BAGS, NB_PAD, Z_PAD))
        tl.store(out_ptr + out_off, acc, mask=store_ok)


def gather_bags(array: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, num_features: int, batch: int,
                dim: int, z: int, block_bags: int = 8) -> torch.Tensor:
    """Pooled [B, F*dim] float32 of the multiply-and-mask pattern (see :func:`gather_reference`).

    ``array`` has ``2**p + z`` elements; block starts are masked to ``[0, 2**p)``.
    """
    span = array.numel() - z
    if span <= 0 or span & (span - 1):
        raise ValueError(f"the gather array must hold 2**p + Z elements, got {array.numel()} with Z={z}")
    out = torch.empty(batch, num_features * dim, dtype=torch.float32, device=array.device)
    block_bags = min(block_bags, next_pow2(batch))
    grid = (triton.cdiv(batch, block_bags), num_features)
    gather_bags_kernel[grid](
        array, ids, offsets, out, batch, span - 1, num_features * dim,
        DIM=dim, Z=z, NB_PAD=next_pow2(dim // z), Z_PAD=next_pow2(z), BLOCK_BAGS=block_bags, MULT=_MULT,
    )
    return out


def gather_reference(array: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, num_features: int, batch: int,
                     dim: int, z: int) -> torch.Tensor:
    """The same pooled result in plain PyTorch (int64 wrap-around arithmetic, like the kernel's)."""
    nb, span = dim // z, array.numel() - z
    c = torch.arange(nb, dtype=torch.int64, device=ids.device)
    starts = ((ids[:, None] * nb + c[None, :]) * _MULT) & (span - 1)
    rows = array.float()[starts[:, :, None] + torch.arange(z, device=ids.device)].reshape(-1, dim)
    bag = torch.repeat_interleave(torch.arange(num_features * batch, device=ids.device), offsets.diff())
    pooled = torch.zeros(num_features * batch, dim, device=ids.device).index_add_(0, bag, rows)
    return pooled.view(num_features, batch, dim).permute(1, 0, 2).reshape(batch, num_features * dim)


def measure(shape: Shape, ratio: float, z: int, dtype: torch.dtype, iters: int, warmup: int,
            device: torch.device, block_bags: int) -> Dict[str, object]:
    """One shape: gathered GB/s of the gather ceiling and of the ROBE forward, in the same run."""
    m = max(z, shape.full_elements // int(ratio))
    span = 1 << (m.bit_length() - 1)
    ids, offsets = make_inputs(shape, device)
    gathered = shape.nnz * shape.dim * torch.finfo(dtype).bits // 8
    array = torch.empty(span + z, device=device).uniform_(-0.01, 0.01).to(dtype)
    ceiling_ms = timed(lambda: gather_bags(array, ids, offsets, shape.tables, shape.batch, shape.dim, z, block_bags),
                       iters, warmup, device)
    del array
    layout = FeatureLayout(
        feature_names=tuple(f"f{t}" for t in range(shape.tables)),
        table_names=tuple(f"t{t}" for t in range(shape.tables)),
        dims=(shape.dim,) * shape.tables, mean=(False,) * shape.tables,
        block_size=z, num_elements=m, seed=0,
    )
    keys = layout.hash_keys(device)
    robe_array = torch.empty(m, device=device).uniform_(-0.01, 0.01).to(dtype)
    robe_ms: Optional[float] = None
    try:
        with torch.no_grad():
            robe_ms = timed(lambda: robe_pooled_lookup(robe_array, ids, offsets, layout, keys, shape.batch, kernel="triton"),
                            iters, warmup, device)
    except (ValueError, RuntimeError, TypeError) as exc:  # e.g. no bf16 arrays on this kernel yet
        print(f"# {shape.name}: ROBE forward with {dtype} arrays not measured: {exc}")
    row = dict(shape=shape.name, dtype=str(dtype).replace("torch.", ""), m=m, ceiling_ms=ceiling_ms,
               ceiling_gbps=gathered / ceiling_ms / 1e6, robe_ms=robe_ms)
    row["robe_gbps"] = None if robe_ms is None else gathered / robe_ms / 1e6
    row["fraction"] = None if robe_ms is None else ceiling_ms / robe_ms
    return row


def print_rows(rows: List[dict], title: str) -> None:
    print(title)
    print("| shape | dtype | array MB | ceiling ms | ceiling GB/s | ROBE fwd ms | ROBE GB/s | ROBE / ceiling |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mb = r["m"] * (2 if r["dtype"] in ("bfloat16", "float16") else 4) / 1e6
        robe = ("n/a", "n/a", "n/a") if r["robe_ms"] is None else (
            f"{r['robe_ms']:.3f}", f"{r['robe_gbps']:.0f}", f"{100 * r['fraction']:.0f}%")
        print(f"| {r['shape']} | {r['dtype']} | {mb:.1f} | {r['ceiling_ms']:.3f} | {r['ceiling_gbps']:.0f} | "
              f"{robe[0]} | {robe[1]} | {robe[2]} |")


def run(argv: Optional[Sequence[str]] = None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--shapes", default="a,b,m", help="comma list of the lookup benchmark's shapes (a, b, c, m)")
    p.add_argument("--ratio", type=float, default=1000.0)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--block-bags", type=int, default=8, help="bags per program of the ceiling kernel")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU (needs TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if triton is None:
        raise SystemExit("gather_limit needs triton")
    if args.quick:
        args.device, args.batch, args.iters, args.warmup = "cpu", min(args.batch, 16), 1, 0
    device = torch.device(args.device)
    all_shapes = shapes(args.batch, args.quick)
    unknown = [s for s in args.shapes.split(",") if s not in all_shapes]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}: choose from {sorted(all_shapes)}")
    rows = [
        measure(all_shapes[s], args.ratio, args.block_size, getattr(torch, d), args.iters, args.warmup, device, args.block_bags)
        for s in args.shapes.split(",") for d in args.dtypes.split(",")
    ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print_rows(rows, f"# gather ceiling vs ROBE Triton forward, {name}, batch {args.batch}, ROBE {args.ratio:g}x, "
                     f"Z={args.block_size}, median of {args.iters}")
    return rows


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    run()
