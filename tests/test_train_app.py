"""The training application: config schema, train loop, atomic DCP checkpoints, resume, 2 ranks."""

import glob
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from robe_torchrec import train
from robe_torchrec.app import checkpoint
from robe_torchrec.app.config import ConfigError, load_config, split_cli_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "synthetic_small.yaml")


def tiny(tmp_path, *extra):
    """argv for a few-second run of the default config."""
    return [
        "--config", SMALL, "--set",
        f"logging.dir={tmp_path}", "logging.progress=false", "logging.tensorboard=false",
        "train.global_batch_size=256", "eval.batches=4", "eval.batch_size=512", "eval.every=0",
        "checkpoint.every=0", "checkpoint.final=false", "optimizer.warmup_steps=0",
        "optimizer.decay_steps=0", "train.device=cpu", *extra,
    ]


# ----- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.model.bottom_mlp[-1] == cfg.model.embedding_dim


def test_mlperf_config_matches_reference():
    cfg = load_config(os.path.join(ROOT, "configs", "criteo_tb_mlperf.yaml"))
    assert cfg.model.arch == "dlrm_dcn" and cfg.model.embedding_dim == 128
    assert cfg.model.bottom_mlp == [512, 256, 128] and cfg.model.top_mlp == [1024, 1024, 512, 256, 1]
    assert (cfg.model.dcn_num_layers, cfg.model.dcn_low_rank_dim) == (3, 512)
    assert len(cfg.data.cardinalities) == 26 and cfg.data.cardinalities[20] == 40_000_000
    assert cfg.data.source == "criteo_binary" and cfg.data.multi_hot  # MLPerf's multi-hot files
    assert cfg.optimizer.lr == 0.004 and cfg.train.global_batch_size == 65536
    assert cfg.train.target_auc == 0.80275 and cfg.robe.compression == 1000.0


def test_pooling_factors_are_refused_for_file_sources():
    path = os.path.join(ROOT, "configs", "criteo_tb_mlperf.yaml")
    pf = "data.pooling_factors=[" + ",".join(["2"] * 26) + "]"
    for source in ("criteo_binary", "criteo_tsv"):
        with pytest.raises(ConfigError, match="pooling_factors only shapes synthetic data"):
            load_config(path, [f"data.source={source}", pf])
    assert load_config(path, ["data.source=synthetic", pf]).data.pooling_factors == [2] * 26


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\].*valid keys.*'steps'"):
        load_config(str(p))
    p.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section.*valid sections.*'train'"):
        load_config(str(p))
    with pytest.raises(ConfigError, match=r"unknown key 'blocksize'.*valid keys.*'block_size'"):
        load_config(SMALL, ["robe.blocksize=8"])


def test_wrong_type_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'many'"):
        load_config(str(p))
    p.write_text("model:\n  bottom_mlp: [64, x]\n")
    with pytest.raises(ConfigError, match=r"bottom_mlp\[1\]: expected int"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="expected int"):
        load_config(SMALL, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(SMALL, ["model.arch=dlrm_v9"])


def test_overrides_parse_to_field_types():
    args = ["--train.steps", "100", "--robe.block_size=8", "--model.bottom_mlp", "32,16"]
    cfg = load_config(SMALL, ["optimizer.lr=0.1", "train.target_auc=0.7", "logging.dir=/x/y"] + split_cli_overrides(args))
    assert cfg.train.steps == 100 and cfg.robe.block_size == 8 and cfg.model.bottom_mlp == [32, 16]
    assert cfg.optimizer.lr == 0.1 and cfg.train.target_auc == 0.7 and cfg.logging.dir == "/x/y"
    assert load_config(SMALL, ["train.target_auc=null"]).train.target_auc is None
    assert isinstance(load_config(SMALL, ["robe.compression=10"]).robe.compression, float)


# ----- training ------------------------------------------------------------------------------------


def test_train_learns_and_writes_csv(tmp_path):
    result = train.main(tiny(tmp_path, "train.steps=30"))
    assert result.step == 30
    assert result.last_eval.auc > 0.55, result.last_eval
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,kind,loss,auc")
    assert any(",eval," in r for r in rows)


def test_target_auc_stops_early(tmp_path):
    result = train.main(tiny(tmp_path, "train.steps=30", "eval.every=5", "train.target_auc=0.51"))
    assert result.stopped_early and result.step < 30


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_resume_matches_uninterrupted_run(tmp_path):
    common = ("train.steps=20", "checkpoint.every=10", "eval.every=10")
    full = train.main(tiny(tmp_path / "full", *common))
    first = train.main(tiny(tmp_path / "split", "train.steps=10", "checkpoint.every=10", "eval.every=10"))
    assert first.step == 10
    resumed = train.main(tiny(tmp_path / "split", *common) + ["--resume"])
    assert resumed.step == 20
    a, b = _params(full.model), _params(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    assert resumed.last_eval.auc == pytest.approx(full.last_eval.auc, abs=1e-6)
    assert resumed.last_eval.logloss == pytest.approx(full.last_eval.logloss, rel=1e-5)


def test_crash_while_checkpointing_keeps_previous(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    publish = checkpoint._publish
    calls = []

    def crash_on_second(tmp, final, directory):
        calls.append(final)
        assert os.path.isdir(tmp)  # the new checkpoint was fully written ...
        if len(calls) == 2:
            raise RuntimeError("simulated crash before rename")  # ... but never published
        publish(tmp, final, directory)

    monkeypatch.setattr(checkpoint, "_publish", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(tiny(tmp_path, "train.steps=20", "checkpoint.every=10"))
    assert (ckpt / "latest").read_text() == "step_10"
    assert (ckpt / "step_20.tmp").is_dir() and not (ckpt / "step_20").exists()
    assert checkpoint.latest_step_dir(str(ckpt)) == str(ckpt / "step_10")

    monkeypatch.setattr(checkpoint, "_publish", publish)
    resumed = train.main(tiny(tmp_path, "train.steps=20", "checkpoint.every=10") + ["--resume"])
    assert resumed.step == 20
    assert (ckpt / "latest").read_text() == "step_20"
    assert not (ckpt / "step_20.tmp").exists()


# ----- two ranks -----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir, stype):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = train.main(tiny(out_dir, "train.steps=4", "eval.batches=1", "train.global_batch_size=128",
                             f"robe.sharding_type={stype}"))
    named = dict(result.model.named_parameters())
    dense = torch.cat([p.detach().reshape(-1) for n, p in named.items() if "arrays" not in n])
    array = next(p for n, p in named.items() if "arrays" in n).detach().clone()
    planned = result.plan.plan["sparse_arch.embedding_bag_collection"]["default"].sharding_type
    torch.save({"dense": dense, "array": array, "planned": planned, "auc": result.last_eval.auc,
                "logloss": result.last_eval.logloss}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("stype", ["data_parallel", "row_wise"])
def test_two_ranks_gloo_agree(tmp_path, stype):
    """Under DMP the MLPs are replicas; a data_parallel array too, a row_wise one is split."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), stype), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["planned"] == r1["planned"] == stype
    assert torch.equal(r0["dense"], r1["dense"])
    m = train.build_model(load_config(SMALL), torch.device("meta"), fused=False, for_dmp=True)
    m = m.sparse_arch.embedding_bag_collection.robe_configs()["default"].num_elements
    if stype == "data_parallel":
        assert torch.equal(r0["array"], r1["array"]) and r0["array"].numel() == m
    else:
        assert r0["array"].numel() + r1["array"].numel() == m and r0["array"].numel() < m
    assert r0["auc"] == r1["auc"]
    assert math.isfinite(r0["logloss"]) and r0["logloss"] < 1.0  # initialised, trained arrays


def _resume_worker(rank, world, ports, out_dir, stype):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    common = ("eval.batches=1", "train.global_batch_size=128", f"robe.sharding_type={stype}", "checkpoint.every=3")
    results = {}
    for name, port, steps, extra in (("full", ports[0], 6, []), ("split", ports[1], 3, []), ("split", ports[2], 6, ["--resume"])):
        os.environ["MASTER_PORT"] = str(port)
        r = train.main(tiny(os.path.join(out_dir, name), f"train.steps={steps}", *common) + extra)
        results[f"{name}{steps}"] = (r.last_eval.auc, r.last_eval.logloss)
    torch.save(results, os.path.join(out_dir, f"resume_rank{rank}.pt"))


@pytest.mark.parametrize("stype", ["data_parallel", "table_wise"])
def test_two_rank_resume_matches_uninterrupted(tmp_path, stype):
    """DCP checkpoints of DMP (dense keyed optimizer; fused state as ShardedTensors) resume exactly.
    (row_wise: the torchx kill-and-restart test in tests/test_launch.py.)"""
    mp.spawn(_resume_worker, args=(2, [_free_port() for _ in range(3)], str(tmp_path), stype), nprocs=2, join=True)
    r = torch.load(tmp_path / "resume_rank0.pt")
    assert r["split6"][0] == pytest.approx(r["full6"][0], abs=1e-6)
    assert r["split6"][1] == pytest.approx(r["full6"][1], rel=1e-5)


def test_sharding_constraints_from_config():
    groups = ["small", "large"]
    cfg = load_config(SMALL, ["robe.groups={small: 100, large: 1000}", "robe.sharding={large: row_wise, default: table_wise}"])
    c = train.sharding_constraints(cfg, groups)
    assert c["large"].sharding_types == ["row_wise"] and c["small"].sharding_types == ["table_wise"]
    cfg = load_config(SMALL, ["robe.sharding={default: data_parallel}"])
    assert train.sharding_constraints(cfg, ["default"])["default"].sharding_types == ["data_parallel"]
    cfg = load_config(SMALL, ["robe.sharding_type=table_wise"])
    assert train.sharding_constraints(cfg, ["default"])["default"].sharding_types == ["table_wise"]
    assert train.sharding_constraints(load_config(SMALL), ["default"]) == {}  # the planner chooses
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(SMALL, ["robe.sharding_type=column_wise"])
    with pytest.raises(ConfigError, match="unknown group"):
        load_config(SMALL, ["robe.sharding={nope: row_wise}"])
    dense = load_config(SMALL, ["optimizer.sparse=dense"])
    assert train.sharding_constraints(dense, ["default"])["default"].sharding_types == ["data_parallel"]
    with pytest.raises(ConfigError, match="needs optimizer.sparse=fused"):
        train.sharding_constraints(load_config(SMALL, ["optimizer.sparse=dense", "robe.sharding_type=row_wise"]), ["default"])


# ----- other architectures and data ---------------------------------------------------------------


def test_dcn_with_groups_and_rowwise_fused(tmp_path):
    result = train.main(tiny(
        tmp_path, "train.steps=3", "model.arch=dlrm_dcn", "model.dcn_low_rank_dim=8",
        "robe.groups={small: 100, large: 1000}", "robe.table_to_group={t_cat_2: large, t_cat_11: large}",
        "optimizer.fused_kind=rowwise_adagrad", "robe.block_size=8", "eval.batches=1",
    ))
    arrays = dict(result.model.sparse_arch.embedding_bag_collection.arrays.items())
    assert sorted(arrays) == ["large", "small"]
    assert math.isfinite(result.last_eval.logloss)


def test_criteo_tsv_source(tmp_path):
    import random

    rng = random.Random(0)
    for name in ("train.txt", "val.txt"):
        lines = []
        for _ in range(300):
            dense = [str(rng.randrange(100)) if rng.random() > 0.1 else "" for _ in range(13)]
            cats = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
            lines.append("\t".join([str(rng.randrange(2))] + dense + cats))
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    result = train.main([
        "--config", os.path.join(ROOT, "configs", "criteo_kaggle.yaml"),
        "--data.train_paths", str(tmp_path / "train.txt"), "--data.val_paths", str(tmp_path / "val.txt"),
        "--set", f"logging.dir={tmp_path / 'run'}", "logging.progress=false", "logging.tensorboard=false",
        "train.steps=2", "train.global_batch_size=128", "eval.batches=2", "eval.batch_size=128",
        "checkpoint.every=0", "checkpoint.final=false", "train.device=cpu",
    ])
    assert result.step == 2 and result.last_eval.num_samples == 256


def test_criteo_binary_source_and_resume(tmp_path):
    """torchrec's preprocessed day_<i>_{dense,sparse,labels}.npy files; resume continues the batch plan."""
    import numpy as np

    rng = np.random.default_rng(0)
    for day, n in ((0, 700), (1, 300), (2, 600)):
        np.save(tmp_path / f"day_{day}_dense.npy", rng.random((n, 13), dtype=np.float32))
        np.save(tmp_path / f"day_{day}_sparse.npy", rng.integers(0, 1 << 31, (n, 26), dtype=np.int64))
        np.save(tmp_path / f"day_{day}_labels.npy", rng.integers(0, 2, (n, 1), dtype=np.int32))

    def argv(run, steps, *extra):
        return [
            "--config", os.path.join(ROOT, "configs", "criteo_kaggle.yaml"),
            "--set", "data.source=criteo_binary", f"data.binary_dir={tmp_path}", "data.train_days=0,1",
            "data.val_days=[2]", f"logging.dir={tmp_path / run}", "logging.progress=false",
            "logging.tensorboard=false", f"train.steps={steps}", "train.global_batch_size=128",
            "eval.batches=2", "eval.batch_size=128", "eval.every=0", "checkpoint.every=3",
            "checkpoint.final=false", "train.device=cpu", "optimizer.warmup_steps=0", *extra,
        ]

    full = train.main(argv("full", 6))
    assert full.step == 6 and full.last_eval.num_samples == 256
    train.main(argv("split", 3))
    resumed = train.main(argv("split", 6) + ["--resume"])
    assert resumed.last_eval.logloss == pytest.approx(full.last_eval.logloss, rel=1e-5)
    a, b = _params(full.model), _params(resumed.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
