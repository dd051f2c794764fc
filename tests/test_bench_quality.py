"""The accuracy-per-byte benchmark's quick mode runs, and every method learns even at tiny scale."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from robe_torchrec.bench.baselines import (
    HashingTrickEBC,
    QREmbeddingBagCollection,
    mult_hash,
    qr_radices,
    water_fill_rows,
)


def _tables(cards, dim=8):
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=c, feature_names=[f"f{i}"])
        for i, c in enumerate(cards)
    ]


def test_mult_hash_is_non_negative_and_spread():
    ids = torch.tensor([-(2**63), -1, 0, 1, 2**63 - 1, -123456789, 987654321], dtype=torch.int64)
    h = mult_hash(ids)
    assert (h >= 0).all() and h.unique().numel() == ids.numel()
    buckets = (mult_hash(torch.arange(100_000)) % 100).bincount(minlength=100)
    assert buckets.min() > 800 and buckets.max() < 1200
    assert not torch.equal(mult_hash(ids, salt=1), h)


def test_water_fill_and_qr_radices_fit_budget():
    cards = [3, 50, 1000, 100_000]
    rows = water_fill_rows(cards, 600)
    assert sum(rows) == 600 and rows[:2] == [3, 50] and abs(rows[2] - rows[3]) <= 1
    assert water_fill_rows(cards, 10**9) == cards
    for card, budget in [(100_000, 700), (100_000, 120), (1_000_000, 300), (50, 100)]:
        r = qr_radices(card, budget)
        assert math.prod(r) >= card
        assert r == [card] if budget >= card else (sum(r) <= budget and len(r) >= 2)
    assert qr_radices(100_000, 700)[0] > 350  # the remainder table takes what the budget allows


def test_qr_is_collision_free_and_baselines_keep_the_ebc_interface():
    tables = _tables([7, 1000])
    qr = QREmbeddingBagCollection(tables, [[7], qr_radices(1000, 80)])
    hashing = HashingTrickEBC(tables, [7, 40])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"],
        values=torch.tensor([1, 2, 3, 10, 999, 0, 5]),
        lengths=torch.tensor([1, 2, 0, 2, 1, 1], dtype=torch.int32),
    )
    for module in (qr, hashing):
        out = module(kjt)
        assert out.keys() == ["f0", "f1"] and out.values().shape == (3, 16)
        assert torch.all(out.values()[2, :8] == 0)  # empty bag
        out.values().sum().backward()
    # every index of a table gets a distinct combination of digit rows
    digits = torch.stack(
        [torch.arange(1000) % qr.radices[1][0], torch.arange(1000) // qr.radices[1][0]], dim=1
    )
    if len(qr.radices[1]) == 2:
        assert torch.unique(digits, dim=0).shape[0] == 1000


@pytest.mark.slow
def test_quick_benchmark_every_method_learns(tmp_path):
    from robe_torchrec.bench import quality

    result = quality.main(["--quick", "--out", str(tmp_path), "--no-plots"])
    summary = result["summary"]
    methods = {s["method"] for s in summary}
    assert methods == {"full", "hash", "qr", "robe-Z1", "robe-Z8", "robe-Z32"}
    for s in summary:
        assert s["auc_mean"] > 0.6, s
    assert result["meta"]["teacher_auc"] > 0.8
    full = next(s for s in summary if s["method"] == "full")
    for s in summary:
        if s["method"] != "full":
            assert s["memory_bytes"] < full["memory_bytes"] / 5
    assert (tmp_path / "quality_results.csv").exists()


@pytest.mark.slow
def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from robe_torchrec.bench import quality

    quality.main(["--quick", "--out", str(tmp_path), "--methods", "full,robe", "--block-sizes", "8"])
    assert (tmp_path / "quality_auc_vs_memory.png").stat().st_size > 1000
    assert (tmp_path / "quality_auc_vs_samples.png").stat().st_size > 1000


def test_levers_plot_pairs_each_series_with_the_baseline_by_seed(tmp_path):
    """quality_plots --levers reads main-sweep runs and quality_levers runs by variant."""
    import json

    from robe_torchrec.bench import quality_plots

    def run(method, ratio, seed, auc, variant=None):
        r = {"method": method, "ratio": ratio, "seed": seed, "auc": auc, "memory_bytes": int(1e6 / ratio)}
        return r if variant is None else dict(r, variant=variant)

    main = {"meta": {}, "summary": [{"family": "full", "auc_mean": 0.9}],
            "runs": [run("robe-Z1", 10.0, 0, 0.80), run("robe-Z1", 10.0, 1, 0.82), run("robe-Z1", 100.0, 0, 0.70)]}
    levers = [run("x", 10.0, 0, 0.81, "v"), run("x", 10.0, 1, 0.80, "v"), run("x", 100.0, 0, 0.75, "w")]
    (tmp_path / "main_results.json").write_text(json.dumps(main))
    (tmp_path / "levers.json").write_text(json.dumps(levers))
    pts = quality_plots.lever_points(str(tmp_path / "main_results.json"), "", f"{tmp_path / 'levers.json'}:v")
    assert pts == {10.0: {0: (100000, 0.81), 1: (100000, 0.80)}}
    base = quality_plots.lever_points(str(tmp_path / "main_results.json"), "robe-Z1", "main")
    assert base[100.0] == {0: (10000, 0.70)}
    out = quality_plots.plot_levers(str(tmp_path / "main_results.json"), "robe-Z1",
                                    [("x", f"{tmp_path / 'levers.json'}:v,w")], str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0 and out.endswith("plot.png")
