"""Dense optimizer (MLPs, plus the ROBE arrays when they are not fused) and the LR schedule."""

from __future__ import annotations

from typing import Iterable, List

import torch

from robe_torchrec.app.config import OptimizerConfig


def trainable_dense_params(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Parameters without an optimizer fused into backward (torchrec's in-backward convention)."""
    return [p for p in model.parameters() if p.requires_grad and not hasattr(p, "_in_backward_optimizers")]


def build_dense_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps)
    if cfg.dense == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps)
    return torch.optim.SGD(params, lr=cfg.lr)


def lr_factor(cfg: OptimizerConfig, step: int) -> float:
    """Multiplier of the base LR for update ``step`` (0-based): linear warmup, then poly decay."""
    factor = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    if cfg.decay_steps > 0 and step >= cfg.decay_start:
        progress = min(1.0, (step - cfg.decay_start) / cfg.decay_steps)
        factor *= cfg.end_lr_factor + (1.0 - cfg.end_lr_factor) * (1.0 - progress) ** cfg.decay_power
    return factor


def set_lr(optimizers: Iterable[torch.optim.Optimizer], base_lrs: Iterable[float], factor: float) -> float:
    """Set every group's lr to base * factor (the fused kernel reads param_groups[0]["lr"])."""
    last = 0.0
    for opt, base in zip(optimizers, base_lrs):
        for g in opt.param_groups:
            g["lr"] = base * factor
        last = base * factor
    return last
