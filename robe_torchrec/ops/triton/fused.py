"""The fused backward's own Triton kernels and their host-side orchestration.

The fused backward never builds a gradient the size of the array. Default, sort-free path
(:func:`compact_gradient_touched`):

  1. the bag kernel (``BagMode.MARK_CHUNKS``) marks the aligned chunks ``j`` (elements
     ``[j*Z, (j+1)*Z)``) every block touches, ``s // Z``, ``min(s+Z-1, m-1) // Z`` and chunk 0 when
     it wraps (with a partial last chunk a wrapping block can touch three chunks), in a
     ``ceil(m/Z)``-byte map (racy stores of 1, each after a load that skips marked chunks);
  2. ``rank = cumsum(map)`` (int32): chunk j's compact row is ``rank[j] - 1``; U = ``rank[-1]``
     (the one host sync);
  3. the bag kernel again (``BagMode.COMPACT_GRAD``, block starts recomputed rather than stored):
     each bag's gradient loaded once, ``atomic_add`` of it, per lookup, into a compact ``[U, Z]``
     buffer. A block's non-wrapped part is contiguous there (chunk j+1, when touched, is the row
     after chunk j), its wrapped part lands in row 0 (chunk 0);
  4. :func:`chunk_update_kernel` over all chunks, skipping untouched ones (``[BLOCK_U, Z_PAD]``
     tiles): sgd / adagrad / rowwise_adagrad exactly as ``reference.apply_optimizer_dense``
     (rowwise: one state per chunk, the mean of g^2 over the chunk's valid elements, the last
     chunk may be partial). Elements of a touched chunk that no lookup read get g = 0 and are left
     unchanged (eps > 0).

  Extra memory is ``5 * ceil(m/Z)`` bytes + U * Z floats, never O(m) floats or O(nnz * D).

Record path (:func:`compact_gradient_records`), when the chunk map would be much larger than the
batch's records (huge, sparsely touched arrays: :func:`use_touched_map`) and in deterministic
mode: :func:`lookup_records_kernel` writes every block start ``[nnz, D/Z]`` int64 with each
lookup's bag and pooling scale, ``torch.unique`` / ``searchsorted`` over the records' chunks give
the compact rows, and :func:`scatter_records_kernel` scatters the records atomically, or, in
deterministic mode, :func:`segmented_records_kernel` sums each row's stably sorted pieces in a
fixed order without atomics.
"""

from __future__ import annotations

import enum
from typing import Optional, Tuple

import torch

from robe_torchrec.ops.api import LookupBatch, OptimizerKind, state_numel
from robe_torchrec.ops.triton import tuning
from robe_torchrec.ops.triton.bags import BagMode, launch_bags
from robe_torchrec.ops.triton.common import MAX_COMBINE, SUM_COMBINE, next_pow2, rows_per_program, tl, triton
from robe_torchrec.ops.triton.hash import hash_starts, inv_m_of, premix


class UpdateMode(enum.IntEnum):
    """What :func:`chunk_update_kernel` does with the compact gradient (the MODE constexpr)."""

    SGD = 0
    ADAGRAD = 1
    ROWWISE_ADAGRAD = 2
    WRITE_DENSE = 3  #: write g into a dense [m] array (the deterministic dense backward)

    @classmethod
    def of(cls, kind: OptimizerKind) -> "UpdateMode":
        return {OptimizerKind.SGD: cls.SGD, OptimizerKind.ADAGRAD: cls.ADAGRAD,
                OptimizerKind.ROWWISE_ADAGRAD: cls.ROWWISE_ADAGRAD}[kind]


#: The fused backward marks touched chunks in a dense ceil(m/Z)-byte map when the map is at most
#: this many times the number of (lookup, block) records (or below TOUCHED_MAP_MIN chunks);
#: beyond that (very large, sparsely touched arrays) it sorts the records' chunks instead.
TOUCHED_MAP_RATIO = 8
TOUCHED_MAP_MIN = 1 << 24


def use_touched_map(num_chunks: int, records: int) -> bool:
    return num_chunks <= max(TOUCHED_MAP_MIN, TOUCHED_MAP_RATIO * records)


if triton is not None:
    # The update modes as Triton constexpr globals (the only globals a kernel may read).
    _SGD = tl.constexpr(int(UpdateMode.SGD))
    _ADAGRAD = tl.constexpr(int(UpdateMode.ADAGRAD))
    _WRITE_DENSE = tl.constexpr(int(UpdateMode.WRITE_DENSE))

    @triton.jit(do_not_specialize=["m"])
    def lookup_records_kernel(
        indices_ptr, offsets_ptr, keys_ptr, mean_ptr, starts_ptr, bag_of_ptr, scale_of_ptr,
        B, m,
        DIM: tl.constexpr, Z: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_BAGS: tl.constexpr,
    ):
        """Records of the record path: for every lookup (position p of indices) its D/Z block
        starts ``starts[p, :]``, its global bag ``bag_of[p]`` and pooling scale ``scale_of[p]``.
        Programs over (group of BLOCK_BAGS bags, feature); loop over the i-th id of each bag."""
        NB: tl.constexpr = DIM // Z
        f = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_BAGS + tl.arange(0, BLOCK_BAGS)
        bag_ok = bags < B
        gbag = f.to(tl.int64) * B + bags  # global bag index (feature-major)
        start = tl.load(offsets_ptr + gbag, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + gbag + 1, mask=bag_ok, other=0) - start

        c = tl.arange(0, NB_PAD)
        k0 = tl.load(keys_ptr + 2 * f).to(tl.uint32)
        k1 = tl.load(keys_ptr + 2 * f + 1).to(tl.uint32)
        p0, p1 = premix(k0, k1, c.to(tl.uint32))  # hoisted: one per (feature, block)
        p0 = p0[None, :]
        p1 = p1[None, :]
        is_mean = tl.load(mean_ptr + f) != 0
        inv_len = tl.div_rn(tl.full([BLOCK_BAGS], 1.0, tl.float32), tl.maximum(length, 1).to(tl.float32))
        scale = tl.where(is_mean, inv_len, 1.0)  # [BLOCK_BAGS]
        blk_ok = (c < NB)[None, :]

        inv_m = inv_m_of(m)
        max_len = tl.reduce(length, 0, MAX_COMBINE)
        for i in range(0, max_len):
            live = i < length
            pos = start + i  # int64 position of the lookup in indices
            x = tl.load(indices_ptr + pos, mask=live, other=0)
            s = hash_starts(p0, p1, x[:, None], m, inv_m)  # [BLOCK_BAGS, NB_PAD]
            rec_ok = live[:, None] & blk_ok  # [BLOCK_BAGS, NB_PAD]: the full tile
            tl.store(starts_ptr + pos[:, None] * NB + c[None, :], s, mask=rec_ok)
            tl.store(bag_of_ptr + pos, gbag, mask=live)
            tl.store(scale_of_ptr + pos, scale, mask=live)

    @triton.jit
    def scatter_records_kernel(
        gout_ptr, weights_ptr, starts_ptr, rowbase_ptr, bag_of_ptr, scale_of_ptr, compact_ptr,
        nnz, B, m, row_stride,
        HAS_WEIGHTS: tl.constexpr, DIM: tl.constexpr, Z: tl.constexpr,
        NB_PAD: tl.constexpr, Z_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """Atomically add every (lookup, block) record's Z gradient values into compact [U, Z]."""
        NB: tl.constexpr = DIM // Z
        lk = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        l_ok = lk < nnz
        c = tl.arange(0, NB_PAD)
        k = tl.arange(0, Z_PAD)
        bag = tl.load(bag_of_ptr + lk, mask=l_ok, other=0)
        sc = tl.load(scale_of_ptr + lk, mask=l_ok, other=0.0)
        f = bag // B
        b = bag - f * B
        rec = lk[:, None] * NB + c[None, :]
        rec_ok = l_ok[:, None] & (c < NB)[None, :]
        s = tl.load(starts_ptr + rec, mask=rec_ok, other=0)
        rb = tl.load(rowbase_ptr + rec, mask=rec_ok, other=0)
        lin = s[:, :, None] + k[None, None, :]
        dst = (rb * Z + s % Z)[:, :, None] + k[None, None, :]
        msk = rec_ok[:, :, None] & (k < Z)[None, None, :]
        col = f[:, None, None] * DIM + (c[:, None] * Z + k[None, :])[None, :, :]
        g = tl.load(gout_ptr + b[:, None, None] * row_stride + col, mask=msk, other=0.0)
        g = g * sc[:, None, None]
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + lk, mask=l_ok, other=0.0)
            g = g * w[:, None, None]
        # two masked atomics (not one on a selected pointer) keep both pointers contiguous along k,
        # so that the compiler coalesces them: the non-wrapped part, then the wrapped part (chunk 0,
        # compact row 0)
        tl.atomic_add(compact_ptr + dst, g, mask=msk & (lin < m), sem="relaxed")
        tl.atomic_add(compact_ptr + (lin - m), g, mask=msk & (lin >= m), sem="relaxed")

    @triton.jit
    def segmented_records_kernel(
        gout_ptr, weights_ptr, starts_ptr, bag_of_ptr, scale_of_ptr, uniq_ptr, seg_start_ptr,
        seg_count_ptr, piece_rec_ptr, compact_ptr,
        U, B, m, row_stride,
        HAS_WEIGHTS: tl.constexpr, DIM: tl.constexpr, Z: tl.constexpr, Z_PAD: tl.constexpr,
        BLOCK_U: tl.constexpr,
    ):
        """Deterministic compact gradient: row u sums its pieces (records) in their sorted order."""
        NB: tl.constexpr = DIM // Z
        u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
        u_ok = u < U
        k = tl.arange(0, Z_PAD)
        chunk = tl.load(uniq_ptr + u, mask=u_ok, other=0)
        e = chunk[:, None] * Z + k[None, :]  # [BLOCK_U, Z_PAD] array elements of the row
        e_ok = u_ok[:, None] & (k < Z)[None, :] & (e < m)
        first = tl.load(seg_start_ptr + u, mask=u_ok, other=0)
        count = tl.load(seg_count_ptr + u, mask=u_ok, other=0)
        acc = tl.full([BLOCK_U, Z_PAD], 0.0, tl.float32)
        for j in range(0, tl.reduce(count, 0, MAX_COMBINE)):
            live = u_ok & (j < count)
            r = tl.load(piece_rec_ptr + first + j, mask=live, other=0)
            s = tl.load(starts_ptr + r, mask=live, other=0)
            lk = r // NB
            c = r - lk * NB
            bag = tl.load(bag_of_ptr + lk, mask=live, other=0)
            sc = tl.load(scale_of_ptr + lk, mask=live, other=0.0)
            f = bag // B
            b = bag - f * B
            off = e - s[:, None]  # position of element e inside the block, mod m
            off = tl.where(off < 0, off + m, off)
            ok = e_ok & live[:, None] & (off < Z)
            col = f[:, None] * DIM + c[:, None] * Z + off
            g = tl.load(gout_ptr + b[:, None] * row_stride + col, mask=ok, other=0.0)
            g = g * sc[:, None]
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + lk, mask=live, other=0.0)
                g = g * w[:, None]
            acc += tl.where(ok, g, 0.0)
        tl.store(compact_ptr + u[:, None] * Z + k[None, :], acc, mask=u_ok[:, None] & (k < Z)[None, :])

    @triton.jit
    def chunk_update_kernel(
        array_ptr, state_ptr, compact_ptr, uniq_ptr, touched_ptr, U, m, lr, eps,
        MODE: tl.constexpr,  # an UpdateMode
        DENSE_MAP: tl.constexpr,
        Z: tl.constexpr, Z_PAD: tl.constexpr, BLOCK_U: tl.constexpr,
    ):
        """Apply the optimizer to the touched chunks (the compact gradient [U, Z]).

        ``DENSE_MAP`` False: program rows are compact rows, ``uniq[u]`` their chunk ids (U = rows).
        ``DENSE_MAP`` True: program rows are all the chunks (U = ceil(m/Z)); ``touched[j] != 0`` marks
        the touched ones and ``uniq`` is then the inclusive prefix count of ``touched``: chunk j's
        compact row is ``uniq[j] - 1``.
        """
        u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
        u_ok = u < U
        k = tl.arange(0, Z_PAD)
        if DENSE_MAP:
            u_ok = u_ok & (tl.load(touched_ptr + u, mask=u_ok, other=0) != 0)
            chunk = u
            crow = tl.load(uniq_ptr + u, mask=u_ok, other=1).to(tl.int64) - 1
        else:
            chunk = tl.load(uniq_ptr + u, mask=u_ok, other=0)
            crow = u
        e = chunk[:, None] * Z + k[None, :]
        ok = u_ok[:, None] & (k < Z)[None, :] & (e < m)
        g = tl.load(compact_ptr + crow[:, None] * Z + k[None, :], mask=ok, other=0.0)
        if MODE == _WRITE_DENSE:
            tl.store(array_ptr + e, g, mask=ok)
        else:
            p = tl.load(array_ptr + e, mask=ok, other=0.0).to(tl.float32)  # bf16 / fp16: step in float32
            if MODE == _SGD:
                p = p - lr * g
            elif MODE == _ADAGRAD:
                st = tl.load(state_ptr + e, mask=ok, other=0.0) + g * g
                tl.store(state_ptr + e, st, mask=ok)
                p = p - tl.div_rn(lr * g, tl.sqrt_rn(st) + eps)
            else:
                valid = tl.minimum(m - chunk * Z, Z).to(tl.float32)  # the last chunk may be partial
                st = tl.load(state_ptr + chunk, mask=u_ok, other=0.0)
                st = st + tl.div_rn(tl.reduce(g * g, 1, SUM_COMBINE), tl.where(u_ok, valid, 1.0))
                tl.store(state_ptr + chunk, st, mask=u_ok)
                denom = tl.sqrt_rn(st) + eps
                p = p - tl.div_rn(lr * g, denom[:, None])
            tl.store(array_ptr + e, p.to(array_ptr.dtype.element_ty), mask=ok)  # rounded to nearest even




def _records_grid(batch_size: int, num_features: int, dim: int, block_size: int) -> Tuple[Tuple[int, int], int]:
    """Grid and BLOCK_BAGS of :func:`lookup_records_kernel`."""
    block_bags = rows_per_program(next_pow2(dim // block_size) * next_pow2(block_size), batch_size)
    return (triton.cdiv(batch_size, block_bags), num_features), block_bags


def compact_gradient_records(gout: torch.Tensor, batch: LookupBatch, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch gradient restricted to the U touched chunks: ``([U, Z] float32, [U] chunk ids)``,
    by the record path (see the module docstring). Syncs with the host (U, and the window)."""
    batch = batch.narrowed()  # records are indexed by position in indices
    device = gout.device
    b, f, dim, z, m = batch.batch_size, batch.num_features, batch.dim, batch.block_size, batch.num_elements
    nb = dim // z
    nnz = batch.indices.numel()
    # 1. block starts of all (lookup, block) records, and each lookup's bag and pooling scale
    starts = torch.empty(nnz, nb, dtype=torch.int64, device=device)
    bag_of = torch.empty(nnz, dtype=torch.int64, device=device)
    scale_of = torch.empty(nnz, dtype=torch.float32, device=device)
    grid, block_bags = _records_grid(b, f, dim, z)
    lookup_records_kernel[grid](
        batch.indices, batch.offsets, batch.hash_keys, batch.mean.view(torch.int8), starts, bag_of, scale_of,
        b, m, DIM=dim, Z=z, NB_PAD=next_pow2(nb), BLOCK_BAGS=block_bags,
    )
    # 2. touched chunks: first, last non-wrapped, and chunk 0 when the block wraps
    s = starts.view(-1)
    first = s // z
    last_in = torch.clamp(s + (z - 1), max=m - 1) // z
    wraps = s + z > m
    cand = torch.cat([first, last_in, torch.where(wraps, torch.zeros_like(first), first)])
    uniq = torch.unique(cand, sorted=True)  # host sync: U is data dependent
    num_uniq = uniq.numel()
    rowbase = torch.searchsorted(uniq, first)
    compact = torch.zeros(num_uniq, z, dtype=torch.float32, device=device)
    z_pad = next_pow2(z)
    weights = batch.weights
    weights_arg = weights if weights is not None else gout
    if not deterministic:
        # 3. atomic scatter of each record's Z values into the compact buffer
        nb_pad = next_pow2(nb)
        block_l = rows_per_program(nb_pad * z_pad, nnz)
        scatter_records_kernel[(triton.cdiv(nnz, block_l),)](
            gout, weights_arg, starts, rowbase, bag_of, scale_of, compact,
            nnz, b, m, f * dim,
            HAS_WEIGHTS=weights is not None, DIM=dim, Z=z, NB_PAD=nb_pad, Z_PAD=z_pad, BLOCK_L=block_l,
        )
        return compact, uniq
    # 3'. deterministic: pieces (record, compact row), stably sorted by row, summed in that order
    rec = torch.arange(s.numel(), dtype=torch.int64, device=device)
    second = last_in != first
    wrap_piece = wraps & (first != 0)  # chunk 0 not already the first/last piece of the record
    piece_row = torch.cat([rowbase, rowbase[second] + 1, torch.zeros_like(rowbase[wrap_piece])])
    piece_rec = torch.cat([rec, rec[second], rec[wrap_piece]])
    sorted_row, order = torch.sort(piece_row, stable=True)
    piece_rec = piece_rec[order].contiguous()
    # segment bounds by binary search (bincount on CUDA is refused under torch's deterministic mode)
    rows = torch.arange(num_uniq, dtype=torch.int64, device=device)
    seg_start = torch.searchsorted(sorted_row, rows)
    seg_count = torch.searchsorted(sorted_row, rows, right=True) - seg_start
    block_u = rows_per_program(z_pad, num_uniq)
    segmented_records_kernel[(triton.cdiv(num_uniq, block_u),)](
        gout, weights_arg, starts, bag_of, scale_of, uniq, seg_start, seg_count, piece_rec, compact,
        num_uniq, b, m, f * dim,
        HAS_WEIGHTS=weights is not None, DIM=dim, Z=z, Z_PAD=z_pad, BLOCK_U=block_u,
    )
    return compact, uniq


def compact_gradient_touched(gout: torch.Tensor, batch: LookupBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort-free compact gradient: ``([U, Z] float32, touched [ceil(m/Z)] int8, rank [ceil(m/Z)] int32)``.

    1. the bag kernel marks every chunk a block touches (first, last non-wrapped, chunk 0 when it
       wraps) in a byte map (plain racy stores of 1);
    2. ``rank = cumsum(touched)``: chunk j's compact row is ``rank[j] - 1`` (chunk j+1, when touched,
       is the row after chunk j; chunk 0 is row 0); U = rank[-1] (the one host sync);
    3. the bag kernel loads each bag's gradient once and atomically adds it, for each lookup, into
       the compact rows (block starts recomputed: cheaper than storing and re-reading them).
    Extra memory: ceil(m/Z) * 5 bytes + U * Z floats; no sort, no [nnz]-sized temporaries.
    """
    z = batch.block_size
    num_chunks = state_numel(OptimizerKind.ROWWISE_ADAGRAD, batch.num_elements, z)  # one per chunk
    touched = torch.zeros(num_chunks, dtype=torch.int8, device=gout.device)
    launch_bags("mark", BagMode.MARK_CHUNKS, batch, touched, gout=gout)
    rank = torch.cumsum(touched, 0, dtype=torch.int32)
    num_uniq = int(rank[-1])  # host sync: U is data dependent
    compact = torch.zeros(num_uniq, z, dtype=torch.float32, device=gout.device)
    if num_uniq:
        launch_bags("scatter", BagMode.COMPACT_GRAD, batch, compact, gout=gout, rank=rank)
    return compact, touched, rank


def launch_chunk_update(
    array: torch.Tensor,
    state: torch.Tensor,
    compact: torch.Tensor,
    rows: torch.Tensor,
    mode: UpdateMode,
    lr: float = 0.0,
    eps: float = 0.0,
    touched: Optional[torch.Tensor] = None,
) -> None:
    """Optimizer step (or dense write) of ``array`` [m] over the compact gradient ``compact`` [U, Z]:
    ``rows`` are the compact rows' chunk ids, or, with ``touched`` (the chunk map), all chunks with
    ``rows`` their inclusive touched count (see :func:`chunk_update_kernel`)."""
    num_rows = rows.numel()
    if num_rows == 0:
        return
    z = compact.shape[1]
    cfg = tuning.kernel_config("update", z, z, 1.0)
    block_u = max(1, min(cfg.block_chunks, next_pow2(num_rows)))
    chunk_update_kernel[(triton.cdiv(num_rows, block_u),)](
        array, state, compact, rows, touched if touched is not None else rows, num_rows, array.numel(),
        float(lr), float(eps),
        MODE=int(mode), DENSE_MAP=touched is not None, Z=z, Z_PAD=next_pow2(z), BLOCK_U=block_u,
        num_warps=cfg.num_warps,
    )
