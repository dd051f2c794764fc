"""Serving artifacts: ``torch.export`` of a model holding ROBE modules, saved with its ROBE layout.

    qmodel = quantize_inference_model(model, quantization_mapping=robe_quantization_mapping())
    program = export_model(qmodel, (dense, kjt))         # dynamic batch size and id count
    save_exported(program, "model.pt2")
    program = load_exported("model.pt2")                  # a fresh process: no training code needed
    logits = program.module()(dense, kjt)

A quantized model's ``layout`` buffers (hash version, m, Z, seed per group) travel inside the
program; the same layout is also written as JSON next to the program in the archive
(``extra_files``) and checked against the buffers on load, and ``load_exported(...,
expected_layout=...)`` refuses an artifact made under another layout.

A float model (RobeEmbeddingBagCollection, e.g. the training model in eval mode) exports the same
way; it has no layout buffer, so ``save_exported(program, path, layout=robe_layouts(model))``
records the layout from the module, and loading checks the record's m and Z against the program's
arrays and the ``robe::pooled_forward`` calls of its graph (the seed is baked into the graph's
hash-key constants, which the record states but cannot be recomputed without the table names).

Loading unpickles nothing: ``save_exported`` stores no example inputs (torch would pickle the
KeyedJaggedTensor and, on load, fall back to ``torch.load(weights_only=False)`` for it), and
``load_exported`` first checks (:func:`robe_torchrec.pickle_free.check_pickle_free`) that every
entry of the archive is JSON, raw tensor bytes or a text file, refusing any other by name, before
``torch.export.load`` reads it. Importing this module registers the ``robe::`` custom ops that
the program calls.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from robe_torchrec.artifact import (  # noqa: F401  (load_exported, ArtifactError: this module's API too)
    _FIELDS, LAYOUT_FILE, ArtifactError, Layouts, _check_record, _float_arrays, _quant_layouts, load_exported,
)
from robe_torchrec.hashing import HASH_VERSION
from robe_torchrec.modules.quant_robe_embedding_bag_collection import QuantRobeEmbeddingBagCollection
from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection



def robe_layouts(model: torch.nn.Module) -> Layouts:
    """``{module path: [per-group layout]}`` of every ROBE module in ``model`` (quantized: from its
    ``layout`` buffer; float: from its configs, in group order, the same as its quantized twin's)."""
    out: Layouts = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantRobeEmbeddingBagCollection):
            out[name] = [dict(zip(_FIELDS, row)) for row in module.layout.tolist()]
        elif isinstance(module, RobeEmbeddingBagCollection):
            out[name] = [
                dict(zip(_FIELDS, (HASH_VERSION, c.num_elements, c.block_size, c.seed)))
                for c in module.robe_configs().values()
            ]
    return out


def _dynamic_shapes(args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Every tensor's first dim dynamic (batch for dense inputs; ids / lengths for KJT leaves)."""

    def spec(arg: Any) -> Any:
        if isinstance(arg, torch.Tensor):
            return {0: Dim.AUTO} if arg.dim() else None
        leaves, _ = pytree.tree_flatten(arg)
        if len(leaves) == 1 and leaves[0] is arg:
            return None
        # custom pytree nodes (KeyedJaggedTensor) take the flattened children's specs
        return [None if not isinstance(leaf, torch.Tensor) or not leaf.dim() else {0: Dim.AUTO} for leaf in leaves]

    return tuple(spec(a) for a in args)


def export_model(model: torch.nn.Module, example_args: Tuple[Any, ...]) -> ExportedProgram:
    """``torch.export.export(strict=False)`` with dynamic batch size and dynamic number of ids."""
    if not robe_layouts(model):
        raise ValueError(
            "export_model expects a model with a RobeEmbeddingBagCollection or, to serve int8 / bf16 / fp16 "
            "arrays, a QuantRobeEmbeddingBagCollection (torchrec.inference.modules.quantize_inference_model("
            "model, quantization_mapping=robe_quantization_mapping())); this one has neither"
        )
    _warn_if_robe_left_float(model)
    model.eval()
    args = tuple(example_args)
    # size-oblivious: a batch of 1 (or one id) must not be specialised away from the example's sizes
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(args), strict=False)


def _warn_if_robe_left_float(model: torch.nn.Module) -> None:
    """Torchrec tables quantized but ROBE arrays still float: quantize_inference_model ran with a
    quantization_mapping that lacks ROBE (a float export is fine, but probably not what was meant)."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC, EmbeddingCollection as QuantEC

    modules = list(model.modules())
    float_robe = [type(m).__name__ for m in modules if isinstance(m, RobeEmbeddingBagCollection)]
    if float_robe and any(isinstance(m, (QuantEBC, QuantEC)) for m in modules):
        warnings.warn(
            "export_model: the model's torchrec tables are quantized but its RobeEmbeddingBagCollection(s) "
            "are still float32: the quantization_mapping given to quantize_inference_model lacks ROBE; add "
            "robe_quantization_mapping() to it (torchrec's default mapping has ROBE once robe_torchrec.modules is imported)",
            UserWarning,
            stacklevel=3,
        )


def save_exported(program: ExportedProgram, path: str, layout: Optional[Layouts] = None) -> None:
    """``torch.export.save`` with the ROBE layout of the program recorded beside it in the archive,
    and without the example inputs (a pickled KeyedJaggedTensor: loading it needs unpickling).

    ``layout``: ``robe_layouts(model)``; needed when the program holds float ROBE modules (their
    layout is not a buffer), checked against the program either way."""
    record = _quant_layouts(program)
    floats = _float_arrays(program)
    if floats and layout is None:
        raise ValueError(
            f"save_exported: the program holds float ROBE module(s) {sorted(floats)} whose layout is not a "
            "buffer; pass layout=robe_layouts(model) (the model that was exported)"
        )
    if layout is not None:
        record = dict(layout)
        _check_record(program, record, str(path))
    extra = {LAYOUT_FILE: json.dumps(record, sort_keys=True)}
    examples = program.example_inputs
    program.example_inputs = None  # restored below: the caller's program keeps its examples
    try:
        torch.export.save(program, path, extra_files=extra)
    finally:
        program.example_inputs = examples
