"""Criteo readers: the TSV stream and torchrec's binary (.npy/.npz) format, on small fixtures."""

from __future__ import annotations

import gzip
import logging
import math
import os
import pickle
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch

from robe_torchrec.data import (
    BinaryCriteoDataset,
    CriteoTSVDataset,
    batch_plan,
    binary_criteo_paths,
)
from robe_torchrec.data.criteo import CRITEO_FEATURE_NAMES, hex_to_id

NUM_DENSE, NUM_SPARSE = 13, 26


# ---------------------------------------------------------------------------------------------
# Fixtures and an independent, slow reference parser
# ---------------------------------------------------------------------------------------------


def random_rows(n: int, seed: int, empties: bool = True, long_hex: bool = False) -> List[List[str]]:
    """``n`` labelled rows as field lists; ``cat_0`` is the row's index (to identify it)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        dense = [str(int(v)) for v in rng.integers(-3, 5000, NUM_DENSE)]
        cats = [f"{i:08x}"] + [f"{int(v):08x}" for v in rng.integers(0, 2**32, NUM_SPARSE - 1)]
        if long_hex:
            cats[1] = f"{int(rng.integers(0, 2**63)) * 2 + 1:016x}"
        if empties:
            for j in np.nonzero(rng.random(NUM_DENSE) < 0.15)[0]:
                dense[j] = ""
            for j in 1 + np.nonzero(rng.random(NUM_SPARSE - 1) < 0.15)[0]:
                cats[j] = ""
        rows.append([str(int(rng.random() < 0.3))] + dense + cats)
    return rows


def write_tsv(path: str, rows: Sequence[Sequence[str]], newline_at_end: bool = True) -> str:
    text = "\n".join("\t".join(r) for r in rows) + ("\n" if newline_at_end and rows else "")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)
    return path


def expected(rows: Sequence[Sequence[str]], has_label: bool = True) -> Dict[str, object]:
    """What the reader should produce for these rows, computed field by field in Python."""
    off = 1 if has_label else 0
    labels = [float(r[0] or 0) if has_label else 0.0 for r in rows]
    dense = [[math.log1p(max(int(x or 0), 0)) for x in r[off : off + NUM_DENSE]] for r in rows]
    sparse = {}
    for f in range(NUM_SPARSE):
        col = [r[off + NUM_DENSE + f] for r in rows]
        sparse[f"cat_{f}"] = ([hex_to_id(x) for x in col if x], [int(bool(x)) for x in col])
    return {"labels": labels, "dense": dense, "sparse": sparse}


def concat(batches: Sequence[Batch]) -> Dict[str, object]:
    return {
        "labels": torch.cat([b.labels for b in batches]).tolist(),
        "dense": torch.cat([b.dense_features for b in batches]),
        "sparse": {
            k: (
                torch.cat([b.sparse_features[k].values() for b in batches]).tolist(),
                torch.cat([b.sparse_features[k].lengths() for b in batches]).tolist(),
            )
            for k in CRITEO_FEATURE_NAMES
        },
    }


def assert_matches(batches: Sequence[Batch], rows: Sequence[Sequence[str]], has_label=True) -> None:
    got, want = concat(batches), expected(rows, has_label)
    assert got["labels"] == want["labels"]
    assert torch.equal(got["dense"], torch.tensor(want["dense"], dtype=torch.float32))
    assert got["sparse"] == want["sparse"]


def assert_same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.labels, b.labels)
    assert a.sparse_features.keys() == b.sparse_features.keys()
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def row_ids(batches: Sequence[Batch]) -> List[int]:
    return [int(v) for b in batches for v in b.sparse_features["cat_0"].values()]


# ---------------------------------------------------------------------------------------------
# TSV: values
# ---------------------------------------------------------------------------------------------


def test_hand_computed_row(tmp_path) -> None:
    cats = [""] * NUM_SPARSE
    cats[0], cats[1], cats[2] = "68fd1e64", "80000000", "ffffffff"  # 8-digit, >= 2**31
    cats[3], cats[4] = "8000000000000000", "ffffffffffffffff"  # 16 digits, >= 2**63: negative
    cats[5], cats[6], cats[25] = "0", "ABCdef01", "7fffffffffffffff"
    dense = ["0", "1", "-3", "", "1382", "4", "", "2", "181", "1", "2", "", "2"]
    rows = [["1"] + dense + cats, ["0"] + [""] * NUM_DENSE + [""] * NUM_SPARSE]
    path = write_tsv(str(tmp_path / "a.tsv"), rows)
    (batch,) = CriteoTSVDataset(path, 8)
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [1.0, 0.0]
    assert batch.dense_features.shape == (2, 13) and batch.dense_features.dtype == torch.float32
    want = [math.log1p(v) for v in (0, 1, 0, 0, 1382, 4, 0, 2, 181, 1, 2, 0, 2)]
    assert batch.dense_features[0].tolist() == [float(np.float32(v)) for v in want]
    assert batch.dense_features[1].tolist() == [0.0] * NUM_DENSE
    kjt = batch.sparse_features
    assert kjt.keys() == [f"cat_{i}" for i in range(NUM_SPARSE)] and kjt.stride() == 2
    assert kjt.values().dtype == torch.int64
    ids = {k: kjt[k].values().tolist() for k in kjt.keys()}
    assert ids["cat_0"] == [0x68FD1E64]
    assert ids["cat_1"] == [2147483648] and ids["cat_2"] == [4294967295]
    assert ids["cat_3"] == [-(2**63)] and ids["cat_4"] == [-1]
    assert ids["cat_5"] == [0] and ids["cat_6"] == [0xABCDEF01] and ids["cat_25"] == [2**63 - 1]
    assert ids["cat_7"] == []  # empty field: empty bag, not id 0
    lengths = kjt.lengths().view(NUM_SPARSE, 2)
    assert lengths[:, 1].tolist() == [0] * NUM_SPARSE  # the all-empty row has no ids at all
    assert lengths[:, 0].tolist() == [int(bool(c)) for c in cats]
    assert hex_to_id("ffffffffffffffff") == -1 and hex_to_id("80000000") == 2**31


def test_random_rows_last_line_without_newline_and_crlf(tmp_path) -> None:
    rows = random_rows(37, seed=1, long_hex=True)
    path = write_tsv(str(tmp_path / "a.tsv"), rows, newline_at_end=False)
    assert_matches(list(CriteoTSVDataset(path, 8)), rows)
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(b"".join(("\t".join(r) + "\r\n").encode() for r in rows))
    assert_matches(list(CriteoTSVDataset(str(crlf), 8)), rows)


def test_gz_equals_plain(tmp_path) -> None:
    rows = random_rows(25, seed=2)
    plain = list(CriteoTSVDataset(write_tsv(str(tmp_path / "a.tsv"), rows), 7))
    zipped = list(CriteoTSVDataset(write_tsv(str(tmp_path / "a.tsv.gz"), rows), 7))
    assert len(plain) == len(zipped) == 4
    for a, b in zip(plain, zipped):
        assert_same_batch(a, b)


def test_files_without_label(tmp_path) -> None:
    rows = random_rows(12, seed=3)
    labelled = write_tsv(str(tmp_path / "train.tsv"), rows)
    unlabelled = write_tsv(str(tmp_path / "test.tsv"), [r[1:] for r in rows])
    ds = CriteoTSVDataset(unlabelled, 5)
    assert ds.has_label is False
    got = list(ds)
    assert all(torch.equal(b.labels, torch.zeros(b.labels.shape[0])) for b in got)
    assert_matches(got, [r[1:] for r in rows], has_label=False)
    for a, b in zip(got, CriteoTSVDataset(labelled, 5)):  # same features as the labelled file
        assert torch.equal(a.dense_features, b.dense_features)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert CriteoTSVDataset(labelled, 5).has_label is True
    assert CriteoTSVDataset(unlabelled, 5, has_label=False).has_label is False
    with pytest.raises(ValueError, match="some files have a label column"):
        CriteoTSVDataset([labelled, unlabelled], 5)
    with pytest.raises(ValueError, match=r"test\.tsv:1: expected 40 tab-separated .* got 39"):
        list(CriteoTSVDataset(unlabelled, 5, has_label=True))


# ---------------------------------------------------------------------------------------------
# TSV: malformed lines
# ---------------------------------------------------------------------------------------------

GOOD = random_rows(6, seed=4, empties=False)


def _bad(column: int, value: str) -> List[str]:
    row = list(GOOD[0])
    row[column] = value
    return row


MALFORMED = [
    (GOOD[0][:-1], r"expected 40 tab-separated columns .* got 39"),
    (GOOD[0] + ["x"], r"expected 40 tab-separated columns .* got 41"),
    ([""], r"expected 40 tab-separated columns .* got 1"),
    (_bad(0, "2"), r"column 1 \(label\): label is not 0 or 1"),
    (_bad(0, "yes"), r"column 1 \(label\)"),
    (_bad(3, "1.5"), r"column 4 \(int_2\): dense value is not an integer: b'1.5'"),
    (_bad(13, "abc"), r"column 14 \(int_12\)"),
    (_bad(14, "12zz34"), r"column 15 \(cat_0\): categorical value is not 1-16 hex digits"),
    (_bad(39, "0x12"), r"column 40 \(cat_25\)"),
    (_bad(20, "1" * 17), r"column 21 \(cat_6\)"),
]


@pytest.mark.parametrize("bad_row, message", MALFORMED)
def test_malformed_line_raises_with_file_line_column(tmp_path, bad_row, message) -> None:
    rows = GOOD[:3] + [bad_row] + GOOD[3:]
    path = write_tsv(str(tmp_path / "bad.tsv"), rows)
    with pytest.raises(ValueError, match=rf"bad\.tsv:4: {message}"):
        list(CriteoTSVDataset(path, 2, has_label=True))


def test_malformed_lines_skipped_and_counted(tmp_path, caplog) -> None:
    bad_rows = [bad for bad, _ in MALFORMED]
    rows = [GOOD[0], bad_rows[0], GOOD[1], *bad_rows[1:5], GOOD[2], *bad_rows[5:], GOOD[3]]
    path = write_tsv(str(tmp_path / "bad.tsv"), rows)
    ds = CriteoTSVDataset(path, 3, has_label=True, skip_malformed=True)
    with caplog.at_level(logging.WARNING, logger="robe_torchrec.data.criteo"):
        got = list(ds)
    assert_matches(got, GOOD[:4])
    assert [b.labels.shape[0] for b in got] == [3, 1]  # skipped lines do not leave holes
    assert ds.num_skipped == len(MALFORMED) and ds.skipped_per_file == {path: len(MALFORMED)}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped {len(MALFORMED)} malformed line(s)" in warnings[0]
    assert "bad.tsv:2:" in warnings[0]  # the first problem, with its line


def test_first_error_in_file_order_is_reported(tmp_path) -> None:
    rows = [GOOD[0], _bad(5, "x"), GOOD[1], GOOD[0][:20]]  # bad value before a short line
    path = write_tsv(str(tmp_path / "bad.tsv"), rows)
    with pytest.raises(ValueError, match=r"bad\.tsv:2: column 6"):
        list(CriteoTSVDataset(path, 100))


# ---------------------------------------------------------------------------------------------
# TSV: batching and sharding
# ---------------------------------------------------------------------------------------------


def test_batch_sizes_and_drop_last(tmp_path) -> None:
    rows = random_rows(23, seed=5)
    a = write_tsv(str(tmp_path / "a.tsv"), rows[:10])
    b = write_tsv(str(tmp_path / "b.tsv.gz"), rows[10:])
    sizes = [x.labels.shape[0] for x in CriteoTSVDataset([a, b], 4)]
    assert sizes == [4, 4, 4, 4, 4, 3]  # batches span files
    kept = list(CriteoTSVDataset([a, b], 4, drop_last=True))
    assert [x.labels.shape[0] for x in kept] == [4] * 5
    assert row_ids(kept) == list(range(20))
    assert_matches(list(CriteoTSVDataset([a, b], 1)), rows)
    assert [x.labels.shape[0] for x in CriteoTSVDataset([a, b], 100)] == [23]


@pytest.mark.parametrize("shard_by", ["line", "file"])
def test_rank_and_worker_shards_are_disjoint_and_cover(tmp_path, shard_by) -> None:
    rows = random_rows(41, seed=6)
    cuts = [0, 9, 17, 17, 30, 41]  # includes an empty file
    paths = [
        write_tsv(str(tmp_path / f"part{i}.tsv"), rows[lo:hi])
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))
    ]
    for world_size, num_workers in [(1, 1), (2, 1), (3, 2), (2, 3)]:
        seen: List[int] = []
        for rank in range(world_size):
            ds = CriteoTSVDataset(paths, 3, rank=rank, world_size=world_size, shard_by=shard_by)
            for worker in range(num_workers):
                shard = list(ds.iter_batches(worker, num_workers))
                assert all(b.labels.shape[0] <= 3 for b in shard)
                ids = row_ids(shard)
                assert ids == sorted(ids)  # each shard reads in file order
                assert ids == row_ids(ds.iter_batches(worker, num_workers))  # deterministic
                seen += ids
        assert sorted(seen) == list(range(41)), (world_size, num_workers)
    # line sharding: line i of each file goes to shard i % S
    ds = CriteoTSVDataset(paths, 100, rank=1, world_size=2)
    if shard_by == "line":
        want = [lo + i for lo, hi in zip(cuts[:-1], cuts[1:]) for i in range(hi - lo) if i % 2 == 1]
        assert row_ids(ds) == want


def test_dataloader_workers(tmp_path) -> None:
    rows = random_rows(30, seed=7)
    path = write_tsv(str(tmp_path / "a.tsv"), rows)
    ds = CriteoTSVDataset(path, 4)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    got = list(loader)
    assert sorted(row_ids(got)) == list(range(30))
    assert row_ids(got) == row_ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert all(isinstance(b, Batch) for b in got)


# ---------------------------------------------------------------------------------------------
# Binary (torchrec's preprocessed format)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def torchrec_io():
    """torchrec's Criteo utilities open files through iopath (a torchrec dependency we pin)."""
    pytest.importorskip("iopath.common.file_io")


def torchrec_npys(tmp_path, day_rows: Sequence[Sequence[Sequence[str]]]) -> Tuple[List[str], ...]:
    """Day files written by torchrec's own ``BinaryCriteoUtils.tsv_to_npys``."""
    from torchrec.datasets.criteo import BinaryCriteoUtils

    out = str(tmp_path / "npy")
    os.makedirs(out, exist_ok=True)
    paths = binary_criteo_paths(out, range(len(day_rows)))
    for day, rows in enumerate(day_rows):
        tsv = write_tsv(str(tmp_path / f"day_{day}.tsv"), rows)
        BinaryCriteoUtils.tsv_to_npys(tsv, paths[0][day], paths[1][day], paths[2][day])
    return paths


@pytest.mark.filterwarnings("ignore:Local function is not supported by pickle")
def test_torchrec_tsv_to_npys_round_trip(tmp_path, torchrec_io) -> None:
    days = [random_rows(11, seed=8), random_rows(9, seed=9)]
    paths = torchrec_npys(tmp_path, days)
    assert np.load(paths[0][0]).dtype == np.float32 and np.load(paths[2][0]).shape == (11, 1)
    ds = BinaryCriteoDataset(*paths, batch_size=4)
    got = list(ds)
    assert [b.labels.shape[0] for b in got] == [4] * 5 and len(ds) == 5
    rows = days[0] + days[1]
    tsv = concat(list(CriteoTSVDataset([str(tmp_path / f"day_{d}.tsv") for d in (0, 1)], 4)))
    binary = concat(got)
    assert binary["labels"] == tsv["labels"] and got[0].labels.dtype == torch.float32
    # torchrec stores dense pre-transformed as log(x - min + 2), the min taken per file
    for d, (lo, hi) in enumerate([(0, 11), (11, 20)]):
        raw = np.array([[int(x or 0) for x in r[1:14]] for r in days[d]], dtype=np.int64)
        want = np.log(raw - raw.min() + 2, dtype=np.float32)
        assert torch.allclose(binary["dense"][lo:hi], torch.from_numpy(want), rtol=1e-6)
    # ids are the same hex values; torchrec writes id 0 (not an empty bag) for an empty field
    for k in CRITEO_FEATURE_NAMES:
        values, lengths = tsv["sparse"][k]
        it = iter(values)
        assert binary["sparse"][k] == ([next(it) if n else 0 for n in lengths], [1] * len(rows))


@pytest.mark.filterwarnings("ignore:Local function is not supported by pickle")
@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_plan_matches_torchrec_datapipe(tmp_path, torchrec_io, drop_last) -> None:
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    paths = torchrec_npys(tmp_path, [random_rows(10, seed=10), random_rows(15, seed=11)])
    for world_size in (1, 2, 3):
        for batch_size in (1, 2, 4, 5, 7):
            for rank in range(world_size):
                kw = dict(batch_size=batch_size, rank=rank, world_size=world_size,
                          drop_last=drop_last)  # fmt: skip
                ref = list(InMemoryBinaryCriteoIterDataPipe("train", *paths, **kw))
                ours = BinaryCriteoDataset(*paths, **kw)
                got = list(ours)
                assert len(got) == len(ref) == len(ours), kw
                for a, b in zip(got, ref):
                    assert torch.equal(a.dense_features, b.dense_features)
                    assert a.labels.tolist() == b.labels.float().tolist()
                    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
                    assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())


def test_batch_plan_covers_rows_once() -> None:
    for total, bs, world, drop_last in [(25, 4, 3, False), (23, 4, 3, False), (25, 4, 3, True),
                                        (2, 4, 3, False), (100, 8, 4, False)]:  # fmt: skip
        plans = [batch_plan(total, bs, r, world, drop_last) for r in range(world)]
        rows = sorted(i for plan in plans for first, n in plan for i in range(first, first + n))
        if drop_last:
            assert rows == list(range(total // (bs * world) * bs * world))
        else:
            assert rows == list(range(total))
        if total >= world:
            assert len({len(plan) for plan in plans}) == 1  # same number of batches everywhere


def save_day(directory: str, day: int, rows, sparse_dtype=np.int64, labels_2d=False) -> None:
    """A day in torchrec's layout with raw integer dense and every categorical present."""
    dense, sparse, labels = binary_criteo_paths(directory, [day])
    np.save(dense[0], np.array([[int(x or 0) for x in r[1:14]] for r in rows], dtype=np.int32))
    ids = np.array([[int(x, 16) for x in r[14:]] for r in rows], dtype=np.uint64)
    np.save(sparse[0], ids.astype(sparse_dtype) if sparse_dtype != np.uint64 else ids)
    lab = np.array([int(r[0]) for r in rows], dtype=np.int32)
    np.save(labels[0], lab.reshape(-1, 1) if labels_2d else lab)


def test_raw_int_npy_equals_tsv_reader(tmp_path) -> None:
    days = [random_rows(13, seed=12, empties=False, long_hex=True), random_rows(8, seed=13)]
    for row in days[1]:  # the binary format has no empty bags
        row[14:] = [x or "0" for x in row[14:]]
    save_day(str(tmp_path), 0, days[0], sparse_dtype=np.uint64)  # ids >= 2**63 too
    save_day(str(tmp_path), 1, days[1], labels_2d=True)
    tsvs = [write_tsv(str(tmp_path / f"day_{d}.tsv"), days[d]) for d in (0, 1)]
    day_1_dense = str(tmp_path / "day_1_dense.npy")
    np.save(day_1_dense, np.load(day_1_dense).astype(np.int64))  # files may differ in dtype
    ds = BinaryCriteoDataset.from_directory(str(tmp_path), [0, 1], batch_size=6)
    got = list(ds)
    want = list(CriteoTSVDataset(tsvs, 6))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert_same_batch(a, b)
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets: the files mapped anew
    assert isinstance(clone.dense_arrs[0], np.memmap) and len(pickle.dumps(ds)) < 2000
    for a, b in zip(clone, want):
        assert_same_batch(a, b)
    # dense_transform="none" hands the stored values through
    (raw,) = BinaryCriteoDataset.from_directory(str(tmp_path), [1], 8, dense_transform="none")
    assert raw.dense_features.tolist() == [[float(int(x or 0)) for x in r[1:14]] for r in days[1]]


def test_val_test_halves_and_workers(tmp_path) -> None:
    rows = random_rows(21, seed=14, empties=False)
    save_day(str(tmp_path), 23, rows)
    val = BinaryCriteoDataset.from_directory(str(tmp_path), [23], 4, stage="val")
    test = BinaryCriteoDataset.from_directory(str(tmp_path), [23], 4, stage="test")
    assert row_ids(val) == list(range(11)) and row_ids(test) == list(range(11, 21))
    ds = BinaryCriteoDataset.from_directory(str(tmp_path), [23], 2, rank=1, world_size=2)
    mine = row_ids(ds)
    by_worker = [row_ids(ds.iter_batches(w, 3)) for w in range(3)]
    assert sorted(sum(by_worker, [])) == mine
    assert row_ids(DataLoader(ds, batch_size=None, num_workers=2)) == mine  # plan order


def test_multi_hot_npz(tmp_path) -> None:
    rows = random_rows(9, seed=15, empties=False)
    save_day(str(tmp_path), 0, rows)
    rng = np.random.default_rng(0)
    pooling = [1 + f % 3 for f in range(NUM_SPARSE)]
    feats = {str(f): rng.integers(0, 1000, (9, p), dtype=np.int32) for f, p in enumerate(pooling)}
    np.savez(str(tmp_path / "day_0_sparse_multi_hot.npz"), **feats)
    ds = BinaryCriteoDataset.from_directory(str(tmp_path), [0], 4, multi_hot=True)
    assert ds.multi_hot and all(isinstance(a, np.memmap) for a in ds.sparse_arrs[0])
    got = list(ds)
    assert [b.labels.shape[0] for b in got] == [4, 4, 1]
    one_hot = list(BinaryCriteoDataset.from_directory(str(tmp_path), [0], 4))
    for b, ref in zip(got, one_hot):
        assert torch.equal(b.dense_features, ref.dense_features)
        assert torch.equal(b.labels, ref.labels)
    for f, p in enumerate(pooling):
        kjt = [b.sparse_features[f"cat_{f}"] for b in got]
        assert torch.cat([j.values() for j in kjt]).tolist() == feats[str(f)].reshape(-1).tolist()
        assert torch.cat([j.lengths() for j in kjt]).tolist() == [p] * 9


def test_binary_rejects_bad_shapes(tmp_path) -> None:
    rows = random_rows(5, seed=16, empties=False)
    save_day(str(tmp_path), 0, rows)
    dense, sparse, labels = binary_criteo_paths(str(tmp_path), [0])
    np.save(labels[0], np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError, match="day_0_labels.npy: shape"):
        BinaryCriteoDataset(dense, sparse, labels, 2)


# ---------------------------------------------------------------------------------------------
# Damaged files: every error is a DataError naming the file
# ---------------------------------------------------------------------------------------------


def test_truncated_gz_names_the_file(tmp_path) -> None:
    from robe_torchrec.data import DataError

    path = write_tsv(str(tmp_path / "day.tsv.gz"), random_rows(3000, seed=20))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"day\.tsv\.gz: truncated or corrupt gzip file after line \d+"):
        list(CriteoTSVDataset(path, 256))


def test_missing_tsv_names_the_file(tmp_path) -> None:
    from robe_torchrec.data import DataError

    with pytest.raises(DataError, match=r"nope\.tsv: cannot open"):
        CriteoTSVDataset(str(tmp_path / "nope.tsv"), 4)


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"truncated: its header says shape \(5, 13\)"),
    ("empty", r"empty file \(0 bytes\)"),
    ("text", "not a NumPy .npy file"),
    ("pickle", "holds Python objects"),
    ("missing", "cannot open"),
])
def test_bad_npy_names_the_file(tmp_path, damage, message) -> None:
    from robe_torchrec.data import DataError

    save_day(str(tmp_path), 0, random_rows(5, seed=21, empties=False))
    dense, sparse, labels = binary_criteo_paths(str(tmp_path), [0])
    data = open(dense[0], "rb").read()
    if damage == "missing":
        os.remove(dense[0])
    elif damage == "pickle":
        np.save(dense[0], np.array([[object()] * 13] * 5, dtype=object), allow_pickle=True)
    else:
        with open(dense[0], "wb") as f:
            f.write({"truncate": data[:-40], "empty": b"", "text": b"0.1 0.2\n"}[damage])
    with pytest.raises(DataError, match=rf"day_0_dense\.npy: {message}"):
        BinaryCriteoDataset(dense, sparse, labels, 2)


def test_binary_bad_values_name_file_and_row(tmp_path) -> None:
    from robe_torchrec.data import DataError

    save_day(str(tmp_path), 0, random_rows(9, seed=22, empties=False))
    dense, sparse, labels = binary_criteo_paths(str(tmp_path), [0])
    y = np.load(labels[0])
    y[6] = 3
    np.save(labels[0], y)
    ds = BinaryCriteoDataset(dense, sparse, labels, 4)
    with pytest.raises(DataError, match=r"day_0_labels\.npy: row 6: label 3, must be 0 or 1"):
        ds.check_labels()
    assert next(ds.iter_batches()).labels.shape[0] == 4  # the first batch (rows 0-3) is fine
    with pytest.raises(DataError, match=r"day_0_labels\.npy: row 6: label 3"):
        list(ds)
    y[6] = 1
    np.save(labels[0], y)
    x = np.load(dense[0]).astype(np.float32)
    x[7, 2] = np.inf
    np.save(dense[0], x)
    with pytest.raises(DataError, match=r"day_0_dense\.npy: row 7: non-finite dense value"):
        list(BinaryCriteoDataset(dense, sparse, labels, 4))
    # val / test halves count rows of the file: the test half of 9 rows starts at row 5
    with pytest.raises(DataError, match=r"day_0_dense\.npy: row 7: non-finite"):
        list(BinaryCriteoDataset(dense, sparse, labels, 4, stage="test"))
