"""Triton kernels for the ROBE pooled lookup: the GPU backend of the kernel API (:mod:`robe_torchrec.ops.api`).

Exposes ``pooled_forward``, ``pooled_backward_dense`` and ``pooled_backward_fused`` (see
:mod:`.launch`), :func:`is_available`, :func:`interpreted`, :func:`block_offsets_triton` (the hash
alone, for the golden-vector test) and the tuning knobs ``BagConfig`` / ``UpdateConfig`` /
``set_kernel_config`` / ``kernel_config`` (``ROBE_TRITON_CONFIG``, see :mod:`.tuning`). The
deterministic-backward flag is ``launch.DETERMINISTIC`` (``ROBE_TRITON_DETERMINISTIC=1``).

Modules, by job: :mod:`.hash` (the hash), :mod:`.bags` (the bag kernel: forward, dense backward,
the fused path's chunk marking and compact scatter), :mod:`.fused` (the fused backward's own
kernels and orchestration), :mod:`.tuning` (launch parameters), :mod:`.launch` (validation and
the kernel API), :mod:`.common` (shared helpers).

The same code runs on CUDA tensors (compiled) and on CPU tensors under ``TRITON_INTERPRET=1``
(Triton's numpy interpreter; this is how CI without a GPU tests it). ``TRITON_INTERPRET`` is read
when the kernel modules are imported (``triton.jit`` picks the interpreter at decoration time), so
it must be set before this package is first imported, or :func:`reload` called after. Triton
itself may have been imported earlier: the kernels call only Triton builtins and this package's
own @jit functions (see ``common.MAX_COMBINE``), never the @jit helpers of
``triton.language.standard``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from robe_torchrec.ops.triton.common import interpreted, is_available
from robe_torchrec.ops.triton.hash import block_offsets_triton
from robe_torchrec.ops.triton.launch import (
    pooled_backward_dense,
    pooled_backward_fused,
    pooled_forward,
    pooled_forward_stored,
)
from robe_torchrec.ops.triton.tuning import BagConfig, UpdateConfig, kernel_config, set_kernel_config

__all__ = [
    "BagConfig",
    "UpdateConfig",
    "block_offsets_triton",
    "interpreted",
    "is_available",
    "kernel_config",
    "pooled_backward_dense",
    "pooled_backward_fused",
    "pooled_forward",
    "pooled_forward_stored",
    "reload",
    "set_kernel_config",
]

_SUBMODULES = ("common", "hash", "tuning", "bags", "fused", "launch")


def reload() -> ModuleType:
    """Re-execute the kernel modules in dependency order (re-decorating every kernel: e.g. after
    setting ``TRITON_INTERPRET=1`` once triton was imported for a GPU), then this package. Resets
    the tuning overrides to ``ROBE_TRITON_CONFIG`` and ``launch.DETERMINISTIC`` to its env value.
    Returns this package (the same module object, updated in place)."""
    for name in _SUBMODULES:
        importlib.reload(sys.modules[f"{__name__}.{name}"])
    return importlib.reload(sys.modules[__name__])
