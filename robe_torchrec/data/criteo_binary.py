"""TorchRec's preprocessed ("binary") Criteo format, read through memory maps as TorchRec batches.

The layout is the one torchrec's ``dlrm_main.py`` reads with
``torchrec.datasets.criteo.InMemoryBinaryCriteoIterDataPipe`` (files written by
``BinaryCriteoUtils.tsv_to_npys`` / ``torchrec/datasets/scripts/npy_preproc_criteo.py``), one
triple of files per day::

    day_{i}_dense.npy    [N, 13]  float32 (or an integer dtype, see below)
    day_{i}_sparse.npy   [N, 26]  integer ids (int64 raw hex values, or int32 after torchrec's
                                  contiguous re-indexing)
    day_{i}_labels.npy   [N, 1]   int32 (``[N]`` accepted too)

and the MLPerf DLRM-DCNv2 multi-hot variant (``materialize_synthetic_multihot_dataset.py`` of the
torchrec DLRM example): ``day_{i}_sparse_multi_hot.npz`` in place of ``day_{i}_sparse.npy``,
written by ``np.savez`` with one array per feature named by its index (``"0"`` .. ``"25"``), each
``[N, pooling_factor]``. Its members are stored uncompressed, so they are memory-mapped in place
(compressed ones are loaded into memory instead).

Dense values: torchrec's ``tsv_to_npys`` stores them **already transformed**, float32
``log(x - m + 2)`` where ``m`` is the minimum dense value of that file (not DLRM's
``log(1 + max(x, 0))``), and its datapipe passes them through at load time. So with
``dense_transform="auto"`` (default) a float array is passed through unchanged, and an integer
array (raw counts) gets :func:`~robe_torchrec.data.criteo.dense_log1p`, the TSV reader's transform;
``"log1p"`` forces the transform on floats holding raw counts, ``"none"`` disables it.

Labels become float32 ``[B]`` (torchrec's datapipe yields its int32 labels as they are); ids become
int64, one per bag (multi-hot: ``pooling_factor`` per bag); batches are the same
:class:`~torchrec.datasets.utils.Batch` as the TSV and synthetic readers produce.

Validation: every file is checked before it is memory-mapped (:func:`load_npy`): a missing, empty,
non-NumPy (a text file, pickled objects) or truncated file raises
:class:`~robe_torchrec.data.errors.DataError` naming it, as do shapes that do not fit. Each batch's
rows are checked as they are read (dense values finite, labels 0 or 1: ``path: row N: ...``);
:meth:`BinaryCriteoDataset.check_labels` scans all labels up front.

Why not subclass torchrec's datapipe: its constructor needs ``iopath`` (not a dependency of this
project) even for local files, and it indexes labels as ``[N, 1]`` only. This module reuses its
constants and re-implements its batch plan (tested batch for batch against it), see
:class:`BinaryCriteoDataset`.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, INT_FEATURE_COUNT
from torchrec.datasets.utils import Batch

from robe_torchrec.data.criteo import CRITEO_FEATURE_NAMES, dense_log1p, make_batch
from robe_torchrec.data.errors import DataError
from robe_torchrec.data.synthetic import resolve_rank_world

logger = logging.getLogger(__name__)

_ZIP_LOCAL_HEADER = 30  # fixed part of a zip local file header
_DENSE_TRANSFORMS = ("auto", "log1p", "none")

# One file's sparse part: one [N, 26] array (one-hot) or 26 arrays [N, pooling_factor].
Sparse = Union[np.ndarray, List[np.ndarray]]


def binary_criteo_paths(
    directory: str, days: Sequence[int], multi_hot: bool = False
) -> Tuple[List[str], List[str], List[str]]:
    """``(dense_paths, sparse_paths, labels_paths)`` of ``days`` in torchrec's file naming."""
    sparse = "sparse_multi_hot.npz" if multi_hot else "sparse.npy"
    return tuple(  # type: ignore[return-value]
        [os.path.join(directory, f"day_{d}_{part}") for d in days]
        for part in ("dense.npy", sparse, "labels.npy")
    )


_LABEL_SCAN_ROWS = 1 << 22  # rows of labels checked at a time by check_labels


def _file_size(path: str) -> int:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from e
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    return size


def load_npy(path: str) -> np.ndarray:
    """A ``.npy`` file memory-mapped read-only, after checking it is one: a missing, empty,
    non-NumPy (e.g. text, or pickled objects) or truncated file raises :class:`DataError` naming
    it (``np.load`` would say "mmap length is greater than file size" or "No data left in file")."""
    size = _file_size(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, _, dtype = np.lib.format._read_array_header(f, version)  # 3.0: utf-8 header
            data_offset = f.tell()
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a NumPy .npy file ({e})") from e
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects (dtype {dtype}), not numbers; refusing to unpickle it")
    need = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise DataError(
            f"{path}: truncated: its header says shape {shape} of {dtype} ({need:,} bytes with the "
            f"header) but the file has {size:,} bytes"
        )
    if need == data_offset:  # no elements: nothing to map
        return np.zeros(shape, dtype=dtype)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _npz_member(path: str, name: str) -> np.ndarray:
    """Array ``name`` of an ``.npz``, memory-mapped when stored uncompressed (as ``np.savez``
    writes it), else loaded."""
    _file_size(path)
    try:
        return _npz_member_unchecked(path, name)
    except DataError:
        raise
    except KeyError as e:
        raise DataError(f"{path}: no member {name}.npy (want one array per feature, named 0..25)") from e
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz file (member {name}): {e}") from e


def _npz_member_unchecked(path: str, name: str) -> np.ndarray:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(_ZIP_LOCAL_HEADER)
            if header[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                f.seek(info.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = {
                    (1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0,
                }.get(version)
                if read_header is not None:
                    shape, fortran, dtype = read_header(f)
                    need = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if os.path.getsize(path) < need:
                        raise DataError(f"{path}: truncated: member {name} needs {need:,} bytes, the file has "
                                        f"{os.path.getsize(path):,}")
                    return np.memmap(
                        path, dtype=dtype, mode="r", shape=shape,
                        order="F" if fortran else "C", offset=f.tell(),
                    )  # fmt: skip
    logger.info("%s: member %s is compressed or unusual; loading it into memory", path, name)
    with np.load(path, allow_pickle=False) as npz:
        return npz[name]


def _signed(ids: np.ndarray) -> np.ndarray:
    """uint64 ids reinterpreted as int64 (a view), like the TSV reader's ids; others as they are."""
    return ids.view(np.int64) if ids.dtype == np.uint64 else ids


def _load_sparse(path: str, num_rows: int) -> Sparse:
    if path.endswith(".npz"):
        feats = []
        for f in range(CAT_FEATURE_COUNT):
            arr = _signed(_npz_member(path, str(f)))
            if arr.ndim == 1:
                arr = arr.reshape(-1, 1)
            if arr.ndim != 2 or arr.shape[0] != num_rows:
                raise DataError(f"{path}: feature {f} has shape {arr.shape}, want [{num_rows}, P]")
            feats.append(arr)
        return feats
    arr = _signed(load_npy(path))
    if arr.shape != (num_rows, CAT_FEATURE_COUNT):
        raise DataError(f"{path}: shape {arr.shape}, want [{num_rows}, {CAT_FEATURE_COUNT}]")
    return arr


def _flat_int64(ids: np.ndarray) -> np.ndarray:
    """Row-major flattening as int64."""
    return np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)


def batch_plan(
    total_rows: int, batch_size: int, rank: int, world_size: int, drop_last: bool
) -> List[Tuple[int, int]]:
    """``(first_row, num_rows)`` of each batch of ``rank``, rows counted over all files in order.

    The same plan as torchrec's ``InMemoryBinaryCriteoIterDataPipe``: consecutive batches of
    ``batch_size`` rows go round-robin to the ranks (batch ``b`` to rank ``b % world_size``) over
    as many full rounds as there are; the rows left after the last full round are cut into
    ``world_size`` near-equal consecutive last batches, one per rank (if fewer than
    ``world_size`` rows are left, the last full round is merged into them), so every rank has
    the same number of batches. ``drop_last`` drops those leftover rows instead. (With fewer
    rows than ranks, where torchrec fails, ranks ``>= total_rows`` get nothing.)
    """
    w, bs = world_size, batch_size
    num_full = total_rows // bs // w * w
    last = np.zeros(w, dtype=np.int64)
    remainder = total_rows % (w * bs)
    if not drop_last and remainder > 0:
        if remainder < w and num_full >= w:
            num_full -= w
            last += bs
        elif remainder >= w:
            last += remainder // w
        last[: remainder % w] += 1
    plan = [(b * bs, bs) for b in range(rank, num_full, w)]
    if last[rank] > 0:
        plan.append((num_full * bs + int(last[:rank].sum()), int(last[rank])))
    return plan


class BinaryCriteoDataset(IterableDataset):
    """Batches from torchrec-format Criteo ``.npy``/``.npz`` files, memory-mapped.

    ``sparse_paths`` entries ending in ``.npz`` are multi-hot files. ``stage="val"``/``"test"``
    read the first/second half (first half rounded up) of the first file, as torchrec's datapipe
    does with the last day; ``"train"`` reads all files.

    Sharding: rank ``r`` gets the batches of :func:`batch_plan` (torchrec's), so all ranks have
    the same number of batches; DataLoader worker ``k`` of ``n`` of a rank yields that rank's
    batches ``k, k + n, ...``, so ``DataLoader(dataset, batch_size=None, num_workers=n)`` yields
    the rank's batches in plan order. ``rank``/``world_size`` default to torch.distributed's.
    """

    def __init__(
        self,
        dense_paths: Sequence[str],
        sparse_paths: Sequence[str],
        labels_paths: Sequence[str],
        batch_size: int,
        *,
        stage: str = "train",
        dense_transform: str = "auto",
        drop_last: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not (len(dense_paths) == len(sparse_paths) == len(labels_paths) > 0):
            raise ValueError("need one dense, sparse and labels path per file, at least one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if stage not in ("train", "val", "test"):
            raise ValueError(f"stage must be 'train', 'val' or 'test', got {stage!r}")
        if dense_transform not in _DENSE_TRANSFORMS:
            raise ValueError(f"dense_transform must be one of {_DENSE_TRANSFORMS}")
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.stage = stage
        self.dense_transform = dense_transform
        self.paths = (list(dense_paths), list(sparse_paths), list(labels_paths))
        self._open()
        self.num_rows_per_file = [int(a.shape[0]) for a in self.dense_arrs]
        self._file_starts = np.cumsum([0] + self.num_rows_per_file)
        self.total_rows = int(self._file_starts[-1])
        self.multi_hot = isinstance(self.sparse_arrs[0], list)
        self.plan = batch_plan(self.total_rows, batch_size, self.rank, self.world_size, drop_last)

    def _open(self) -> None:
        """Memory-map the files (and keep the stage's rows)."""
        self.dense_arrs: List[np.ndarray] = []
        self.sparse_arrs: List[Sparse] = []
        self.labels_arrs: List[np.ndarray] = []
        for dense_path, sparse_path, labels_path in zip(*self.paths):
            dense = load_npy(dense_path)
            if dense.ndim != 2 or dense.shape[1] != INT_FEATURE_COUNT:
                want = f"[N, {INT_FEATURE_COUNT}]"
                raise DataError(f"{dense_path}: shape {dense.shape}, want {want}")
            n = dense.shape[0]
            labels = load_npy(labels_path)
            if labels.shape not in ((n,), (n, 1)):
                raise DataError(f"{labels_path}: shape {labels.shape}, want [{n}] or [{n}, 1]")
            self.dense_arrs.append(dense)
            self.sparse_arrs.append(_load_sparse(sparse_path, n))
            self.labels_arrs.append(labels.reshape(n))
        self._row_offset = 0  # row of the first file's first kept row (val/test: half a file)
        if self.stage != "train":
            n = self.dense_arrs[0].shape[0]
            half = slice(0, (n + 1) // 2) if self.stage == "val" else slice((n + 1) // 2, n)
            self._row_offset = half.start
            self.dense_arrs = [self.dense_arrs[0][half]]
            self.sparse_arrs = [_rows(self.sparse_arrs[0], half)]
            self.labels_arrs = [self.labels_arrs[0][half]]

    def __getstate__(self) -> dict:
        """Pickled (e.g. for spawned DataLoader workers) without the arrays: a memmap would be
        pickled as a full in-memory copy. They are mapped again on unpickling."""
        state = self.__dict__.copy()
        for name in ("dense_arrs", "sparse_arrs", "labels_arrs"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def _dense(self, dense: np.ndarray) -> np.ndarray:
        """float32 dense features of stored rows (see the module doc for ``dense_transform``)."""
        transform = self.dense_transform
        if transform == "log1p" or (transform == "auto" and dense.dtype.kind in "iu"):
            return dense_log1p(dense)
        return np.asarray(dense, dtype=np.float32)

    def _read(self, first_row: int, num_rows: int) -> Tuple[np.ndarray, Sparse, np.ndarray]:
        """Rows ``[first_row, first_row + num_rows)`` of the concatenated files, in memory, with
        the dense features transformed (file by file: files may differ in dtype)."""
        dense, sparse, labels = [], [], []
        stop = first_row + num_rows
        for i, (a, b) in enumerate(zip(self._file_starts[:-1], self._file_starts[1:])):
            lo, hi = max(first_row, a), min(stop, b)
            if lo < hi:
                part = slice(int(lo - a), int(hi - a))
                dense.append(self._dense(self.dense_arrs[i][part]))
                sparse.append(_rows(self.sparse_arrs[i], part))
                labels.append(self.labels_arrs[i][part])
                self._check_rows(i, part.start, dense[-1], labels[-1])
        if self.multi_hot:
            sparse_out: Sparse = [
                np.concatenate([s[f] for s in sparse]) for f in range(CAT_FEATURE_COUNT)
            ]
        else:
            sparse_out = np.concatenate(sparse)
        return np.concatenate(dense), sparse_out, np.concatenate(labels)

    def _row_name(self, kind: int, i: int, row: int) -> str:
        """``path: row N`` of kept row ``row`` of file ``i`` (``kind``: 0 dense, 1 sparse, 2 labels)."""
        return f"{self.paths[kind][i]}: row {row + self._row_offset}"

    def _check_rows(self, i: int, first: int, dense: np.ndarray, labels: np.ndarray) -> None:
        """Rows about to be batched: float32 dense values must be finite, labels 0 or 1."""
        bad = ~np.isfinite(dense).all(axis=1)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(f"{self._row_name(0, i, first + r)}: non-finite dense value(s) {dense[r].tolist()}")
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(f"{self._row_name(2, i, first + r)}: label {labels[r].item()!r}, must be 0 or 1")

    def check_labels(self) -> None:
        """Scan every label (in chunks: labels are the smallest of the three files) and raise
        :class:`DataError` naming the file and row of the first that is not 0 or 1."""
        for i, labels in enumerate(self.labels_arrs):
            for lo in range(0, labels.shape[0], _LABEL_SCAN_ROWS):
                chunk = np.asarray(labels[lo : lo + _LABEL_SCAN_ROWS])
                bad = (chunk != 0) & (chunk != 1)
                if bad.any():
                    r = int(np.argmax(bad))
                    raise DataError(f"{self._row_name(2, i, lo + r)}: label {chunk[r].item()!r}, must be 0 or 1")

    def _to_batch(self, dense: np.ndarray, sparse: Sparse, labels: np.ndarray) -> Batch:
        n = dense.shape[0]
        if self.multi_hot:
            values = np.concatenate([_flat_int64(f) for f in sparse])
            lengths = np.repeat(
                np.array([f.shape[1] for f in sparse], dtype=np.int32), n
            )
        else:
            values = _flat_int64(sparse.T)  # feature-major
            lengths = np.ones(CAT_FEATURE_COUNT * n, dtype=np.int32)
        return make_batch(dense, values, lengths, labels, CRITEO_FEATURE_NAMES)

    def iter_batches(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[Batch]:
        """The batches of this rank's DataLoader worker ``worker_id`` of ``num_workers``."""
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"need 0 <= worker_id < num_workers, got {worker_id}, {num_workers}")
        for first_row, num_rows in self.plan[worker_id::num_workers]:
            yield self._to_batch(*self._read(first_row, num_rows))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_batches(worker_id, num_workers)

    def __len__(self) -> int:
        """Batches this rank yields over all its workers."""
        return len(self.plan)

    @classmethod
    def from_directory(
        cls, directory: str, days: Sequence[int], batch_size: int, *, multi_hot: bool = False,
        **kwargs,
    ) -> "BinaryCriteoDataset":  # fmt: skip
        """The dataset of ``days`` in ``directory``, in torchrec's file naming
        (:func:`binary_criteo_paths`)."""
        return cls(*binary_criteo_paths(directory, days, multi_hot), batch_size, **kwargs)


def _rows(sparse: Sparse, part: slice) -> Sparse:
    if isinstance(sparse, list):
        return [f[part] for f in sparse]
    return sparse[part]
