"""What the Triton kernel modules share: the optional import, reduction combine functions, tile
sizes, interpreter detection and host-side argument checks."""

from __future__ import annotations

import os
from typing import Optional

import torch

try:  # triton is optional: is_available() says whether this backend can run
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = exc

# Elements per program tile. On a GPU ~1-2K elements keep 4 warps busy with a few registers per
# thread; the interpreter pays per op and per program, so it wants few, large programs.
GPU_TILE = 1024
INTERP_TILE = 1 << 14


def env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def is_available() -> bool:
    """True if triton imports and either CUDA is available or TRITON_INTERPRET=1 is set."""
    if triton is None:
        return False
    return torch.cuda.is_available() or env_interpret()


if triton is not None:
    # Reductions go through tl.reduce with these combine functions instead of tl.max / tl.sum /
    # tl.zeros, which are @jit functions of triton.language.standard, decorated once when triton is
    # first imported. If that happened before TRITON_INTERPRET=1 was set (torchrec imports triton),
    # they stay compiled-mode functions that the interpreter cannot call, while these modules can
    # still be (re)imported in interpreter mode: only builtins and this package's own @jit
    # functions are called. The interpreter recognises triton's own combine functions and reduces
    # with numpy; the fallbacks (if triton renames them) are slower there but correct.
    MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None)
    SUM_COMBINE = getattr(tl.standard, "_sum_combine", None)
    if MAX_COMBINE is None or SUM_COMBINE is None:  # pragma: no cover - other triton versions

        @triton.jit
        def MAX_COMBINE(a, b):
            return tl.maximum(a, b)

        @triton.jit
        def SUM_COMBINE(a, b):
            return a + b

    @triton.jit
    def _probe_kernel():
        """Never launched: its type tells whether this package was decorated for the interpreter."""
        pass


def interpreted() -> bool:
    """True if these kernels run in Triton's interpreter (TRITON_INTERPRET=1 when decorated)."""
    if triton is None:
        return False
    return type(_probe_kernel).__name__ == "InterpretedFunction"


def require_triton() -> None:
    if triton is None:
        raise RuntimeError(f"triton is not importable: {TRITON_IMPORT_ERROR!r}")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rows_per_program(row_elems: int, num_rows: int) -> int:
    """Power-of-two rows per program so that a tile holds about the target number of elements."""
    target = INTERP_TILE if interpreted() else GPU_TILE
    rows = next_pow2(max(1, target // max(1, row_elems)))
    return max(1, min(rows, next_pow2(max(1, num_rows))))


def check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")


def check_runnable(device: torch.device) -> None:
    require_triton()
    if interpreted():
        return
    if device.type != "cuda":
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
            "importing robe_torchrec.ops.triton to run them on CPU tensors"
        )


def check_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
