"""Check that a ``torch.export`` PT2 archive can be loaded without unpickling anything.

``torch.export.load`` unpickles in four places: example inputs (``torch.load(weights_only=True)``,
then, silently, ``weights_only=False`` when that fails, which it does for a KeyedJaggedTensor),
weights or constants that are tensor subclasses (``use_pickle``: ``weights_only=False``), script /
opaque object constants (``pickle.loads``), and AOTInductor payloads (a compiled library it loads).
A serving artifact needs none of them, so :func:`check_pickle_free` accepts only archives whose
every entry is JSON, raw tensor bytes, an empty example-inputs record or an extra text file, and
refuses anything else by name BEFORE ``torch.export.load`` opens the archive.
"""

from __future__ import annotations

import json
import zipfile
from typing import Iterable, List

__all__ = ["UnsafeArchiveError", "check_pickle_free"]

# PT2 archive entries (below the archive's root folder) that hold no pickle
_METADATA = ("archive_format", "archive_version", "byteorder", ".data/")
_WEIGHTS, _CONSTANTS, _SAMPLES = "data/weights/", "data/constants/", "data/sample_inputs/"


class UnsafeArchiveError(ValueError):
    """The archive has an entry that loading would unpickle (or run); names the entry."""


def _relative_names(names: Iterable[str], path: str) -> List[str]:
    """Entry names below the single root folder every PT2 archive has."""
    names = [n for n in names if not n.endswith("/")]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise UnsafeArchiveError(f"{path}: not a PT2 archive (entries under several roots: {sorted(roots)})")
    return [n.split("/", 1)[1] for n in names]


def _check_payload_config(raw: bytes, entry: str, path: str, prefix: str) -> None:
    """Every weight / constant is raw tensor bytes (no ``use_pickle``, no script or opaque object)."""
    try:
        config = json.loads(raw)["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UnsafeArchiveError(f"{path}: {entry} is not a PT2 payload config ({exc})") from exc
    for fqn, meta in config.items():
        if meta.get("use_pickle", True) or not str(meta.get("path_name", "")).startswith(prefix):
            raise UnsafeArchiveError(
                f"{path}: {fqn!r} ({entry}) is stored as a pickled object ({meta.get('path_name')}); "
                "loading it would unpickle (a tensor subclass, script or opaque object) - refusing"
            )


def check_pickle_free(path: str) -> None:
    """Raise :class:`UnsafeArchiveError` unless loading ``path`` with ``torch.export.load`` unpickles nothing."""
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        names = _relative_names(infos, path)
        full = dict(zip(names, [n for n in infos if not n.endswith("/")]))
        if "archive_format" not in full or archive.read(full["archive_format"]).decode().strip() != "pt2":
            raise UnsafeArchiveError(f"{path}: not a PT2 archive (an older torch.export format, which pickles)")
        for name in names:
            if name.startswith(_METADATA) or name.startswith("extra/"):
                continue
            if name.startswith("models/") and name.endswith(".json"):
                continue
            if name.startswith(_WEIGHTS) and name.endswith("_weights_config.json"):
                _check_payload_config(archive.read(full[name]), name, path, "weight_")
            elif name.startswith(_CONSTANTS) and name.endswith("_constants_config.json"):
                _check_payload_config(archive.read(full[name]), name, path, "tensor_")
            elif name.startswith(_WEIGHTS + "weight_") or name.startswith(_CONSTANTS + "tensor_"):
                continue  # raw tensor bytes, read with torch.frombuffer when their config says so
            elif name.startswith(_SAMPLES):
                if infos[full[name]].file_size:
                    raise UnsafeArchiveError(
                        f"{path}: {name} holds pickled example inputs (torch.export.load would fall back to "
                        "torch.load(weights_only=False) for a KeyedJaggedTensor); save with "
                        "robe_torchrec.export.save_exported, which stores none"
                    )
            else:
                raise UnsafeArchiveError(
                    f"{path}: unexpected entry {name} (not JSON, raw tensor bytes or an extra file: it could be "
                    "a pickle or compiled code) - refusing to load it"
                )
