"""The training loops behind one interface: torchrec's TrainPipelineSparseDist, or the plain loop.

``train.pipeline`` (:func:`choose_loop`): ``sparse_dist`` runs
``torchrec.distributed.train_pipeline.TrainPipelineSparseDist``, which starts the input dist of
batch i+1 (and reads batch i+2) while batch i computes; ``plain`` runs forward, backward and the
optimizer step on one batch at a time; ``auto`` takes sparse_dist under a process group of more
than one rank or on CUDA, plain on one CPU process.

The trainer (robe_torchrec.train) sees the same thing from both: ``loop.step(batches)`` trains
on the next batch and returns its loss; :class:`Batches` says after each step whether a next
batch exists. That keeps the step count, the divergence check, data errors, exhaustion,
checkpoint-at-step-N and the LR schedule identical under the pipeline, although it holds batches
ahead: the model state after ``step`` returns is exactly the state after that step (the input dist
of the next batch changes no parameter), and a checkpoint records only the step, from which
resume re-reads the data.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

LOOPS = ("auto", "sparse_dist", "plain")


def choose_loop(setting: str, world_size: int, device: torch.device) -> str:
    """``sparse_dist`` or ``plain`` for ``train.pipeline`` = ``setting`` (see the module doc)."""
    if setting not in LOOPS:
        raise ValueError(f"train.pipeline must be one of {list(LOOPS)}, got {setting!r}")
    if setting == "auto":
        return "sparse_dist" if world_size > 1 or device.type == "cuda" else "plain"
    return setting


class BatchModel(torch.nn.Module):
    """``batch -> (loss, (loss, logits, labels))`` around a DLRM: the contract of torchrec's
    ``DLRMTrain``, which TrainPipelineSparseDist needs (one input whose attributes feed the
    sharded modules). The DLRM's submodules become this module's own children, so parameter
    names, state-dict keys, the sharding plan's module paths and so checkpoints are the DLRM's;
    the DLRM object itself still works on ``(dense, sparse)`` (it shares those children)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        direct = [n for n, _ in model.named_parameters(recurse=False)] + [n for n, _ in model.named_buffers(recurse=False)]
        if direct:
            raise ValueError(f"BatchModel: {type(model).__name__} holds tensors outside its submodules ({direct})")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["_model"] = model  # not a child: its children are ours

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self._model.forward(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _any_rank(flags: "list[bool]") -> "list[bool]":
    """Each flag true on every rank when it is true on any rank (one all_reduce; local without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


class Batches:
    """The training batches as a loop reads them: at most ``limit``, read errors caught, ends agreed.

    A read that raises (a bad file) or finds no batch ends the stream on *every* rank (one small
    all_reduce a read): TrainPipelineSparseDist starts the input-dist collectives of every batch it
    holds, so no rank may hold a batch another lacks. ``error`` keeps this rank's exception;
    :meth:`next_missing` answers, after ``done`` batches were trained on, whether batch ``done``
    is there (reading it now when no loop has: the plain loop reads one batch at a time).
    """

    def __init__(self, source: Iterator[Any], limit: int) -> None:
        self._source = source
        self._left = limit
        self._ahead: Deque[Any] = deque()
        self.read = 0  # batches read successfully (handed out or waiting in ``_ahead``)
        self.ended = False
        self.error: Optional[BaseException] = None  # this rank's read error
        self.failed = False  # a read failed on some rank (maybe this one)
        self.ran_out = False  # the data ended on some rank before ``limit``

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        if not self._ahead and not self._read_one():
            raise StopIteration
        return self._ahead.popleft()

    def _read_one(self) -> bool:
        if self.ended:
            return False
        if self._left <= 0:  # the same limit on every rank: no agreement needed
            self.ended = True
            return False
        batch, error = None, None
        try:
            batch = next(self._source, None)
        except Exception as e:  # a bad file: reported after the step that precedes it
            error = e
        self.failed, self.ran_out = _any_rank([error is not None, error is None and batch is None])
        if self.failed or self.ran_out:
            self.ended, self.error = True, error
            return False
        self._left -= 1
        self.read += 1
        self._ahead.append(batch)
        return True

    def next_missing(self, done: int) -> Tuple[bool, bool]:
        """(read failed, data exhausted) for batch ``done`` (0-based, counted from this run's start):
        both False when it is there. The same answer on every rank."""
        if self.read <= done:
            self._read_one()
        if self.read > done:
            return False, False
        return self.failed, self.ran_out and not self.failed


class PlainLoop:
    """Forward, backward (a fused ROBE optimizer updates its array here), dense optimizer step."""

    name = "plain"

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device

    def step(self, batches: Batches) -> torch.Tensor:
        batch = next(batches).to(self.device)
        loss, _ = self.model(batch)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss

    def describe(self) -> str:
        return "training loop: plain (forward, backward, step; one batch at a time)"

    def pause(self) -> None:
        """Before the model is called outside :meth:`step` (evaluation): nothing to undo here."""

    def close(self) -> None:
        pass


class SparseDistLoop:
    """torchrec's TrainPipelineSparseDist: zero_grad, forward, backward, step inside ``progress``."""

    name = "sparse_dist"

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        self.pipeline = TrainPipelineSparseDist(model, optimizer, device)

    def step(self, batches: Batches) -> torch.Tensor:
        try:
            loss, _, _ = self.pipeline.progress(batches)  # the model output: (loss, logits, labels)
        except StopIteration:  # the trainer checks next_missing first: this is a bug, not the data
            raise RuntimeError("TrainPipelineSparseDist ran out of batches the trainer had counted on") from None
        return loss

    def describe(self) -> str:
        """After a step: which sharded modules the pipeline took over (none would mean no overlap)."""
        names = [getattr(m.forward, "name", type(m).__name__) for m in self.pipeline._pipelined_modules]
        return f"training loop: TrainPipelineSparseDist, input dist a batch ahead for {names or 'no module'}"

    def pause(self) -> None:
        """Restore the sharded modules' own forwards so the model can be called outside
        ``progress`` (evaluation); the next ``progress`` re-attaches them. In-flight batches keep
        their input dist (torchrec's detach / attach, pytorch/torchrec#2076)."""
        self.pipeline.detach()

    def close(self) -> None:
        self.pipeline.detach()


def make_loop(kind: str, model: torch.nn.Module, optimizer: Any, device: torch.device) -> Any:
    """The loop ``kind`` (``sparse_dist`` / ``plain``) over a :class:`BatchModel` (or DMP around one)."""
    return SparseDistLoop(model, optimizer, device) if kind == "sparse_dist" else PlainLoop(model, optimizer, device)
