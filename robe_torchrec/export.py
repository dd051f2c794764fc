"""Serving artifacts: ``torch.export`` of a model holding QuantRobeEmbeddingBagCollections, saved with its ROBE layout.

    qmodel = quantize_inference_model(model, quantization_mapping=robe_quantization_mapping())
    program = export_model(qmodel, (dense, kjt))         # dynamic batch size and id count
    save_exported(program, "model.pt2")
    program = load_exported("model.pt2")                  # a fresh process: no training code needed
    logits = program.module()(dense, kjt)

The program's ``layout`` buffers (hash version, m, Z, seed per group) travel inside it; the same
layout is also written as JSON next to the program in the archive (``extra_files``) and checked
against the buffers on load, and ``load_exported(..., expected_layout=...)`` refuses an artifact
made under another layout.

Loading unpickles nothing: ``save_exported`` stores no example inputs (torch would pickle the
KeyedJaggedTensor and, on load, fall back to ``torch.load(weights_only=False)`` for it), and
``load_exported`` first checks (:func:`robe_torchrec.pickle_free.check_pickle_free`) that every
entry of the archive is JSON, raw tensor bytes or a text file, refusing any other by name, before
``torch.export.load`` reads it. Importing this module registers the ``robe::`` custom ops that
the program calls.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from robe_torchrec.modules.quant_robe_embedding_bag_collection import QuantRobeEmbeddingBagCollection
from robe_torchrec.ops import stored_lookup  # noqa: F401  (registers torch.ops.robe.*)
from robe_torchrec.pickle_free import UnsafeArchiveError, check_pickle_free

LAYOUT_FILE = "robe_layout.json"


class ArtifactError(ValueError):
    """A serving artifact that is missing, unreadable, made under another ROBE layout, or one whose
    loading would unpickle something (:mod:`robe_torchrec.pickle_free`); names the file."""

_FIELDS = ("hash_version", "num_elements", "block_size", "seed")


def robe_layouts(model: torch.nn.Module) -> Dict[str, List[Dict[str, int]]]:
    """``{module path: [per-group layout]}`` of every QuantRobeEmbeddingBagCollection in ``model``."""
    return {
        name: [dict(zip(_FIELDS, row)) for row in module.layout.tolist()]
        for name, module in model.named_modules()
        if isinstance(module, QuantRobeEmbeddingBagCollection)
    }


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
            "export_model expects a model with a QuantRobeEmbeddingBagCollection: quantize it first with "
            "torchrec.inference.modules.quantize_inference_model(model, quantization_mapping="
            "robe_quantization_mapping()) (storage int8, or bfloat16 / float16 / float32 via from_float)"
        )
    model.eval()
    args = tuple(example_args)
    # size-oblivious: a batch of 1 (or one id) must not be specialised away from the example's sizes
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(model, args, dynamic_shapes=_dynamic_shapes(args), strict=False)


def save_exported(program: ExportedProgram, path: str) -> None:
    """``torch.export.save`` with the ROBE layout of the program recorded beside it in the archive,
    and without the example inputs (a pickled KeyedJaggedTensor: loading it needs unpickling)."""
    extra = {LAYOUT_FILE: json.dumps(_program_layouts(program), sort_keys=True)}
    examples = program.example_inputs
    program.example_inputs = None  # restored below: the caller's program keeps its examples
    try:
        torch.export.save(program, path, extra_files=extra)
    finally:
        program.example_inputs = examples


def load_exported(path: str, expected_layout: Optional[Dict[str, List[Dict[str, int]]]] = None) -> ExportedProgram:
    """Load an artifact written by :func:`save_exported`; refuse one whose layout record does not match
    its own buffers or ``expected_layout`` (as :func:`robe_layouts` returns it)."""
    if not os.path.isfile(path):
        raise ArtifactError(f"{path}: no such serving artifact")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a torch.export archive (truncated or another kind of file)")
    try:
        check_pickle_free(path)
    except UnsafeArchiveError as exc:
        raise ArtifactError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt archive: name the file
        raise ArtifactError(f"{path}: cannot be read as a torch.export archive ({type(exc).__name__}: {exc})") from exc
    extra = {LAYOUT_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure to deserialize: name the file
        raise ArtifactError(f"{path}: cannot be loaded as a torch.export artifact ({type(exc).__name__}: {exc})") from exc
    if not extra[LAYOUT_FILE]:
        raise ArtifactError(f"{path}: not a robe-torchrec serving artifact (no {LAYOUT_FILE} inside)")
    recorded = json.loads(extra[LAYOUT_FILE])
    actual = _program_layouts(program)
    if recorded != actual:
        raise ArtifactError(f"{path}: the recorded ROBE layout {recorded} does not match the program's buffers {actual}")
    if expected_layout is not None and expected_layout != actual:
        raise ArtifactError(f"{path}: made with ROBE layout {actual}, expected {expected_layout}; refusing to serve it")
    return program


def _program_layouts(program: ExportedProgram) -> Dict[str, List[Dict[str, int]]]:
    out: Dict[str, List[Dict[str, int]]] = {}
    for name, tensor in program.state_dict.items():
        if name == "layout" or name.endswith(".layout"):
            module = name[: -len(".layout")] if name.endswith(".layout") else ""
            out[module] = [dict(zip(_FIELDS, row)) for row in tensor.tolist()]
    return out
