"""Count the bytes each torch.distributed collective moves off and onto this rank.

``CommCounter`` patches the Python collectives of ``torch.distributed`` (what torchrec's
``KJTAllToAll`` / ``PooledEmbeddingsAllToAll`` / reduce-scatter and DDP comm hooks call) while it
is entered, runs them unchanged and records one ``CommRecord`` per call:

- ``raw``: the bytes of the tensor handed to the collective (input side).
- ``sent`` / ``recv``: bytes that leave / reach this rank. all-to-all: exact, from the split
  sizes (rows to / from the other ranks; the self part stays local). all-reduce: the ring
  algorithm's ``2 (W-1)/W * raw`` both ways (an assumption about the backend's algorithm, not a
  measurement). reduce-scatter: ``(W-1)/W * raw`` (ring); all-gather: ``(W-1) * raw``;
  broadcast: ``raw`` (sent by the source, received by the others; a lower bound for W > 2).
- ``label``: ``torchrec``'s KJT tensor label (``lengths``, ``values``, ``weights``) or
  ``splits`` when called from its splits all-to-all, else ``""``; ``phase``: whatever the caller
  set on the counter (e.g. ``fwd`` / ``bwd``) when the collective was launched.

The C++ side of DDP (its default reducer) does not go through these functions: register
``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook`` (see
``count_ddp_allreduce``) so that its bucket all-reduces are counted. ``wire_bytes`` reads the
process's socket-level byte counters (``/proc/self/io``: gloo's TCP pairs write and read with
plain syscalls), an independent check of the whole picture, headers included.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

PATCHED = (
    "all_to_all_single",
    "all_to_all",
    "all_reduce",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "all_gather_into_tensor",
    "all_gather",
    "broadcast",
)


@dataclass
class CommRecord:
    """One collective call on this rank."""

    op: str
    phase: str
    label: str
    dtype: torch.dtype
    raw: int
    sent: float
    recv: float
    rows_in: int = 0  # all_to_all_single: rows of the input (self part included)


def _row_bytes(t: torch.Tensor) -> int:
    """Bytes of one dim-0 row of ``t`` (all_to_all_single splits count rows)."""
    return t.element_size() * math.prod(t.shape[1:])


def _splits(t: torch.Tensor, sizes: Optional[Sequence[int]], world_size: int) -> List[int]:
    """Rows of ``t`` per rank: the given split sizes, else equal parts (as torch does)."""
    if sizes is not None and len(sizes) > 0:
        if len(sizes) != world_size:
            raise ValueError(f"all_to_all_single: {len(sizes)} split sizes for {world_size} ranks")
        return [int(s) for s in sizes]
    rows = t.shape[0] if t.dim() > 0 else t.numel()
    if rows % world_size != 0:
        raise ValueError(f"all_to_all_single: {rows} rows do not split evenly over {world_size} ranks")
    return [rows // world_size] * world_size


def all_to_all_single_bytes(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: Optional[Sequence[int]],
    input_split_sizes: Optional[Sequence[int]],
    rank: int,
    world_size: int,
) -> Tuple[int, int]:
    """(sent, received) bytes of one all_to_all_single on ``rank``: all rows but the self part."""
    ins = _splits(input, input_split_sizes, world_size)
    outs = _splits(output, output_split_sizes, world_size)
    sent = (sum(ins) - ins[rank]) * _row_bytes(input)
    recv = (sum(outs) - outs[rank]) * _row_bytes(output)
    return sent, recv


def _torchrec_label(frame: Any, max_depth: int = 3) -> str:
    """torchrec's KJT tensor label of the caller ``frame`` (``values``, ...), ``splits`` or ''.

    Only frames of torchrec.distributed count (its ``KJTAllToAllTensorsAwaitable`` loops over
    ``label``; its splits all-to-all runs in ``KJTAllToAllSplitsAwaitable``)."""
    for _ in range(max_depth):
        if frame is None:
            break
        code = frame.f_code
        if "torchrec" in code.co_filename and "distributed" in code.co_filename:
            label = frame.f_locals.get("label")
            if isinstance(label, str):
                return label
            if "SplitsAwaitable" in getattr(code, "co_qualname", ""):
                return "splits"
        frame = frame.f_back
    return ""


def _arg(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _group(args: Tuple[Any, ...], kwargs: Dict[str, Any], i: int) -> Any:
    return _arg(args, kwargs, i, "group")


class CommCounter:
    """Context manager recording every Python collective call of this process (see module doc)."""

    def __init__(self) -> None:
        self.records: List[CommRecord] = []
        self.phase = ""
        self._saved: Dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> "CommCounter":
        if self._saved:
            raise RuntimeError("CommCounter is already entered")
        for name in PATCHED:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}

    def _add(self, op: str, label: str, dtype: torch.dtype, raw: int, sent: float, recv: float, rows_in: int = 0) -> None:
        with self._lock:
            self.records.append(CommRecord(op, self.phase, label, dtype, raw, sent, recv, rows_in))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        counter = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counter._count(name, _torchrec_label(sys._getframe(1)), args, kwargs)
            return original(*args, **kwargs)

        wrapped.__name__ = name
        wrapped.__wrapped__ = original  # type: ignore[attr-defined]
        return wrapped

    def _count(self, name: str, label: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if name == "all_to_all_single":
            out, inp = _arg(args, kwargs, 0, "output"), _arg(args, kwargs, 1, "input")
            group = _group(args, kwargs, 4)
            w, r = dist.get_world_size(group), dist.get_rank(group)
            in_sizes = _arg(args, kwargs, 3, "input_split_sizes")
            sent, recv = all_to_all_single_bytes(out, inp, _arg(args, kwargs, 2, "output_split_sizes"), in_sizes, r, w)
            self._add(name, label, inp.dtype, inp.nbytes, sent, recv, sum(_splits(inp, in_sizes, w)))
        elif name == "all_to_all":
            outs, ins = _arg(args, kwargs, 0, "output_tensor_list"), _arg(args, kwargs, 1, "input_tensor_list")
            r = dist.get_rank(_group(args, kwargs, 2))
            sent = sum(t.nbytes for i, t in enumerate(ins) if i != r)
            recv = sum(t.nbytes for i, t in enumerate(outs) if i != r)
            self._add(name, label, ins[0].dtype, sum(t.nbytes for t in ins), sent, recv)
        elif name == "all_reduce":
            t = _arg(args, kwargs, 0, "tensor")
            w = dist.get_world_size(_group(args, kwargs, 2))
            ring = 2.0 * (w - 1) / w * t.nbytes
            self._add(name, label, t.dtype, t.nbytes, ring, ring)
        elif name == "reduce_scatter_tensor":
            inp = _arg(args, kwargs, 1, "input")
            w = dist.get_world_size(_group(args, kwargs, 3))
            ring = (w - 1) / w * inp.nbytes
            self._add(name, label, inp.dtype, inp.nbytes, ring, ring)
        elif name == "reduce_scatter":
            ins = _arg(args, kwargs, 1, "input_list")
            r = dist.get_rank(_group(args, kwargs, 3))
            raw = sum(t.nbytes for t in ins)
            sent = sum(t.nbytes for i, t in enumerate(ins) if i != r)
            self._add(name, label, ins[0].dtype, raw, sent, sent)
        elif name in ("all_gather_into_tensor", "all_gather"):
            inp = _arg(args, kwargs, 1, "input_tensor" if name == "all_gather_into_tensor" else "tensor")
            w = dist.get_world_size(_group(args, kwargs, 2))
            self._add(name, label, inp.dtype, inp.nbytes, (w - 1) * inp.nbytes, (w - 1) * inp.nbytes)
        elif name == "broadcast":
            t = _arg(args, kwargs, 0, "tensor")
            src = _arg(args, kwargs, 1, "src", 0)  # a global rank
            mine = dist.get_rank() == src
            self._add(name, label, t.dtype, t.nbytes, t.nbytes if mine else 0, 0 if mine else t.nbytes)

    def total(self, **match: Any) -> Dict[str, float]:
        """Sums of raw / sent / recv over the records whose fields equal ``match``."""
        rs = [r for r in self.records if all(getattr(r, k) == v for k, v in match.items())]
        return {
            "calls": len(rs),
            "raw": float(sum(r.raw for r in rs)),
            "sent": float(sum(r.sent for r in rs)),
            "recv": float(sum(r.recv for r in rs)),
            "rows_in": float(sum(r.rows_in for r in rs)),
        }


def count_ddp_allreduce(model: torch.nn.Module) -> int:
    """Route every DDP module's bucket all-reduce inside ``model`` through ``dist.all_reduce``
    (torch's default allreduce hook: same math as the C++ default), so CommCounter sees it.
    Returns the number of DDP modules hooked."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    n = 0
    for m in model.modules():
        if isinstance(m, DistributedDataParallel):
            m.register_comm_hook(None, default_hooks.allreduce_hook)
            n += 1
    return n


def wire_bytes() -> Tuple[int, int]:
    """(written, read) bytes of this process's read/write syscalls so far (``/proc/self/io``
    wchar, rchar): socket traffic of gloo's TCP pairs plus any file or pipe I/O (keep none in
    the measured window). (-1, -1) where the file does not exist."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(":") for line in f.read().strip().splitlines())
    except OSError:
        return -1, -1
    return int(fields["wchar"]), int(fields["rchar"])
