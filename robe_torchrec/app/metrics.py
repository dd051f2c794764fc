"""Validation AUC / log loss, and the metrics log (CSV, TensorBoard when it imports)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch


@dataclass
class EvalResult:
    auc: float
    logloss: float
    num_samples: int


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device) -> EvalResult:
    """AUC and log loss of ``model`` (DLRM-style forward(dense, sparse) -> logits) on ``batches``."""
    was_training = model.training
    model.eval()
    logits: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    for b in batches:
        b = b.to(device)
        logits.append(model(b.dense_features, b.sparse_features).squeeze(-1).float())
        labels.append(b.labels)
    model.train(was_training)
    z, y = torch.cat(logits), torch.cat(labels)
    return EvalResult(
        auc=binary_auroc(torch.sigmoid(z), y.long()).item(),
        logloss=F.binary_cross_entropy_with_logits(z, y).item(),
        num_samples=int(y.numel()),
    )


FIELDS = ["step", "kind", "loss", "auc", "logloss", "lr", "steps_per_s", "elapsed_s"]


class MetricsLogger:
    """Rank 0 writes rows to ``<dir>/metrics.csv`` (appending on resume) and TensorBoard scalars."""

    def __init__(self, directory: str, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._tb: Any = None
        self._file: Any = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.csv_path = os.path.join(directory, "metrics.csv")
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self._file = open(self.csv_path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        if new:
            self._writer.writeheader()
            self._file.flush()  # a worker killed before its first row still leaves the header
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(directory, "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self._tb = None

    def log(self, step: int, kind: str, **values: Optional[float]) -> None:
        if not self.enabled:
            return
        row: Dict[str, Any] = {"step": step, "kind": kind}
        row.update({k: ("" if v is None else v) for k, v in values.items()})
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if v is not None and k != "elapsed_s":
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
