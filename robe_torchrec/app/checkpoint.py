"""Atomic, checksummed torch.distributed.checkpoint (DCP) checkpoints: model, optimizers, fused state, step.

Layout under the checkpoint directory::

    step_10/        a complete DCP checkpoint + manifest.json
    step_20/
    latest          text file: "step_20"

Writing step N (:func:`save`): the state is checked finite first (a non-finite value anywhere
refuses the save: :class:`NonFiniteStateError`, nothing written); every rank writes its DCP shards
into ``step_N.tmp/``; rank 0 then writes ``manifest.json`` (size and CRC-32 of every file, the
step, and the caller's ``meta``: the training app puts its config there), renames the directory
to ``step_N/`` and atomically replaces ``latest`` (write ``latest.tmp``, fsync, ``os.replace``,
fsync the directory). A crash at any point leaves ``latest`` naming the previous complete
checkpoint; a stale ``step_N.tmp/`` is removed by the next save. Pruning keeps the newest
``keep`` checkpoints up to the one just written and never removes the one ``latest`` names.

Reading: :func:`verify` checks a checkpoint against its manifest (every listed file present,
same size, same CRC-32; :class:`CheckpointError` naming the file otherwise).
:func:`find_resume_checkpoint` picks what ``--resume`` continues from: the checkpoint ``latest``
names if it verifies, else the newest older one that does (the caller logs why); it never
quietly returns "nothing" when checkpoints or a ``latest`` pointer exist but none is intact.
:func:`load` loads in place, with the loaded non-tensor entries (e.g. the ROBE layout in
``_extra_state``) handed to ``load_state_dict``, whose layout check then compares the checkpoint's
layout with the module's.

Unpickling: DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and every non-tensor
item with ``torch.load(weights_only=False)``, so a crafted checkpoint could run code. Every load
here goes through :class:`SafeFileSystemReader` (``.metadata`` through an unpickler that only
admits DCP's metadata classes, torch sizes / dtypes / layouts and paths) and
:class:`SafeLoadPlanner` (non-tensor items through ``torch.load(weights_only=True)``); DCP
already reads tensors with ``weights_only=True``. See docs/usage.md: still load checkpoints only
from sources you trust.

Contents: ``model`` and ``optim`` (the dense optimizer), ``fused`` (the fused ROBE optimizer,
when there is one) and ``progress.step``. One process (plain module, torch optimizer):
``torch.distributed.checkpoint.state_dict.get_state_dict``. Under DistributedModelParallel (the
dense optimizer is a torchrec ``KeyedOptimizer``): ``dmp.state_dict()`` (unsharded keys;
ShardedTensors for table_wise / row_wise ROBE arrays), the keyed dense optimizer's state dict and
``dmp.fused_optimizer.state_dict()`` (ShardedTensor accumulators); DCP loads them in place.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import re
import shutil
import warnings
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "robe_torchrec.checkpoint/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 8 << 20  # bytes read at a time for checksums


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit this run; names the file."""


class NonFiniteStateError(RuntimeError):
    """The state to checkpoint holds NaN or inf; nothing was written."""


# ----- process group helpers --------------------------------------------------------------------


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _dist() or dist.get_rank() == 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective under a process group)."""
    if not _dist():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_main(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 only; if it raises, every rank raises (no rank is left waiting)."""
    result, error = None, None
    if _is_main():
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if not _dist():
        if error is not None:
            raise error
        return result
    box = [None if error is None else f"{type(error).__name__}: {error}", result]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        if error is not None:
            raise error
        raise CheckpointError(f"{what} failed on rank 0: {box[0]}")
    return box[1]


# ----- the state ----------------------------------------------------------------------------------


def _keyed(optimizer: Any) -> bool:
    from torchrec.optim.keyed import KeyedOptimizer

    return isinstance(optimizer, KeyedOptimizer)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fused: Optional[Any], step: int) -> Dict[str, Any]:
    if _keyed(optimizer):  # DMP: torchrec state dicts (ShardedTensors under the unsharded keys)
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    state: Dict[str, Any] = {
        "model": model_sd,
        "optim": optim_sd,
        "progress": {"step": torch.tensor(step, dtype=torch.int64)},
    }
    if fused is not None:
        state["fused"] = fused.state_dict()
    return state


def _local_tensors(value: Any) -> List[torch.Tensor]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [s.tensor for s in value.local_shards()]
    if isinstance(value, torch.Tensor):
        return [value]
    return []


def nonfinite_entries(state: Any, prefix: str = "") -> List[str]:
    """Keys of the floating-point tensors (this rank's shards) of ``state`` holding NaN or inf."""
    bad: List[str] = []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)):
            bad += nonfinite_entries(v, key + ".")
            continue
        for t in _local_tensors(v):
            if t.is_floating_point() and t.device.type != "meta" and t.numel() and not bool(torch.isfinite(t).all()):
                bad.append(key)
                break
    return bad


# ----- writing --------------------------------------------------------------------------------------


def check_writable(directory: str, what: str = "checkpoint directory") -> None:
    """Create ``directory`` if needed and write, fsync and remove a probe file in it; raises
    :class:`CheckpointError` naming the directory when that fails."""
    rank = dist.get_rank() if _dist() else 0
    probe = os.path.join(directory, f".write_probe.rank{rank}.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"{directory}: the {what} is not writable: {e.strerror or e}") from e


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def file_crc32(path: str) -> Tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of a file."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc & 0xFFFFFFFF:08x}"


def write_manifest(path: str, step: int, meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Checksum every file of the checkpoint directory ``path`` into ``path/manifest.json``."""
    files: Dict[str, Dict[str, Any]] = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name in (MANIFEST, MANIFEST + ".tmp") or not os.path.isfile(full):
            continue
        size, crc = file_crc32(full)
        files[name] = {"bytes": size, "crc32": crc}
    if ".metadata" not in files:
        raise CheckpointError(f"{path}: DCP wrote no .metadata file")
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "checksum": "crc32", "files": files, "meta": meta or {}}
    _write_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _publish(tmp: str, final: str, directory: str) -> None:
    """Make the written ``tmp`` checkpoint visible: rename, then repoint ``latest`` atomically."""
    old = None
    if os.path.exists(final):  # a stale checkpoint of this step (an abandoned, newer timeline)
        old = final + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(directory)
    _write_atomic(os.path.join(directory, LATEST), os.path.basename(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(name: str) -> Optional[int]:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def _prune(directory: str, keep: int, step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (the one just written) and whatever
    ``latest`` names. Newer ones (left by a run that resumed from an older checkpoint) are kept
    until this run reaches their step and replaces them."""
    done = sorted(s for s in map(_step_of, os.listdir(directory)) if s is not None and s <= step)
    current = latest_step_dir(directory)
    for s in done[:-keep]:
        path = os.path.join(directory, f"step_{s}")
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


def save(
    directory: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    fused: Optional[Any] = None, keep: int = 2, meta: Optional[Dict[str, Any]] = None,
) -> str:
    """Write checkpoint ``step`` atomically (collective: call on every rank); returns its path.

    Refuses (:class:`NonFiniteStateError`, on every rank, nothing written) when any floating
    tensor of the state holds NaN or inf. ``meta`` (JSON-serialisable) goes into the manifest.
    """
    final = os.path.join(directory, f"step_{step}")
    tmp = final + ".tmp"
    state = _state(model, optimizer, fused, step)
    bad = nonfinite_entries(state)
    if any_rank(bool(bad)):
        where = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "") if bad else "on another rank"
        raise NonFiniteStateError(
            f"step {step}: refusing to write a checkpoint: non-finite values in {where}; "
            f"the existing checkpoints in {directory} are left as they are"
        )

    def prepare() -> None:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    on_main(prepare, f"preparing {tmp}")
    _barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp)
    _barrier()

    def finish() -> None:
        write_manifest(tmp, step, meta)  # before the rename: a published checkpoint has one
        _publish(tmp, final, directory)
        _prune(directory, keep, step)

    on_main(finish, f"publishing {final}")
    _barrier()
    return final


# ----- reading ---------------------------------------------------------------------------------------


def latest_step_dir(directory: str) -> Optional[str]:
    """The checkpoint ``latest`` names, or None when there is none (or it names no directory)."""
    name = _latest_name(directory)
    if name is None:
        return None
    path = os.path.join(directory, name)
    return path if os.path.isdir(path) else None


def _latest_name(directory: str) -> Optional[str]:
    pointer = os.path.join(directory, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def read_manifest(path: str) -> Dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(mpath):
        raise CheckpointError(
            f"{mpath}: missing: not a complete checkpoint of robe_torchrec.train (interrupted copy, "
            "or written without checksums)"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{mpath}: unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify(path: str) -> Dict[str, Any]:
    """Check checkpoint ``path`` against its manifest; returns the manifest.

    Raises :class:`CheckpointError` naming the first file that is missing, of another size
    (truncated) or of another CRC-32 (corrupt)."""
    manifest = read_manifest(path)
    files = manifest["files"]
    if ".metadata" not in files:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: lists no .metadata")
    for name, info in sorted(files.items()):
        full = os.path.join(path, name)
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{os.path.join(path, MANIFEST)}: bad file name {name!r}")
        if not os.path.isfile(full):
            raise CheckpointError(f"{full}: missing (listed in {MANIFEST})")
        size = os.path.getsize(full)
        if size != info.get("bytes"):
            raise CheckpointError(f"{full}: {size:,} bytes, {MANIFEST} says {info.get('bytes'):,}: truncated or replaced")
        _, crc = file_crc32(full)
        if crc != info.get("crc32"):
            raise CheckpointError(f"{full}: CRC-32 {crc}, {MANIFEST} says {info.get('crc32')}: the file is corrupt")
    step = _step_of(os.path.basename(os.path.normpath(path)))
    if step is not None and manifest.get("step") != step:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: says step {manifest.get('step')}, the directory is step_{step}")
    return manifest


def list_checkpoints(directory: str) -> List[str]:
    """The complete-looking checkpoint directories (``step_N``, no ``.tmp``), oldest first."""
    if not os.path.isdir(directory):
        return []
    return [f"step_{s}" for s in sorted(s for s in map(_step_of, os.listdir(directory)) if s is not None)]


def find_resume_checkpoint(directory: str, log: Callable[[str], None] = print) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(path, manifest)`` of the checkpoint to resume from, or None for a fresh start.

    The one ``latest`` names, if it verifies; otherwise the newest older ``step_N`` that does
    (each skipped checkpoint is logged with the reason). None only when there is no ``latest`` and
    no ``step_N``; raises :class:`CheckpointError` when there are but none is intact.
    """
    name = _latest_name(directory)
    steps = sorted((s for s in map(_step_of, os.listdir(directory)) if s is not None), reverse=True) if os.path.isdir(directory) else []
    if name is None and not steps:
        return None
    problems: List[str] = []
    named_step = _step_of(name) if name is not None else None
    candidates = steps
    if name is not None:
        if named_step is None:
            problems.append(f"{os.path.join(directory, LATEST)} holds {name!r}, not a step_N name")
        elif named_step not in steps:
            problems.append(f"{os.path.join(directory, LATEST)} names {name}, which does not exist")
        if named_step is not None:
            candidates = [named_step] * (named_step in steps) + [s for s in steps if s < named_step]
    for p in problems:
        log(f"checkpoint: {p}")
    for s in candidates:
        path = os.path.join(directory, f"step_{s}")
        try:
            manifest = verify(path)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"checkpoint: step_{s} is not intact: {e}")
            continue
        if problems:
            log(f"checkpoint: falling back to {path}, the newest intact checkpoint")
        return path, manifest
    raise CheckpointError(
        f"{directory}: no intact checkpoint to resume from ({'; '.join(problems) or 'none found'}); "
        "refusing to start over from step 0 over it: fix or move the directory away"
    )


# ----- safe loading -----------------------------------------------------------------------------------


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: Dict[Tuple[str, str], Any] = {
        (metadata.__name__, n): getattr(metadata, n)
        for n in (
            "Metadata", "MetadataIndex", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
            "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING",
        )
        if hasattr(metadata, n)
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath, pathlib.Path):
        allowed[(cls.__module__, cls.__name__)] = cls
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only the classes it is made of."""

    _allowed: Optional[Dict[Tuple[str, str], Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, with ``.metadata`` read by a restricted unpickler (no code runs)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = os.path.join(str(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError) as e:
                raise CheckpointError(f"{path}: not valid DCP metadata: {e}") from e
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner, with non-tensor items read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"unsupported GLOBAL [^\n]*|Unsupported global: [^\n]*|WeightsUnpickler error: [^\n]*", str(e))
            raise CheckpointError(
                f"item {read_item.dest_index.fqn}: refusing to unpickle it, it is not plain data "
                f"({m.group(0) if m else type(e).__name__})"
            ) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _failure_summary(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(sorted(failures.items())))
        exc = pair[0] if isinstance(pair, tuple) else pair
        return f"rank {rank}: {type(exc).__name__}: {exc}"
    return f"{type(e).__name__}: {e}"


def dcp_load(state: Dict[str, Any], path: str) -> None:
    """``dcp.load(state, path)`` in place, through the safe reader and planner; every failure is a
    :class:`CheckpointError` naming the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: missing: not a DCP checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointError:
        raise
    except (CheckpointException, Exception) as e:
        raise CheckpointError(f"{path}: cannot be loaded into this model: {_failure_summary(e)}") from e


def _merge_loaded(original: Dict[str, Any], loaded: Dict[str, Any]) -> None:
    """Copy what DCP put into ``loaded`` (a filtered copy of ``original``) back into ``original``.

    Tensors are loaded in place (the copy shares them); non-tensor entries (the ROBE layout in
    ``_extra_state``, optimizer hyper-parameters) are *replaced* in the dict DCP was given, so
    without this they would be lost and ``original`` would still hold the module's own values.
    """
    for k, v in loaded.items():
        o = original.get(k)
        if isinstance(v, dict) and isinstance(o, dict) and o is not v:
            _merge_loaded(o, v)
        elif o is not v:
            original[k] = v


def load(
    path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fused: Optional[Any] = None
) -> int:
    """Load checkpoint ``path`` into model and optimizers in place; returns its step.

    The module's ``load_state_dict`` sees the checkpoint's ``_extra_state``: a ROBE collection
    refuses a checkpoint of another layout (``ValueError``)."""
    keyed = _keyed(optimizer)
    if keyed:
        optimizer.init_state()  # lazily created state (e.g. Adam) must exist before an in-place load
    state = _state(model, optimizer, fused, step=0)
    loaded = _without_empty_shards(state)
    dcp_load(loaded, path)  # in place: shares the tensors
    _merge_loaded(state, loaded)
    try:
        if keyed:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if fused is not None:
            fused.load_state_dict(state["fused"])
    except (ValueError, RuntimeError, KeyError) as e:  # e.g. the ROBE layout check
        raise CheckpointError(f"{path}: {' '.join(str(e).split())}") from e
    return int(state["progress"]["step"])


def _without_empty_shards(state: Any) -> Any:
    """``state`` (new dicts, same tensors) minus ShardedTensors with no shard on this rank.

    A table_wise array (and its fused state) has no shard on the other ranks. DCP (torch 2.13)
    takes a requested-but-empty ShardedTensor for a sign of a pre-2.4 checkpoint, switches to the
    old key flattening and then misses non-tensor entries such as the ROBE ``_extra_state``; such
    a rank has nothing to read for that tensor anyway. What DCP loads into the copy is merged back
    by :func:`_merge_loaded`.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(state, dict):
        return {
            k: _without_empty_shards(v)
            for k, v in state.items()
            if not (isinstance(v, ShardedTensor) and not v.local_shards())
        }
    return state
