"""Serving formats of a trained ROBE model: AUC, model bytes and inference samples/s, all measured in one run.

Trains the main job's model (DLRM + ROBE 1000x on the planted synthetic benchmark, through the app),
then serves the same weights as: the float training module (C++ kernel), QuantRobe fp32 / bf16 /
fp16 / int8 (``quantize_inference_model`` path, ``robe::pooled_lookup_stored`` op), and, for speed
and bytes only, torchrec's full-table ``EmbeddingBagCollection`` with the same MLPs (untrained).

    python -m robe_torchrec.bench.serving                      # the main job's 300 steps
    python -m robe_torchrec.bench.serving --steps 100 --iters 5
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.app.data import eval_batches
from robe_torchrec.app.metrics import evaluate_batches
from robe_torchrec.bench.lookup import timed
from robe_torchrec.modules.quant_robe_embedding_bag_collection import QuantRobeEmbeddingBagCollection
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection


def _embedding_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _ids_within_tables(kjt: KeyedJaggedTensor, ebc: RobeEmbeddingBagCollection) -> KeyedJaggedTensor:
    """The same bags with each id taken modulo its table's rows (full tables index rows; ROBE hashes)."""
    rows = {f: t.num_embeddings for t in ebc.embedding_bag_configs() for f in t.feature_names}
    per_key = torch.tensor([rows[k] for k in kjt.keys()], dtype=torch.int64)
    modulus = per_key.repeat_interleave(torch.tensor(kjt.length_per_key()))
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % modulus, lengths=kjt.lengths())


def _with_embeddings(model: DLRM, embeddings: torch.nn.Module) -> DLRM:
    served = copy.deepcopy(model)
    served.sparse_arch.embedding_bag_collection = embeddings
    return served.eval()


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_small.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--iters", type=int, default=10, help="timed forward passes per format (median)")
    p.add_argument("--batch", type=int, default=2048, help="inference batch size for timing")
    args = p.parse_args(argv)

    from robe_torchrec.train import main as train_main

    with tempfile.TemporaryDirectory() as tmp:
        trained = train_main(["--config", args.config, "--set", f"logging.dir={tmp}", "logging.progress=false",
                              "logging.tensorboard=false", f"train.steps={args.steps}", "checkpoint.every=0",
                              "checkpoint.final=false", "eval.every=0"])
    model: DLRM = trained.model.eval()  # type: ignore[assignment]
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, RobeEmbeddingBagCollection)
    val = eval_batches(trained.config)
    cpu = torch.device("cpu")
    timing = max(val, key=lambda b: b.labels.numel())
    rows: List[Dict[str, float]] = []

    def measure(name: str, served: torch.nn.Module, embeddings: torch.nn.Module, with_auc: bool = True) -> None:
        kjt = timing.sparse_features if with_auc else _ids_within_tables(timing.sparse_features, ebc)
        with torch.no_grad():
            auc = evaluate_batches(served, val, cpu).auc if with_auc else float("nan")
            ms = timed(lambda: served(timing.dense_features, kjt), args.iters, 2, cpu)
        rows.append({"format": name, "auc": auc, "embedding_bytes": _embedding_bytes(embeddings),
                     "samples_per_s": timing.labels.numel() / (ms / 1e3)})

    measure("ROBE fp32 (training module, C++ kernel)", model, ebc)
    for storage in ("float32", "bfloat16", "float16", "int8"):
        quant = QuantRobeEmbeddingBagCollection.from_float(ebc, storage=storage)
        measure(f"QuantRobe {storage} (stored-lookup op)", _with_embeddings(model, quant), quant)
    full = EmbeddingBagCollection(tables=copy.deepcopy(ebc.embedding_bag_configs()))
    measure("full tables fp32 (torchrec EBC, untrained: speed only)", _with_embeddings(model, full), full, with_auc=False)

    base = rows[0]["auc"]
    print(f"\n{args.steps} training steps, {sum(b.labels.numel() for b in val):,} validation samples, "
          f"timing batch {timing.labels.numel()}, {torch.get_num_threads()} threads")
    print("| format | val AUC | AUC - fp32 | embedding bytes | inference samples/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        delta = "" if r["auc"] != r["auc"] else f"{r['auc'] - base:+.5f}"
        auc = "-" if r["auc"] != r["auc"] else f"{r['auc']:.5f}"
        print(f"| {r['format']} | {auc} | {delta} | {int(r['embedding_bytes']):,} | {r['samples_per_s']:,.0f} |")
    return rows


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    main()
