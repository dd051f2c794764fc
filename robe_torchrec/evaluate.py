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

Before loading, a checkpoint written by the training app is verified against its manifest
(sizes and CRC-32 of every file) and its settings (model, tables, ROBE layout) are compared with
the config's: a corrupt file or another layout is an error naming it. Loading unpickles nothing
but DCP's metadata classes and plain values (see ``robe_torchrec.app.checkpoint``); still, load
checkpoints only from sources you trust (docs/usage.md).

Exit status: 0; 1 for a data or checkpoint error, or metrics that are not finite (the JSON then
has ``null`` for them and an ``"error"`` entry: it is always valid JSON); 2 for a config error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from robe_torchrec.app.config import ConfigError, TrainConfig, load_config, split_cli_overrides
from robe_torchrec.app.data import validation_batches

# The checkpoint path needs the training app's model building and checkpoint code; the
# --exported path must not import it (a serving machine runs an artifact alone), so those
# imports live in the functions that load checkpoints.


def resolve_checkpoint(cfg: TrainConfig, path: Optional[str]) -> str:
    """A complete ``step_N`` checkpoint directory from ``path`` (or the config's checkpoint dir)."""
    from robe_torchrec.app import checkpoint as ckpt

    directory = path or cfg.checkpoint.dir or os.path.join(cfg.logging.dir, "checkpoints")
    if os.path.isfile(os.path.join(directory, ".metadata")) or os.path.isfile(os.path.join(directory, ckpt.MANIFEST)):
        return directory  # a step_N directory (verified, and any missing file named, by load_model)
    latest = ckpt.latest_step_dir(directory)
    if latest is None:
        pointer = os.path.join(directory, ckpt.LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as f:
                raise ckpt.CheckpointError(f"{pointer} names {f.read().strip()!r}, which does not exist")
        raise ckpt.CheckpointError(f"{directory}: no checkpoint (expected a step_N directory or a 'latest' file)")
    return latest


def load_model(cfg: TrainConfig, path: str, device: torch.device) -> torch.nn.Module:
    """The unsharded model of ``cfg`` with the weights of checkpoint ``path``.

    With a manifest (the training app's checkpoints): verified file by file, and the model /
    tables / ROBE layout it was written with must be the config's. Without one: a warning, and
    the ROBE layout check of ``load_state_dict`` still applies."""
    from robe_torchrec.app import checkpoint as ckpt
    from robe_torchrec.app.compat import check_compatible, checkpoint_signature
    from robe_torchrec.app.model import build_model

    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        manifest = ckpt.verify(path)
        check_compatible(path, manifest, checkpoint_signature(cfg), skip=("optimizer",), hint="")
    else:
        print(f"warning: {path} has no {ckpt.MANIFEST}: its files cannot be verified", file=sys.stderr)
    model = build_model(cfg, device, fused=False, for_dmp=False)
    state = {"model": model.state_dict()}
    ckpt.dcp_load(state, path)
    try:
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, KeyError) as e:  # e.g. the ROBE layout check
        raise ckpt.CheckpointError(f"{path}: {' '.join(str(e).split())}") from e
    model.eval()
    return model


def _device(cfg: TrainConfig) -> torch.device:
    d = cfg.train.device
    use_cuda = torch.cuda.is_available() if d == "auto" else d == "cuda"
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def run_evaluate(cfg: TrainConfig, checkpoint: Optional[str], output: Optional[str]) -> Dict[str, Any]:
    from robe_torchrec.app.metrics import evaluate_batches

    path = resolve_checkpoint(cfg, checkpoint)
    device = _device(cfg)
    model = load_model(cfg, path, device)
    r = evaluate_batches(model, validation_batches(cfg), device)
    result: Dict[str, Any] = {"checkpoint": path, "auc": r.auc, "logloss": r.logloss, "num_samples": r.num_samples}
    return _report(result, output)


def run_evaluate_exported(cfg: TrainConfig, artifact: str, output: Optional[str]) -> Dict[str, Any]:
    """:func:`run_evaluate` for a serving artifact (``python -m robe_torchrec.export_checkpoint``)."""
    from robe_torchrec.serve import evaluate_exported

    return _report(evaluate_exported(artifact, validation_batches(cfg)), output)


def _report(result: Dict[str, Any], output: Optional[str]) -> Dict[str, Any]:
    """Print (and write) the metrics as strict JSON; non-finite metrics become null plus an error."""
    bad = [k for k in ("logloss", "auc") if not math.isfinite(result[k])]
    if bad:  # JSON has no NaN / Infinity: null (an AUC of non-finite outputs means nothing either)
        result["auc"] = result["logloss"] = None
        result["error"] = f"non-finite {' and '.join(bad)}: the model's outputs are not finite"
    print(json.dumps(result, allow_nan=False))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
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
    p.add_argument("--exported", default=None, help="a serving artifact (.pt2) instead of a checkpoint")
    p.add_argument("--input", nargs="*", default=[], help="predict: Criteo TSV file(s), .gz ok")
    p.add_argument("--output", default=None, help="evaluate: JSON file; predict: probabilities file")
    p.add_argument("--batch_size", type=int, default=4096)
    args, rest = p.parse_known_args(argv)
    cfg = load_config(args.config, list(args.set) + split_cli_overrides(rest))
    if args.exported and args.checkpoint:
        p.error("give --checkpoint or --exported, not both")
    if args.mode == "predict":
        if not args.input or not args.output:
            p.error("predict needs --input and --output")
        if args.exported:
            from robe_torchrec.serve import predict_exported

            return predict_exported(args.exported, args.input, args.output, args.batch_size)
        return run_predict(cfg, args.checkpoint, args.input, args.output, args.batch_size)
    if args.exported:
        return run_evaluate_exported(cfg, args.exported, args.output)
    return run_evaluate(cfg, args.checkpoint, args.output)


def _load_errors() -> tuple:
    """Error types of the loaders that ran (checkpoint and/or artifact): only loaded modules count."""
    names = (("robe_torchrec.app.checkpoint", "CheckpointError"), ("robe_torchrec.artifact", "ArtifactError"))
    return tuple(getattr(sys.modules[m], n) for m, n in names if m in sys.modules)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m robe_torchrec.evaluate``: :func:`main` with exit codes (see the module doc)."""
    from robe_torchrec.data import DataError

    try:
        result = main(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except (*_load_errors(), DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    if isinstance(result, dict) and "error" in result:
        print(f"error: {result['error']}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    sys.exit(cli())
