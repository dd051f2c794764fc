"""The LR schedule (linear warmup, then polynomial decay) against hand-computed factors, and as the
training app applies it: the logged lr of every step, for the dense and the fused ROBE optimizer."""

from __future__ import annotations

import csv
import os

import pytest

from robe_torchrec.app.config import OptimizerConfig
from robe_torchrec.app.optim import lr_factor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# warmup over 4 updates, decay from update 6 over 4 updates with power 2 down to 0:
# warmup (s+1)/4; decay (1 - (s-6)/4)^2; both by hand.
HAND = {0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 0.5625, 8: 0.25, 9: 0.0625, 10: 0.0, 11: 0.0}


def _schedule(**kw: float) -> OptimizerConfig:
    base = dict(warmup_steps=4, decay_start=6, decay_steps=4, decay_power=2.0, end_lr_factor=0.0)
    base.update(kw)
    return OptimizerConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("step", sorted(HAND))
def test_factor_matches_hand_computed(step: int) -> None:
    assert lr_factor(_schedule(), step) == pytest.approx(HAND[step], abs=1e-12)


def test_end_factor_floor_and_overlap_of_warmup_and_decay() -> None:
    # the decay falls to end_lr_factor, not to 0: 0.1 + 0.9 * (1 - p)^1
    cfg = _schedule(warmup_steps=0, decay_power=1.0, end_lr_factor=0.1)
    assert [round(lr_factor(cfg, s), 12) for s in (5, 6, 7, 8, 9, 10, 50)] == [1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    # decay starting inside the warmup multiplies both factors: step 1 = 0.5 * (1 - 1/2)^2
    cfg = _schedule(warmup_steps=4, decay_start=0, decay_steps=2)
    assert lr_factor(cfg, 1) == pytest.approx(0.5 * 0.25)
    assert lr_factor(OptimizerConfig(), 123) == 1.0  # no schedule configured


@pytest.mark.parametrize("sparse", ["fused", "dense"])
def test_training_app_applies_the_schedule_every_step(tmp_path, sparse: str) -> None:
    from robe_torchrec.train import main

    lr = 0.08
    result = main([
        "--config", os.path.join(ROOT, "configs", "synthetic_small.yaml"),
        "--set", f"logging.dir={tmp_path}", "logging.progress=false", "logging.tensorboard=false",
        "train.steps=10", "train.log_every=1", "train.global_batch_size=64", "eval.batches=1", "eval.batch_size=64",
        "eval.every=0", "checkpoint.every=0", "checkpoint.final=false",
        f"optimizer.lr={lr}", f"optimizer.sparse={sparse}", "optimizer.warmup_steps=4", "optimizer.decay_start=6",
        "optimizer.decay_steps=4", "optimizer.decay_power=2.0", "optimizer.end_lr_factor=0.0",
    ])
    assert result.step == 10
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    # the row logged after update s (1-based step s+1) carries the lr used by update s
    logged = {int(r["step"]) - 1: float(r["lr"]) for r in rows}
    assert sorted(logged) == list(range(10))
    for s, value in logged.items():
        assert value == pytest.approx(lr * HAND[s], rel=1e-9, abs=1e-12), s
    if sparse == "fused":  # the fused kernel reads this lr at backward time
        from robe_torchrec import RobeEmbeddingBagCollection

        (ebc,) = [m for m in result.model.modules() if isinstance(m, RobeEmbeddingBagCollection)]
        assert ebc.fused_optimizer.param_groups[0]["lr"] == pytest.approx(lr * HAND[9])
