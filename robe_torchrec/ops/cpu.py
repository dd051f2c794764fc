"""Fast CPU ROBE pooled lookup: a C++/OpenMP extension with the kernel API of ``reference.py``.

The extension (``csrc/robe_cpu.cpp``) is compiled with ``torch.utils.cpp_extension.load`` on first
use, once per process; torch caches the build in its extensions directory
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so later processes only load it.
If it cannot be built (no compiler, failed build), :func:`load_extension` raises ``RuntimeError``
and :func:`is_available` returns False: callers then fall back to the reference kernel.

Semantics are those of ``robe_torchrec.ops.reference`` (same hash, layout, pooling, optimizer
rules), except that these functions are not differentiable by autograd: the lookup op wires
``pooled_forward`` and the backward functions into its own ``autograd.Function``. The fused
backward never builds a gradient of the whole array; results are bit-identical run to run and
for any number of threads (see the backward notes in the C++ file).
"""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType
from typing import Optional, Tuple

import torch

from robe_torchrec.ops.api import LookupBatch, OptimizerArgs

EXTENSION_NAME = "robe_torchrec_cpu_v5"  # v2: element_range (row-wise shards); v3: bf16 / fp16 training arrays; v4: touched-chunk-map backward, write-once forward; v5: tiled AVX2 hash
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "robe_cpu.cpp")
# No -march=native: the cached build may be reused on another machine of the same cluster, and
# the hot loops are short gathers the baseline SSE2 build already vectorises. -ffp-contract=off
# keeps a*b+c as two roundings, as PyTorch computes the reference's optimizer formulas.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]
_COMPILING_MESSAGE = "[robe-torchrec] compiling the CPU kernel once (about a minute)..."

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional[str] = None


def _build_is_cached() -> bool:
    """Whether torch's extension cache already holds an up-to-date build (then nothing compiles)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private but long-stable

        built = os.path.join(_get_build_directory(EXTENSION_NAME, verbose=False), EXTENSION_NAME + ".so")
        return os.path.getmtime(built) >= os.path.getmtime(SOURCE)
    except Exception:  # noqa: BLE001 - any doubt means "say that we compile"
        return False


def load_extension() -> ModuleType:
    """The compiled extension, built on first call (once per process; cached across processes).

    Raises:
        RuntimeError: if the extension cannot be built or loaded (missing compiler, build error).
            The failure is remembered: later calls raise at once instead of rebuilding.
    """
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            from torch.utils.cpp_extension import load

            if not _build_is_cached():
                print(_COMPILING_MESSAGE, file=sys.stderr, flush=True)
            _module = load(
                name=EXTENSION_NAME,
                sources=[SOURCE],
                extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - compiler missing, ninja missing, build or load error
            _error = (
                "robe-torchrec: the CPU kernel could not be built; it needs a C++ compiler with "
                "OpenMP (e.g. g++) and ninja (the reference kernel works without them). "
                f"Cause: {type(exc).__name__}: {exc}"
            )
            raise RuntimeError(_error) from exc
        return _module


def is_available() -> bool:
    """True if the CPU kernel is built (building it now if needed) and loads; never raises."""
    try:
        load_extension()
        return True
    except RuntimeError:
        return False


def pooled_forward(array: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API forward: pooled ``[B, F*dim]`` float32 (see ``reference.pooled_forward``); with
    ``batch.element_range``, the partial sums over the shard's elements only. The array may be
    float32, bfloat16 or float16 (read as float32, summed in float32 in the same order)."""
    b = _checked(batch, array.numel())
    lo, hi = _range(b)
    return load_extension().pooled_forward(
        array.detach(), b.indices, b.offsets, b.hash_keys, b.mean, _detached(b.weights), b.batch_size, b.dim,
        b.block_size, b.num_elements, lo, hi,
    )


def pooled_backward_dense(grad_out: torch.Tensor, batch: LookupBatch) -> torch.Tensor:
    """Kernel API backward (non-fused): the dense gradient ``[m]`` (see the reference), or
    ``[hi - lo]`` of the shard's elements with ``batch.element_range``."""
    b = _checked(batch)
    lo, hi = _range(b)
    return load_extension().pooled_backward_dense(
        grad_out.detach(), b.num_elements, b.indices, b.offsets, b.hash_keys, b.mean, _detached(b.weights),
        b.batch_size, b.dim, b.block_size, lo, hi,
    )


def pooled_backward_fused(
    grad_out: torch.Tensor, array: torch.Tensor, batch: LookupBatch, optimizer: OptimizerArgs
) -> None:
    """Kernel API fused backward: one optimizer step on ``array`` (and ``optimizer.state``) in place.

    Same update rules as ``reference.pooled_backward_fused``; only the touched chunks are read
    and written, and no gradient of the whole array is built. With ``batch.element_range`` the
    array and the state are the shard's (see :class:`~robe_torchrec.ops.api.LookupBatch`).
    A bfloat16 / float16 array is updated in float32 from its upcast value and rounded back
    (to nearest even, or stochastically with ``optimizer.rounding_seed``); the state is float32.
    """
    b = _checked(batch, array.numel())
    state = optimizer.state
    lr, eps = optimizer.hyper()
    load_extension().pooled_backward_fused(
        grad_out.detach(), array.detach(), state.detach(), b.indices, b.offsets, b.hash_keys, b.mean,
        _detached(b.weights), b.batch_size, b.dim, b.block_size, optimizer.kind.value, lr, eps,
        b.num_elements, *_range(b), optimizer.rounding_seed_or_nearest(),
    )
    # The C++ code writes through raw pointers, which autograd does not see: bump the version
    # counters as an in-place torch op would, so stale saved tensors are still detected.
    torch.autograd.graph.increment_version(array)
    if state.numel():
        torch.autograd.graph.increment_version(state)


def _range(batch: LookupBatch) -> Tuple[int, int]:
    """(lo, hi) of the elements the array holds: ``batch.element_range`` or the whole [0, m)."""
    if batch.element_range is None:
        return 0, batch.num_elements
    lo, hi = batch.element_range
    return int(lo), int(hi)


def _checked(batch: LookupBatch, array_numel: Optional[int] = None) -> LookupBatch:
    """The batch as the C++ code takes it: offsets starting at 0 and ending at nnz (a window is
    cut out here: reading two CPU offsets costs nothing), the array's length that of its range
    (the batch's m, or ``hi - lo`` of ``element_range``, whose bounds the C++ code checks)."""
    if array_numel is not None and batch.element_range is None and array_numel != batch.num_elements:
        raise ValueError(f"array has {array_numel} elements, the batch's num_elements is {batch.num_elements}")
    if batch.offsets.dim() != 1 or batch.offsets.device.type != "cpu" or batch.indices.device.type != "cpu":
        return batch  # the C++ checks name the problem
    return batch.narrowed()


def _detached(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()
