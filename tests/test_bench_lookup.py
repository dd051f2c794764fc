"""The lookup benchmark's driver: both timing modes run every requested side and step."""

from robe_torchrec.bench.lookup import STEPS, run


def test_lookup_bench_back_to_back_and_interleaved_rows():
    rows = run(["--quick", "--shapes", "a", "--batch", "32", "--iters", "2", "--warmup", "0",
                "--sides", "robe,tbe,torch", "--kernels", "reference"])
    modes = {r["mode"] for r in rows}
    assert modes == {"back-to-back", "interleaved"}
    for mode in modes:
        got = {(r["side"], r["step"]) for r in rows if r["mode"] == mode}
        assert {("robe-reference", s) for s in STEPS} <= got
        assert {("fbgemm-tbe", "forward"), ("fbgemm-tbe", "train sgd"), ("fbgemm-tbe", "train rowwise_adagrad")} <= got
        assert {("torch-bag", "forward"), ("torch-bag", "train sgd")} <= got
        assert ("torch-bag", "train adagrad") not in got  # torch has no fused step of that kind here
    assert all(r["ms"] > 0 for r in rows)


def test_lookup_bench_rejects_unknown_step(capsys):
    import pytest

    with pytest.raises(SystemExit):
        run(["--quick", "--steps", "train adam"])
    assert "unknown --steps" in capsys.readouterr().err
