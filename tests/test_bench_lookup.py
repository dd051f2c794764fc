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


def test_lookup_bench_dtype_sides():
    rows = run(["--quick", "--shapes", "a", "--batch", "16", "--iters", "1", "--warmup", "0", "--mode", "back-to-back",
                "--sides", "robe", "--kernels", "reference", "--dtype", "float32,bfloat16",
                "--steps", "forward,train rowwise_adagrad"])
    got = {(r["side"], r["step"]) for r in rows}
    for side in ("robe-reference", "robe-reference-bf16"):
        assert {(side, "forward"), (side, "train rowwise_adagrad")} <= got
    mem = {r["side"]: r["mbytes"] for r in rows if r["step"] == "forward"}
    assert abs(mem["robe-reference-bf16"] * 2 - mem["robe-reference"]) < 1e-6  # half the bytes


def test_lookup_bench_rejects_unknown_dtype(capsys):
    import pytest

    with pytest.raises(SystemExit):
        run(["--quick", "--dtype", "float64"])
    assert "unknown --dtype" in capsys.readouterr().err
