"""Criteo click logs from their TSV files, streamed as TorchRec batches.

The format (Criteo Kaggle / Display Advertising Challenge and Criteo 1TB Click Logs): one sample a
line, tab-separated: the label (0/1), 13 integer counts, 26 categorical features as hexadecimal
hashes (8 hex digits in the public data). Any field may be empty. Criteo's test files have no label
column (39 columns instead of 40).

What a sample becomes (the same :class:`~torchrec.datasets.utils.Batch` as
:mod:`robe_torchrec.data.synthetic`):

* ``dense_features``: float32 ``[B, 13]``, ``log(1 + max(x, 0))`` of the counts as in the DLRM
  reference (``dlrm_data_pytorch.py``: negatives clipped to 0, then ``log(x + 1)``); empty -> 0;
* ``sparse_features``: a KeyedJaggedTensor with keys ``cat_0 .. cat_25`` (torchrec's
  ``DEFAULT_CAT_NAMES``), feature-major, one int64 id per bag; the id is the hex string read as an
  unsigned 64-bit number (up to 16 hex digits) and reinterpreted as int64 two's complement, so
  ``80000000`` -> 2147483648 and ``ffffffffffffffff`` -> -1. No vocabulary, no modulo: ROBE hashes
  raw ids. An empty field is an empty bag (length 0), not id 0;
* ``labels``: float32 ``[B]``; all zeros for a file without labels (the dataset's ``has_label`` is
  then False: that is the flag to check before computing any metric).

Validation: a line with the wrong number of columns, a dense field that is not an integer (parsed
like Python's ``int``), a categorical field that is not 1-16 hex digits, or a label other than
``0``/``1``/empty raises a :class:`~robe_torchrec.data.errors.DataError` (a ``ValueError``)
naming ``file:line`` (1-based) and the column; so does a file that is missing, unreadable or
truncated (a ``.gz`` that ends early: ``path: truncated or corrupt gzip file after line N``). With
``skip_malformed=True`` such lines are dropped instead, counted (``num_skipped`` and
``skipped_per_file``, for the latest pass in this process) and reported by a ``logging`` warning at
the end of each file. An empty label is read as 0, as torchrec's own Criteo row mapper does.

Sharding: see :class:`CriteoTSVDataset`. Reading is line by line (plain or gzip, detected by its
magic bytes), converted in vectorised chunks of a few thousand lines, so memory stays bounded
whatever the file size.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import zlib
from typing import IO, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.criteo import (
    CAT_FEATURE_COUNT,
    DEFAULT_CAT_NAMES,
    DEFAULT_INT_NAMES,
    DEFAULT_LABEL_NAME,
    INT_FEATURE_COUNT,
)
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.data.errors import DataError
from robe_torchrec.data.synthetic import resolve_rank_world

logger = logging.getLogger(__name__)

NUM_DENSE: int = INT_FEATURE_COUNT  # 13
NUM_SPARSE: int = CAT_FEATURE_COUNT  # 26
CRITEO_FEATURE_NAMES: Tuple[str, ...] = tuple(DEFAULT_CAT_NAMES)  # "cat_0" .. "cat_25"
COLUMNS_WITH_LABEL: int = 1 + NUM_DENSE + NUM_SPARSE  # 40
COLUMNS_WITHOUT_LABEL: int = NUM_DENSE + NUM_SPARSE  # 39

# Lines converted together; bounds the memory held in Python objects (about 2 KB a line).
_CHUNK_LINES = 4096
_MAX_HEX_DIGITS = 16

_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i
del _i, _c


# ---------------------------------------------------------------------------------------------
# Conversions shared with the binary reader
# ---------------------------------------------------------------------------------------------


def dense_log1p(counts: np.ndarray) -> np.ndarray:
    """DLRM's dense transform: ``log(1 + max(x, 0))`` as float32 (computed in float64)."""
    x = np.maximum(np.asarray(counts), 0).astype(np.float64)
    return np.log1p(x).astype(np.float32)


def hex_to_id(field: str) -> int:
    """One categorical field as the reader maps it: unsigned hex -> int64 two's complement."""
    value = int(field, 16)
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{field!r} does not fit 64 bits")
    return value - (1 << 64) if value >= 1 << 63 else value


def make_batch(
    dense: np.ndarray,
    values: np.ndarray,
    lengths: np.ndarray,
    labels: np.ndarray,
    keys: Sequence[str] = CRITEO_FEATURE_NAMES,
) -> Batch:
    """A Batch from float32 ``dense [B, 13]``, feature-major int64 ``values`` and ``lengths``
    (``[F * B]``, bag ``b`` of feature ``f`` at ``f * B + b``) and ``labels [B]``.

    The KJT's offsets and per-key lengths are computed here in numpy, so building it costs no
    torch reduction (``from_lengths_sync`` would).
    """
    batch_size, num_keys = int(labels.shape[0]), len(keys)
    lengths = np.ascontiguousarray(lengths, dtype=np.int32)
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    length_per_key = lengths.reshape(num_keys, batch_size).sum(axis=1, dtype=np.int64).tolist()
    offset_per_key = [0] + np.cumsum(length_per_key, dtype=np.int64).tolist()
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=KeyedJaggedTensor(
            keys=list(keys),
            values=torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)),
            lengths=torch.from_numpy(lengths),
            offsets=torch.from_numpy(offsets.astype(np.int32)),
            stride=batch_size,
            length_per_key=length_per_key,
            offset_per_key=offset_per_key,
        ),
        labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
    )


# ---------------------------------------------------------------------------------------------
# Vectorised parsing of a chunk of split lines
# ---------------------------------------------------------------------------------------------


class _Parsed(NamedTuple):
    """Converted rows: ``labels [n]``, ``dense [n, 13]`` (transformed), ``ids``/``present``
    ``[26, n]`` (feature-major, ``present`` False for an empty field)."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    present: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def rows(self, start: int, stop: int) -> "_Parsed":
        return _Parsed(
            self.labels[start:stop],
            self.dense[start:stop],
            self.ids[:, start:stop],
            self.present[:, start:stop],
        )

    def to_batch(self) -> Batch:
        return make_batch(
            self.dense,
            self.ids[self.present],  # boolean indexing flattens row-major: feature-major values
            self.present.reshape(-1),
            self.labels,
        )


def _concat(parts: List[_Parsed]) -> _Parsed:
    if len(parts) == 1:
        return parts[0]
    return _Parsed(
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.dense for p in parts]),
        np.concatenate([p.ids for p in parts], axis=1),
        np.concatenate([p.present for p in parts], axis=1),
    )


def _parse_hex(fields: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bytes array (any shape) of hex strings -> (int64 ids, present, bad), elementwise."""
    width = fields.dtype.itemsize
    length = np.char.str_len(fields)
    digits = _HEX_LUT[fields.view(np.uint8).reshape(fields.shape + (width,))]
    in_string = np.arange(width) < length[..., None]
    bad = (length > _MAX_HEX_DIGITS) | ((digits == 255) & in_string).any(axis=-1)
    value = np.zeros(fields.shape, dtype=np.uint64)
    for k in range(min(width, _MAX_HEX_DIGITS)):
        value = np.where(in_string[..., k], (value << 4) | digits[..., k], value)
    return value.view(np.int64), length > 0, bad


def _parse_int(fields: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Bytes array of decimal integers (empty -> 0) -> (int64 values, bad), elementwise."""
    fields = fields.copy()
    fields[fields == b""] = b"0"
    try:
        return fields.astype(np.int64), np.zeros(fields.shape, dtype=bool)
    except (ValueError, OverflowError):
        pass
    # Slow path, only for chunks with a bad value: find which ones.
    flat = fields.reshape(-1)
    values = np.zeros(flat.shape, dtype=np.int64)
    bad = np.zeros(flat.shape, dtype=bool)
    for i, field in enumerate(flat.tolist()):
        try:
            values[i] = int(field)
        except (ValueError, OverflowError):
            bad[i] = True
    return values.reshape(fields.shape), bad.reshape(fields.shape)


def _column_names(has_label: bool) -> List[str]:
    return ([DEFAULT_LABEL_NAME] if has_label else []) + DEFAULT_INT_NAMES + DEFAULT_CAT_NAMES


def _parse_rows(rows: List[List[bytes]], has_label: bool) -> Tuple[_Parsed, np.ndarray]:
    """Split lines (all with the right column count) -> (parsed rows, bad ``[columns, n]``).

    Bad rows are still present in the output; the caller drops them or raises.
    """
    n = len(rows)
    columns = list(zip(*rows))
    first = 1 if has_label else 0
    bad = np.zeros((len(columns), n), dtype=bool)
    if has_label:
        label_fields = np.array(columns[0])
        bad[0] = ~((label_fields == b"0") | (label_fields == b"1") | (label_fields == b""))
        labels = (label_fields == b"1").astype(np.float32)
    else:
        labels = np.zeros(n, dtype=np.float32)
    sparse_first = first + NUM_DENSE
    counts, bad[first:sparse_first] = _parse_int(np.array(columns[first:sparse_first]))
    ids, present, bad[sparse_first:] = _parse_hex(np.array(columns[sparse_first:]))
    return _Parsed(labels, dense_log1p(counts.T), ids, present), bad


def _describe_bad(path: str, lineno: int, row: List[bytes], column: int, has_label: bool) -> str:
    name = _column_names(has_label)[column]
    if name == DEFAULT_LABEL_NAME:
        what = "label is not 0 or 1"
    elif name.startswith("int_"):
        what = "dense value is not an integer"
    else:
        what = f"categorical value is not 1-{_MAX_HEX_DIGITS} hex digits"
    return f"{path}:{lineno}: column {column + 1} ({name}): {what}: {row[column]!r}"


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def open_criteo_file(path: str) -> IO[bytes]:
    """Open a TSV file for reading bytes, gunzipping it if it starts with gzip's magic bytes.

    A file that is missing or cannot be read raises :class:`DataError` naming it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"\x1f\x8b":
            return gzip.open(path, "rb")
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from e


# What a truncated or damaged gzip stream raises while being read: EOFError ("Compressed file
# ended before the end-of-stream marker was reached"), gzip.BadGzipFile / zlib.error (bad CRC or
# data), OSError (an I/O error of the file itself).
_READ_ERRORS = (EOFError, OSError, zlib.error)


def read_lines(path: str, f: IO[bytes]) -> Iterator[bytes]:
    """The lines of open file ``f`` (of ``path``); a read error raises :class:`DataError` naming
    the file and the last complete line."""
    n = 0
    it = iter(f)
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except _READ_ERRORS as e:
            kind = "truncated or corrupt gzip file" if isinstance(f, gzip.GzipFile) else "read error"
            raise DataError(f"{path}: {kind} after line {n}: {e}") from e
        n += 1
        yield line


def detect_has_label(path: str) -> Optional[bool]:
    """Whether a Criteo TSV file has the label column, from its first line's column count
    (40: yes, 39: no); None for an empty file. Raises ``ValueError`` for any other count."""
    with open_criteo_file(path) as f:
        line = next(read_lines(path, f), b"")
    if not line:
        return None
    num_columns = len(line.rstrip(b"\r\n").split(b"\t"))
    if num_columns == COLUMNS_WITH_LABEL:
        return True
    if num_columns == COLUMNS_WITHOUT_LABEL:
        return False
    raise DataError(
        f"{path}:1: {num_columns} tab-separated columns, expected {COLUMNS_WITH_LABEL} "
        f"(with label) or {COLUMNS_WITHOUT_LABEL} (without); pass has_label= to read it anyway"
    )


class _Pending:
    """Converted rows waiting to fill a batch (they may span chunks and files)."""

    def __init__(self) -> None:
        self.parts: List[_Parsed] = []
        self.count = 0

    def add(self, part: _Parsed) -> None:
        if part.num_rows:
            self.parts.append(part)
            self.count += part.num_rows

    def full_batches(self, batch_size: int) -> Iterator[_Parsed]:
        if self.count < batch_size:
            return
        merged = _concat(self.parts)
        num_full = self.count // batch_size
        rest = merged.rows(num_full * batch_size, self.count)
        self.parts = [rest] if rest.num_rows else []
        self.count = rest.num_rows
        for i in range(num_full):
            yield merged.rows(i * batch_size, (i + 1) * batch_size)

    def remainder(self) -> Optional[_Parsed]:
        if not self.count:
            return None
        merged = _concat(self.parts)
        self.parts, self.count = [], 0
        return merged


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class CriteoTSVDataset(IterableDataset):
    """Streams Criteo TSV files (plain or ``.gz``) as batches of ``batch_size`` samples.

    Sharding: shard ``s = rank * num_workers + worker_id`` of ``S = world_size * num_workers``
    (DataLoader workers of every rank) reads

    * ``shard_by="line"`` (default): line ``i`` (0-based, counted in each file separately) of
      every file with ``i % S == s``. Every shard opens (and for ``.gz`` decompresses) every file
      but converts only its lines; shares differ by at most one line per file;
    * ``shard_by="file"``: whole files, file ``j`` of ``paths`` with ``j % S == s``: no redundant
      reading, but balanced only when there are many files of similar size.

    Shards never overlap and together cover every line. Each shard reads its lines in file order
    and fills its own batches (a batch may span files); with ``drop_last`` the shard's final,
    partial batch is dropped. The number of batches may therefore differ by one between ranks:
    a distributed training loop must stop all ranks together (or cap the step count).
    The order is deterministic. Use ``DataLoader(dataset, batch_size=None)``: items are batches.
    ``rank``/``world_size`` default to torch.distributed's when it is initialised.

    ``has_label``: None detects it from the first line of each file (40 columns: labelled, 39:
    not; all files must agree); the resolved value is the attribute ``has_label``.
    """

    def __init__(
        self,
        paths: Sequence[str] | str,
        batch_size: int,
        *,
        has_label: Optional[bool] = None,
        skip_malformed: bool = False,
        drop_last: bool = False,
        shard_by: str = "line",
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.paths: List[str] = [paths] if isinstance(paths, str) else [str(p) for p in paths]
        if not self.paths:
            raise ValueError("need at least one file")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shard_by not in ("line", "file"):
            raise ValueError(f"shard_by must be 'line' or 'file', got {shard_by!r}")
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.batch_size = batch_size
        self.skip_malformed = skip_malformed
        self.drop_last = drop_last
        self.shard_by = shard_by
        self.has_label: bool = self._resolve_has_label(has_label)
        self.num_columns = COLUMNS_WITH_LABEL if self.has_label else COLUMNS_WITHOUT_LABEL
        # Malformed lines skipped in the latest pass of this process (this shard's share only).
        self.num_skipped = 0
        self.skipped_per_file: Dict[str, int] = {}

    def _resolve_has_label(self, has_label: Optional[bool]) -> bool:
        if has_label is not None:
            return bool(has_label)
        found = {path: detect_has_label(path) for path in self.paths}
        kinds = {v for v in found.values() if v is not None}
        if len(kinds) > 1:
            raise DataError(
                "some files have a label column and some do not: "
                + ", ".join(f"{p} ({'labelled' if v else 'no label'})" for p, v in found.items())
            )
        return kinds.pop() if kinds else True

    # -- reading ---------------------------------------------------------------------------

    def _lines(self, path: str, f: IO[bytes], shard: int, num_shards: int) -> Iterable[Tuple[int, bytes]]:
        numbered = enumerate(read_lines(path, f), 1)
        if self.shard_by == "file" or num_shards == 1:
            return numbered
        return itertools.islice(numbered, shard, None, num_shards)

    def _parse_file(self, path: str, shard: int, num_shards: int) -> Iterator[_Parsed]:
        """Converted rows of this shard's lines of one file, in chunks."""
        rows: List[List[bytes]] = []
        linenos: List[int] = []
        skipped = 0
        first_problem: Optional[str] = None

        def convert() -> _Parsed:
            nonlocal skipped, first_problem
            parsed, bad = _parse_rows(rows, self.has_label)
            bad_rows = bad.any(axis=0)
            if bad_rows.any():
                r = int(np.argmax(bad_rows))
                message = _describe_bad(
                    path, linenos[r], rows[r], int(np.argmax(bad[:, r])), self.has_label
                )
                if not self.skip_malformed:
                    raise DataError(message)
                skipped += int(bad_rows.sum())
                first_problem = first_problem or message
                keep = ~bad_rows
                parsed = _Parsed(
                    parsed.labels[keep], parsed.dense[keep],
                    parsed.ids[:, keep], parsed.present[:, keep],
                )  # fmt: skip
            rows.clear()
            linenos.clear()
            return parsed

        with open_criteo_file(path) as f:
            for lineno, line in self._lines(path, f, shard, num_shards):
                fields = line.rstrip(b"\r\n").split(b"\t")
                if len(fields) != self.num_columns:
                    message = (
                        f"{path}:{lineno}: expected {self.num_columns} tab-separated columns"
                        f" ({'label, ' if self.has_label else 'no label, '}{NUM_DENSE} integer,"
                        f" {NUM_SPARSE} categorical), got {len(fields)}"
                    )
                    if not self.skip_malformed:
                        if rows:
                            convert()  # an earlier bad value is reported first
                        raise DataError(message)
                    skipped += 1
                    first_problem = first_problem or message
                    continue
                rows.append(fields)
                linenos.append(lineno)
                if len(rows) == _CHUNK_LINES:
                    yield convert()
            if rows:
                yield convert()
        if skipped:
            self.num_skipped += skipped
            self.skipped_per_file[path] = self.skipped_per_file.get(path, 0) + skipped
            logger.warning(
                "%s: skipped %d malformed line(s) (this shard's share; first: %s)",
                path, skipped, first_problem,
            )  # fmt: skip

    def shard_files(self, shard: int, num_shards: int) -> List[str]:
        """The files shard ``shard`` of ``num_shards`` opens."""
        if self.shard_by == "line":
            return list(self.paths)
        return [p for j, p in enumerate(self.paths) if j % num_shards == shard]

    def iter_batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        """The batches of this rank's DataLoader worker ``worker_id`` of ``num_workers``."""
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        num_shards = self.world_size * num_workers
        shard = self.rank * num_workers + worker_id
        self.num_skipped = 0
        self.skipped_per_file = {}
        pending = _Pending()
        for path in self.shard_files(shard, num_shards):
            for part in self._parse_file(path, shard, num_shards):
                pending.add(part)
                for rows in pending.full_batches(self.batch_size):
                    yield rows.to_batch()
        rest = pending.remainder()
        if rest is not None and not self.drop_last:
            yield rest.to_batch()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_batches(worker_id, num_workers)
