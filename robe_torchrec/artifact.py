"""Loading a serving artifact: the half of :mod:`robe_torchrec.export` a server needs.

``load_exported`` imports only this file, the archive check (:mod:`robe_torchrec.pickle_free`) and
the ``robe::`` custom ops the program calls (``robe_torchrec.ops.library`` / ``stored_lookup``): no
module classes, optimizers or training code, so a serving process (``robe_torchrec.serve``,
``python -m robe_torchrec.evaluate --exported``) stays small. Writing artifacts
(:func:`robe_torchrec.export.save_exported`) lives with the exporter.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Dict, List, Optional

import torch
from torch.export import ExportedProgram

from robe_torchrec.ops import library, stored_lookup  # noqa: F401  (register torch.ops.robe.*)
from robe_torchrec.pickle_free import UnsafeArchiveError, check_pickle_free

LAYOUT_FILE = "robe_layout.json"
_FIELDS = ("hash_version", "num_elements", "block_size", "seed")

Layouts = Dict[str, List[Dict[str, int]]]


class ArtifactError(ValueError):
    """A serving artifact that is missing, unreadable, made under another ROBE layout, or one whose
    loading would unpickle something (:mod:`robe_torchrec.pickle_free`); names the file."""


def load_exported(path: str, expected_layout: Optional[Layouts] = None) -> ExportedProgram:
    """Load an artifact written by :func:`save_exported`; refuse one that would need unpickling, or
    whose layout record does not match the program or ``expected_layout`` (as :func:`robe_layouts`
    returns it)."""
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
    try:
        _check_record(program, recorded, path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from exc
    if expected_layout is not None and expected_layout != recorded:
        raise ArtifactError(f"{path}: made with ROBE layout {recorded}, expected {expected_layout}; refusing to serve it")
    return program


def _quant_layouts(program: ExportedProgram) -> Layouts:
    """The layouts of the program's quantized ROBE modules, from their ``layout`` buffers."""
    out: Layouts = {}
    for name, tensor in program.state_dict.items():
        if name == "layout" or name.endswith(".layout"):
            module = name[: -len(".layout")] if name.endswith(".layout") else ""
            out[module] = [dict(zip(_FIELDS, row)) for row in tensor.tolist()]
    return out


def _float_arrays(program: ExportedProgram) -> Dict[str, List[int]]:
    """``{module path: [array numel per group]}`` of the program's float ROBE modules (``<path>.arrays.<group>``)."""
    out: Dict[str, List[int]] = {}
    for name, tensor in program.state_dict.items():
        head, sep, _ = name.rpartition(".arrays.")
        if sep and "." not in name[len(head) + len(sep):]:
            out.setdefault(head, []).append(int(tensor.numel()))
    return out


def _lookup_shapes(program: ExportedProgram) -> set:
    """(m, Z) of every ``robe::pooled_forward`` call in the program's graph."""
    return {
        (int(node.args[9]), int(node.args[8]))
        for node in program.graph.nodes
        if node.op == "call_function" and node.target is torch.ops.robe.pooled_forward.default
    }


def _check_record(program: ExportedProgram, record: Layouts, where: str) -> None:
    """The layout record agrees with the program: quantized modules exactly (their buffers); float
    modules in m (array sizes) and Z (the lookups' arguments). Raises ValueError naming ``where``."""
    quant, floats = _quant_layouts(program), _float_arrays(program)
    if set(record) != set(quant) | set(floats):
        raise ValueError(f"{where}: the ROBE layout record names modules {sorted(record)}, the program has "
                         f"{sorted(set(quant) | set(floats))}")
    for module, groups in quant.items():
        if record[module] != groups:
            raise ValueError(f"{where}: the recorded ROBE layout of {module!r} {record[module]} does not match "
                             f"the program's buffers {groups}")
    shapes = _lookup_shapes(program)  # empty for the reference kernel's plain-torch path: m checked only
    for module, sizes in floats.items():
        stated = [g["num_elements"] for g in record[module]]
        zs = [{z for m, z in shapes if m == g["num_elements"]} for g in record[module]]
        if stated != sizes or any(z and g["block_size"] not in z for g, z in zip(record[module], zs)):
            raise ValueError(f"{where}: the recorded ROBE layout of {module!r} {record[module]} does not match the "
                             f"program (array sizes {sizes}, lookups (m, Z) {sorted(shapes)})")
