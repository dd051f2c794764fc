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
``v = ((a & 0x3FFFFFFF) << 32) | b`` is built in int64 and reduced ``v % m`` in int64. The two
key-only stages, ``fmix(k0 ^ c)`` and ``fmix(k1 ^ c)``, do not depend on the id: each
program computes them once per (feature, block) before its loop over ids.

*Bag kernels* (forward, dense backward, the fused path's record kernel): grid
``(cdiv(B, BLOCK_BAGS), F)``, i.e. ONE launch for all F features; a program owns BLOCK_BAGS bags
of one feature and loops ``i`` up to the longest of its bags, processing the i-th id of all its
bags at once as a ``[BLOCK_BAGS, NB_PAD, Z_PAD]`` tile (NB = D/Z blocks of Z elements; both padded
to powers of two and masked, so any D and Z with Z | D work). The hash is computed per
(lookup, block), not per element. Element positions wrap with one conditional subtraction
(``Z <= m`` is required).

*Dense backward* (data-parallel training): the same bag loop, ``tl.atomic_add`` of
``grad_out * scale * w`` into a zero ``[m]`` gradient. No ``[nnz, D]`` tensor exists.

*Fused backward* (no gradient the size of the array):
  1. record kernel: block start ``s`` of every (lookup, block) record, ``[nnz, D/Z]`` int64, plus
     each lookup's bag and pooling scale;
  2. torch ops on the same device: the aligned chunks ``j`` (elements ``[j*Z, (j+1)*Z)``) a record
     touches are ``s // Z``, ``min(s+Z-1, m-1) // Z`` and, when the block wraps, chunk 0 (with a
     partial last chunk a wrapping block can touch three chunks); ``torch.unique`` gives the U
     touched chunks sorted, ``searchsorted`` each record's compact row of ``s // Z``;
  3. scatter kernel over lookups: ``atomic_add`` of each record's Z values into a compact
     ``[U, Z]`` buffer. A block's non-wrapped part is contiguous there (chunk j+1, when touched,
     is the row after chunk j), its wrapped part lands in row 0 (chunk 0, the smallest);
  4. optimizer kernel over the U chunks (``[BLOCK_U, Z_PAD]`` tiles): sgd / adagrad /
     rowwise_adagrad exactly as ``apply_optimizer_dense`` (rowwise: one state per chunk, the mean
     of g^2 over the chunk's valid elements, the last chunk may be partial). Elements of a
     touched chunk that no lookup read get g = 0 and are left unchanged (for eps > 0).
  Extra memory is O(nnz * D/Z + U * Z), never O(m) or O(nnz * D).

Reproducibility
---------------
Bit-reproducible, run to run and on any GPU: the hash, block starts, chunk indices, and the
forward (each bag sums its ids sequentially in input order, like the reference).
NOT bit-reproducible by default: the backward. Float atomics make each element's gradient sum
depend on the order threads arrive, so ``pooled_backward_dense`` and the fused updates can
differ in the last bits between runs (the optimizer update itself is deterministic given g).
With ``DETERMINISTIC = True`` (this module's flag, initialised from the environment variable
``ROBE_TRITON_DETERMINISTIC=1``) or under ``torch.use_deterministic_algorithms(True)``, step 3 is
replaced by a segmented reduction without atomics: the (record, chunk) pieces are stably sorted
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
from typing import Optional, Tuple

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
    def _hash_starts(p0, p1, x, m):
        """Block start v mod m (int64) of int64 ids ``x`` for premixed keys p0, p1 (broadcast)."""
        lo = x.to(tl.uint32)  # truncation: the low word
        hi = (x >> 32).to(tl.uint32)  # arithmetic shift then truncation: the high word
        a = _fmix32(_fmix32(p0 ^ lo) ^ hi)
        b = _fmix32(_fmix32(_fmix32(p1 ^ hi) ^ lo) ^ a)
        v = ((a & 0x3FFFFFFF).to(tl.int64) << 32) | b.to(tl.int64)  # uint32 -> int64 zero-extends
        return v % m

    @triton.jit
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
        s = _hash_starts(p0, p1, x[:, None], m)
        tl.store(out_ptr + rows[:, None] * NB + c[None, :], s, mask=row_ok[:, None] & (c < NB)[None, :])

    @triton.jit
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

        max_len = tl.reduce(length, 0, _MAX_COMBINE)
        for i in range(0, max_len):
            live = i < length
            pos = start + i  # int64 position of the lookup in indices
            x = tl.load(indices_ptr + pos, mask=live, other=0)
            s = _hash_starts(p0, p1, x[:, None], m)  # [BLOCK_BAGS, NB_PAD]
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
        dst = tl.where(lin >= m, lin - m, (rb * Z + s % Z)[:, :, None] + k[None, None, :])
        msk = rec_ok[:, :, None] & (k < Z)[None, None, :]
        col = f[:, None, None] * DIM + (c[:, None] * Z + k[None, :])[None, :, :]
        g = tl.load(gout_ptr + b[:, None, None] * row_stride + col, mask=msk, other=0.0)
        g = g * sc[:, None, None]
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + lk, mask=l_ok, other=0.0)
            g = g * w[:, None, None]
        tl.atomic_add(compact_ptr + dst, g, mask=msk, sem="relaxed")

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
        array_ptr, state_ptr, compact_ptr, uniq_ptr, U, m, lr, eps,
        MODE: tl.constexpr,  # 0 sgd, 1 adagrad, 2 rowwise_adagrad, 3 write g into a dense array
        Z: tl.constexpr, Z_PAD: tl.constexpr, BLOCK_U: tl.constexpr,
    ):
        """Apply the optimizer to the U touched chunks (the compact gradient [U, Z])."""
        u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
        u_ok = u < U
        k = tl.arange(0, Z_PAD)
        chunk = tl.load(uniq_ptr + u, mask=u_ok, other=0)
        e = chunk[:, None] * Z + k[None, :]
        ok = u_ok[:, None] & (k < Z)[None, :] & (e < m)
        g = tl.load(compact_ptr + u[:, None] * Z + k[None, :], mask=ok, other=0.0)
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
    nb_pad = _next_pow2(dim // block_size)
    z_pad = _next_pow2(block_size)
    block_bags = _rows_per_program(nb_pad * z_pad, batch_size)
    grid = (triton.cdiv(batch_size, block_bags), num_features)
    meta = dict(DIM=dim, Z=block_size, NB_PAD=nb_pad, Z_PAD=z_pad, BLOCK_BAGS=block_bags)
    return grid, meta


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
    grid, meta = _bag_grid(batch_size, num_features, dim, block_size)
    _bag_kernel[grid](
        array, indices, offsets, keys, mean_i8, weights if weights is not None else array, out, out,
        indices, indices, array,  # record outputs: unused in this mode
        batch_size, array.numel(), num_features * dim,
        MODE=0, HAS_WEIGHTS=weights is not None, **meta,
    )
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
    grid, meta = _bag_grid(batch_size, num_features, dim, block_size)
    _bag_kernel[grid](
        gout, indices, offsets, keys, mean_i8, weights if weights is not None else gout, gout, grad,
        indices, indices, gout,  # record outputs: unused in this mode
        batch_size, num_elements, num_features * dim,
        MODE=1, HAS_WEIGHTS=weights is not None, **meta,
    )
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


def _launch_chunk_update(array, state, compact, uniq, m, lr, eps, mode, block_size) -> None:
    num_uniq = uniq.numel()
    if num_uniq == 0:
        return
    z_pad = _next_pow2(block_size)
    block_u = _rows_per_program(z_pad, num_uniq)
    _chunk_update_kernel[(triton.cdiv(num_uniq, block_u),)](
        array, state, compact, uniq, num_uniq, m, float(lr), float(eps),
        MODE=mode, Z=block_size, Z_PAD=z_pad, BLOCK_U=block_u,
    )


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
    compact, uniq = _compact_gradient(gout, indices, offsets, keys, mean_i8, weights, batch_size, num_features,
                                      dim, block_size, m, deterministic=_deterministic())
    _launch_chunk_update(array, state, compact, uniq, m, lr, eps, _OPTIMIZERS[optimizer], block_size)
