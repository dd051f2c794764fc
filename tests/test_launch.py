"""torchx-launched jobs: 2-process sharded training (each ROBE sharding type), a killed worker
restarted by torchelastic that resumes to the same result, evaluate / predict components, and
the slurm / kubernetes specs rendered with --dryrun.

Each launched job is a real ``torchx run -s local_cwd ./launch/components.py:...`` subprocess
(torchrun, gloo, CPU); tiny configs keep each one to ~10-20 s on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from typing import Dict, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")
TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(shutil.which(TORCHX) is None and shutil.which("torchx") is None, reason="torchx CLI not installed")


def tiny_overrides(run_dir, *extra: str) -> str:
    return " ".join([
        f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
        "train.global_batch_size=128", "train.steps=8", "train.device=cpu", "train.log_every=4",
        "eval.batches=2", "eval.batch_size=256", "eval.every=0",
        "checkpoint.every=2", "checkpoint.final=true", "optimizer.warmup_steps=0", "optimizer.decay_steps=0",
        *extra,
    ])


def torchx(*args: str, log_dir=None) -> subprocess.CompletedProcess:
    exe = TORCHX if os.path.exists(TORCHX) else "torchx"
    env = dict(os.environ, OMP_NUM_THREADS="1", LOGLEVEL="WARNING")
    cmd = [exe, "run", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return proc


def launch_train(run_dir, *extra: str, nproc: int = 2, retries: int = 0) -> str:
    args = ["-s", "local_cwd", "--scheduler_args", f"log_dir={run_dir}/torchx",
            "./launch/components.py:train", "--nproc_per_node", str(nproc), "--overrides", tiny_overrides(run_dir, *extra)]
    if retries:
        args += ["--max_retries", str(retries), "--resume", "True"]
    proc = torchx(*args)
    return proc.stdout + proc.stderr


def metrics(run_dir) -> List[Dict[str, str]]:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def last_eval(run_dir) -> Dict[str, float]:
    rows = [r for r in metrics(run_dir) if r["kind"] == "eval"]
    assert rows, metrics(run_dir)
    return {"step": int(rows[-1]["step"]), "auc": float(rows[-1]["auc"]), "logloss": float(rows[-1]["logloss"])}


_RUNS: Dict[str, str] = {}


def uninterrupted(tmp_path_factory, stype: str) -> str:
    """One uninterrupted 2-process run per sharding type (shared by the tests of this module)."""
    if stype not in _RUNS:
        run_dir = str(tmp_path_factory.mktemp(f"run_{stype}"))
        out = launch_train(run_dir, f"robe.sharding_type={stype}")
        assert f"default | {stype}" in out, out[-4000:]  # rank 0 printed torchrec's plan
        _RUNS[stype] = run_dir
    return _RUNS[stype]


@pytest.mark.parametrize("stype", ["data_parallel", "table_wise", "row_wise"])
def test_two_process_torchx_job_trains_with_each_sharding_type(tmp_path_factory, stype):
    run_dir = uninterrupted(tmp_path_factory, stype)
    result = last_eval(run_dir)
    assert result["step"] == 8
    assert 0.0 <= result["auc"] <= 1.0 and 0.0 < result["logloss"] < 1.0, result
    train_rows = [r for r in metrics(run_dir) if r["kind"] == "train"]
    assert all(0.0 < float(r["loss"]) < 2.0 for r in train_rows), train_rows
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step_8", ".metadata"))


def test_killed_worker_restarts_and_matches_uninterrupted_run(tmp_path_factory, tmp_path):
    """Rank 1 dies after update 5 (os._exit); torchrun --max_restarts 1 restarts both workers with
    --resume; they continue from step_4 and end with the uninterrupted run's metrics."""
    reference = last_eval(uninterrupted(tmp_path_factory, "row_wise"))
    run_dir = str(tmp_path / "killed")
    out = launch_train(run_dir, "robe.sharding_type=row_wise", "train.fail_at_step=5", retries=1)
    assert "rank 1 exits now" in out, out[-4000:]
    assert "resumed from" in out and "step_4" in out, out[-4000:]
    assert os.path.exists(os.path.join(run_dir, "failed_at_step_5"))
    got = last_eval(run_dir)
    assert got["step"] == 8
    assert got["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    assert got["logloss"] == pytest.approx(reference["logloss"], rel=1e-5, abs=1e-7)


def _write_tsv(path, n, label, seed):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        dense = [str(rng.randrange(100)) if rng.random() > 0.1 else "" for _ in range(13)]
        cats = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
        lines.append("\t".join(([str(rng.randrange(2))] if label else []) + dense + cats))
    path.write_text("\n".join(lines) + "\n")


def test_evaluate_and_predict_components_on_a_two_process_checkpoint(tmp_path_factory, tmp_path):
    """A row_wise checkpoint written by 2 ranks is evaluated / used for prediction by 1 process."""
    run_dir = uninterrupted(tmp_path_factory, "row_wise")
    reference = last_eval(run_dir)
    over = tiny_overrides(run_dir)
    out_json = tmp_path / "eval.json"
    logs = f"log_dir={tmp_path / 'torchx'}"
    torchx("-s", "local_cwd", "--scheduler_args", logs, "./launch/components.py:evaluate", "--overrides", over, "--output", str(out_json))
    result = json.loads(out_json.read_text())
    assert result["checkpoint"].endswith("step_8") and result["num_samples"] == 512
    assert result["auc"] == pytest.approx(reference["auc"], abs=1e-6)
    assert result["logloss"] == pytest.approx(reference["logloss"], rel=1e-5)

    test_file = tmp_path / "test.txt"
    _write_tsv(test_file, 37, label=False, seed=3)  # Criteo's test format: no label column
    preds = tmp_path / "preds.txt"
    torchx("-s", "local_cwd", "--scheduler_args", logs, "./launch/components.py:predict", "--input", str(test_file), "--output", str(preds),
           "--config", "configs/synthetic_small.yaml", "--checkpoint", os.path.join(run_dir, "checkpoints"),
           "--overrides", over, "--batch_size", "16")
    probs = [float(x) for x in preds.read_text().split()]
    assert len(probs) == 37 and all(0.0 < p < 1.0 for p in probs)


# ----- dry runs: rendered specs for cluster schedulers ---------------------------------------------


def dryrun(*args: str) -> str:
    """``torchx run --dryrun``, output with whitespace collapsed (YAML wraps long lines)."""
    proc = torchx("--workspace", "", "--dryrun", *args)
    return " ".join((proc.stdout + proc.stderr).split())


def test_slurm_dryrun_renders_the_training_job():
    out = dryrun("-s", "slurm", "./launch/components.py:train", "--nnodes", "2", "--nproc_per_node", "8",
                 "--gpu", "8", "--cpu", "64", "--memMB", "400000", "--max_retries", "2", "--resume", "True",
                 "--config", "configs/criteo_tb_mlperf.yaml", "--overrides", "robe.sharding_type=table_wise")
    assert "#SBATCH --job-name=train-0" in out and "#SBATCH --job-name=train-1" in out, out  # 2 nodes
    assert "--cpus-per-task=64 --mem=400000 --gpus-per-task=8" in out, out
    assert "export TORCHX_MAX_RETRIES=2" in out and "scontrol requeue" in out, out
    assert "srun" in out and "torchrun --max_restarts 2" in out, out
    assert "--nnodes 2 --nproc_per_node 8" in out, out
    assert "-m robe_torchrec.train --config configs/criteo_tb_mlperf.yaml --set robe.sharding_type=table_wise --resume" in out, out


def test_kubernetes_dryrun_renders_the_training_job():
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs the kubernetes client")
    out = dryrun("-s", "kubernetes", "-cfg", "queue=default", "./launch/components.py:train",
                 "--nnodes", "2", "--nproc_per_node", "4", "--gpu", "4", "--cpu", "32", "--memMB", "200000",
                 "--image", "ghcr.io/example/robe-torchrec:latest", "--max_retries", "1",
                 "--overrides", "robe.sharding={default: row_wise}")
    assert "apiVersion: batch.volcano.sh/v1alpha1 kind: Job" in out, out
    assert "maxRetry: 1" in out and "queue: default" in out, out
    assert "name: train-0" in out and "name: train-1" in out, out  # one task per node
    assert "image: ghcr.io/example/robe-torchrec:latest" in out, out
    assert "nvidia.com/gpu: '4'" in out and "cpu: 32000m" in out and "memory: 200000M" in out, out
    assert "torchrun --max_restarts 1" in out and "--nnodes 2 --nproc_per_node 4" in out, out
    assert "-m robe_torchrec.train --config configs/synthetic_small.yaml --set 'robe.sharding={default:" in out, out


def test_evaluate_and_predict_dryrun_on_slurm_and_kubernetes():
    out = dryrun("-s", "slurm", "./launch/components.py:evaluate", "--checkpoint", "/ckpt/step_100", "--gpu", "1")
    assert "robe_torchrec.evaluate evaluate --config configs/synthetic_small.yaml --checkpoint /ckpt/step_100" in out, out
    assert "--gpus-per-task=1" in out, out
    pytest.importorskip("kubernetes", reason="torchx's kubernetes scheduler needs the kubernetes client")
    out = dryrun("-s", "kubernetes", "-cfg", "queue=default", "./launch/components.py:predict",
                 "--input", "/data/day_23_test.txt", "--output", "/out/preds.txt", "--gpu", "1")
    assert "robe_torchrec.evaluate - predict" in out or "robe_torchrec.evaluate predict" in out, out
    assert "/data/day_23_test.txt" in out and "/out/preds.txt" in out and "nvidia.com/gpu: '1'" in out, out
