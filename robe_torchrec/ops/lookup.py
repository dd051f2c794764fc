"""The ROBE pooled lookup as one autograd op, dispatched to a kernel by device.

Kernels: ``reference`` (PyTorch, any device, autograd), ``cpu`` (C++/OpenMP), ``triton`` (GPU;
also on CPU under TRITON_INTERPRET=1, for tests). ``auto`` picks triton on CUDA and cpu on CPU,
falling back to the reference (with a warning) when the fast kernel cannot load.

The fast kernels take one embedding dim per call (like one TBE per dim); a layout with several
dims is split into its per-dim feature runs, which the module keeps contiguous.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import torch

from robe_torchrec.ops.layout import FeatureLayout
from robe_torchrec.ops.reference import robe_pooled_lookup_reference

KERNELS = ("auto", "reference", "cpu", "triton")
_BACKEND_MODULES = {"cpu": "robe_torchrec.ops.cpu", "triton": "robe_torchrec.ops.triton_kernels"}
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


class _FusedStep:
    """What a fused backward needs: the optimizer (for lr/eps, read at backward time) and state."""

    def __init__(self, optimizer: Any, state: torch.Tensor) -> None:
        self.optimizer = optimizer
        self.state = state


class _RobeLookup(torch.autograd.Function):
    """One uniform-dim lookup; backward is the kernel's dense or fused backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        array: torch.Tensor,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        hash_keys: torch.Tensor,
        mean: torch.Tensor,
        weights: Optional[torch.Tensor],
        batch_size: int,
        dim: int,
        block_size: int,
        kernel: str,
        fused: Optional[_FusedStep],
    ) -> torch.Tensor:
        backend = _backend(kernel)
        out = backend.pooled_forward(
            array.detach(), indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size
        )
        ctx.save_for_backward(indices, offsets, hash_keys, mean, weights)
        ctx.meta = (array, batch_size, dim, block_size, kernel, fused)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        indices, offsets, hash_keys, mean, weights = ctx.saved_tensors
        array, batch_size, dim, block_size, kernel, fused = ctx.meta
        backend = _backend(kernel)
        grad_out = grad_out.contiguous()
        grad_array = None
        if fused is not None:
            opt = fused.optimizer
            with torch.no_grad():
                backend.pooled_backward_fused(
                    grad_out, array.data, fused.state, indices, offsets, hash_keys, mean, weights,
                    batch_size, dim, block_size, opt.config.optimizer, opt.lr, opt.eps,
                )
        elif ctx.needs_input_grad[0]:
            grad_array = backend.pooled_backward_dense(
                grad_out, array.numel(), indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size
            )
        return (grad_array,) + (None,) * 10


def robe_pooled_lookup(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    layout: FeatureLayout,
    hash_keys: torch.Tensor,
    batch_size: int,
    per_sample_weights: Optional[torch.Tensor] = None,
    kernel: str = "auto",
    fused_optimizer: Optional[Any] = None,
) -> torch.Tensor:
    """Pooled ``[B, layout.total_dim]`` embeddings of one array's features, by ``kernel``.

    With ``fused_optimizer`` (a RobeFusedOptimizer holding this array), backward updates the
    array in place and leaves no gradient; otherwise backward gives the array a dense gradient.
    Per-sample weights are treated as constants by the fast kernels (no gradient flows to them);
    the reference path differentiates them.
    """
    name = resolve_kernel(kernel, array.device)
    if name == "reference":
        if fused_optimizer is not None:
            return _ReferenceFused.apply(
                array, indices, offsets, layout, hash_keys, batch_size, per_sample_weights, fused_optimizer
            )
        return robe_pooled_lookup_reference(array, indices, offsets, layout, hash_keys, batch_size, per_sample_weights)

    fused = None if fused_optimizer is None else _FusedStep(fused_optimizer, fused_optimizer.state_of(array))
    mean = torch.tensor(layout.mean, dtype=torch.bool, device=array.device)
    dims = layout.dims
    if len(set(dims)) == 1:
        return _RobeLookup.apply(
            array, indices, offsets, hash_keys, mean, per_sample_weights,
            batch_size, dims[0], layout.block_size, name, fused,
        )
    runs = []
    for f0, f1 in _dim_runs(dims):
        lo, hi = int(offsets[f0 * batch_size]), int(offsets[f1 * batch_size])
        runs.append(
            (
                indices[lo:hi],
                offsets[f0 * batch_size : f1 * batch_size + 1] - lo,
                hash_keys[f0:f1],
                mean[f0:f1],
                None if per_sample_weights is None else per_sample_weights[lo:hi],
                dims[f0],
            )
        )
    return _RobeLookupRuns.apply(array, runs, batch_size, layout.block_size, name, fused)


def _dim_runs(dims: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """Maximal [f0, f1) runs of features with equal dims."""
    runs, start = [], 0
    for f in range(1, len(dims) + 1):
        if f == len(dims) or dims[f] != dims[start]:
            runs.append((start, f))
            start = f
    return runs


class _RobeLookupRuns(torch.autograd.Function):
    """Several embedding dims on one array: one kernel call per dim run, ONE optimizer step.

    The array's gradient is the sum over runs, so a fused step must see all of them at once
    (Adagrad is not additive); this rare layout therefore sums the runs' dense gradients and
    applies the fused update rule to that (DLRM-style models use one dim and never get here).
    """

    @staticmethod
    def forward(ctx: Any, array, runs, batch_size, block_size, kernel, fused):  # type: ignore[override]
        backend = _backend(kernel)
        outs = [
            backend.pooled_forward(array.detach(), ids, offs, keys, mean, w, batch_size, dim, block_size)
            for ids, offs, keys, mean, w, dim in runs
        ]
        ctx.meta = (array, runs, batch_size, block_size, kernel, fused)
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        from robe_torchrec.ops.reference import apply_optimizer_dense

        array, runs, batch_size, block_size, kernel, fused = ctx.meta
        backend = _backend(kernel)
        grad = None
        col = 0
        for ids, offs, keys, mean, w, dim in runs:
            width = keys.shape[0] * dim
            g = backend.pooled_backward_dense(
                grad_out[:, col : col + width].contiguous(), array.numel(), ids, offs, keys, mean, w,
                batch_size, dim, block_size,
            )
            grad = g if grad is None else grad + g
            col += width
        if fused is None:
            return (grad,) + (None,) * 5
        opt = fused.optimizer
        apply_optimizer_dense(array.data, fused.state, grad, opt.config.optimizer, opt.lr, opt.eps, block_size)
        return (None,) * 6


class _ReferenceFused(torch.autograd.Function):
    """Reference lookup whose backward applies the fused optimizer (for tests and any device)."""

    @staticmethod
    def forward(ctx: Any, array, indices, offsets, layout, hash_keys, batch_size, weights, optimizer):  # type: ignore[override]
        ctx.args = (array, indices, offsets, layout, hash_keys, batch_size, weights, optimizer)
        with torch.no_grad():
            return robe_pooled_lookup_reference(array, indices, offsets, layout, hash_keys, batch_size, weights)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        from robe_torchrec.ops.reference import apply_optimizer_dense

        array, indices, offsets, layout, hash_keys, batch_size, weights, opt = ctx.args
        leaf = torch.zeros_like(array, requires_grad=True)
        with torch.enable_grad():
            out = robe_pooled_lookup_reference(leaf, indices, offsets, layout, hash_keys, batch_size, weights)
            (g,) = torch.autograd.grad(out, leaf, grad_out)
        apply_optimizer_dense(array.data, opt.state_of(array), g, opt.config.optimizer, opt.lr, opt.eps, layout.block_size)
        return (None,) * 8
