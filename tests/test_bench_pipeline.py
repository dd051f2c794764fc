"""The pipeline benchmark runs every sharding type on both loops (a side that fails becomes an
error cell in its table, so the test checks that every cell is a time)."""

from __future__ import annotations

from robe_torchrec.bench import pipeline


def test_every_sharding_type_times_both_loops():
    rows = pipeline.main(["--steps", "2", "--warmup", "1", "--batch", "64"])
    assert [r["type"] for r in rows] == list(pipeline.TYPES)
    for row in rows:
        for side in ("plain", "pipeline"):
            assert isinstance(row[side], float) and row[side] > 0, row
