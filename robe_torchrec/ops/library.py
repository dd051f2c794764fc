"""The ROBE training lookup as ``torch.library`` custom ops, so ``torch.compile`` and ``torch.export``
see one opaque node per lookup instead of tracing (and breaking on) the kernels' Python.

Ops (namespace ``robe``), one embedding dim per call, as the kernel API of
:mod:`robe_torchrec.ops.api`:

- ``robe::pooled_forward(array, indices, offsets, hash_keys, mean, weights, batch_size, dim,
  block_size, num_elements, kernel) -> [B, F*dim]``;
- ``robe::pooled_backward_dense(grad_out, indices, ..., kernel) -> [m]``, linked to the forward by
  ``register_autograd`` (the array's gradient; ids, offsets and weights get none);
- ``robe::pooled_backward_fused(grad_out, array, state, indices, ..., kind, lr, eps, kernel,
  rounding_seed=-1)``: one optimizer step that mutates ``array`` and ``state`` (``mutates_args``),
  lr / eps as floats;
- ``robe::apply_optimizer_dense(array, state, grad, kind, lr, eps, block_size)``: the same update
  rules on a dense float32 gradient, in place. A layout with several embedding dims looks each dim
  run up separately (the kernels take one dim per call) and must step ONCE on the sum of the runs'
  gradients (Adagrad is not additive): :func:`fused_runs_lookup` sums ``pooled_backward_dense`` of
  every run and applies this op, so that layout compiles without graph breaks too.

Arrays may be float32, bfloat16 or float16: the forward returns float32 (float32 accumulation), the
dense backward computes a float32 gradient and the forward's autograd rounds it to the array's
dtype (autograd requires a parameter's gradient to have its dtype), and the fused step keeps the
state float32 and rounds the array's new values (to nearest even; stochastically with
``rounding_seed >= 0``).

``kernel`` is ``"reference"``, ``"cpu"`` or ``"triton"`` (already resolved by the caller); the ops
build a :class:`~robe_torchrec.ops.api.LookupBatch` and call that backend's kernel API, so no kernel
code knows about them. Fake kernels give shapes from the arguments only (``[offsets.numel() - 1) /
F, F*dim]`` is ``[batch_size, F*dim]``; no data is read), so batch size and number of ids can be
dynamic.

Optimizer in backward (:func:`fused_lookup`): an ``autograd.Function`` whose forward calls the
forward op and whose backward calls the mutating fused op and returns no gradient. Chosen over
``register_autograd`` on the forward op because a registered backward must be a pure function of
the op's inputs and outputs (AOTAutograd functionalises it), while the fused step has to write into
the parameter and the optimizer state; dynamo traces an ``autograd.Function``'s backward into the
compiled backward graph, where the mutating op keeps its in-place effect. Hyper-parameters:
``OptimizerArgs.lr`` / ``eps`` may be callables (an LR scheduler's reader). In eager mode they are
called when the backward runs, as before. Under ``torch.compile`` / export they are read when the
forward is traced and enter the graph as constants (dynamo guards on the Python float it read, so a
changed lr recompiles rather than being silently ignored; a scheduler that changes lr every step
therefore recompiles every step until dynamo's cache limit, and then runs eagerly).
"""

from __future__ import annotations

import importlib
from typing import Any, List, Optional, Tuple

import torch

from robe_torchrec.hashing import block_offsets, element_indices
from robe_torchrec.ops.api import LookupBatch, OptimizerArgs, OptimizerKind, check_array_dtype
from robe_torchrec.ops.reference import apply_optimizer_dense as _apply_dense, require_nearest_rounding

__all__ = [
    "apply_optimizer_dense", "fused_lookup", "fused_runs_lookup", "pooled_backward_dense", "pooled_backward_fused",
    "pooled_forward",
]

_BACKENDS = {
    "reference": "robe_torchrec.ops.reference",
    "cpu": "robe_torchrec.ops.cpu",
    "triton": "robe_torchrec.ops.triton",
}


def _backend(kernel: str) -> Any:
    try:
        return importlib.import_module(_BACKENDS[kernel])
    except KeyError:
        raise ValueError(f"robe ops: kernel must be one of {tuple(_BACKENDS)}, got {kernel!r}") from None


def _batch(
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    num_elements: int,
) -> LookupBatch:
    return LookupBatch(
        indices=indices,
        offsets=offsets,
        hash_keys=hash_keys,
        mean=mean,
        weights=weights,
        batch_size=batch_size,
        dim=dim,
        block_size=block_size,
        num_elements=num_elements,
    )


def _reference_terms(b: LookupBatch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bag [nnz], coefficient [nnz], elements [nnz, dim]) of every id: the lookup is the linear map
    ``pooled[bag] += coef * array[elements]``. Plain torch math on the device, no host read."""
    nnz, bags, dim = b.indices.numel(), b.num_features * b.batch_size, b.dim
    offsets = b.offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    # rows 0 and bags + 1 hold the ids before / after the offsets' window (not pooled)
    spans = torch.cat([offsets[:1], lengths, nnz - offsets[-1:]])
    row = torch.repeat_interleave(torch.arange(bags + 2, device=offsets.device), spans, output_size=nnz)
    inside = (row >= 1) & (row <= bags)
    bag = (row - 1).clamp(0, max(bags - 1, 0))
    keys = b.hash_keys[bag // max(b.batch_size, 1)]
    starts = block_offsets(b.indices.to(torch.int64), keys[:, 0], keys[:, 1], dim // b.block_size, b.num_elements)
    elements = element_indices(starts, b.block_size, b.num_elements)
    mean = b.mean.to(torch.bool).repeat_interleave(b.batch_size)
    scale = torch.where(mean, 1.0 / lengths.clamp(min=1).float(), torch.ones((), device=offsets.device))
    coef = scale[bag] * inside.float() if bags else inside.float()
    if b.weights is not None:
        coef = coef * b.weights.float()
    return bag, coef, elements


def _reference_forward(array: torch.Tensor, b: LookupBatch) -> torch.Tensor:
    """The reference backend's forward as the op runs it: the same math as
    ``reference.pooled_forward`` without its host read of the mean flags (tested against it)."""
    check_array_dtype(array, "reference kernel")
    if array.numel() != b.num_elements:
        raise ValueError(f"array has {array.numel()} elements, the batch's num_elements is {b.num_elements}")
    bags, dim = b.num_features * b.batch_size, b.dim
    bag, coef, elements = _reference_terms(b)
    pooled = torch.zeros(bags, dim, dtype=torch.float32, device=array.device)
    if bags:
        pooled = pooled.index_add(0, bag, array.float()[elements] * coef.unsqueeze(1))
    return pooled.view(b.num_features, b.batch_size, dim).permute(1, 0, 2).reshape(b.batch_size, b.num_features * dim)


def _reference_dense_grad(grad_out: torch.Tensor, b: LookupBatch) -> torch.Tensor:
    """The reference backend's dense gradient without autograd (an op's body runs below the autograd
    dispatch key, where ``reference.pooled_backward_dense``'s ``autograd.grad`` records nothing): the
    transpose of the linear map of :func:`_reference_terms`. Tested against the autograd reference."""
    bags, dim = b.num_features * b.batch_size, b.dim
    grad = torch.zeros(b.num_elements, dtype=torch.float32, device=grad_out.device)
    if bags == 0 or b.indices.numel() == 0:
        return grad
    bag, coef, elements = _reference_terms(b)
    g = grad_out.float().reshape(b.batch_size, b.num_features, dim).permute(1, 0, 2).reshape(bags, dim)
    return grad.index_add(0, elements.reshape(-1), (g[bag] * coef.unsqueeze(1)).reshape(-1))


@torch.library.custom_op("robe::pooled_forward", mutates_args=())
def pooled_forward(
    array: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    num_elements: int,
    kernel: str,
) -> torch.Tensor:
    """Pooled ``[batch_size, F*dim]`` float32 of F = hash_keys.shape[0] features (kernel API forward);
    the array is float32, bfloat16 or float16 (summed in float32)."""
    batch = _batch(indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements)
    if kernel == "reference":
        return _reference_forward(array, batch)
    with torch.no_grad():
        return _backend(kernel).pooled_forward(array, batch)


@pooled_forward.register_fake
def _(array, indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements, kernel):  # type: ignore[no-untyped-def]
    return array.new_empty((batch_size, hash_keys.shape[0] * dim), dtype=torch.float32)


@torch.library.custom_op("robe::pooled_backward_dense", mutates_args=())
def pooled_backward_dense(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    num_elements: int,
    kernel: str,
) -> torch.Tensor:
    """The dense float32 gradient ``[num_elements]`` of ``sum(pooled * grad_out)`` (kernel API dense
    backward); the forward's autograd rounds it to the array's dtype (see ``_backward``)."""
    batch = _batch(indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements)
    if kernel == "reference":
        return _reference_dense_grad(grad_out, batch)
    with torch.no_grad():
        return _backend(kernel).pooled_backward_dense(grad_out.contiguous(), batch)


@pooled_backward_dense.register_fake
def _(grad_out, indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements, kernel):  # type: ignore[no-untyped-def]
    return grad_out.new_empty((num_elements,), dtype=torch.float32)


@torch.library.custom_op("robe::pooled_backward_fused", mutates_args=("array", "state"))
def pooled_backward_fused(
    grad_out: torch.Tensor,
    array: torch.Tensor,
    state: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    hash_keys: torch.Tensor,
    mean: torch.Tensor,
    weights: Optional[torch.Tensor],
    batch_size: int,
    dim: int,
    block_size: int,
    num_elements: int,
    kind: str,
    lr: float,
    eps: float,
    kernel: str,
    rounding_seed: int = -1,
) -> None:
    """One ``kind`` optimizer step on ``array`` and ``state`` in place (kernel API fused backward).

    ``rounding_seed``: -1 rounds a bfloat16 / float16 array's new values to nearest even, >= 0
    rounds them stochastically (``OptimizerArgs.rounding_seed``; the cpu kernel only)."""
    batch = _batch(indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements)
    seed = None if rounding_seed < 0 else rounding_seed
    optimizer = OptimizerArgs(kind=OptimizerKind.parse(kind), state=state, lr=lr, eps=eps, rounding_seed=seed)
    backend = _backend(kernel)
    with torch.no_grad():
        if kernel == "reference":  # the reference's fused step builds its gradient by autograd
            check_array_dtype(array, "reference kernel")
            if seed is not None and array.dtype != torch.float32:
                raise NotImplementedError("stochastic rounding (rounding_seed) of a bf16 / fp16 array needs the cpu kernel")
            backend.apply_optimizer_dense(array, state, _reference_dense_grad(grad_out, batch), kind, lr, eps, block_size)
        else:
            backend.pooled_backward_fused(grad_out.contiguous(), array, batch, optimizer)


@pooled_backward_fused.register_fake
def _(grad_out, array, state, indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements, kind, lr, eps, kernel, rounding_seed=-1):  # type: ignore[no-untyped-def]
    return None


@torch.library.custom_op("robe::apply_optimizer_dense", mutates_args=("array", "state"))
def apply_optimizer_dense(
    array: torch.Tensor,
    state: torch.Tensor,
    grad: torch.Tensor,
    kind: str,
    lr: float,
    eps: float,
    block_size: int,
) -> None:
    """One ``kind`` step of the fused optimizers' update rules on a dense float32 ``grad`` ([m]), in
    place; a bf16 / fp16 array is stepped in float32 and rounded to nearest even."""
    check_array_dtype(array, "robe::apply_optimizer_dense")
    if grad.numel() != array.numel():
        raise ValueError(f"gradient has {grad.numel()} elements, the array {array.numel()}")
    _apply_dense(array, state, grad, kind, lr, eps, block_size)


@apply_optimizer_dense.register_fake
def _(array, state, grad, kind, lr, eps, block_size):  # type: ignore[no-untyped-def]
    return None


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    array, indices, offsets, hash_keys, mean, weights, batch_size, dim, block_size, num_elements, kernel = inputs
    ctx.save_for_backward(indices, offsets, hash_keys, mean, weights)
    ctx.sizes = (batch_size, dim, block_size, num_elements, kernel)
    ctx.array_dtype = array.dtype


def _backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
    indices, offsets, hash_keys, mean, weights = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = pooled_backward_dense(grad_out, indices, offsets, hash_keys, mean, weights, *ctx.sizes)
        if ctx.array_dtype != torch.float32:  # autograd wants the parameter's dtype: round once here
            grad = grad.to(ctx.array_dtype)
    return (grad,) + (None,) * 10


pooled_forward.register_autograd(_backward, setup_context=_setup_context)


class _FusedLookup(torch.autograd.Function):
    """Forward op; backward steps the optimizer through the mutating fused op (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        array: torch.Tensor,
        state: torch.Tensor,
        batch: LookupBatch,
        kind: str,
        hyper: Optional[Tuple[float, float]],
        optimizer: OptimizerArgs,
        kernel: str,
    ) -> torch.Tensor:
        b = batch
        out = torch.ops.robe.pooled_forward(
            array, b.indices, b.offsets, b.hash_keys, b.mean, b.weights,
            b.batch_size, b.dim, b.block_size, b.num_elements, kernel,
        )
        ctx.save_for_backward(array, state)
        ctx.batch, ctx.kind, ctx.hyper, ctx.optimizer, ctx.kernel = batch, kind, hyper, optimizer, kernel
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        array, state = ctx.saved_tensors
        b = ctx.batch
        lr, eps = ctx.hyper if ctx.hyper is not None else ctx.optimizer.hyper()
        torch.ops.robe.pooled_backward_fused(
            grad_out, array, state, b.indices, b.offsets, b.hash_keys, b.mean, b.weights,
            b.batch_size, b.dim, b.block_size, b.num_elements, ctx.kind, lr, eps, ctx.kernel,
            ctx.optimizer.rounding_seed_or_nearest(),
        )
        return (None,) * 7


def fused_lookup(array: torch.Tensor, batch: LookupBatch, optimizer: OptimizerArgs, kernel: str) -> torch.Tensor:
    """Pooled lookup whose backward applies ``optimizer`` to ``array`` in place (no gradient left).

    Eager: lr / eps callables are read when the backward runs. Compiled / exported: read now
    (see the module doc).
    """
    hyper = optimizer.hyper() if torch.compiler.is_compiling() else None
    return _FusedLookup.apply(array, optimizer.state, batch, optimizer.kind.value, hyper, optimizer, kernel)


class _FusedRunsLookup(torch.autograd.Function):
    """Several dim runs of one array: a forward op per run; backward sums the runs' dense gradients
    (one op each) and steps the optimizer once through ``robe::apply_optimizer_dense``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        array: torch.Tensor,
        state: torch.Tensor,
        runs: List[LookupBatch],
        kind: str,
        hyper: Optional[Tuple[float, float]],
        optimizer: OptimizerArgs,
        kernel: str,
    ) -> torch.Tensor:
        outs = [
            torch.ops.robe.pooled_forward(
                array, r.indices, r.offsets, r.hash_keys, r.mean, r.weights,
                r.batch_size, r.dim, r.block_size, r.num_elements, kernel,
            )
            for r in runs
        ]
        ctx.save_for_backward(array, state)
        ctx.runs, ctx.kind, ctx.hyper, ctx.optimizer, ctx.kernel = runs, kind, hyper, optimizer, kernel
        return torch.cat(outs, dim=1)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        array, state = ctx.saved_tensors
        grad: Optional[torch.Tensor] = None
        col = 0
        for r in ctx.runs:
            width = r.num_features * r.dim
            g = torch.ops.robe.pooled_backward_dense(
                grad_out[:, col : col + width].contiguous(), r.indices, r.offsets, r.hash_keys, r.mean, r.weights,
                r.batch_size, r.dim, r.block_size, r.num_elements, ctx.kernel,
            )
            grad = g if grad is None else grad + g
            col += width
        lr, eps = ctx.hyper if ctx.hyper is not None else ctx.optimizer.hyper()
        torch.ops.robe.apply_optimizer_dense(array, state, grad, ctx.kind, lr, eps, ctx.runs[0].block_size)
        return (None,) * 7


def fused_runs_lookup(
    array: torch.Tensor, runs: List[LookupBatch], optimizer: OptimizerArgs, kernel: str
) -> torch.Tensor:
    """Pooled lookup of several dim runs of one array (columns run after run) whose backward steps
    ``optimizer`` once on the summed gradient, in place (no gradient left).

    That step rounds a bf16 / fp16 array to nearest (``NotImplementedError`` for stochastic
    rounding, which only the single-dim fused kernels do). lr / eps as in :func:`fused_lookup`.
    """
    require_nearest_rounding(array, optimizer, "a multi-dim layout's fused step")
    hyper = optimizer.hyper() if torch.compiler.is_compiling() else None
    return _FusedRunsLookup.apply(array, optimizer.state, runs, optimizer.kind.value, hyper, optimizer, kernel)
