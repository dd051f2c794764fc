"""Optimizers fused into the ROBE lookup's backward (FBGEMM style): no dense gradient of the array.

The update happens inside backward, so ``step()`` is a no-op, as for torchrec's own fused
embedding optimizers; the object exists so that checkpoints see the optimizer state, so that
``DistributedModelParallel.fused_optimizer`` / ``CombinedOptimizer`` can hold it, and so that LR
schedulers can drive it: the kernel reads ``param_groups[0]["lr"]`` at every backward (through
:meth:`RobeFusedOptimizerBase.kernel_args`, the plain data the ops layer takes). The state size of
every rule is :func:`state_numel` (defined with the kernel API in ``robe_torchrec.ops.api``).

Update rules (per step, gradient g summed over the batch first; chunk j = array elements
[j*Z, min((j+1)*Z, m))):

- ``sgd``:             M[e] -= lr * g[e]
- ``adagrad``:         S[e] += g[e]^2;  M[e] -= lr * g[e] / (sqrt(S[e]) + eps)   (exact, per element)
- ``rowwise_adagrad``: S[j] += mean over chunk j of g^2;  M[e] -= lr * g[e] / (sqrt(S[e // Z]) + eps)
  (one state value per aligned Z-element chunk: FBGEMM's row-wise Adagrad with the array viewed
  as a [m/Z, Z] table; Z times less state than exact Adagrad)

bfloat16 / float16 arrays: the state stays float32, the update is computed in float32 from the
element's upcast value and rounded back to nearest even, or, with
``RobeFusedOptimizerConfig(stochastic_rounding=True)`` (FBGEMM TBE's ``stochastic_rounding``),
stochastically: every backward draws a new seed from ``(rounding_seed, step)`` (see
:meth:`RobeFusedOptimizerBase.kernel_args`), so runs are reproducible from the start of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torchrec.optim.fused import FusedOptimizer

from robe_torchrec.ops.api import FUSED_OPTIMIZERS, OptimizerArgs, state_numel

__all__ = [
    "FUSED_OPTIMIZERS",
    "STATE_NAME",
    "RobeFusedOptimizer",
    "RobeFusedOptimizerBase",
    "RobeFusedOptimizerConfig",
    "mark_in_backward",
    "state_numel",
]

STATE_NAME = "momentum1"  # FBGEMM / torchrec name of the (row-wise) Adagrad accumulator


@dataclass(frozen=True)
class RobeFusedOptimizerConfig:
    """Which optimizer to fuse into backward, and its hyper-parameters.

    Never fuse the update of a data-parallel array: its gradient must be all-reduced first.
    """

    optimizer: str = "adagrad"
    lr: float = 0.01
    eps: float = 1e-8
    #: bf16 / fp16 arrays: round each new value stochastically instead of to nearest even (small
    #: updates then survive in expectation). The C++ kernel only, in eager mode; float32 arrays
    #: ignore it.
    stochastic_rounding: bool = False
    #: base seed of the rounding's random bits (with the step number; see ``kernel_args``).
    rounding_seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"fused optimizer must be one of {FUSED_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr >= 0:
            raise ValueError(f"fused optimizer lr must be >= 0, got {self.lr}")
        if not self.eps > 0:
            raise ValueError(f"fused optimizer eps must be > 0, got {self.eps}")
        if isinstance(self.rounding_seed, bool) or not isinstance(self.rounding_seed, int) or self.rounding_seed < 0:
            raise ValueError(f"rounding_seed must be an int >= 0, got {self.rounding_seed!r}")


class RobeFusedOptimizerBase(FusedOptimizer):
    """What every ROBE fused optimizer shares: no-op ``step``/``zero_grad`` (the update happened in
    backward) and the hyper-parameters the kernels read at backward time from ``param_groups``."""

    config: RobeFusedOptimizerConfig

    def step(self, closure: Any = None) -> None:
        """No-op: the update happened in backward."""
        if closure is not None:
            closure()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """No-op: fused arrays never hold a gradient."""

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])  # type: ignore[index]

    @property
    def eps(self) -> float:
        return float(self.param_groups[0]["eps"])  # type: ignore[index]

    def state_of(self, param: torch.Tensor) -> torch.Tensor:
        """The (local) accumulator of one array (empty for SGD)."""
        raise NotImplementedError

    def kernel_args(self, param: torch.Tensor) -> OptimizerArgs:
        """What the lookup kernels need to step ``param`` in backward, as plain data: the kind,
        the (local) state, and readers of lr / eps that look at ``param_groups`` when the backward
        runs (so LR schedulers are honoured). Built once per forward.

        With ``config.stochastic_rounding`` and a bf16 / fp16 ``param``, each call draws the next
        rounding seed, ``splitmix64(rounding_seed, n)`` with n counting this optimizer's calls: the
        same model, data and call order give the same bits. The count is not checkpointed (a
        resumed run rounds with other, equally unbiased bits). Under torch.compile it would be a
        graph constant, so that raises."""
        seed = None
        if getattr(self.config, "stochastic_rounding", False) and param.dtype != torch.float32:
            if torch.compiler.is_compiling() or torch.compiler.is_exporting():
                raise NotImplementedError(
                    "stochastic rounding of ROBE arrays runs eagerly only (its per-step seed would be a "
                    "graph constant); compile with stochastic_rounding=False (round to nearest even)"
                )
            step = getattr(self, "_rounding_calls", 0)
            self._rounding_calls = step + 1
            seed = _splitmix64(self.config.rounding_seed * 0x9E3779B97F4A7C15 + step) >> 1  # 63 bits
        return OptimizerArgs(
            kind=self.config.optimizer, state=self.state_of(param), lr=self._read_lr, eps=self._read_eps, rounding_seed=seed
        )

    def _read_lr(self) -> float:
        return self.lr

    def _read_eps(self) -> float:
        return self.eps


class RobeFusedOptimizer(RobeFusedOptimizerBase):
    """Holds the fused optimizer's hyper-parameters and state for a module's ROBE arrays.

    Args:
        params: ``{state-dict key: array parameter}``.
        block_sizes: ``{state-dict key: Z}`` of each array (sizes row-wise state).
        config: optimizer kind, lr, eps.
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        block_sizes: Mapping[str, int],
        config: RobeFusedOptimizerConfig,
    ) -> None:
        self.config = config
        self._block_sizes = dict(block_sizes)
        state: Dict[Any, Any] = {}
        for key, param in params.items():
            n = state_numel(config.optimizer, param.numel(), self._block_sizes[key])
            state[param] = {STATE_NAME: torch.zeros(n, dtype=torch.float32, device=param.device)}
        groups: List[Dict[str, Any]] = [
            {
                "params": list(params.values()),
                "lr": config.lr,
                "eps": config.eps,
                "optimizer": config.optimizer,
            }
        ]
        super().__init__(dict(params), state, groups)
        mark_in_backward(params.values(), self)

    def state_of(self, param: torch.Tensor) -> torch.Tensor:
        """The accumulator of one array (empty for SGD)."""
        return self.state[param][STATE_NAME]

    def rebind(self, params: Mapping[str, torch.nn.Parameter], move: Optional[Any] = None) -> None:
        """Point at new parameter objects (after ``module.to_empty`` / ``_apply``), keeping state.

        ``move`` maps an old state tensor to its new device (the module's ``_apply`` fn); the state
        stays float32 whatever dtype ``move`` gives the arrays (``module.to(torch.bfloat16)``).
        """
        old = {key: self.state[p][STATE_NAME] for key, p in self.params.items()}
        new_state: Dict[Any, Any] = {}
        for key, param in params.items():
            tensor = old[key] if move is None else move(old[key])
            if tensor.dtype != torch.float32:  # moved from the old tensor, not through the cast
                tensor = old[key].to(device=tensor.device, dtype=torch.float32)
            if tensor.device != param.device:
                # state that was never materialised (meta) starts at zero
                tensor = torch.zeros_like(tensor, device=param.device) if tensor.is_meta else tensor.to(param.device)
            new_state[param] = {STATE_NAME: tensor}
        self.params = dict(params)
        self.state = new_state
        self.param_groups[0]["params"] = list(params.values())  # type: ignore[index]
        mark_in_backward(params.values(), self)

    def ensure_bound(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Re-point at ``params`` if they were replaced behind the module's back (DMP swaps
        materialised meta parameters in place); state that was never real becomes zeros."""
        if any(self.params.get(k) is not p for k, p in params.items()):
            self.rebind(params)

    def reset_state(self) -> None:
        """Zero every accumulator (a fresh model after ``reset_parameters``)."""
        for key, param in self.params.items():
            n = state_numel(self.config.optimizer, param.numel(), self._block_sizes[key])
            self.state[param][STATE_NAME] = torch.zeros(n, dtype=torch.float32, device=param.device)


def _splitmix64(x: int) -> int:
    """SplitMix64's output function: a well-mixed 64-bit value of x (the per-step rounding seed)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def mark_in_backward(params: Any, optimizer: FusedOptimizer) -> None:
    """Tag arrays the way torch's _apply_optimizer_in_backward does, so that torchrec's
    ``in_backward_optimizer_filter`` keeps them out of the dense optimizer."""
    for p in params:
        p._in_backward_optimizers = [optimizer]  # type: ignore[attr-defined]
