"""The ROBE hash: where block ``c`` of the embedding of id ``x`` in table ``t`` starts in the array.

This is THE hash of robe-torchrec, defined once here and specified exactly in ``docs/design.md``.
Every kernel (reference, C++, Triton) and every sharded path reproduces it bit for bit, and
checkpoints depend on it: a trained array means nothing under another hash. Golden vectors in
``tests/test_hashing.py`` make any change visible. Never change it silently: bump
``HASH_VERSION`` and keep the old one readable.

Spec (version 1), all arithmetic on unsigned 32-bit words, i.e. modulo 2**32:

    k0, k1   = first 8 bytes of sha256(b"robe-torchrec/hash/v1\\0" + str(seed) + b"\\0" + table_name),
               read as two little-endian uint32 (computed once per table, on the host)
    lo, hi   = low and high 32 bits of the id's 64-bit two's-complement form
    fmix(h)  = murmur3's finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35;
               h ^= h >> 16
    a        = fmix(fmix(fmix(k0 ^ c) ^ lo) ^ hi)
    b        = fmix(fmix(fmix(fmix(k1 ^ c) ^ hi) ^ lo) ^ a)
    v        = (a & 0x3FFFFFFF) * 2**32 + b              # 62 bits, never negative as int64
    offset   = v mod m                                   # m = num_elements of the array

Block ``c`` then reads ``M[(offset + k) mod m]`` for ``k`` in ``[0, Z)``.

Why this shape: the id enters only through 32-bit words, so every backend computes it with plain
uint32 multiplies (C++, Triton) or, where unsigned types are thin (PyTorch), with int64 ops whose
intermediate values stay below 2**49 and can never overflow. ``c`` is mixed in first, so the
blocks of one id are as unrelated as the blocks of different ids. The table enters through a
name-derived key, so adding or reordering tables never moves another table's blocks.
``v`` has 62 bits, so ``v mod m`` has a relative bias below ``m / 2**62`` (< 2**-14 at the
supported maximum of ``m = 2**48`` elements).
"""

from __future__ import annotations

import hashlib
from typing import Tuple

import torch

HASH_VERSION = 1
MAX_NUM_ELEMENTS = 1 << 48  # v mod m keeps a bias below 2**-14 up to here
MAX_BLOCKS_PER_ROW = 1 << 31  # c must fit a 32-bit word

_MASK32 = 0xFFFFFFFF
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_KEY_PREFIX = b"robe-torchrec/hash/v1\0"


def table_key(seed: int, table_name: str) -> Tuple[int, int]:
    """The two 32-bit keys (k0, k1) of a table: a function of the seed and the table's NAME only."""
    if not isinstance(table_name, str) or not table_name:
        raise ValueError(f"table name must be a non-empty string, got {table_name!r}")
    digest = hashlib.sha256(
        _KEY_PREFIX + str(int(seed)).encode() + b"\0" + table_name.encode("utf-8")
    ).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


# ---------------------------------------------------------------------------------------------
# Scalar version on Python ints: the spec, line for line. Slow; used by tests and for documentation.
# ---------------------------------------------------------------------------------------------


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _FMIX_C1) & _MASK32
    h ^= h >> 13
    h = (h * _FMIX_C2) & _MASK32
    h ^= h >> 16
    return h


def block_offset_scalar(key: Tuple[int, int], idx: int, block: int, num_elements: int) -> int:
    """Start offset in [0, num_elements) of block ``block`` of id ``idx`` (any int64) for a table key."""
    k0, k1 = key
    u = idx & 0xFFFFFFFFFFFFFFFF  # two's complement of the int64 id
    lo, hi = u & _MASK32, u >> 32
    a = _fmix32_int(_fmix32_int(_fmix32_int(k0 ^ block) ^ lo) ^ hi)
    b = _fmix32_int(_fmix32_int(_fmix32_int(_fmix32_int(k1 ^ block) ^ hi) ^ lo) ^ a)
    v = ((a & 0x3FFFFFFF) << 32) | b
    return v % num_elements


# ---------------------------------------------------------------------------------------------
# Vectorised PyTorch version: int64 tensors, every intermediate value below 2**49 (no overflow).
# ---------------------------------------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, split so that no int64 product exceeds 2**48."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_C2)
    return h ^ (h >> 16)


def block_offsets(
    ids: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    num_blocks: int,
    num_elements: int,
) -> torch.Tensor:
    """Block start offsets, shape ``[n, num_blocks]`` (int64), for ``n`` ids.

    ``ids`` is any int64 tensor of shape [n]; ``k0``/``k1`` are int64 tensors of shape [n] (or
    broadcastable) holding each id's table key (from :func:`table_key`).
    """
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if not 1 <= num_elements <= MAX_NUM_ELEMENTS:
        raise ValueError(f"num_elements must be in [1, 2**48], got {num_elements}")
    lo = (ids & _MASK32).unsqueeze(1)
    hi = ((ids >> 32) & _MASK32).unsqueeze(1)  # arithmetic shift, then mask: the high word
    c = torch.arange(num_blocks, dtype=torch.int64, device=ids.device).unsqueeze(0)
    a = _fmix32(_fmix32(_fmix32(k0.reshape(-1, 1) ^ c) ^ lo) ^ hi)
    b = _fmix32(_fmix32(_fmix32(_fmix32(k1.reshape(-1, 1) ^ c) ^ hi) ^ lo) ^ a)
    v = ((a & 0x3FFFFFFF) << 32) | b
    return torch.remainder(v, num_elements)


def element_indices(offsets: torch.Tensor, block_size: int, num_elements: int) -> torch.Tensor:
    """Array positions read by each block: ``(offset + k) mod m``, shape ``[..., nblocks * Z]``."""
    k = torch.arange(block_size, dtype=torch.int64, device=offsets.device)
    idx = offsets.unsqueeze(-1) + k  # offset < m <= 2**48, so no overflow
    idx = torch.where(idx >= num_elements, idx - num_elements, idx)
    return idx.flatten(-2)
