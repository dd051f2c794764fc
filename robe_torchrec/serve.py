"""Evaluate or predict from an exported serving artifact, without the training code.

An artifact comes from ``python -m robe_torchrec.export_checkpoint`` (a training checkpoint,
quantized and exported) or from :func:`robe_torchrec.export.save_exported`. This module imports
only the artifact loader (:mod:`robe_torchrec.artifact`: the ``robe::`` ops, no module classes or
optimizers), the data readers and metrics: no model building, no checkpoint or distributed code. ``python -m robe_torchrec.evaluate --exported model.pt2`` and its ``predict`` mode
call these functions.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Sequence

import torch

from robe_torchrec.artifact import load_exported


@torch.no_grad()
def evaluate_exported(path: str, batches: Iterable[Any]) -> Dict[str, Any]:
    """AUC and log loss of the artifact at ``path`` on labelled ``batches`` (torchrec ``Batch``es)."""
    import torch.nn.functional as F
    from torchmetrics.functional.classification import binary_auroc

    model = load_exported(path).module()
    logits, labels = [], []
    for b in batches:
        logits.append(model(b.dense_features, b.sparse_features).reshape(-1).float())
        labels.append(b.labels)
    if not logits:
        raise ValueError(f"evaluate_exported({path}): no validation batches")
    z, y = torch.cat(logits), torch.cat(labels)
    return {
        "artifact": path,
        "auc": binary_auroc(torch.sigmoid(z), y.long()).item(),
        "logloss": F.binary_cross_entropy_with_logits(z, y).item(),
        "num_samples": int(y.numel()),
    }


@torch.no_grad()
def predict_exported(path: str, inputs: Sequence[str], output: str, batch_size: int = 4096) -> int:
    """One click probability per line of the Criteo TSV ``inputs`` into ``output``; returns the count.

    Written to ``output.tmp`` and renamed at the end, so a failure never leaves a partial file.
    """
    from robe_torchrec.data import CriteoTSVDataset

    model = load_exported(path).module()
    dataset = CriteoTSVDataset(list(inputs), batch_size, skip_malformed=False, rank=0, world_size=1)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp, n = output + ".tmp", 0
    with open(tmp, "w") as f:
        for b in dataset:
            p = torch.sigmoid(model(b.dense_features, b.sparse_features).reshape(-1).float())
            f.writelines(f"{v:.6f}\n" for v in p.tolist())
            n += int(p.numel())
    os.replace(tmp, output)
    print(f"wrote {n:,} probabilities to {output} (artifact {path})")
    return n
