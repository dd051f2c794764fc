"""The ROBE hash (version 1 of ``robe_torchrec.hashing``) in Triton, and the block-offsets kernel.

Native ``tl.uint32`` arithmetic (wrapping multiplies, logical shifts); the int64 id is split into
its lo/hi words, ``v = ((a & 0x3FFFFFFF) << 32) | b`` is built in int64 and reduced mod m exactly
by two fp64 multiplications with ``1/m`` and integer corrections (:func:`_mod_exact`; a 64-bit
``%`` is a ~75-instruction subroutine on NVIDIA GPUs). The two key-only stages, ``fmix(k0 ^ c)``
and ``fmix(k1 ^ c)``, do not depend on the id: kernels compute them once per (feature, block)
with :func:`premix` and hash ids with :func:`hash_starts`.
"""

from __future__ import annotations

import torch

from robe_torchrec.hashing import MAX_NUM_ELEMENTS
from robe_torchrec.ops.triton.common import (
    check_dtype,
    check_runnable,
    next_pow2,
    require_triton,
    rows_per_program,
    tl,
    triton,
)

if triton is not None:

    @triton.jit
    def _fmix32(h):
        """murmur3's finaliser on tl.uint32 (wrapping multiplies, logical shifts)."""
        h = h ^ (h >> 16)
        h = h * tl.full([], 0x85EBCA6B, tl.uint32)  # explicit uint32: no int64 promotion
        h = h ^ (h >> 13)
        h = h * tl.full([], 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def premix(k0, k1, c):
        """The id-independent stages of the hash: (fmix(k0 ^ c), fmix(k1 ^ c)), uint32."""
        p0 = _fmix32(k0 ^ c)
        p1 = _fmix32(k1 ^ c)
        return p0, p1

    @triton.jit
    def inv_m_of(m):
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
    def hash_starts(p0, p1, x, m, inv_m):
        """Block start v mod m (int64) of int64 ids ``x`` for premixed keys p0, p1 (broadcast)."""
        lo = x.to(tl.uint32)  # truncation: the low word
        hi = (x >> 32).to(tl.uint32)  # arithmetic shift then truncation: the high word
        a = _fmix32(_fmix32(p0 ^ lo) ^ hi)
        b = _fmix32(_fmix32(_fmix32(p1 ^ hi) ^ lo) ^ a)
        v = ((a & 0x3FFFFFFF).to(tl.int64) << 32) | b.to(tl.int64)  # uint32 -> int64 zero-extends
        return _mod_exact(v, m, inv_m)

    @triton.jit(do_not_specialize=["m"])
    def block_offsets_kernel(ids_ptr, k0_ptr, k1_ptr, out_ptr, n, m, NB: tl.constexpr,
                             NB_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[i, c] = block start of id i, block c (keys per id)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        c = tl.arange(0, NB_PAD)
        row_ok = rows < n
        x = tl.load(ids_ptr + rows, mask=row_ok, other=0)
        k0 = tl.load(k0_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
        k1 = tl.load(k1_ptr + rows, mask=row_ok, other=0).to(tl.uint32)
        p0, p1 = premix(k0[:, None], k1[:, None], c[None, :].to(tl.uint32))
        s = hash_starts(p0, p1, x[:, None], m, inv_m_of(m))
        tl.store(out_ptr + rows[:, None] * NB + c[None, :], s, mask=row_ok[:, None] & (c < NB)[None, :])


def block_offsets_triton(ids: torch.Tensor, k0, k1, num_blocks: int, m: int) -> torch.Tensor:
    """Block start offsets ``[n, num_blocks]`` int64, as ``hashing.block_offsets`` (for tests).

    ``k0``/``k1``: ints or int64 tensors of shape [n] or [1] (each id's table key).
    """
    require_triton()
    check_dtype(ids, "ids", torch.int64)
    if not 1 <= m <= MAX_NUM_ELEMENTS:
        raise ValueError(f"num_elements must be in [1, 2**48], got {m}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    device = ids.device
    check_runnable(device)
    ids = ids.reshape(-1).contiguous()
    n = ids.numel()
    k0 = torch.as_tensor(k0, dtype=torch.int64, device=device).reshape(-1).expand(n).contiguous()
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=device).reshape(-1).expand(n).contiguous()
    out = torch.empty(n, num_blocks, dtype=torch.int64, device=device)
    if n == 0:
        return out
    nb_pad = next_pow2(num_blocks)
    block_n = rows_per_program(nb_pad, n)
    block_offsets_kernel[(triton.cdiv(n, block_n),)](
        ids, k0, k1, out, n, m, NB=num_blocks, NB_PAD=nb_pad, BLOCK_N=block_n
    )
    return out
