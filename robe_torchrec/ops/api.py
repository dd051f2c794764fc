"""The kernel API: what every ROBE lookup backend (reference, cpu, triton) takes, as typed bundles.

Every backend module provides, for one embedding dim per call (like one FBGEMM TBE per dim):

- ``pooled_forward(array, batch) -> [B, F*D]`` float32;

The array is float32, bfloat16 or float16 (:data:`ARRAY_DTYPES`): reduced-precision arrays are read
as float32 and summed in float32; gradients and optimizer state are always float32, and a fused
step computes in float32 and rounds the new value into the array's dtype (``OptimizerArgs.rounding_seed``).
- ``pooled_backward_dense(grad_out, batch) -> [m]``: the dense gradient of ``sum(pooled * grad_out)``;
- ``pooled_backward_fused(grad_out, array, batch, optimizer) -> None``: one optimizer step on
  ``array`` (and ``optimizer.state``) in place, without a gradient the size of the array;

with ``batch`` a :class:`LookupBatch` (ids, bag offsets, per-feature keys and pooling, shape) and
``optimizer`` an :class:`OptimizerArgs` (kind, state, lr, eps). Both are plain data built once per
forward: this layer never sees the optimizer object of the layer above (``robe_torchrec.optim``
builds :class:`OptimizerArgs` with :meth:`~robe_torchrec.optim.RobeFusedOptimizerBase.kernel_args`).

The bundles do not validate their fields: each backend checks what it needs (dtypes, shapes,
devices) and raises its own errors, so that building one costs nothing per forward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple, Union

import torch

__all__ = [
    "ARRAY_DTYPES",
    "FUSED_OPTIMIZERS",
    "LookupBatch",
    "OptimizerArgs",
    "OptimizerKind",
    "check_array_dtype",
    "mean_flags",
    "state_numel",
]


class OptimizerKind(str, enum.Enum):
    """The optimizers fused into backward (values are the config names; a ``str``, so
    ``OptimizerKind.SGD == "sgd"``)."""

    SGD = "sgd"
    ADAGRAD = "adagrad"
    ROWWISE_ADAGRAD = "rowwise_adagrad"

    @classmethod
    def parse(cls, value: Union[str, "OptimizerKind"]) -> "OptimizerKind":
        """The kind named ``value``; ``ValueError`` naming the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"unknown fused optimizer {value!r}: {', '.join(k.value for k in cls)}"
            ) from None


FUSED_OPTIMIZERS: Tuple[str, ...] = tuple(k.value for k in OptimizerKind)

#: The dtypes a training array may have (every backend accepts these and rejects others).
ARRAY_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def check_array_dtype(array: torch.Tensor, who: str) -> None:
    """``TypeError`` naming the supported dtypes when ``array`` is not float32 / bfloat16 / float16."""
    if array.dtype not in ARRAY_DTYPES:
        raise TypeError(
            f"{who}: the ROBE array must be float32, bfloat16 or float16, got {array.dtype}"
        )


def state_numel(optimizer: Union[str, OptimizerKind], num_elements: int, block_size: int) -> int:
    """Elements of fused-optimizer state for one array of ``num_elements`` elements, block size Z:
    0 (sgd), m (adagrad), ceil(m / Z) (rowwise_adagrad: one accumulator per aligned Z-chunk).

    The one sizing rule: the module, the sharded state, the planner's sizing and the kernels'
    checks all call this.
    """
    kind = OptimizerKind.parse(optimizer)
    if kind is OptimizerKind.SGD:
        return 0
    if kind is OptimizerKind.ADAGRAD:
        return num_elements
    return -(-num_elements // block_size)


@dataclass(frozen=True)
class LookupBatch:
    """One uniform-dim lookup of F features over a batch of B samples.

    Attributes:
        indices: int64 ids, feature-major. Bag (f, b) is
            ``indices[offsets[f*B + b] : offsets[f*B + b + 1]]``.
        offsets: [F*B + 1] int64 bag boundaries, positions in ``indices``. They may be a window of
            a larger batch: ``offsets[0] > 0`` and ``offsets[-1] < indices.numel()`` are allowed
            (ids outside the window belong to other features and are not pooled), which lets a
            caller pass one group's or one dim's features without reading offsets on the host.
        hash_keys: [F, 2] int64 table keys (k0, k1) of each feature (``FeatureLayout.hash_keys``).
        mean: [F] bool, True where the feature pools by MEAN (else SUM).
        weights: [indices.numel()] float32 per-id weights (aligned with ``indices``), or None.
        batch_size: B.
        dim: D, the embedding dim of every feature here (a multiple of ``block_size``).
        block_size: Z.
        num_elements: m, the length of the whole (logical) array.
        element_range: None (the array passed to the kernel is the whole array), or ``(lo, hi)``
            with ``0 <= lo < hi <= m`` and ``lo``, ``hi`` multiples of Z (or ``hi == m``): the
            array passed holds only global elements ``[lo, hi)`` (a row-wise shard;
            ``array.numel() == hi - lo``). Hashing still uses m; element ``e`` is read from
            ``array[e - lo]`` when ``lo <= e < hi`` and counts as 0 otherwise; the fused backward
            updates only elements (and state entries) in the range, with state local to the shard
            (adagrad: ``hi - lo`` entries; rowwise_adagrad: one per local Z-chunk), and the dense
            backward returns ``[hi - lo]``. The partial sums of shards tiling ``[0, m)`` add up to
            the whole-array result.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    hash_keys: torch.Tensor
    mean: torch.Tensor
    weights: Optional[torch.Tensor]
    batch_size: int
    dim: int
    block_size: int
    num_elements: int
    element_range: Optional[Tuple[int, int]] = None

    @property
    def num_features(self) -> int:
        return int(self.hash_keys.shape[0])

    def features(self, f0: int, f1: int, dim: int) -> "LookupBatch":
        """Features ``[f0, f1)`` of dim ``dim``: a window of this batch (no host read of offsets)."""
        b = self.batch_size
        return replace(
            self,
            offsets=self.offsets[f0 * b : f1 * b + 1],
            hash_keys=self.hash_keys[f0:f1],
            mean=self.mean[f0:f1],
            dim=dim,
        )

    def narrowed(self) -> "LookupBatch":
        """The same lookup with ``indices`` / ``weights`` cut to the window and offsets rebased to
        start at 0 (what the C++ kernel and the sort-based Triton path need).

        Reads ``offsets[0]`` and ``offsets[-1]`` on the host: free on CPU, one device sync on a GPU.
        Returns ``self`` when the window is already the whole of ``indices``.
        """
        nnz = self.indices.numel()
        if self.offsets.numel() == 0:
            return self
        lo, hi = (int(x) for x in torch.stack([self.offsets[0], self.offsets[-1]]).tolist())
        if lo == 0 and hi == nnz:
            return self
        if not 0 <= lo <= hi <= nnz:
            raise ValueError(f"offsets window [{lo}, {hi}) is not inside the {nnz} ids")
        return replace(
            self,
            indices=self.indices[lo:hi],
            offsets=self.offsets - lo,
            weights=None if self.weights is None else self.weights[lo:hi],
        )


HyperParam = Union[float, Callable[[], float]]


@dataclass(frozen=True)
class OptimizerArgs:
    """What a fused backward needs, as plain data.

    Attributes:
        kind: the update rule (a ``str`` is parsed; an unknown name raises ``ValueError``).
        state: the accumulator, float32 ``[state_numel(kind, m, Z)]`` (empty for sgd).
        lr, eps: numbers, or zero-argument callables read when the backward runs (an LR scheduler
            changes the optimizer's ``param_groups`` between forward and backward; the fused
            optimizers pass a reader of their ``param_groups``).
        rounding_seed: how a bfloat16 / float16 array stores its float32-computed update. None:
            round to nearest even (what ``tensor.to(dtype)`` does). An int >= 0: stochastic
            rounding, element ``e`` rounded up with probability equal to its distance from the
            lower neighbour, using random bits that are a hash of ``(rounding_seed, e)``: the
            same seed gives the same result on any number of threads; pass a new seed every step.
            Ignored for float32 arrays.
    """

    kind: OptimizerKind
    state: torch.Tensor
    lr: HyperParam
    eps: HyperParam = 1e-8
    rounding_seed: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OptimizerKind.parse(self.kind))
        seed = self.rounding_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ValueError(f"rounding_seed must be None or an int in [0, 2**63), got {seed!r}")

    def rounding_seed_or_nearest(self) -> int:
        """The seed as the kernels take it: -1 for round-to-nearest-even."""
        return -1 if self.rounding_seed is None else int(self.rounding_seed)

    def hyper(self) -> Tuple[float, float]:
        """(lr, eps) now (callables are called)."""
        lr = self.lr() if callable(self.lr) else self.lr
        eps = self.eps() if callable(self.eps) else self.eps
        return float(lr), float(eps)


_MEAN_FLAGS: Dict[Tuple[Tuple[bool, ...], torch.device], torch.Tensor] = {}


def mean_flags(mean: Tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """The [F] bool tensor of ``mean`` on ``device``, made once per (flags, device) and cached
    (a host-to-device copy per forward otherwise). Treat it as read-only."""
    key = (tuple(bool(x) for x in mean), torch.device(device))
    cached = _MEAN_FLAGS.get(key)
    if cached is None:
        cached = torch.tensor(key[0], dtype=torch.bool, device=key[1])
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            _MEAN_FLAGS[key] = cached  # a traced one may be fake: the graph keeps its own
    return cached
