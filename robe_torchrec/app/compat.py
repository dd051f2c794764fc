"""Which settings a checkpoint's tensors depend on, and the refusal to load one under others.

The training app stores :func:`checkpoint_signature` of its config in every checkpoint's manifest
(``meta.signature``); ``--resume`` and ``evaluate`` compare it with their own before loading a
tensor, and refuse with the differing settings named. The ROBE modules' own layout check (the
``_extra_state`` compared in ``load_state_dict``) stays as the second line of defence, for
checkpoints without a manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Sequence

from robe_torchrec.app import checkpoint
from robe_torchrec.app.config import TrainConfig
from robe_torchrec.app.model import build_tables, robe_configs


def checkpoint_signature(cfg: TrainConfig) -> Dict[str, Any]:
    """What a checkpoint's tensors depend on: model, tables, ROBE layout, optimizer kinds.

    A resume under any other value is refused (the state would mean something else or not fit).
    Not in it, so free to change on resume: learning rates and schedule, batch size, world size
    and sharding (DCP reshards), kernel, data paths, evaluation, logging."""
    tables = build_tables(cfg)
    robe, mapping = robe_configs(cfg, tables)
    o = cfg.optimizer
    sig = {
        "model": dataclasses.asdict(cfg.model),
        "num_dense": cfg.data.num_dense,
        "tables": {t.name: {"rows": t.num_embeddings, "dim": t.embedding_dim, "features": list(t.feature_names)} for t in tables},
        "robe": {g: c.layout() for g, c in robe.items()},
        "table_to_group": mapping or {},
        "optimizer": {"dense": o.dense, "sparse": o.sparse, "fused_kind": o.fused_kind if o.sparse == "fused" else None},
    }
    return json.loads(json.dumps(sig))  # as it reads back from the manifest


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def signature_differences(saved: Dict[str, Any], current: Dict[str, Any], skip: Sequence[str] = ()) -> List[str]:
    """``"key: checkpoint X, this run Y"`` for every setting that differs."""
    a, b = _flat(saved), _flat(current)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in skip or a.get(k, "<absent>") == b.get(k, "<absent>"):
            continue
        out.append(f"{k}: checkpoint {a.get(k, '<absent>')!r}, this run {b.get(k, '<absent>')!r}")
    return out


def check_compatible(
    path: str, manifest: Dict[str, Any], signature: Dict[str, Any], skip: Sequence[str] = (),
    hint: str = "or start a new run in another checkpoint.dir / logging.dir",
) -> None:
    """Raise CheckpointError when checkpoint ``path`` was written under another signature."""
    saved = manifest.get("meta", {}).get("signature")
    if saved is None:
        return  # not written by this app: the ROBE modules' own layout check still applies
    diffs = signature_differences(saved, signature, skip)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise checkpoint.CheckpointError(
            f"{path} was written with other model / ROBE layout / optimizer settings, refusing to load it: {shown}. "
            f"Use the settings it was written with (its config: {os.path.join(path, checkpoint.MANIFEST)})"
            + (f", {hint}" if hint else "")
        )
