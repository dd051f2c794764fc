"""The ROBE pooled lookup as one autograd op, dispatched to a kernel by device.

Kernels: ``reference`` (PyTorch, any device, autograd), ``cpu`` (C++/OpenMP), ``triton`` (GPU;
also on CPU under TRITON_INTERPRET=1, for tests). ``auto`` picks triton on CUDA and cpu on CPU,
falling back to the reference (with a warning) when the fast kernel cannot load.

The fast kernels take one embedding dim per call (like one TBE per dim) through the kernel API
of :mod:`robe_torchrec.ops.api` (a :class:`~robe_torchrec.ops.api.LookupBatch`, built once per
call here, and, for a fused backward, an :class:`~robe_torchrec.ops.api.OptimizerArgs`); a layout
with several dims is split into its per-dim feature runs, which the module keeps contiguous
(with a fused optimizer, :func:`robe_torchrec.ops.library.fused_runs_lookup` steps once on the
runs' summed gradient). Every fast path goes through the ``robe::`` custom ops, so
``torch.compile(fullgraph=True)`` sees no kernel Python.
Nothing here reads offsets on the host: one call never synchronises with the device (the fused
Triton backward does once, for the number of touched chunks).
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Dict, List, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from robe_torchrec.ops.api import LookupBatch, OptimizerArgs, check_array_dtype, mean_flags
from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.library import fused_lookup, fused_runs_lookup
from robe_torchrec.ops.reference import robe_pooled_lookup_reference

KERNELS = ("auto", "reference", "cpu", "triton")
_BACKEND_MODULES = {"cpu": "robe_torchrec.ops.cpu", "triton": "robe_torchrec.ops.triton"}
_warned: Dict[str, bool] = {}


def _backend(name: str) -> ModuleType:
    return importlib.import_module(_BACKEND_MODULES[name])


def _available(name: str) -> Tuple[bool, str]:
    try:
        module = _backend(name)
        return bool(module.is_available()), ""
    except Exception as exc:  # an import or build failure: fall back, say why once
        return False, f"{type(exc).__name__}: {exc}"


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel that will actually run for ``kernel`` on ``device``."""
    return _resolve(kernel, torch.device(device).type)


@torch.compiler.assume_constant_result
def _resolve(kernel: str, device_type: str) -> str:
    """resolve_kernel on a device type; run eagerly (import, build, warning) even while torch.compile
    traces, which then treats the name as a constant of the graph."""
    device = torch.device(device_type)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "reference":
        return "reference"
    wanted = kernel
    if kernel == "auto":
        wanted = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "reference"
        if wanted == "reference":
            return wanted
    if wanted == "cpu" and device.type != "cpu":
        raise ValueError(f"kernel='cpu' needs CPU tensors, the array is on {device}")
    if wanted == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernel='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), the array is on {device}"
        )
    ok, why = _available(wanted)
    if ok:
        return wanted
    if not _warned.get(wanted):
        warnings.warn(
            f"robe-torchrec: the {wanted} kernel is unavailable ({why or 'not built'}); "
            "falling back to the (slower) reference lookup",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned[wanted] = True
    return "reference"


@runtime_checkable
class KernelArgsSource(Protocol):
    """Anything that can say, once per forward, how to step one array in backward (the fused
    optimizers of ``robe_torchrec.optim`` and ``robe_torchrec.sharding.state`` do)."""

    def kernel_args(self, array: torch.Tensor) -> OptimizerArgs: ...


FusedArg = Union[OptimizerArgs, KernelArgsSource, None]


def _optimizer_args(fused: FusedArg, array: torch.Tensor) -> Optional[OptimizerArgs]:
    if fused is None or isinstance(fused, OptimizerArgs):
        return fused
    if isinstance(fused, KernelArgsSource):
        return fused.kernel_args(array)
    raise TypeError(
        f"fused_optimizer must be an OptimizerArgs or have kernel_args(array), got {type(fused).__name__}"
    )


def robe_pooled_lookup(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    batch_size: int,
    per_sample_weights: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    fused_optimizer: FusedArg = None,
) -> torch.Tensor:
    """Pooled ``[B, layout.total_dim]`` embeddings of one array's features, by ``kernel``.

    ``offsets`` ([F*B + 1]) are positions in ``indices`` and may be a window of it (``offsets[0]``
    need not be 0, nor ``offsets[-1]`` the number of ids: a caller passes one group's offsets with
    the whole batch's ids and weights, and no host read is needed).

    With ``fused_optimizer`` (an :class:`~robe_torchrec.ops.api.OptimizerArgs` for this array, or
    an object whose ``kernel_args(array)`` returns one, such as the module's RobeFusedOptimizer),
    backward updates the array in place and leaves no gradient; otherwise backward gives the array
    a dense gradient. The array is float32, bfloat16 or float16 (``TypeError`` otherwise): the
    output is float32 (float32 accumulation), a dense gradient has the array's dtype (the float32
    gradient rounded once), a fused step keeps float32 state. Per-sample weights are treated as
    constants by the fast kernels (no gradient flows to them); the reference path differentiates them.
    """
    check_array_dtype(array, "robe_pooled_lookup")  # every kernel: float32, bfloat16 or float16
    name = resolve_kernel(kernel, array.device)
    optimizer = _optimizer_args(fused_optimizer, array)
    if name == "reference" and optimizer is None:
        return robe_pooled_lookup_reference(array, indices, offsets, layout, hash_keys, batch_size, per_sample_weights)

    dims = layout.dims
    batch = LookupBatch(
        indices=indices,
        offsets=offsets,
        hash_keys=hash_keys,
        mean=mean_flags(layout.mean, array.device),
        weights=per_sample_weights,
        batch_size=batch_size,
        dim=dims[0],
        block_size=layout.block_size,
        num_elements=layout.num_elements,
    )
    if len(set(dims)) == 1:
        if optimizer is not None:
            return fused_lookup(array, batch, optimizer, name)
        return _forward_op(array, batch, name)
    runs = [batch.features(f0, f1, dims[f0]) for f0, f1 in dim_runs(dims)]
    if optimizer is None:  # autograd sums the runs' dense gradients
        return torch.cat([_forward_op(array, run, name) for run in runs], dim=1)
    # one optimizer step on the runs' summed gradient (Adagrad is not additive), all through robe:: ops
    return fused_runs_lookup(array, runs, optimizer, name)


def _forward_op(array: torch.Tensor, batch: LookupBatch, kernel: str) -> torch.Tensor:
    """``robe::pooled_forward`` of one uniform-dim batch (dense gradient through register_autograd)."""
    b = batch
    return torch.ops.robe.pooled_forward(
        array, b.indices, b.offsets, b.hash_keys, b.mean, b.weights,
        b.batch_size, b.dim, b.block_size, b.num_elements, kernel,
    )


def dim_runs(dims: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """Maximal [f0, f1) runs of features with equal dims."""
    runs, start = [], 0
    for f in range(1, len(dims) + 1):
        if f == len(dims) or dims[f] != dims[start]:
            runs.append((start, f))
            start = f
    return runs


def runs_forward(backend: ModuleType, array: torch.Tensor, runs: List[LookupBatch]) -> torch.Tensor:
    """The kernel forward of each dim run of one array, concatenated along columns."""
    outs = [backend.pooled_forward(array.detach(), run) for run in runs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def runs_dense_grad(backend: ModuleType, grad_out: torch.Tensor, runs: List[LookupBatch]) -> torch.Tensor:
    """The array's dense gradient: the sum of every dim run's kernel backward (each run reads its
    columns of ``grad_out``)."""
    grad = None
    col = 0
    for run in runs:
        width = run.num_features * run.dim
        g = backend.pooled_backward_dense(grad_out[:, col : col + width].contiguous(), run)
        grad = g if grad is None else grad + g
        col += width
    assert grad is not None
    return grad
