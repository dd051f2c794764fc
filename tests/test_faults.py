"""Fault injection through the command line: every scenario of issue 11, end to end.

Each test breaks something the way a careless user (or a failing disk) would and runs the real
entry points: ``robe_torchrec.train.cli`` / ``robe_torchrec.evaluate.cli`` in-process (what
``python -m`` runs, exit code included; a few cases also as real ``python -m`` subprocesses).
It checks the exit status, that the message names the step / file, and that no good checkpoint
was replaced or pruned. Tiny configs: the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from robe_torchrec import evaluate as evaluate_cli
from robe_torchrec import train
from robe_torchrec.app import checkpoint
from robe_torchrec.app.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "synthetic_small.yaml")
KAGGLE = os.path.join(ROOT, "configs", "criteo_kaggle.yaml")


def small_sets(run_dir, *extra: str) -> List[str]:
    return [
        f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
        "train.global_batch_size=128", "eval.batches=2", "eval.batch_size=256", "eval.every=0",
        "checkpoint.every=10", "checkpoint.final=true", "checkpoint.keep=2", "optimizer.warmup_steps=0",
        "optimizer.decay_steps=0", "train.device=cpu", "train.log_every=5", *extra,
    ]


def run_train(capsys, config: str, sets: Sequence[str], resume: bool = False) -> Tuple[int, str]:
    """``python -m robe_torchrec.train`` in-process: (exit status, stdout + stderr)."""
    capsys.readouterr()
    rc = train.cli(["--config", config, "--set", *sets] + (["--resume"] if resume else []))
    out = capsys.readouterr()
    return rc, out.out + out.err


def run_eval(capsys, sets: Sequence[str], *args: str) -> Tuple[int, str, str]:
    capsys.readouterr()
    rc = evaluate_cli.cli(["--config", SMALL, "--set", *sets, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(directory) -> Dict[str, str]:
    """sha256 of every file under ``directory`` (relative path -> digest)."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def train_rows(run_dir) -> List[str]:
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in f.read().splitlines() if ",train," in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    """A run of 20 steps with checkpoints step_10 and step_20 (copied by the tests that change it)."""
    run_dir = str(tmp_path_factory.mktemp("trained"))
    rc = train.cli(["--config", SMALL, "--set", *small_sets(run_dir, "train.steps=20")])
    assert rc == 0
    assert checkpoint.list_checkpoints(os.path.join(run_dir, "checkpoints")) == ["step_10", "step_20"]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(trained, dst)
    return dst


def ckpt_dir(run_dir) -> str:
    return os.path.join(run_dir, "checkpoints")


# ----- 1. resume under another layout / dims / optimizer ----------------------------------------


@pytest.mark.parametrize("change, named", [
    (["robe.seed=1"], "robe.default.seed: checkpoint 0, this run 1"),
    (["robe.block_size=8"], "robe.default.block_size: checkpoint 16, this run 8"),
    (["model.embedding_dim=8", "model.bottom_mlp=[64, 8]", "robe.block_size=8"], "model.bottom_mlp"),
    (["optimizer.fused_kind=rowwise_adagrad"], "optimizer.fused_kind: checkpoint 'adagrad', this run 'rowwise_adagrad'"),
    (["optimizer.dense=adam"], "optimizer.dense"),
])
def test_resume_under_other_layout_is_refused_before_any_step(capsys, trained, change, named):
    before, rows = snapshot(ckpt_dir(trained)), train_rows(trained)
    rc, out = run_train(capsys, SMALL, small_sets(trained, "train.steps=25", *change), resume=True)
    assert rc == 1, out
    assert "refusing to load it" in out and named in out, out
    assert "resumed from" not in out and "Traceback" not in out
    assert snapshot(ckpt_dir(trained)) == before  # checkpoint untouched
    assert train_rows(trained) == rows  # no step ran


def test_layout_check_compares_the_loaded_layout_not_the_module_with_itself(capsys, run_copy):
    """Root cause: DCP loaded ``_extra_state`` into a copy of the state dict, so the module's
    layout check saw its own layout. Without the manifest's settings (a checkpoint written by other
    code), the ROBE module's own check must still refuse."""
    step = os.path.join(ckpt_dir(run_copy), "step_20")
    manifest = checkpoint.read_manifest(step)
    del manifest["meta"]["signature"]
    with open(os.path.join(step, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=25", "robe.seed=1"), resume=True)
    assert rc == 1, out
    assert "different layout" in out and "'seed': 0" in out and "'seed': 1" in out, out
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 0 and "resumed from" in out and "step_20" in out, out  # same layout: fine


def test_fresh_run_over_checkpoints_says_it_starts_over(capsys, run_copy):
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=5", "checkpoint.final=false"))
    assert rc == 0 and "holds checkpoints of an earlier run (step_10, step_20)" in out and "--resume" in out, out
    assert checkpoint.list_checkpoints(ckpt_dir(run_copy)) == ["step_10", "step_20"]  # not reached: kept


# ----- 2. divergence ---------------------------------------------------------------------------------


def test_nonfinite_loss_stops_without_touching_checkpoints(capsys, trained):
    before = snapshot(ckpt_dir(trained))
    rc, out = run_train(capsys, SMALL, small_sets(trained, "train.steps=40", "optimizer.lr=1E9"), resume=True)
    assert rc == 1, out
    assert "training diverged" in out and "step 2" in out and "step_20" in out, out
    assert snapshot(ckpt_dir(trained)) == before  # nothing written, replaced or pruned


def test_nonfinite_parameters_stop_training(capsys, tmp_path, monkeypatch):
    """Finite loss, but an update that leaves inf in a parameter: stopped at that step."""
    real_step = torch.optim.Adagrad.step

    def step_then_poison(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        self._n = getattr(self, "_n", 0) + 1
        if self._n == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adagrad, "step", step_then_poison)
    rc, out = run_train(capsys, SMALL, small_sets(tmp_path, "train.steps=10", "checkpoint.every=2"))
    assert rc == 1 and "step 3: training diverged: the parameters hold NaN or inf" in out, out
    assert checkpoint.list_checkpoints(ckpt_dir(tmp_path)) == ["step_2"]


def test_checkpoint_save_refuses_nonfinite_state(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(str(tmp_path), 1, model, opt)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 2: .*non-finite values in model\.bias"):
        checkpoint.save(str(tmp_path), 2, model, opt)
    assert checkpoint.list_checkpoints(str(tmp_path)) == ["step_1"] and not os.path.exists(tmp_path / "step_2.tmp")


def test_evaluate_prints_valid_json_for_a_nonfinite_model(capsys, run_copy):
    """A NaN model (written by other code: the app refuses to write one) -> null + error, exit 1."""
    import torch.distributed.checkpoint as dcp

    cfg = load_config(SMALL, small_sets(run_copy))
    model = train.build_model(cfg, torch.device("cpu"), fused=False, for_dmp=False)
    with torch.no_grad():
        model.over_arch.model[-1].bias.fill_(float("nan"))
    path = os.path.join(ckpt_dir(run_copy), "step_99")
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
    checkpoint.write_manifest(path, 99)
    rc, out, err = run_eval(capsys, small_sets(run_copy), "--checkpoint", path)
    assert rc == 1, err
    result = json.loads(out)  # strict JSON: no NaN literal
    assert result["logloss"] is None and result["auc"] is None and "non-finite" in result["error"]
    assert "NaN" not in out


# ----- 3. a `latest` pointing at nothing ---------------------------------------------------------


def test_latest_naming_a_missing_checkpoint_resumes_from_the_newest_intact(capsys, run_copy):
    with open(os.path.join(ckpt_dir(run_copy), "latest"), "w") as f:
        f.write("step_99")
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 0, out
    assert "names step_99, which does not exist" in out and "falling back to" in out, out
    assert "resumed from" in out and "(step 20)" in out, out
    assert "starting from step 0" not in out


def test_latest_with_no_checkpoint_left_fails_instead_of_starting_over(capsys, run_copy):
    for d in checkpoint.list_checkpoints(ckpt_dir(run_copy)):
        shutil.rmtree(os.path.join(ckpt_dir(run_copy), d))
    with open(os.path.join(ckpt_dir(run_copy), "latest"), "w") as f:
        f.write("step_99")
    rows = train_rows(run_copy)
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 1 and "no intact checkpoint" in out and "step_99" in out, out
    assert train_rows(run_copy) == rows and checkpoint.list_checkpoints(ckpt_dir(run_copy)) == []


# ----- 4. checked before the first step ------------------------------------------------------------


def test_unwritable_checkpoint_dir_fails_before_the_first_step(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, out = run_train(capsys, SMALL, small_sets(tmp_path / "run", "train.steps=5", f"checkpoint.dir={blocker}/ckpt"))
    assert rc == 1 and f"{blocker}/ckpt: the checkpoint directory is not writable" in out, out
    assert train_rows(tmp_path / "run") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_fails_before_the_first_step(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    rc, out = run_train(capsys, SMALL, small_sets(tmp_path / "run", "train.steps=5", f"checkpoint.dir={ro}"))
    assert rc == 1 and "not writable" in out, out


def write_tsv(path, n: int, seed: int = 0, label: bool = True) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        dense = [str(rng.randrange(100)) for _ in range(13)]
        cats = [f"{rng.getrandbits(32):08x}" for _ in range(26)]
        lines.append("\t".join(([str(rng.randrange(2))] if label else []) + dense + cats))
    text = "\n".join(lines) + ("\n" if lines else "")
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)
    return str(path)


def tsv_sets(run_dir, train_paths, val_paths, *extra) -> List[str]:
    return [
        f"data.train_paths={train_paths}", f"data.val_paths={val_paths}",
        f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
        "train.steps=3", "train.global_batch_size=64", "eval.batches=2", "eval.batch_size=64", "eval.every=0",
        "checkpoint.every=0", "checkpoint.final=false", "train.device=cpu", "optimizer.warmup_steps=0",
        "model.bottom_mlp=[16, 16]", "model.top_mlp=[16, 1]", *extra,
    ]


def test_empty_validation_file_fails_before_training(capsys, tmp_path):
    tr, val = write_tsv(tmp_path / "train.txt", 300), write_tsv(tmp_path / "val.txt", 0)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tr, val))
    assert rc == 1 and f"{val}: empty validation file" in out, out
    assert train_rows(tmp_path / "run") == []


def test_empty_training_file_is_an_error(capsys, tmp_path):
    tr, val = write_tsv(tmp_path / "train.txt", 0), write_tsv(tmp_path / "val.txt", 100)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tr, val))
    assert rc == 1 and f"{tr}: empty training file" in out, out


def test_training_file_with_less_than_a_batch_is_an_error(capsys, tmp_path):
    tr, val = write_tsv(tmp_path / "train.txt", 10), write_tsv(tmp_path / "val.txt", 100)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tr, val))
    assert rc == 1 and "no training batch for step 1" in out and tr in out, out


def test_missing_data_file_is_named(capsys, tmp_path):
    val = write_tsv(tmp_path / "val.txt", 100)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tmp_path / "nope.txt", val))
    assert rc == 1 and f"{tmp_path / 'nope.txt'}: cannot open" in out, out


def test_data_exhausted_mid_run_ends_with_a_final_checkpoint(capsys, tmp_path):
    tr, val = write_tsv(tmp_path / "train.txt", 200), write_tsv(tmp_path / "val.txt", 100)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tr, val, "train.steps=10", "checkpoint.final=true"))
    assert rc == 0 and "training data exhausted after step 3" in out, out
    assert checkpoint.list_checkpoints(ckpt_dir(tmp_path / "run")) == ["step_3"]


def write_binary_days(directory, rows=(300, 200), seed=0) -> None:
    rng = np.random.default_rng(seed)
    for day, n in enumerate(rows):
        np.save(os.path.join(directory, f"day_{day}_dense.npy"), rng.random((n, 13), dtype=np.float32))
        np.save(os.path.join(directory, f"day_{day}_sparse.npy"), rng.integers(0, 1 << 31, (n, 26), dtype=np.int64))
        np.save(os.path.join(directory, f"day_{day}_labels.npy"), rng.integers(0, 2, (n, 1), dtype=np.int32))


def binary_sets(run_dir, data_dir, *extra) -> List[str]:
    return [
        "data.source=criteo_binary", f"data.binary_dir={data_dir}", "data.train_days=[0]", "data.val_days=[1]",
        f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
        "train.steps=2", "train.global_batch_size=64", "eval.batches=1", "eval.batch_size=64", "eval.every=0",
        "checkpoint.every=0", "checkpoint.final=false", "train.device=cpu",
        "model.bottom_mlp=[16, 16]", "model.top_mlp=[16, 1]", *extra,
    ]


@pytest.mark.parametrize("day, bad", [(0, 2), (0, -1), (1, 2)])
def test_binary_labels_outside_0_1_fail_before_training(capsys, tmp_path, day, bad):
    write_binary_days(tmp_path)
    path = tmp_path / f"day_{day}_labels.npy"
    labels = np.load(path)
    labels[57] = bad
    np.save(path, labels)
    rc, out = run_train(capsys, KAGGLE, binary_sets(tmp_path / "run", tmp_path))
    assert rc == 1 and f"{path}: row 57: label {bad}, must be 0 or 1" in out, out
    assert train_rows(tmp_path / "run") == []


def test_empty_binary_validation_day_fails_before_training(capsys, tmp_path):
    write_binary_days(tmp_path, rows=(300, 0))
    rc, out = run_train(capsys, KAGGLE, binary_sets(tmp_path / "run", tmp_path))
    assert rc == 1 and "no validation rows" in out and "day_1_dense.npy" in out, out


# ----- 5. every data / checkpoint error names the file -------------------------------------------


def test_truncated_gz_training_file_is_named(capsys, tmp_path):
    tr = write_tsv(tmp_path / "train.txt.gz", 3000, seed=1)
    data = open(tr, "rb").read()
    with open(tr, "wb") as f:
        f.write(data[: len(data) // 2])
    val = write_tsv(tmp_path / "val.txt", 100)
    rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / "run", tr, val, "train.steps=100"))
    assert rc == 1 and f"{tr}: truncated or corrupt gzip file after line" in out, out


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated: its header says shape (300, 13)"),
    ("empty", "empty file (0 bytes)"),
    ("text", "not a NumPy .npy file"),
])
def test_bad_npy_file_is_named(capsys, tmp_path, damage, message):
    write_binary_days(tmp_path)
    path = tmp_path / "day_0_dense.npy"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "text": b"1,2,3\n4,5,6\n"}[damage])
    rc, out = run_train(capsys, KAGGLE, binary_sets(tmp_path / "run", tmp_path))
    assert rc == 1 and f"{path}: {message}" in out, out


def test_nan_in_a_binary_dense_feature_is_named_before_it_is_trained_on(capsys, tmp_path):
    write_binary_days(tmp_path)
    path = tmp_path / "day_0_dense.npy"
    dense = np.load(path)
    dense[130, 4] = np.nan  # in the third batch of 64
    np.save(path, dense)
    rc, out = run_train(capsys, KAGGLE, binary_sets(tmp_path / "run", tmp_path, "train.steps=4", "checkpoint.every=1"))
    assert rc == 1 and f"{path}: row 130: non-finite dense value" in out, out
    assert "diverged" not in out
    # the batch is read (and refused) right after step 2: steps 1-2 checkpointed, no NaN step
    assert checkpoint.list_checkpoints(ckpt_dir(tmp_path / "run")) == ["step_1", "step_2"]


def _damage(path, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one bit in the middle (size unchanged)
        data[len(data) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("how, message", [("truncate", "truncated or replaced"), ("bitflip", "the file is corrupt")])
def test_damaged_checkpoint_is_named_and_resume_falls_back(capsys, run_copy, how, message):
    step20 = os.path.join(ckpt_dir(run_copy), "step_20")
    data_file = os.path.join(step20, "__0_0.distcp")
    _damage(data_file, how)
    sets = small_sets(run_copy)
    rc, out, err = run_eval(capsys, sets, "--checkpoint", step20)
    assert rc == 1 and f"{data_file}: " in err and message in err, err
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 0, out
    assert f"{data_file}: " in out and message in out, out
    assert "falling back to" in out and "resumed from" in out and "(step 10)" in out, out


def test_damaged_metadata_is_named(capsys, run_copy):
    step20 = os.path.join(ckpt_dir(run_copy), "step_20")
    _damage(os.path.join(step20, ".metadata"), "bitflip")
    rc, out, err = run_eval(capsys, small_sets(run_copy), "--checkpoint", step20)
    assert rc == 1 and f"{step20}/.metadata: " in err, err


def test_checkpoint_without_manifest_is_not_resumed_from(capsys, run_copy):
    os.remove(os.path.join(ckpt_dir(run_copy), "step_20", checkpoint.MANIFEST))
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 0 and "manifest.json: missing" in out and "(step 10)" in out, out


def test_manifest_is_written_before_publishing(tmp_path, monkeypatch):
    """A crash after the DCP write but before the rename leaves latest on the previous checkpoint."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(str(tmp_path), 1, model, opt)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(str(tmp_path), 2, model, opt)
    assert checkpoint.latest_step_dir(str(tmp_path)) == str(tmp_path / "step_1")
    assert checkpoint.find_resume_checkpoint(str(tmp_path), lambda s: None)[0] == str(tmp_path / "step_1")


# ----- 7. YAML 1.2 numbers, one-line config errors ------------------------------------------------


def test_yaml_12_numbers_in_overrides_and_files(capsys, tmp_path):
    cfg = load_config(SMALL, ["optimizer.lr=1e-3", "optimizer.sparse_lr=1E9", "robe.compression=2e3"])
    assert (cfg.optimizer.lr, cfg.optimizer.sparse_lr, cfg.robe.compression) == (1e-3, 1e9, 2000.0)
    p = tmp_path / "c.yaml"
    p.write_text("optimizer:\n  lr: 5E-4\n  eps: 1e-10\ntrain:\n  steps: 010\n")
    cfg = load_config(str(p))
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.train.steps) == (5e-4, 1e-10, 10)
    rc, out = run_train(capsys, SMALL, small_sets(tmp_path / "run", "train.steps=2", "optimizer.lr=1e-3"))
    assert rc == 0, out


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps: expected int, got 'abc'"),
    ("optimizer.lr=-1e-3", "optimizer.lr: must be a finite number > 0"),
    ("logging.tensorboard=yes", "logging.tensorboard: expected bool, got 'yes'"),
    ("robe.nope=1", "unknown key 'nope'"),
])
def test_config_error_is_one_line_and_exit_2(capsys, tmp_path, override, message):
    rc, out = run_train(capsys, SMALL, small_sets(tmp_path, override))
    assert rc == 2 and out.strip().startswith("config error:") and message in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_evaluate_config_and_missing_checkpoint_errors(capsys, tmp_path):
    rc, out, err = run_eval(capsys, small_sets(tmp_path, "optimizer.lr=1e-3x"))
    assert rc == 2 and err.startswith("config error:") and "optimizer.lr" in err, err
    rc, out, err = run_eval(capsys, small_sets(tmp_path))
    assert rc == 1 and "no checkpoint" in err and str(tmp_path) in err and out == "", err


def _python_m(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_python_m_exit_codes(trained, tmp_path):
    """The real entry points: a config error exits 2 with one line, a refused resume exits 1."""
    proc = _python_m("robe_torchrec.train", "--config", SMALL, "--set", "optimizer.lr=fast")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and "optimizer.lr: expected float, got 'fast'" in lines[0], lines
    before = snapshot(ckpt_dir(trained))
    proc = _python_m("robe_torchrec.train", "--config", SMALL, "--set", *small_sets(trained, "train.steps=25", "robe.seed=1"), "--resume")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "refusing to load it: robe.default.seed" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(ckpt_dir(trained)) == before
    proc = _python_m("robe_torchrec.evaluate", "--config", SMALL, "--set", *small_sets(trained))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_20")


# ----- 9. loading unpickles nothing but plain data --------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_does_not_run_code(capsys, run_copy, tmp_path):
    step20 = os.path.join(ckpt_dir(run_copy), "step_20")
    marker = tmp_path / "pwned"
    with open(os.path.join(step20, ".metadata"), "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    checkpoint.write_manifest(step20, 20, checkpoint.read_manifest(step20)["meta"])  # checksums pass
    rc, out, err = run_eval(capsys, small_sets(run_copy), "--checkpoint", step20)
    assert rc == 1 and "not allowed in checkpoint metadata" in err, err
    rc, out = run_train(capsys, SMALL, small_sets(run_copy, "train.steps=22"), resume=True)
    assert rc == 1 and "not allowed in checkpoint metadata" in out, out
    assert not marker.exists()


def test_crafted_byte_item_does_not_run_code(capsys, run_copy, tmp_path):
    """A non-tensor item (here the ROBE layout) whose pickle calls os.system."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    cfg = load_config(SMALL, small_sets(run_copy))
    model = train.build_model(cfg, torch.device("cpu"), fused=False, for_dmp=False)
    sd = dict(model.state_dict())
    key = "sparse_arch.embedding_bag_collection._extra_state"
    sd[key] = {"groups": {"default": {**sd[key]["groups"]["default"], "seed": _Evil(str(marker))}}}
    path = os.path.join(ckpt_dir(run_copy), "step_30")
    dcp.save({"model": sd}, checkpoint_id=path)
    checkpoint.write_manifest(path, 30)
    rc, out, err = run_eval(capsys, small_sets(run_copy), "--checkpoint", path)
    assert rc == 1 and "refusing to unpickle it" in err and "posix.system" in err, err
    assert not marker.exists()


# ----- 1 (continued). two ranks, row_wise ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, world, ports, run_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    base = small_sets(run_dir, "robe.sharding_type=row_wise", "eval.batches=1", "checkpoint.every=2")
    codes = []
    for i, (extra, resume) in enumerate([(["train.steps=4"], False), (["train.steps=6", "robe.seed=1"], True),
                                          (["train.steps=6", "robe.seed=1"], True)]):
        if i == 2 and rank == 0:  # a manifest without the settings: the sharded module's own check
            step = os.path.join(run_dir, "checkpoints", "step_4")
            manifest = checkpoint.read_manifest(step)
            del manifest["meta"]["signature"]
            with open(os.path.join(step, checkpoint.MANIFEST), "w") as f:
                json.dump(manifest, f)
        os.environ["MASTER_PORT"] = str(ports[i])
        codes.append(train.cli(["--config", SMALL, "--set", *base, *extra] + (["--resume"] if resume else [])))
    with open(os.path.join(run_dir, f"codes{rank}.json"), "w") as f:
        json.dump(codes, f)


def test_two_ranks_row_wise_resume_under_other_layout_is_refused(tmp_path, capfd):
    mp.spawn(_two_rank_worker, args=(2, [_free_port() for _ in range(3)], str(tmp_path)), nprocs=2, join=True)
    out = capfd.readouterr()
    text = out.out + out.err
    for rank in (0, 1):
        assert json.loads((tmp_path / f"codes{rank}.json").read_text()) == [0, 1, 1], text[-3000:]
    assert "robe.default.seed: checkpoint 0, this run 1" in text and "different layout" in text, text[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_4"
