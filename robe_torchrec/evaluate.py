"""Evaluate a training checkpoint, or write click probabilities for unlabelled Criteo TSV files.

    python -m robe_torchrec.evaluate --config configs/synthetic_small.yaml [--checkpoint DIR] [--output m.json]
    python -m robe_torchrec.evaluate predict --config configs/criteo_kaggle.yaml \\
        --input /data/test.txt --output preds.txt [--checkpoint DIR]
    torchx run -s local_cwd launch/components.py:evaluate --config ...
    torchx run -s local_cwd launch/components.py:predict --config ... --input ... --output ...

One process (CPU or one GPU): the model is built unsharded and the checkpoint's ``model`` entry
is loaded with torch.distributed.checkpoint, which reshards it: a checkpoint written by N ranks
(any ROBE sharding type) loads here unchanged. ``--checkpoint`` is a ``step_N`` directory or a
checkpoint directory (its ``latest`` is used); default: the config's checkpoint directory.

``evaluate``: AUC and log loss on the config's validation data (``eval.batches`` x
``eval.batch_size``; synthetic: the held-out batches; criteo_tsv: ``data.val_paths``), printed
as JSON (and written to ``--output``). ``predict``: one probability per input line, in input
order, one per line of ``--output`` (``%.6f``); files with or without the label column.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed.checkpoint as dcp

from robe_torchrec.app import checkpoint as ckpt
from robe_torchrec.app.config import TrainConfig, load_config, split_cli_overrides
from robe_torchrec.app.data import eval_batches
from robe_torchrec.app.metrics import evaluate_batches
from robe_torchrec.app.model import build_model


def resolve_checkpoint(cfg: TrainConfig, path: Optional[str]) -> str:
    """A complete ``step_N`` checkpoint directory from ``path`` (or the config's checkpoint dir)."""
    directory = path or cfg.checkpoint.dir or os.path.join(cfg.logging.dir, "checkpoints")
    if os.path.isfile(os.path.join(directory, ".metadata")):
        return directory
    latest = ckpt.latest_step_dir(directory)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {directory} (expected a step_N directory or a 'latest' file)")
    return latest


def load_model(cfg: TrainConfig, path: str, device: torch.device) -> torch.nn.Module:
    """The unsharded model of ``cfg`` with the weights of checkpoint ``path``."""
    model = build_model(cfg, device, fused=False, for_dmp=False)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    model.eval()
    return model


def _device(cfg: TrainConfig) -> torch.device:
    d = cfg.train.device
    use_cuda = torch.cuda.is_available() if d == "auto" else d == "cuda"
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def run_evaluate(cfg: TrainConfig, checkpoint: Optional[str], output: Optional[str]) -> Dict[str, Any]:
    path = resolve_checkpoint(cfg, checkpoint)
    device = _device(cfg)
    model = load_model(cfg, path, device)
    r = evaluate_batches(model, eval_batches(cfg), device)
    result = {"checkpoint": path, "auc": r.auc, "logloss": r.logloss, "num_samples": r.num_samples}
    print(json.dumps(result))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2)
    return result


@torch.no_grad()
def run_predict(
    cfg: TrainConfig, checkpoint: Optional[str], inputs: Sequence[str], output: str, batch_size: int = 4096
) -> int:
    """Write one probability per input line to ``output``; returns the number of lines."""
    from robe_torchrec.data import CriteoTSVDataset

    path = resolve_checkpoint(cfg, checkpoint)
    device = _device(cfg)
    model = load_model(cfg, path, device)
    ds = CriteoTSVDataset(list(inputs), batch_size, skip_malformed=False, rank=0, world_size=1)
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w") as f:
        for b in ds:
            b = b.to(device)
            p = torch.sigmoid(model(b.dense_features, b.sparse_features).squeeze(-1).float()).cpu()
            f.writelines(f"{v:.6f}\n" for v in p.tolist())
            n += int(p.numel())
    os.replace(tmp, output)
    print(f"wrote {n:,} probabilities to {output} (checkpoint {path})")
    return n


def main(argv: Optional[Sequence[str]] = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["evaluate", "predict"], default="evaluate")
    p.add_argument("--config", default="configs/synthetic_small.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint", default=None, help="step_N directory or checkpoint directory")
    p.add_argument("--input", nargs="*", default=[], help="predict: Criteo TSV file(s), .gz ok")
    p.add_argument("--output", default=None, help="evaluate: JSON file; predict: probabilities file")
    p.add_argument("--batch_size", type=int, default=4096)
    args, rest = p.parse_known_args(argv)
    cfg = load_config(args.config, list(args.set) + split_cli_overrides(rest))
    if args.mode == "predict":
        if not args.input or not args.output:
            p.error("predict needs --input and --output")
        return run_predict(cfg, args.checkpoint, args.input, args.output, args.batch_size)
    return run_evaluate(cfg, args.checkpoint, args.output)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
