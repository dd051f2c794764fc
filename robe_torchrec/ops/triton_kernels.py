"""Triton kernels for the ROBE pooled lookup: the GPU backend of the kernel API of ``reference.py``.

Exposes ``pooled_forward``, ``pooled_backward_dense`` and ``pooled_backward_fused`` with exactly
the signatures and semantics of :mod:`robe_torchrec.ops.reference`, plus :func:`is_available`
and :func:`block_offsets_triton` (the hash alone, for the golden-vector test).

The same code runs on CUDA tensors (compiled) and on CPU tensors under ``TRITON_INTERPRET=1``
(Triton's numpy interpreter; this is how CI without a GPU tests it). ``TRITON_INTERPRET`` is read
when this module is imported (``triton.jit`` picks the interpreter at decoration time), so it must
be set before this module is first imported, or the module reloaded (``importlib.reload``) after.
Triton itself may have been imported earlier: the kernels call only Triton builtins and their own
@jit functions (see ``_MAX_COMBINE``), never the @jit helpers of ``triton.language.standard``.

Design
------
*Hash.* The version-1 hash of ``robe_torchrec.hashing`` computed with native ``tl.uint32``
arithmetic (wrapping multiplies, logical shifts); the int64 id is split into its lo/hi words,
``v = ((a & 0x3FFFFFFF) << 32) | b`` is built in int64 and reduced mod m exactly by two fp64
multiplications with ``1/m`` and integer corrections (``_mod_exact``; a 64-bit ``%`` is a
~75-instruction subroutine on NVIDIA GPUs). The two key-only stages, ``fmix(k0 ^ c)`` and
``fmix(k1 ^ c)``, do not depend on the id: each program computes them once per (feature, block).

*Bag kernel* (``_bags_kernel``: forward, dense backward, and the fused path's chunk marking and
scatter): grid ``(cdiv(B, BLOCK_BAGS), F)``, i.e. ONE launch for all F features; a program owns
BLOCK_BAGS bags of one feature and steps through their lookups UNROLL at a time (then one at a
time), each lookup a ``[BLOCK_BAGS, NB_PAD, Z_PAD]`` tile (NB = D/Z blocks of Z elements; both
padded to powers of two and masked, so any D and Z with Z | D work). Layout matters more than
anything else here (measured on an H200, see docs/kernels.md and bench/triton_sweep.py):
  - the hash of a step's ``[BLOCK_BAGS, UNROLL, NB_PAD]`` (bag, lookup, block) triples is computed
    spread over the threads, once per triple, then each lookup's starts are broadcast to the lanes
    of their blocks (through shared memory), instead of every lane of a block recomputing it;
  - a warp's lanes cover the Z consecutive elements of one block, so that each gather / atomic
    instruction touches one or two 128-byte lines (the former kernel's layout put 32 different
    blocks in one instruction); ``row_stride`` is not specialised on alignment so that the output
    tile keeps that layout (no conversion);
  - a block running past m wraps to the array's start: the rare steps with such a block use a
    second masked access on ``e - m`` (a select on the pointer would lose its contiguity), the
    others one plain access.
The forward adds each bag's lookups one after the other in input order, whatever the tuning
parameters (``BagConfig``: block_bags, unroll, num_warps, num_stages; ``set_kernel_config`` or
``ROBE_TRITON_CONFIG``); defaults are keyed by one-hot / multi-hot and Z == D.

*Dense backward* (data-parallel training): the same bag loop, ``tl.atomic_add`` of
``grad_out * scale * w`` into a zero ``[m]`` gradient. No ``[nnz, D]`` tensor exists.

*Fused backward* (no gradient the size of the array), sort-free:
  1. the bag kernel marks the aligned chunks ``j`` (elements ``[j*Z, (j+1)*Z)``) every block
     touches, ``s // Z``, ``min(s+Z-1, m-1) // Z`` and chunk 0 when it wraps (with a partial last
     chunk a wrapping block can touch three chunks), in a ``ceil(m/Z)``-byte map (racy stores of 1,
     each after a load that skips chunks already marked);
  2. ``rank = cumsum(map)`` (int32): chunk j's compact row is ``rank[j] - 1``; U = ``rank[-1]``
     (the one host sync);
  3. the bag kernel again (block starts recomputed rather than stored): each bag's gradient
     loaded once, ``atomic_add`` of it, per lookup, into a compact ``[U, Z]`` buffer. A block's
     non-wrapped part is contiguous there (chunk j+1, when touched, is the row after chunk j), its
     wrapped part lands in row 0 (chunk 0);
  4. optimizer kernel over all chunks, skipping untouched ones (``[BLOCK_U, Z_PAD]`` tiles):
     sgd / adagrad / rowwise_adagrad exactly as ``apply_optimizer_dense`` (rowwise: one state per
     chunk, the mean of g^2 over the chunk's valid elements, the last chunk may be partial).
     Elements of a touched chunk that no lookup read get g = 0 and are left unchanged (eps > 0).
  Extra memory is ``5 * ceil(m/Z)`` bytes + U * Z floats, never O(m) floats or O(nnz * D). When
  the chunk map would be much larger than the batch's records (huge, sparsely touched arrays:
  ``_use_touched_map``), steps 1-2 are instead a record kernel writing every block start
  ``[nnz, D/Z]`` int64 and ``torch.unique`` / ``searchsorted`` over the records' chunks, and step 3
  a scatter over records (the deterministic mode below uses that path too).

Reproducibility
---------------
Bit-reproducible, run to run and on any GPU: the hash, block starts, chunk indices, and the
forward (each bag sums its ids sequentially in input order, like the reference).
NOT bit-reproducible by default: the backward. Float atomics make each element's gradient sum
depend on the order threads arrive, so ``pooled_backward_dense`` and the fused updates can
differ in the last bits between runs (the optimizer update itself is deterministic given g).
With ``DETERMINISTIC = True`` (this module's flag, initialised from the environment variable
``ROBE_TRITON_DETERMINISTIC=1``) or under ``torch.use_deterministic_algorithms(True)``, the
fused backward takes the record (sort-based) path with its scatter replaced by a segmented
reduction without atomics: the (record, chunk) pieces are stably sorted
by chunk, and one program per group of chunks sums its pieces in that fixed order. This costs a
sort and a host sync, and a chunk read by many lookups (a hot id) serialises on one program.
Neither mode is bitwise equal to the reference, which sums in another order (and the compiler may
contract multiply-adds into FMAs on GPU): tests compare within float tolerances.

Input validation is done on the host without device syncs: dtypes, shapes, devices and
contiguity are checked; the values of ``offsets`` (monotone, ending at nnz) and of the keys
(< 2**32) are trusted, as in the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

try:  # triton is optional: is_available() says whether this backend can run
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

from robe_torchrec.hashing import MAX_NUM_ELEMENTS

__all__ = [
    "DETERMINISTIC",
    "BagConfig",
    "UpdateConfig",
    "kernel_config",
    "set_kernel_config",
    "block_offsets_triton",
    "interpreted",
    "is_available",
    "pooled_backward_dense",
    "pooled_backward_fused",
    "pooled_forward",
]

#: Use the atomic-free segmented reduction in the backward (see the module docstring).
DETERMINISTIC: bool = os.environ.get("ROBE_TRITON_DETERMINISTIC", "0") == "1"

_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2}
_WRITE_DENSE = 3  # mode of the chunk kernel that writes the compact gradient into a dense one

# Elements per program tile. On a GPU ~1-2K elements keep 4 warps busy with a few registers per
# thread; the interpreter pays per op and per program, so it wants few, large programs.
_GPU_TILE = 1024
_INTERP_TILE = 1 << 14


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True if triton imports and either CUDA is available or TRITON_INTERPRET=1 is set."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _env_interpret()


def _deterministic() -> bool:
    return DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


if triton is not None:
    # Reductions go through tl.reduce with these combine functions instead of tl.max / tl.sum /
    # tl.zeros, which are @jit functions of triton.language.standard, decorated once when triton is
    # first imported. If that happened before TRITON_INTERPRET=1 was set (torchrec imports triton),
    # they stay compiled-mode functions that the interpreter cannot call, while this module can
    # still be (re)imported in interpreter mode: only builtins and this module's own @jit functions
    # are called here. The interpreter recognises triton's own combine functions and reduces with
    # numpy; the fallbacks (if triton renames them) are slower there but correct.
    _MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None)
    _SUM_COMBINE = getattr(tl.standard, "_sum_combine", None)
    if _MAX_COMBINE is None or _SUM_COMBINE is None:  # pragma: no cover - other triton versions

        @triton.jit
        def _MAX_COMBINE(a, b):
            return tl.maximum(a, b)

        @triton.jit
        def _SUM_COMBINE(a, b):
            return a + b

    @triton.jit
    def _fmix32(h):
        """murmur3's finaliser on tl.uint32 (wrapping multiplies, logical shifts)."""
        h = h ^ (h >> 16)
        h = h * tl.full([], 0x85EBCA6B, tl.uint32)  # explicit uint32: no int64 promotion
        h = h ^ (h >> 13)
        h = h * tl.full([], 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def _premix(k0, k1, c):
        """The id-independent stages of the hash: (fmix(k0 ^ c), fmix(k1 ^ c)), uint32."""
        p0 = _fmix32(k0 ^ c)
        p1 = _fmix32(k1 ^ c)
        return p0, p1

    @triton.jit
    def _inv_m(m):
        """fp64(1 / m), computed once per program for :func:`_mod_exact`."""
        return 1.0 / m.to(tl.float64)

    @triton.jit
    def _mod_exact(v, m, inv_m):
        """``v mod m`` for int64 ``0 <= v < 2**62`` and ``1 <= m <= 2**48``, exactly, without the
        64-bit integer division (a ~75-instruction subroutine call on NVIDIA GPUs).

        ``inv_m = fp64(1/m)``. Step 1: ``q = trunc(fp64(v) * inv_m)`` is ``floor(v/m)`` within
        ``1 + 1536/m`` (three fp64 roundings of relative size 2**-53 on a quotient below 2**62/m), so
        ``r = v - q*m`` (exact int64) satisfies ``|r| < 2m + 1536 < 2**50``, exactly representable in
        fp64. Step 2: ``floor(fp64(r) * inv_m)`` is ``floor(r/m)`` exactly when ``r/m`` is not an
        integer (the product's error, ``|r/m| * 2**-52 < 1/m``, cannot cross an integer: the nearest is
        at least ``1/m`` away), and ``r/m`` or ``r/m - 1`` when it is; so ``r - q2*m`` is in ``[0, m]``
        and one conditional subtraction finishes. Tested bit-equal to ``%`` (golden vectors, m up to
        2**48, edge ids) on the interpreter (numpy float64, the same IEEE arithmetic) and on CUDA.
        """
        q = (v.to(tl.float64) * inv_m).to(tl.int64)  # v >= 0: truncation is floor
        r = v - q * m
        q2 = tl.floor(r.to(tl.float64) * inv_m).to(tl.int64)
        r = r - q2 * m
        return tl.where(r >= m, r - m, r)

    @triton.jit
    def _hash_starts(p0, p1, x, m, inv_m):
        """Block start v mod m (int64) of int64 ids ``x`` for premixed keys p0, p1 (broadcast)."""
        lo = x.to(tl.uint32)  # truncation: the low word
        hi = (x >> 32).to(tl.uint32)  # arithmetic shift then truncation: the high word
        a = _fmix32(_fmix32(p0 ^ lo) ^ hi)
        b = _fmix32(_fmix32(_fmix32(p1 ^ hi) ^ lo) ^ a)
        v = ((a & 0x3FFFFFFF).to(tl.int64) << 32) | b.to(tl.int64)  # uint32 -> int64 zero-extends
        return _mod_exact(v, m, inv_m)

    @triton.jit(do_not_specialize=["m"])
    def _block_offsets_kernel(ids_ptr, k0_ptr, k1_ptr, out_ptr, n, m, NB: tl.constexpr,
                              NB_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[i, c] = block start of id i, block c (keys per id)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        c = tl.arange(0, NB_PAD)
        row_ok = rows < n
        x = tl.load(ids_ptr + rows, mask=row_ok, other=0)
        k0 = tl.load(k0_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
        k1 = tl.load(k1_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
        p0, p1 = _premix(k0[:, None], k1[:, None], c[None, :].to(tl.uint32))
        s = _hash_starts(p0, p1, x[:, None], m, _inv_m(m))
        tl.store(out_ptr + rows[:, None] * NB + c[None, :], s, mask=row_ok[:, None] & (c < NB)[None, :])

    @triton.jit(do_not_specialize=["m"])
    def _bag_kernel(
        array_ptr, indices_ptr, offsets_ptr, keys_ptr, mean_ptr, weights_ptr, gout_ptr, out_ptr,
        starts_ptr, bag_of_ptr, scale_of_ptr,
        B, m, row_stride,
        MODE: tl.constexpr,  # 0 forward, 1 dense backward (atomics), 2 records of the fused path
        HAS_WEIGHTS: tl.constexpr,
        DIM: tl.constexpr, Z: tl.constexpr, NB_PAD: tl.constexpr, Z_PAD: tl.constexpr,
        BLOCK_BAGS: tl.constexpr,
    ):
        """Programs over (group of BLOCK_BAGS bags, feature); loop over the i-th id of each bag."""
        NB: tl.constexpr = DIM // Z
        f = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_BAGS + tl.arange(0, BLOCK_BAGS)
        bag_ok = bags < B
        gbag = f.to(tl.int64) * B + bags  # global bag index (feature-major)
        start = tl.load(offsets_ptr + gbag, mask=bag_ok, other=0)
        length = tl.load(offsets_ptr + gbag + 1, mask=bag_ok, other=0) - start

        c = tl.arange(0, NB_PAD)
        k = tl.arange(0, Z_PAD)
        elem_ok = ((c < NB)[:, None] & (k < Z)[None, :])[None, :, :]  # [1, NB_PAD, Z_PAD]
        k0 = tl.load(keys_ptr + 2 * f).to(tl.uint32)
        k1 = tl.load(keys_ptr + 2 * f + 1).to(tl.uint32)
        p0, p1 = _premix(k0, k1, c.to(tl.uint32))  # hoisted: one per (feature, block)
        p0 = p0[None, :]
        p1 = p1[None, :]

        is_mean = tl.load(mean_ptr + f) != 0
        inv_len = tl.div_rn(tl.full([BLOCK_BAGS], 1.0, tl.float32), tl.maximum(length, 1).to(tl.float32))
        scale = tl.where(is_mean, inv_len, 1.0)  # [BLOCK_BAGS]

        col = f * DIM + c[:, None] * Z + k[None, :]  # [NB_PAD, Z_PAD]
        out_off = bags.to(tl.int64)[:, None, None] * row_stride + col[None, :, :]
        tile_ok = bag_ok[:, None, None] & elem_ok

        if MODE == 0:
            acc = tl.full([BLOCK_BAGS, NB_PAD, Z_PAD], 0.0, tl.float32)
        if MODE == 1:
            g = tl.load(gout_ptr + out_off, mask=tile_ok, other=0.0) * scale[:, None, None]
        if MODE == 2:
            blk_ok = (c < NB)[None, :]

        inv_m = _inv_m(m)
        max_len = tl.reduce(length, 0, _MAX_COMBINE)
        for i in range(0, max_len):
            live = i < length
            pos = start + i  # int64 position of the lookup in indices
            x = tl.load(indices_ptr + pos, mask=live, other=0)
            s = _hash_starts(p0, p1, x[:, None], m, inv_m)  # [BLOCK_BAGS, NB_PAD]
            if MODE == 2:
                rec_ok = live[:, None] & blk_ok
                tl.store(starts_ptr + pos[:, None] * NB + c[None, :], s, mask=rec_ok)
                tl.store(bag_of_ptr + pos, gbag, mask=live)
                tl.store(scale_of_ptr + pos, scale, mask=live)
            else:
                e = s[:, :, None] + k[None, None, :]
                e = tl.where(e >= m, e - m, e)
                msk = live[:, None, None] & elem_ok
                if MODE == 0:
                    row = tl.load(array_ptr + e, mask=msk, other=0.0)
                    if HAS_WEIGHTS:
                        w = tl.load(weights_ptr + pos, mask=live, other=0.0)
                        row = row * w[:, None, None]
                    acc += row
                else:
                    val = g
                    if HAS_WEIGHTS:
                        w = tl.load(weights_ptr + pos, mask=live, other=0.0)
                        val = g * w[:, None, None]
                    tl.atomic_add(out_ptr + e, val, mask=msk, sem="relaxed")

        if MODE == 0:
            tl.store(out_ptr + out_off, acc * scale[:, None, None], mask=tile_ok)

    @triton.jit
    def _scatter_compact_kernel(
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
    def _segmented_compact_kernel(
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
        for j in range(0, tl.reduce(count, 0, _MAX_COMBINE)):
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
    def _chunk_update_kernel(
        array_ptr, state_ptr, compact_ptr, uniq_ptr, touched_ptr, U, m, lr, eps,
        MODE: tl.constexpr,  # 0 sgd, 1 adagrad, 2 rowwise_adagrad, 3 write g into a dense array
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
        if MODE == 3:
            tl.store(array_ptr + e, g, mask=ok)
        else:
            p = tl.load(array_ptr + e, mask=ok, other=0.0)
            if MODE == 0:
                p = p - lr * g
            elif MODE == 1:
                st = tl.load(state_ptr + e, mask=ok, other=0.0) + g * g
                tl.store(state_ptr + e, st, mask=ok)
                p = p - tl.div_rn(lr * g, tl.sqrt_rn(st) + eps)
            else:
                valid = tl.minimum(m - chunk * Z, Z).to(tl.float32)  # the last chunk may be partial
                st = tl.load(state_ptr + chunk, mask=u_ok, other=0.0)
                st = st + tl.div_rn(tl.reduce(g * g, 1, _SUM_COMBINE), tl.where(u_ok, valid, 1.0))
                tl.store(state_ptr + chunk, st, mask=u_ok)
                denom = tl.sqrt_rn(st) + eps
                p = p - tl.div_rn(lr * g, denom[:, None])
            tl.store(array_ptr + e, p, mask=ok)


    # ---- bag kernels, v2: the hash distributed over threads, gathers/atomics coalesced ---------
    #
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
        s3 = _hash_starts(p0[None, None, :], p1[None, None, :], x2[:, :, None], m, inv_m)
        if OFF32:
            s3 = s3.to(tl.int32)
        return s3, live2

    @triton.jit
    def _pick(t3, u: tl.constexpr, U: tl.constexpr):
        """t3[:, u, :] of an integer tile (exact: a sum of one value and zeros)."""
        if U == 1:
            return tl.reduce(t3, 1, _SUM_COMBINE)
        else:
            return tl.reduce(tl.where((tl.arange(0, U) == u)[None, :, None], t3, 0), 1, _SUM_COMBINE)

    @triton.jit
    def _any_wraps(s3, live2, m, Z: tl.constexpr):
        """1 if a block of a live lookup of the tile runs past m (wraps to the array's start), else 0."""
        w = ((s3 > m - Z) & live2[:, :, None]).to(tl.int32)
        return tl.reduce(tl.reduce(tl.reduce(w, 2, _MAX_COMBINE), 1, _MAX_COMBINE), 0, _MAX_COMBINE)

    @triton.jit
    def _fwd_gather(acc, s3, array_ptr, weights_ptr, start, length, i, m, k, elem_ok,
                    HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, WRAP: tl.constexpr):
        for u in tl.static_range(U):  # lookups added one after the other, in input order
            s = _pick(s3, u, U)
            live = i + u < length
            e = s[:, :, None] + k[None, None, :]
            msk = live[:, None, None] & elem_ok
            if WRAP:
                inside = e < m
                row = tl.load(array_ptr + e, mask=msk & inside, other=0.0)
                wrapped = tl.load(array_ptr + (e - m), mask=msk & (e >= m), other=0.0)
                row = tl.where(inside, row, wrapped)
            else:
                row = tl.load(array_ptr + e, mask=msk, other=0.0)
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + (start + (i + u)), mask=live, other=0.0)
                row = row * w[:, None, None]
            acc += row
        return acc

    @triton.jit
    def _fwd_steps(acc, array_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m, k, elem_ok,
                   HAS_WEIGHTS: tl.constexpr, U: tl.constexpr, OFF32: tl.constexpr, Z: tl.constexpr):
        s3, live2 = _hash_tile(indices_ptr, start, length, i, p0, p1, m, inv_m, U, OFF32)
        # almost no step has a wrapping block (probability ~ Z/m per block): those that do take
        # the path with a second masked load per element, the others one plain load
        if _any_wraps(s3, live2, m, Z) != 0:
            acc = _fwd_gather(acc, s3, array_ptr, weights_ptr, start, length, i, m, k, elem_ok, HAS_WEIGHTS, U, True)
        else:
            acc = _fwd_gather(acc, s3, array_ptr, weights_ptr, start, length, i, m, k, elem_ok, HAS_WEIGHTS, U, False)
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
            rb = tl.load(rank_ptr + first, mask=live2[:, :, None], other=1) - 1
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

    @triton.jit(do_not_specialize=["m"], do_not_specialize_on_alignment=["row_stride"])
    def _bags_kernel(
        array_ptr, indices_ptr, offsets_ptr, keys_ptr, mean_ptr, weights_ptr, gout_ptr, out_ptr, rank_ptr,
        B, m, row_stride,
        MODE: tl.constexpr,  # 0 forward, 1 dense gradient (atomics), 2 mark touched chunks, 3 compact gradient
        HAS_WEIGHTS: tl.constexpr,
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
        if NB == NB_PAD and Z == Z_PAD:
            elem_ok = bag_ok[:, None, None]  # lookups are masked by ``live``; no padding to mask
        else:
            elem_ok = ((c < NB)[:, None] & (k < Z)[None, :])[None, :, :]
        k0 = tl.load(keys_ptr + 2 * f).to(tl.uint32)
        k1 = tl.load(keys_ptr + 2 * f + 1).to(tl.uint32)
        p0, p1 = _premix(k0, k1, c.to(tl.uint32))  # hoisted: one per (feature, block)
        inv_m = _inv_m(m)
        max_len = tl.reduce(length, 0, _MAX_COMBINE)
        n_main = (max_len // UNROLL) * UNROLL

        if MODE == 2:
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
            tile_ok = bag_ok[:, None, None] & ((c < NB)[:, None] & (k < Z)[None, :])[None, :, :]
            if MODE == 0:
                acc = tl.full([BLOCK_BAGS, NB_PAD, Z_PAD], 0.0, tl.float32)
                for i in range(0, n_main, UNROLL):
                    acc = _fwd_steps(acc, array_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                                     k, elem_ok, HAS_WEIGHTS, UNROLL, OFF32, Z)
                for i in range(n_main, max_len):
                    acc = _fwd_steps(acc, array_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                                     k, elem_ok, HAS_WEIGHTS, 1, OFF32, Z)
                tl.store(out_ptr + out_off, acc * scale[:, None, None], mask=tile_ok)
            else:
                g = tl.load(gout_ptr + out_off, mask=tile_ok, other=0.0) * scale[:, None, None]
                for i in range(0, n_main, UNROLL):
                    _bwd_steps(g, out_ptr, rank_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                               k, elem_ok, HAS_WEIGHTS, UNROLL, OFF32, Z, MODE == 3)
                for i in range(n_main, max_len):
                    _bwd_steps(g, out_ptr, rank_ptr, indices_ptr, weights_ptr, start, length, i, p0, p1, m, inv_m,
                               k, elem_ok, HAS_WEIGHTS, 1, OFF32, Z, MODE == 3)


# ---------------------------------------------------------------------------------------------
# Host side: validation, blocking, launches
# ---------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """True if this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    return type(_bag_kernel).__name__ == "InterpretedFunction"


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR!r}")


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _rows_per_program(row_elems: int, num_rows: int) -> int:
    """Power-of-two rows per program so that a tile holds about the target number of elements."""
    target = _INTERP_TILE if interpreted() else _GPU_TILE
    rows = _next_pow2(max(1, target // max(1, row_elems)))
    return max(1, min(rows, _next_pow2(max(1, num_rows))))


def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")


def _check_runnable(device: torch.device) -> None:
    _require_triton()
    if interpreted():
        return
    if device.type != "cuda":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
            "importing robe_torchrec.ops.triton_kernels to run them on CPU tensors"
        )


def _check_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def _prepare(
    device: torch.device,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    num_elements: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """Validate the common arguments (no device sync) and return contiguous device tensors."""
    _check_runnable(device)
    for t, name in ((indices, "indices"), (offsets, "offsets"), (hash_keys, "hash_keys")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        _check_dtype(t, name, torch.int64)
    if hash_keys.dim() != 2 or hash_keys.shape[1] != 2:
        raise ValueError(f"hash_keys must have shape [F, 2], got {tuple(hash_keys.shape)}")
    num_features = hash_keys.shape[0]
    if mean.dtype != torch.bool or mean.shape != (num_features,):
        raise TypeError(f"mean must be a bool tensor of shape [{num_features}], got {mean.dtype} {tuple(mean.shape)}")
    if indices.dim() != 1 or offsets.dim() != 1:
        raise ValueError("indices and offsets must be 1-D")
    _check_device(indices, "indices", device)
    _check_device(offsets, "offsets", device)
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if offsets.numel() != num_features * batch_size + 1:
        raise ValueError(
            f"offsets must have F*B+1 = {num_features * batch_size + 1} entries, got {offsets.numel()}"
        )
    if block_size < 1 or dim < 1 or dim % block_size:
        raise ValueError(f"block_size {block_size} must be >= 1 and divide dim {dim}")
    if not block_size <= num_elements <= MAX_NUM_ELEMENTS:
        raise ValueError(f"num_elements must be in [block_size={block_size}, 2**48], got {num_elements}")
    weights = None
    if per_sample_weights is not None:
        _check_dtype(per_sample_weights, "per_sample_weights", torch.float32)
        _check_device(per_sample_weights, "per_sample_weights", device)
        if per_sample_weights.shape != indices.shape:
            raise ValueError(
                f"per_sample_weights must have shape {tuple(indices.shape)}, got {tuple(per_sample_weights.shape)}"
            )
        weights = per_sample_weights.contiguous()
    # keys and mean flags are [F]-sized metadata: moved to the device if needed (cheap)
    keys = hash_keys.to(device).contiguous()
    mean_i8 = mean.to(device=device, dtype=torch.int8)
    return indices.contiguous(), offsets.contiguous(), keys, mean_i8, weights, num_features


def _bag_grid(batch_size: int, num_features: int, dim: int, block_size: int) -> Tuple[Tuple[int, int], dict]:
    """Grid and meta-parameters of the v1 ``_bag_kernel`` (records of the sort-based paths)."""
    nb_pad = _next_pow2(dim // block_size)
    z_pad = _next_pow2(block_size)
    block_bags = _rows_per_program(nb_pad * z_pad, batch_size)
    grid = (triton.cdiv(batch_size, block_bags), num_features)
    meta = dict(DIM=dim, Z=block_size, NB_PAD=nb_pad, Z_PAD=z_pad, BLOCK_BAGS=block_bags)
    return grid, meta


# ---- tuning parameters -----------------------------------------------------------------------


@dataclass(frozen=True)
class BagConfig:
    """Launch parameters of the bag kernel (``forward``, ``mark``, ``scatter`` kinds).

    block_bags: bags per program (power of two); unroll: lookups of each bag hashed and loaded per
    step (power of two; bags' remaining lookups go one at a time); num_warps, num_stages: Triton's.
    None of them changes results: the forward adds each bag's lookups in input order whatever the
    configuration (bit-identical outputs), the backward only reorders float atomics.
    """

    block_bags: int
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class UpdateConfig:
    """Launch parameters of the optimizer kernel (``update`` kind): chunks per program, warps."""

    block_chunks: int
    num_warps: int = 4


_KINDS = ("forward", "mark", "scatter", "update")
_OVERRIDES: Dict[str, Union[BagConfig, UpdateConfig]] = {}


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def set_kernel_config(kind: str, config: Union[BagConfig, UpdateConfig, None]) -> None:
    """Force the launch parameters of one kernel kind (None: back to the defaults).

    Also settable before import with ``ROBE_TRITON_CONFIG``, e.g.
    ``forward=32,4,4,1;mark=64,4,4;scatter=16,4,4;update=64,4`` (block_bags, unroll, num_warps,
    num_stages / block_chunks, num_warps).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}: one of {_KINDS}")
    if config is None:
        _OVERRIDES.pop(kind, None)
        return
    want = UpdateConfig if kind == "update" else BagConfig
    if not isinstance(config, want):
        raise TypeError(f"{kind} takes a {want.__name__}, got {type(config).__name__}")
    sizes = (config.block_chunks,) if kind == "update" else (config.block_bags, config.unroll)
    if not all(_is_pow2(x) for x in sizes + (config.num_warps,)):
        raise ValueError(f"{config}: block sizes, unroll and num_warps must be powers of two")
    _OVERRIDES[kind] = config


def _parse_env_config(text: str) -> None:
    for item in filter(None, (x.strip() for x in text.split(";"))):
        kind, _, vals = item.partition("=")
        nums = [int(v) for v in vals.split(",") if v.strip()]
        kind = kind.strip()
        set_kernel_config(kind, UpdateConfig(*nums) if kind == "update" else BagConfig(*nums))


# Defaults on CUDA, from robe_torchrec/bench/triton_sweep.py on an H200 (torch 2.11, triton 3.6;
# batch 65536, D = 128, Z in {32, 128}, m in {332800, 26135627}; the best configuration summed over
# both m, near-ties broken towards the smaller tile). Keyed by (multi-hot: mean ids per bag >= 1.5,
# one block per row: Z == D).
_DEFAULTS = {
    (False, False): {  # one-hot, D/Z blocks per row (Z = 32)
        "forward": BagConfig(block_bags=16, unroll=1, num_warps=4),
        "mark": BagConfig(block_bags=64, unroll=1, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=1, num_warps=4),
    },
    (False, True): {  # one-hot, Z = D
        "forward": BagConfig(block_bags=8, unroll=1, num_warps=4),
        "mark": BagConfig(block_bags=128, unroll=1, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=1, num_warps=4),
    },
    (True, False): {  # multi-hot (MLPerf pooling factors), Z = 32
        "forward": BagConfig(block_bags=16, unroll=2, num_warps=4),
        "mark": BagConfig(block_bags=32, unroll=4, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=2, num_warps=4),
    },
    (True, True): {  # multi-hot, Z = D
        "forward": BagConfig(block_bags=8, unroll=4, num_warps=4),
        "mark": BagConfig(block_bags=32, unroll=4, num_warps=4),
        "scatter": BagConfig(block_bags=8, unroll=2, num_warps=4),
    },
}
_DEFAULT_UPDATE_TILE = 2048  # elements per optimizer program (64 chunks of Z = 32)

#: Mark touched chunks with a load before the store (see ``_mark_steps``).
MARK_LOAD_FIRST = True


def kernel_config(kind: str, dim: int, block_size: int, pooling: float, batch_size: int = 1 << 30):
    """The launch parameters used for one kernel kind at this shape (an override if set)."""
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}: one of {_KINDS}")
    if kind in _OVERRIDES:
        return _OVERRIDES[kind]
    z_pad = _next_pow2(block_size)
    if kind == "update":
        target = _INTERP_TILE if interpreted() else _DEFAULT_UPDATE_TILE
        return UpdateConfig(block_chunks=_next_pow2(max(1, target // z_pad)), num_warps=4)
    if interpreted():  # few, large programs; unroll 2 runs both the unrolled and the tail loop
        rows = _rows_per_program(_next_pow2(dim // block_size) * z_pad, batch_size)
        return BagConfig(block_bags=rows, unroll=2, num_warps=4)
    cfg = _DEFAULTS[(pooling >= 1.5, dim == block_size)][kind]
    # other shapes: keep the tile near the tuned one's element count
    tuned_elems = cfg.block_bags * 128
    rows = _next_pow2(max(1, tuned_elems // (_next_pow2(dim // block_size) * z_pad)))
    return BagConfig(block_bags=min(rows, 256), unroll=cfg.unroll, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)


if os.environ.get("ROBE_TRITON_CONFIG"):
    _parse_env_config(os.environ["ROBE_TRITON_CONFIG"])


def _launch_bags(kind, mode, array, indices, offsets, keys, mean_i8, weights, gout, out, rank,
                 batch_size, num_features, dim, block_size, m) -> None:
    """One launch of ``_bags_kernel`` over all features (grid (cdiv(B, block_bags), F))."""
    pooling = indices.numel() / max(1, batch_size * num_features)
    cfg = kernel_config(kind, dim, block_size, pooling, batch_size)
    block_bags = min(cfg.block_bags, _next_pow2(batch_size))
    grid = (triton.cdiv(batch_size, block_bags), num_features)
    dummy_f = gout if gout is not None else array if array is not None else out
    _bags_kernel[grid](
        array if array is not None else dummy_f, indices, offsets, keys, mean_i8,
        weights if weights is not None else dummy_f, gout if gout is not None else dummy_f, out,
        rank if rank is not None else offsets,
        batch_size, m, num_features * dim,
        MODE=mode, HAS_WEIGHTS=weights is not None and mode != 2,
        DIM=dim, Z=block_size, NB_PAD=_next_pow2(dim // block_size), Z_PAD=_next_pow2(block_size),
        BLOCK_BAGS=block_bags, UNROLL=cfg.unroll, OFF32=m + block_size < 2**31,
        MARK_LOAD_FIRST=mode == 2 and MARK_LOAD_FIRST,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def block_offsets_triton(
    ids: torch.Tensor, k0, k1, num_blocks: int, m: int
) -> torch.Tensor:
    """Block start offsets ``[n, num_blocks]`` int64, as ``hashing.block_offsets`` (for tests).

    ``k0``/``k1``: ints or int64 tensors of shape [n] or [1] (each id's table key).
    """
    _require_triton()
    _check_dtype(ids, "ids", torch.int64)
    if not 1 <= m <= MAX_NUM_ELEMENTS:
        raise ValueError(f"num_elements must be in [1, 2**48], got {m}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    device = ids.device
    _check_runnable(device)
    ids = ids.reshape(-1).contiguous()
    n = ids.numel()
    k0 = torch.as_tensor(k0, dtype=torch.int64, device=device).reshape(-1).expand(n).contiguous()
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=device).reshape(-1).expand(n).contiguous()
    out = torch.empty(n, num_blocks, dtype=torch.int64, device=device)
    if n == 0:
        return out
    nb_pad = _next_pow2(num_blocks)
    block_n = _rows_per_program(nb_pad, n)
    _block_offsets_kernel[(triton.cdiv(n, block_n),)](
        ids, k0, k1, out, n, m, NB=num_blocks, NB_PAD=nb_pad, BLOCK_N=block_n
    )
    return out


def pooled_forward(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
) -> torch.Tensor:
    """Kernel API forward: pooled ``[B, F*dim]`` float32 (see ``reference.pooled_forward``)."""
    _check_dtype(array, "array", torch.float32)
    if array.dim() != 1 or not array.is_contiguous():
        raise ValueError("array must be a contiguous 1-D tensor")
    device = array.device
    indices, offsets, keys, mean_i8, weights, num_features = _prepare(
        device, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim, block_size, array.numel()
    )
    out = torch.empty(batch_size, num_features * dim, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    _launch_bags("forward", 0, array, indices, offsets, keys, mean_i8, weights, None, out, None,
                 batch_size, num_features, dim, block_size, array.numel())
    return out


def _check_grad_out(grad_out: torch.Tensor, batch_size: int, num_features: int, dim: int) -> torch.Tensor:
    _check_dtype(grad_out, "grad_out", torch.float32)
    if grad_out.shape != (batch_size, num_features * dim):
        raise ValueError(f"grad_out must have shape {(batch_size, num_features * dim)}, got {tuple(grad_out.shape)}")
    return grad_out.contiguous()


def pooled_backward_dense(
    grad_out: torch.Tensor,
    num_elements: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
) -> torch.Tensor:
    """Kernel API backward (non-fused): the dense gradient ``[m]`` of sum(pooled * grad_out).

    Atomic adds into a zero [m] tensor (not bit-reproducible); with DETERMINISTIC, the compact
    segmented reduction of the fused path, scattered into the zero tensor.
    """
    device = grad_out.device
    indices, offsets, keys, mean_i8, weights, num_features = _prepare(
        device, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim, block_size, num_elements
    )
    gout = _check_grad_out(grad_out, batch_size, num_features, dim)
    grad = torch.zeros(num_elements, dtype=torch.float32, device=device)
    if indices.numel() == 0 or batch_size == 0:
        return grad
    if _deterministic():
        compact, uniq = _compact_gradient(gout, indices, offsets, keys, mean_i8, weights, batch_size, num_features,
                                          dim, block_size, num_elements, deterministic=True)
        _launch_chunk_update(grad, grad, compact, uniq, num_elements, 0.0, 0.0, _WRITE_DENSE, block_size)
        return grad
    _launch_bags("scatter", 1, None, indices, offsets, keys, mean_i8, weights, gout, grad, None,
                 batch_size, num_features, dim, block_size, num_elements)
    return grad


def _compact_gradient(
    gout: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    keys: torch.Tensor,
    mean_i8: torch.Tensor,
    weights: Optional[torch.Tensor],
    batch_size: int,
    num_features: int,
    dim: int,
    block_size: int,
    m: int,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch gradient restricted to the U touched chunks: ``([U, Z] float32, [U] chunk ids)``."""
    device = gout.device
    z = block_size
    nb = dim // z
    nnz = indices.numel()
    # 1. block starts of all (lookup, block) records, and each lookup's bag and pooling scale
    starts = torch.empty(nnz, nb, dtype=torch.int64, device=device)
    bag_of = torch.empty(nnz, dtype=torch.int64, device=device)
    scale_of = torch.empty(nnz, dtype=torch.float32, device=device)
    grid, meta = _bag_grid(batch_size, num_features, dim, z)
    _bag_kernel[grid](
        gout, indices, offsets, keys, mean_i8, gout, gout, gout,
        starts, bag_of, scale_of,
        batch_size, m, num_features * dim,
        MODE=2, HAS_WEIGHTS=False, **meta,
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
    z_pad = _next_pow2(z)
    weights_arg = weights if weights is not None else gout
    if not deterministic:
        # 3. atomic scatter of each record's Z values into the compact buffer
        nb_pad = _next_pow2(nb)
        block_l = _rows_per_program(nb_pad * z_pad, nnz)
        _scatter_compact_kernel[(triton.cdiv(nnz, block_l),)](
            gout, weights_arg, starts, rowbase, bag_of, scale_of, compact,
            nnz, batch_size, m, num_features * dim,
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
    block_u = _rows_per_program(z_pad, num_uniq)
    _segmented_compact_kernel[(triton.cdiv(num_uniq, block_u),)](
        gout, weights_arg, starts, bag_of, scale_of, uniq, seg_start, seg_count, piece_rec, compact,
        num_uniq, batch_size, m, num_features * dim,
        HAS_WEIGHTS=weights is not None, DIM=dim, Z=z, Z_PAD=z_pad, BLOCK_U=block_u,
    )
    return compact, uniq


def _launch_chunk_update(array, state, compact, uniq, m, lr, eps, mode, block_size, touched=None) -> None:
    """Optimizer (or dense write) over the compact gradient: rows ``uniq`` (chunk ids), or, with
    ``touched``, all chunks with ``uniq`` their inclusive touched count (see ``_chunk_update_kernel``)."""
    rows = uniq.numel()
    if rows == 0:
        return
    z_pad = _next_pow2(block_size)
    cfg = kernel_config("update", block_size, block_size, 1.0)
    block_u = max(1, min(cfg.block_chunks, _next_pow2(rows)))
    _chunk_update_kernel[(triton.cdiv(rows, block_u),)](
        array, state, compact, uniq, touched if touched is not None else uniq, rows, m, float(lr), float(eps),
        MODE=mode, DENSE_MAP=touched is not None, Z=block_size, Z_PAD=z_pad, BLOCK_U=block_u,
        num_warps=cfg.num_warps,
    )


#: The fused backward marks touched chunks in a dense ceil(m/Z)-byte map when the map is at most
#: this many times the number of (lookup, block) records (or below _TOUCHED_MAP_MIN chunks);
#: beyond that (very large, sparsely touched arrays) it sorts the records' chunks instead.
_TOUCHED_MAP_RATIO = 8
_TOUCHED_MAP_MIN = 1 << 24


def _use_touched_map(num_chunks: int, records: int) -> bool:
    return num_chunks <= max(_TOUCHED_MAP_MIN, _TOUCHED_MAP_RATIO * records)


def _compact_gradient_touched(gout, indices, offsets, keys, mean_i8, weights, batch_size, num_features, dim,
                              block_size, m) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort-free compact gradient: ``([U, Z] float32, touched [ceil(m/Z)] int8, rank [ceil(m/Z)] int32)``.

    1. the bag kernel marks every chunk a block touches (first, last non-wrapped, chunk 0 when it
       wraps) in a byte map (plain racy stores of 1);
    2. ``rank = cumsum(touched)``: chunk j's compact row is ``rank[j] - 1`` (chunk j+1, when touched,
       is the row after chunk j; chunk 0 is row 0); U = rank[-1] (the one host sync);
    3. the bag kernel loads each bag's gradient once and atomically adds it, for each lookup, into
       the compact rows (block starts recomputed: cheaper than storing and re-reading them).
    Extra memory: ceil(m/Z) * 5 bytes + U * Z floats; no sort, no [nnz]-sized temporaries.
    """
    device = gout.device
    num_chunks = (m + block_size - 1) // block_size
    touched = torch.zeros(num_chunks, dtype=torch.int8, device=device)
    _launch_bags("mark", 2, None, indices, offsets, keys, mean_i8, None, gout, touched, None,
                 batch_size, num_features, dim, block_size, m)
    rank = torch.cumsum(touched, 0, dtype=torch.int32)
    num_uniq = int(rank[-1])  # host sync: U is data dependent
    compact = torch.zeros(num_uniq, block_size, dtype=torch.float32, device=device)
    if num_uniq:
        _launch_bags("scatter", 3, None, indices, offsets, keys, mean_i8, weights, gout, compact, rank,
                     batch_size, num_features, dim, block_size, m)
    return compact, touched, rank


def pooled_backward_fused(
    grad_out: torch.Tensor,
    array: torch.Tensor,
    state: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    optimizer: str,
    lr: float,
    eps: float,
) -> None:
    """Kernel API fused backward: one optimizer step on ``array`` (and ``state``) in place.

    Same semantics as ``reference.pooled_backward_fused``; the gradient only ever exists for the
    touched chunks (compact [U, Z]), never as an [m] or [nnz, D] tensor.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown fused optimizer {optimizer!r}: sgd, adagrad or rowwise_adagrad")
    _check_dtype(array, "array", torch.float32)
    if array.dim() != 1 or not array.is_contiguous():
        raise ValueError("array must be a contiguous 1-D tensor (it is updated in place)")
    device = array.device
    m = array.numel()
    indices, offsets, keys, mean_i8, weights, num_features = _prepare(
        device, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim, block_size, m
    )
    _check_device(grad_out, "grad_out", device)
    gout = _check_grad_out(grad_out, batch_size, num_features, dim)
    if optimizer != "sgd":
        expected = m if optimizer == "adagrad" else (m + block_size - 1) // block_size
        _check_dtype(state, "state", torch.float32)
        _check_device(state, "state", device)
        if state.shape != (expected,) or not state.is_contiguous():
            raise ValueError(f"{optimizer} state must be a contiguous [{expected}] tensor, got {tuple(state.shape)}")
    else:
        state = array  # unused by the sgd kernel
    if indices.numel() == 0 or batch_size == 0:
        return
    deterministic = _deterministic()
    num_chunks = (m + block_size - 1) // block_size
    if not deterministic and _use_touched_map(num_chunks, indices.numel() * (dim // block_size)):
        compact, touched, rank = _compact_gradient_touched(gout, indices, offsets, keys, mean_i8, weights,
                                                           batch_size, num_features, dim, block_size, m)
        _launch_chunk_update(array, state, compact, rank, m, lr, eps, _OPTIMIZERS[optimizer], block_size,
                             touched=touched)
        return
    compact, uniq = _compact_gradient(gout, indices, offsets, keys, mean_i8, weights, batch_size, num_features,
                                      dim, block_size, m, deterministic=deterministic)
    _launch_chunk_update(array, state, compact, uniq, m, lr, eps, _OPTIMIZERS[optimizer], block_size)
