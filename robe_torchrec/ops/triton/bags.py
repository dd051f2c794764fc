"""The bag kernel (:func:`pooled_bags_kernel`): forward, dense backward, and the fused backward's
chunk marking and compact scatter, as one Triton kernel in four modes (:class:`BagMode`).

Grid ``(cdiv(B, BLOCK_BAGS), F)``, i.e. ONE launch for all F features; a program owns BLOCK_BAGS
bags of one feature and steps through their lookups UNROLL at a time (then one at a time), each
lookup a ``[BLOCK_BAGS, NB_PAD, Z_PAD]`` tile (NB = D/Z blocks of Z elements; both padded to powers
of two and masked, so any D and Z with Z | D work). Layout matters more than anything else here
(measured on an H200, see docs/kernels.md and tools/triton_sweep.py):

- the hash of a step's ``[BLOCK_BAGS, UNROLL, NB_PAD]`` (bag, lookup, block) triples is computed
  spread over the threads, once per triple, then each lookup's starts are broadcast to the lanes
  of their blocks (the reduction that extracts lookup u lands in shared memory / shuffles),
  instead of every lane of a block recomputing it;
- a warp's lanes cover the Z consecutive elements of one block, so that each gather / atomic
  instruction touches one or two 128-byte lines; ``row_stride`` is not specialised on alignment
  so that the output tile keeps that layout (no conversion);
- a block running past m wraps to the array's start: the rare steps with such a block use a
  second masked access on ``e - m`` (a select on the pointer would lose its contiguity), the
  others one plain access.

The forward adds each bag's lookups one after the other in input order, whatever the tuning
parameters (:mod:`.tuning`). Offsets are positions in ``indices`` and may be a window of it (the
kernel never assumes ``offsets[0] == 0``).
"""

from __future__ import annotations

import enum
from typing import Optional

import torch

from robe_torchrec.ops.api import LookupBatch
from robe_torchrec.ops.triton import tuning
from robe_torchrec.ops.triton.common import MAX_COMBINE, SUM_COMBINE, next_pow2, tl, triton
from robe_torchrec.ops.triton.hash import hash_starts, inv_m_of, premix


class BagMode(enum.IntEnum):
    """What :func:`pooled_bags_kernel` does with each lookup (passed as the MODE constexpr)."""

    FORWARD = 0  #: gather and pool into out [B, F*D]
    DENSE_GRAD = 1  #: atomically add grad_out * scale * w into a dense [m] gradient
    MARK_CHUNKS = 2  #: mark the aligned Z-chunks each block touches in a [ceil(m/Z)] int8 map
    COMPACT_GRAD = 3  #: atomically add the gradient into the compact [U, Z] rows (row = rank - 1)


if triton is not None:
    # The modes as Triton constexpr globals (the only globals a kernel may read).
    _FORWARD = tl.constexpr(int(BagMode.FORWARD))
    _MARK_CHUNKS = tl.constexpr(int(BagMode.MARK_CHUNKS))
    _COMPACT_GRAD = tl.constexpr(int(BagMode.COMPACT_GRAD))

    # The lookup tile is [BLOCK_BAGS, NB_PAD, Z_PAD]; a warp's lanes cover the Z consecutive
    # elements of one block so that every gather / atomic instruction touches one or two 128-byte
    # lines. A block start is computed ONCE, in a [BLOCK_BAGS, UNROLL, NB_PAD] tile that spreads
    # the (bag, lookup, block) triples over the threads, then broadcast to the lanes of its block
    # (the reduction that extracts lookup u lands in shared memory / shuffles); hashing in the
    # gather layout itself would repeat each hash on all Z lanes. The wrapped part of a block
    # (elements past m) is read / written by a second masked access so that both pointers keep
    # their contiguity (one select on the pointer would make the compiler lay the tile out for
    # scattered accesses). ``row_stride`` is not specialised on alignment: that keeps the output
    # tile in the same one-element-per-lane layout as the gathers (no layout conversion).

    @triton.jit
    def _hash_tile(indices_ptr, start, length, i, p0, p1, m, inv_m, U: tl.constexpr, OFF32: tl.constexpr):
        """Block starts of lookups i..i+U-1 of every bag: ([BB, U, NB_PAD] int32/int64, [BB, U] live)."""
        j = i + tl.arange(0, U)
        live2 = j[None, :] < length[:, None]
        x2 = tl.load(indices_ptr + (start[:, None] + j[None, :]), mask=live2, other=0)
        s3 = hash_starts(p0[None, None, :], p1[None, None, :], x2[:, :, None], m, inv_m)
        if OFF32:
            s3 = s3.to(tl.int32)
        return s3, live2

    @triton.jit
    def _pick(t3, u: tl.constexpr, U: tl.constexpr):
        """t3[:, u, :] of an integer tile (exact: a sum of one value and zeros)."""
        if U == 1:
            return tl.reduce(t3, 1, SUM_COMBINE)
        else:
            return tl.reduce(tl.where((tl.arange(0, U) == u)[None, :, None], t3, 0), 1, SUM_COMBINE)

    @triton.jit
    def _any_wraps(s3, live2, m, Z: tl.constexpr):
        """1 if a block of a live lookup of the tile runs past m (wraps to the array's start), else 0."""
        w = ((s3 > m - Z) & live2[:, :, None]).to(tl.int32)
        return tl.reduce(tl.reduce(tl.reduce(w, 2, MAX_COMBINE), 1, MAX_COMBINE), 0, MAX_COMBINE)

    @triton.jit
    def _fwd_gather(acc, s3, array_ptr, sb_ptr, weights_ptr, start, length, i, m, lo, hi, k, elem_ok,
                    HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, WRAP: tl.constexpr, RANGED: tl.constexpr,
                    INT8: tl.constexpr, Z: tl.constexpr):
        for u in tl.static_range(U):  # lookups added one after the other, in input order
            s = _pick(s3, u, U)
            live = i + u < length
            e = s[:, :, None] + k[None, None, :]
            msk = live[:, None, None] & elem_ok
            if INT8:
                # FBGEMM's row-wise int8 on the [ceil(m/Z), Z] view: code * scale[row] + bias[row];
                # masked elements read scale = bias = 0, hence 0 (the wrapped part of a block is
                # read through a selected pointer: rare, see _any_wraps)
                ew = e
                if WRAP:
                    ew = tl.where(e < m, e, e - m)
                code = tl.load(array_ptr + ew, mask=msk, other=0)
                sb = (ew // Z) * 2
                row = code.to(tl.float32) * tl.load(sb_ptr + sb, mask=msk, other=0.0) + tl.load(
                    sb_ptr + (sb + 1), mask=msk, other=0.0)
            elif RANGED:
                # a row-wise shard: global element e is local[e - lo] inside [lo, hi), else 0
                if WRAP:
                    inside = e < m
                    row = tl.load(array_ptr + (e - lo), mask=msk & inside & (e >= lo) & (e < hi), other=0.0)
                    w_e = e - m
                    wrapped = tl.load(array_ptr + (w_e - lo), mask=msk & (e >= m) & (w_e >= lo) & (w_e < hi),
                                      other=0.0)
                    row = tl.where(inside, row, wrapped)
                else:
                    row = tl.load(array_ptr + (e - lo), mask=msk & (e >= lo) & (e < hi), other=0.0)
            elif WRAP:
                inside = e < m
                row = tl.load(array_ptr + e, mask=msk & inside, other=0.0)
                wrapped = tl.load(array_ptr + (e - m), mask=msk & (e >= m), other=0.0)
                row = tl.where(inside, row, wrapped)
            else:
                row = tl.load(array_ptr + e, mask=msk, other=0.0)
            row = row.to(tl.float32)  # bf16 / fp16 arrays: summed in float32
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + (start + (i + u)), mask=live, other=0.0)
                row = row * w[:, None, None]
            acc += row
        return acc

    @triton.jit
    def _fwd_steps(acc, array_ptr, sb_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m, lo, hi, k, elem_ok,
                   HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, OFF32: tl.constexpr, Z: tl.constexpr,
                   RANGED: tl.constexpr, INT8: tl.constexpr):
        s3, live2 = _hash_tile(indices_ptr, start, length, i, p0, p1, m, inv_m, U, OFF32)
        # almost no step has a wrapping block (probability ~ Z/m per block): those that do take
        # the path with a second masked load per element, the others one plain load
        if _any_wraps(s3, live2, m, Z) != 0:
            acc = _fwd_gather(acc, s3, array_ptr, sb_ptr, weights_ptr, start, length, i, m, lo, hi, k, elem_ok,
                              HAS_WEIGHTS, U, True, RANGED, INT8, Z)
        else:
            acc = _fwd_gather(acc, s3, array_ptr, sb_ptr, weights_ptr, start, length, i, m, lo, hi, k, elem_ok,
                              HAS_WEIGHTS, U, False, RANGED, INT8, Z)
        return acc

    @triton.jit
    def _bwd_scatter(g, s3, base3, out_ptr, weights_ptr, start, length, i, m, k, elem_ok,
                     HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, COMPACT: tl.constexpr, WRAP: tl.constexpr):
        for u in tl.static_range(U):
            s = _pick(s3, u, U)
            live = i + u < length
            e = s[:, :, None] + k[None, None, :]
            msk = live[:, None, None] & elem_ok
            val = g
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + (start + (i + u)), mask=live, other=0.0)
                val = g * w[:, None, None]
            if COMPACT:
                dst = _pick(base3, u, U)[:, :, None] + k[None, None, :]
            else:
                dst = e
            if WRAP:
                tl.atomic_add(out_ptr + dst, val, mask=msk & (e < m), sem="relaxed")
                # the wrapped part: element e - m of chunk 0, which is compact row 0 when touched
                tl.atomic_add(out_ptr + (e - m), val, mask=msk & (e >= m), sem="relaxed")
            else:
                tl.atomic_add(out_ptr + dst, val, mask=msk, sem="relaxed")

    @triton.jit
    def _bwd_steps(g, out_ptr, rank_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m, k, elem_ok,
                   HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, OFF32: tl.constexpr, Z: tl.constexpr,
                   COMPACT: tl.constexpr):
        s3, live2 = _hash_tile(indices_ptr, start, length, i, p0, p1, m, inv_m, U, OFF32)
        base3 = s3
        if COMPACT:
            # compact position of the block's first element; chunk first+1 (when touched) is the
            # next compact row, so the block's non-wrapped part stays contiguous there
            first = s3 // Z
            rb = tl.load(rank_ptr + first, mask=tl.broadcast_to(live2[:, :, None], first.shape), other=1) - 1
            if not OFF32:
                rb = rb.to(tl.int64)
            base3 = rb * Z + (s3 - first * Z)
        if _any_wraps(s3, live2, m, Z) != 0:
            _bwd_scatter(g, s3, base3, out_ptr, weights_ptr, start, length, i, m, k, elem_ok, HAS_WEIGHTS, U,
                         COMPACT, True)
        else:
            _bwd_scatter(g, s3, base3, out_ptr, weights_ptr, start, length, i, m, k, elem_ok, HAS_WEIGHTS, U,
                         COMPACT, False)

    @triton.jit
    def _mark_steps(touched_ptr, indices_ptr, start, length, i, p0, p1, m, inv_m, blk_ok,
                    U: tl.constexpr, OFF32: tl.constexpr, Z: tl.constexpr, LOAD_FIRST: tl.constexpr):
        s3, live2 = _hash_tile(indices_ptr, start, length, i, p0, p1, m, inv_m, U, OFF32)
        ok = live2[:, :, None] & blk_ok[None, None, :]
        first = s3 // Z
        last = tl.minimum(s3 + (Z - 1), m - 1) // Z
        two = ok & (last != first)
        one = (first * 0 + 1).to(tl.int8)
        if LOAD_FIRST:
            # a small array's map is hit by every SM: plain stores of 1 to a few hot lines serialise
            # in L2 (measured 11.8 ms for 56M records on 10400 chunks); read first and store only
            # where a 0 is seen (a stale 0 only costs a redundant store of the same value)
            ok = ok & (tl.load(touched_ptr + first, mask=ok, other=1) == 0)
            two = two & (tl.load(touched_ptr + last, mask=two, other=1) == 0)
        tl.store(touched_ptr + first, one, mask=ok)
        tl.store(touched_ptr + last, one, mask=two)
        wraps = live2[:, :, None] & blk_ok[None, None, :] & (s3 > m - Z)
        tl.store(touched_ptr + first * 0, one, mask=wraps)  # wraps into chunk 0 (rare)

    @triton.jit(do_not_specialize=["m", "lo", "hi"], do_not_specialize_on_alignment=["row_stride"])
    def pooled_bags_kernel(
        array_ptr, indices_ptr, offsets_ptr, keys_ptr, mean_ptr, weights_ptr, gout_ptr, out_ptr, rank_ptr, sb_ptr,
        B, m, row_stride, lo, hi,
        MODE: tl.constexpr,  # a BagMode
        HAS_WEIGHTS: tl.constexpr,
        RANGED: tl.constexpr,  # FORWARD only: array_ptr holds global elements [lo, hi) (a row-wise shard)
        INT8: tl.constexpr,  # FORWARD only: array_ptr is uint8 codes, sb_ptr [ceil(m/Z), 2] float32 (scale, bias)
        DIM: tl.constexpr, Z: tl.constexpr, NB_PAD: tl.constexpr, Z_PAD: tl.constexpr,
        BLOCK_BAGS: tl.constexpr, UNROLL: tl.constexpr, OFF32: tl.constexpr, MARK_LOAD_FIRST: tl.constexpr,
    ):
        """Programs over (group of BLOCK_BAGS bags, feature); UNROLL lookups of each bag per step."""
        NB: tl.constexpr = DIM // Z
        f = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_BAGS + tl.arange(0, BLOCK_BAGS)
        bag_ok = bags < B
        gbag = f.to(tl.int64) * B + bags  # global bag index (feature-major)
        start = tl.load(offsets_ptr + gbag, mask=bag_ok, other=0)
        length = (tl.load(offsets_ptr + gbag + 1, mask=bag_ok, other=0) - start).to(tl.int32)

        c = tl.arange(0, NB_PAD)
        k = tl.arange(0, Z_PAD)
        blk_ok = c < NB
        # Every mask is built to the full [BLOCK_BAGS, NB_PAD, Z_PAD] tile: the interpreter's
        # atomic_add does not broadcast a [1, 1, 1] mask (batch size 1, no padding) to the tile.
        # (lookups of bags past B are masked by ``live``: their length is 0)
        if NB == NB_PAD and Z == Z_PAD:  # no padding to mask
            elem_ok = tl.broadcast_to(bag_ok[:, None, None], (BLOCK_BAGS, NB_PAD, Z_PAD))
        else:
            elem_ok = tl.broadcast_to(((c < NB)[:, None] & (k < Z)[None, :])[None, :, :], (BLOCK_BAGS, NB_PAD, Z_PAD))
        k0 = tl.load(keys_ptr + 2 * f).to(tl.uint32)
        k1 = tl.load(keys_ptr + 2 * f + 1).to(tl.uint32)
        p0, p1 = premix(k0, k1, c.to(tl.uint32))  # hoisted: one per (feature, block)
        inv_m = inv_m_of(m)
        max_len = tl.reduce(length, 0, MAX_COMBINE)
        n_main = (max_len // UNROLL) * UNROLL

        if MODE == _MARK_CHUNKS:
            for i in range(0, n_main, UNROLL):
                _mark_steps(out_ptr, indices_ptr, start, length, i, p0, p1, m, inv_m, blk_ok, UNROLL, OFF32, Z,
                            MARK_LOAD_FIRST)
            for i in range(n_main, max_len):
                _mark_steps(out_ptr, indices_ptr, start, length, i, p0, p1, m, inv_m, blk_ok, 1, OFF32, Z,
                            MARK_LOAD_FIRST)
        else:
            is_mean = tl.load(mean_ptr + f) != 0
            inv_len = tl.div_rn(tl.full([BLOCK_BAGS], 1.0, tl.float32), tl.maximum(length, 1).to(tl.float32))
            scale = tl.where(is_mean, inv_len, 1.0)  # [BLOCK_BAGS]
            col = f * DIM + c[:, None] * Z + k[None, :]  # [NB_PAD, Z_PAD]
            out_off = bags.to(tl.int64)[:, None, None] * row_stride + col[None, :, :]
            tile_ok = bag_ok[:, None, None] & ((c < NB)[:, None] & (k < Z)[None, :])[None, :, :]  # full tile
            if MODE == _FORWARD:
                acc = tl.full([BLOCK_BAGS, NB_PAD, Z_PAD], 0.0, tl.float32)
                for i in range(0, n_main, UNROLL):
                    acc = _fwd_steps(acc, array_ptr, sb_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m,
                                     inv_m, lo, hi, k, elem_ok, HAS_WEIGHTS, UNROLL, OFF32, Z, RANGED, INT8)
                for i in range(n_main, max_len):
                    acc = _fwd_steps(acc, array_ptr, sb_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m,
                                     inv_m, lo, hi, k, elem_ok, HAS_WEIGHTS, 1, OFF32, Z, RANGED, INT8)
                tl.store(out_ptr + out_off, acc * scale[:, None, None], mask=tile_ok)
            else:
                g = tl.load(gout_ptr + out_off, mask=tile_ok, other=0.0) * scale[:, None, None]
                for i in range(0, n_main, UNROLL):
                    _bwd_steps(g, out_ptr, rank_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                               k, elem_ok, HAS_WEIGHTS, UNROLL, OFF32, Z, MODE == _COMPACT_GRAD)
                for i in range(n_main, max_len):
                    _bwd_steps(g, out_ptr, rank_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                               k, elem_ok, HAS_WEIGHTS, 1, OFF32, Z, MODE == _COMPACT_GRAD)


def launch_bags(
    kind: str,
    mode: BagMode,
    batch: LookupBatch,
    out: torch.Tensor,
    *,
    array: Optional[torch.Tensor] = None,
    gout: Optional[torch.Tensor] = None,
    rank: Optional[torch.Tensor] = None,
    scale_bias: Optional[torch.Tensor] = None,
) -> None:
    """One launch of :func:`pooled_bags_kernel` over all features (grid (cdiv(B, block_bags), F)).

    ``kind`` picks the tuning (``forward``, ``mark``, ``scatter``); ``batch`` holds contiguous
    tensors on the device (see ``launch._prepare``); ``array`` is read in FORWARD mode, ``gout``
    (grad_out) in the gradient modes, ``rank`` (inclusive prefix count of the chunk map) in
    COMPACT_GRAD mode. In FORWARD mode with ``batch.element_range`` (lo, hi), ``array`` holds only
    the global elements [lo, hi) and the others count as 0; the gradient modes ignore the range
    (they work in global chunks: ``launch`` restricts their result to a shard). With ``scale_bias``
    (FORWARD only), ``array`` holds uint8 codes of FBGEMM's row-wise int8 scheme (serving).
    """
    b, f, dim, z, m = batch.batch_size, batch.num_features, batch.dim, batch.block_size, batch.num_elements
    # a tuning hint only: with a window of offsets, indices may also hold other features' ids
    pooling = batch.indices.numel() / max(1, b * f)
    cfg = tuning.kernel_config(kind, dim, z, pooling, b)
    block_bags = min(cfg.block_bags, next_pow2(b))
    grid = (triton.cdiv(b, block_bags), f)
    dummy = gout if gout is not None else array if array is not None else out
    weights = batch.weights if mode != BagMode.MARK_CHUNKS else None
    ranged = mode == BagMode.FORWARD and batch.element_range is not None
    lo, hi = batch.element_range if ranged else (0, m)
    int8 = scale_bias is not None
    if int8 and (mode != BagMode.FORWARD or ranged):
        raise ValueError("int8 arrays are read by the unranged forward only")
    pooled_bags_kernel[grid](
        array if array is not None else dummy, batch.indices, batch.offsets, batch.hash_keys,
        batch.mean.view(torch.int8), weights if weights is not None else dummy,
        gout if gout is not None else dummy, out, rank if rank is not None else batch.offsets,
        scale_bias if int8 else dummy,
        b, m, f * dim, int(lo), int(hi),
        MODE=int(mode), HAS_WEIGHTS=weights is not None, RANGED=ranged, INT8=int8,
        DIM=dim, Z=z, NB_PAD=next_pow2(dim // z), Z_PAD=next_pow2(z),
        BLOCK_BAGS=block_bags, UNROLL=cfg.unroll, OFF32=m + z < 2**31,
        MARK_LOAD_FIRST=mode == BagMode.MARK_CHUNKS and tuning.MARK_LOAD_FIRST,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
