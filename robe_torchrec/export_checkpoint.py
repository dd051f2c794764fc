"""Turn a training checkpoint into a serving artifact: load, quantize, ``torch.export``, save.

    python -m robe_torchrec.export_checkpoint --config configs/synthetic_small.yaml \\
        [--checkpoint DIR] --output model.pt2 [--storage int8|bfloat16|float16|float32]
    python -m robe_torchrec.evaluate --exported model.pt2 --config configs/synthetic_small.yaml

The checkpoint is loaded as ``python -m robe_torchrec.evaluate`` loads it (any number of ranks,
any sharding type), every ROBE module is converted by torchrec's ``quantize_inference_model``
with :func:`robe_quantization_mapping`, and the model is exported with dynamic batch size and id
count on one validation batch of the config (see ``robe_torchrec.export``).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from robe_torchrec.export import export_model, robe_layouts, save_exported

_DTYPES = {"int8": torch.qint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_checkpoint(config: str, checkpoint: Optional[str], output: str, storage: str = "int8",
                      overrides: Sequence[str] = ()) -> str:
    """Write the artifact of ``checkpoint`` (default: the config's latest) to ``output``; returns it."""
    from torchrec.inference.modules import quantize_inference_model

    from robe_torchrec.app.config import load_config
    from robe_torchrec.app.data import eval_batches
    from robe_torchrec.evaluate import load_model, resolve_checkpoint
    from robe_torchrec.modules.quant_robe_embedding_bag_collection import robe_quantization_mapping

    if storage not in _DTYPES:
        raise ValueError(f"--storage must be one of {sorted(_DTYPES)}, got {storage!r}")
    cfg = load_config(config, list(overrides))
    path = resolve_checkpoint(cfg, checkpoint)
    model = load_model(cfg, path, torch.device("cpu"))
    quant = quantize_inference_model(model, quantization_mapping=robe_quantization_mapping(),
                                     quantization_dtype=_DTYPES[storage])
    example = eval_batches(cfg)[0]
    program = export_model(quant, (example.dense_features, example.sparse_features))
    save_exported(program, output)
    print(f"exported {path} ({storage} ROBE arrays, layout {robe_layouts(quant)}) to {output}")
    return output


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_small.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint", default=None, help="step_N directory or checkpoint directory")
    p.add_argument("--output", required=True, help="artifact file (e.g. model.pt2)")
    p.add_argument("--storage", default="int8", choices=sorted(_DTYPES))
    args = p.parse_args(argv)
    return export_checkpoint(args.config, args.checkpoint, args.output, args.storage, args.set)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
