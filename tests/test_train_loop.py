"""The training app's two loops (robe_torchrec.app.loop): TrainPipelineSparseDist == the plain loop.

Reference: the plain loop (forward, backward, step on one batch at a time), the app's loop
before the pipeline existed. Under ``train.pipeline=sparse_dist`` (torchrec's pipeline, which
reads batches ahead and starts the next batch's input dist during this one), every logged train
loss and LR, every evaluation, the final parameters, checkpoint-at-step-N + resume, data
exhaustion, data errors and divergence must come out the same, within float32 noise. One
process (a 1-rank gloo group + DMP, so the pipeline has a sharded module) keeps most cases
cheap; two gloo processes check the real input dist.
"""

from __future__ import annotations

import csv
import os
import socket
from typing import Dict, List

import pytest
import torch
import torch.multiprocessing as mp

from robe_torchrec import train
from robe_torchrec.app import checkpoint
from robe_torchrec.app.loop import Batches, BatchModel, choose_loop
from tests.test_faults import KAGGLE, run_train, tsv_sets, write_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "synthetic_small.yaml")
RTOL, ATOL = 1e-5, 1e-6
# Plain module vs sharded module (the CLI's two one-process choices) compare under SGD: their other
# summation orders stay float32 noise, which Adagrad's g / sqrt(sum g^2) would amplify.
SGD = ("optimizer.dense=sgd", "optimizer.fused_kind=sgd", "optimizer.lr=0.5")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with two, CPU reductions may add in another order from run to run, and
    Adagrad's g / sqrt(sum g^2) turns that last-bit noise into ~1e-4 differences within a few
    steps (measured: the same plain run twice); with one, the runs are repeatable to the bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sets(run_dir, *extra: str) -> List[str]:
    """A few-second run with an LR schedule (warmup, then decay) and mid-run evaluations."""
    return [
        f"logging.dir={run_dir}", "logging.progress=false", "logging.tensorboard=false",
        "train.global_batch_size=128", "eval.batches=2", "eval.batch_size=256", "eval.every=3",
        "checkpoint.every=0", "checkpoint.final=false", "optimizer.warmup_steps=3", "optimizer.decay_start=4",
        "optimizer.decay_steps=4", "train.device=cpu", "train.log_every=1", *extra,
    ]


def metrics(run_dir) -> List[Dict[str, str]]:
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def assert_same_metrics(a, b) -> None:
    """Same rows (step, kind), same train loss and LR, same eval AUC and log loss."""
    ra, rb = metrics(a), metrics(b)
    assert [(r["step"], r["kind"]) for r in ra] == [(r["step"], r["kind"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "lr", "auc", "logloss"):
            if x[key] or y[key]:
                assert float(x[key]) == pytest.approx(float(y[key]), rel=RTOL, abs=ATOL), (x, y, key)


def local_params(model) -> Dict[str, torch.Tensor]:
    """This rank's parameters (a table/row-wise array: its local shard), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_params(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")


# ----- the pieces ---------------------------------------------------------------------------------


def test_choose_loop():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_loop("auto", 1, cpu) == "plain"
    assert choose_loop("auto", 2, cpu) == choose_loop("auto", 1, cuda) == "sparse_dist"
    assert choose_loop("plain", 4, cuda) == "plain" and choose_loop("sparse_dist", 1, cpu) == "sparse_dist"
    with pytest.raises(ValueError, match="train.pipeline must be one of"):
        choose_loop("fast", 1, cpu)


def _failing_source(good: int):
    for i in range(good):
        yield i
    raise OSError("disk gone")


def test_batches_reads_ahead_and_reports_the_batch_after_the_last_good_one():
    data = Batches(_failing_source(3), limit=10)
    assert data.next_missing(0) == (False, False) and next(data) == 0
    assert [next(data), next(data)] == [1, 2]  # a pipeline reads ahead of the trained steps
    assert data.next_missing(1) == (False, False)  # batch 1 was read: there
    assert data.next_missing(3) == (True, False) and isinstance(data.error, OSError)
    with pytest.raises(StopIteration):
        next(data)
    ended = Batches(iter(range(2)), limit=10)
    assert [next(ended), next(ended)] == [0, 1] and ended.next_missing(2) == (False, True) and ended.error is None
    capped = Batches(iter(range(100)), limit=2)
    assert list(capped) == [0, 1] and capped.read == 2  # never reads past train.steps


def test_batch_model_keeps_the_dlrm_names():
    from robe_torchrec.app.config import load_config
    from robe_torchrec.app.model import build_model

    dlrm = build_model(load_config(SMALL), torch.device("cpu"), fused=False, for_dmp=False)
    wrapped = BatchModel(dlrm)
    assert list(wrapped.state_dict()) == list(dlrm.state_dict())
    assert wrapped.sparse_arch is dlrm.sparse_arch


# ----- one process: a 1-rank group + DMP under the pipeline vs the plain module ------------------


def test_pipeline_equals_plain_loop_one_process(tmp_path):
    """The CLI's two choices on one process: the plain module vs a 1-rank DMP under the pipeline.
    SGD (see ``SGD``); the same-DMP test below isolates the loop under Adagrad."""
    plain = train.main(["--config", SMALL, "--set", *sets(tmp_path / "plain", *SGD, "train.steps=8", "train.pipeline=plain")])
    pipe = train.main(["--config", SMALL, "--set", *sets(tmp_path / "pipe", *SGD, "train.steps=8", "train.pipeline=sparse_dist")])
    assert plain.plan is None and pipe.plan is not None  # plain module vs DMP on one rank
    assert pipe.step == plain.step == 8
    assert_same_metrics(tmp_path / "plain", tmp_path / "pipe")
    assert_same_params(local_params(plain.model), local_params(pipe.model))


def _both_loops_on_one_rank(tmp_path, device: str, *extra: str) -> Dict[str, str]:
    """Train with the plain loop and with the pipeline, each on a fresh 1-rank DMP of the same
    model on ``device``; assert the same metrics and parameters; return the plan's sharding types."""
    from robe_torchrec.app.dist_env import init_one_process_group, setup, teardown

    params, types = {}, {}
    for loop in ("plain", "sparse_dist"):
        overrides = sets(tmp_path / loop, "train.steps=8", f"train.pipeline={loop}", f"train.device={device}", *extra)
        cfg, _ = train.parse_args(["--config", SMALL, "--set", *overrides])
        env = setup(device)
        init_one_process_group(env)
        try:
            result = train.run(cfg, env, resume=False)
        finally:
            teardown()
        assert result.plan is not None
        params[loop] = local_params(result.model)
        types[loop] = {g: p.sharding_type for plan in result.plan.plan.values() for g, p in plan.items()}
    assert_same_metrics(tmp_path / "plain", tmp_path / "sparse_dist")
    for k, v in params["plain"].items():
        torch.testing.assert_close(v, params["sparse_dist"][k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert types["plain"] == types["sparse_dist"]
    return types["plain"]


def test_pipeline_equals_plain_loop_on_the_same_dmp(tmp_path):
    """Both loops on the same 1-rank DMP model (Adagrad, evaluations mid-run: the pipeline is
    detached and re-attached): the pipeline changes nothing but the order of work."""
    _both_loops_on_one_rank(tmp_path, "cpu")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stype", ["data_parallel", "table_wise", "row_wise"])
def test_one_process_pipeline_equals_plain_loop_per_sharding_type(tmp_path, device, stype):
    """The app on one process per sharding type (a 1-rank gloo group on CPU; on a GPU a 1-rank
    NCCL group, CUDA streams in the pipeline and the Triton kernels): pipeline == plain loop."""
    types = _both_loops_on_one_rank(tmp_path, device, f"robe.sharding_type={stype}")
    assert set(types.values()) >= {stype}, types


def test_resume_under_the_pipeline_equals_uninterrupted_run(tmp_path):
    """Checkpoint at step 4 while the pipeline already holds batches 5 and 6; resume from it."""
    ckpt = ("checkpoint.every=4", "checkpoint.keep=3")
    full = train.main(["--config", SMALL, "--set", *sets(tmp_path / "full", "train.steps=8", "train.pipeline=sparse_dist", *ckpt)])
    split = ["--config", SMALL, "--set", *sets(tmp_path / "split", "train.pipeline=sparse_dist", *ckpt)]
    assert train.main(split + ["train.steps=4"]).step == 4
    assert checkpoint.list_checkpoints(str(tmp_path / "split" / "checkpoints")) == ["step_4"]
    resumed = train.main(split + ["train.steps=8", "--resume"])
    assert resumed.step == 8
    assert_same_params(local_params(full.model), local_params(resumed.model))
    assert resumed.last_eval.logloss == pytest.approx(full.last_eval.logloss, rel=RTOL)
    assert resumed.last_eval.auc == pytest.approx(full.last_eval.auc, abs=ATOL)


def test_data_exhausted_under_the_pipeline(capsys, tmp_path):
    tr, val = write_tsv(tmp_path / "train.txt", 200), write_tsv(tmp_path / "val.txt", 100)
    outs = {}
    for loop in ("plain", "sparse_dist"):
        rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / loop, tr, val, "train.steps=10", "checkpoint.final=true",
                                                     f"train.pipeline={loop}"))
        assert rc == 0 and "training data exhausted after step 3" in out, out
        assert checkpoint.list_checkpoints(str(tmp_path / loop / "checkpoints")) == ["step_3"]
        outs[loop] = out
    assert "training loop: TrainPipelineSparseDist, input dist a batch ahead for ['sparse_arch.embedding_bag_collection']" in outs["sparse_dist"]
    assert "training loop: plain" in outs["plain"]
    assert_same_metrics(tmp_path / "plain", tmp_path / "sparse_dist")


def test_data_error_under_the_pipeline_stops_after_the_last_good_step(capsys, tmp_path):
    """The pipeline reads two batches ahead; the error still surfaces after the step before the
    bad batch, with that step checkpointed as due, exactly as in the plain loop. The TSV reader
    converts 4096-line chunks: a file cut after its second chunk gives 8192 / 64 = 128 good batches."""
    tr = str(tmp_path / "train.txt.gz")
    write_tsv(tr, 20000, seed=1)
    with open(tr, "rb") as f:
        data = f.read()
    with open(tr, "wb") as f:
        f.write(data[: len(data) // 2])  # about 10,000 readable lines
    val = write_tsv(tmp_path / "val.txt", 100)
    for loop in ("plain", "sparse_dist"):
        rc, out = run_train(capsys, KAGGLE, tsv_sets(tmp_path / loop, tr, val, "train.steps=1000", "checkpoint.every=8",
                                                     "checkpoint.keep=1", "train.log_every=1", *SGD, f"train.pipeline={loop}"))
        assert rc == 1 and f"{tr}: truncated or corrupt gzip file after line" in out, out
        assert checkpoint.list_checkpoints(str(tmp_path / loop / "checkpoints")) == ["step_128"], loop
        assert metrics(tmp_path / loop)[-1]["step"] == "128"
    assert_same_metrics(tmp_path / "plain", tmp_path / "sparse_dist")


def test_divergence_under_the_pipeline(capsys, tmp_path):
    rc, out = run_train(capsys, SMALL, sets(tmp_path, "train.steps=10", "optimizer.lr=1E9", "optimizer.warmup_steps=0",
                                            "train.pipeline=sparse_dist", "checkpoint.every=1"))
    assert rc == 1 and "training diverged" in out and "step 2" in out, out
    assert checkpoint.list_checkpoints(str(tmp_path / "checkpoints")) == ["step_1"]


# ----- two gloo processes ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, world, ports, out_dir, stype):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    runs = [  # name, loop, steps, resume
        ("plain", "plain", 6, False), ("pipe", "sparse_dist", 6, False),
        ("split", "sparse_dist", 3, False), ("split", "sparse_dist", 6, True),
    ]
    params = {}
    for (name, loop, steps, resume), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        argv = ["--config", SMALL, "--set", *sets(os.path.join(out_dir, name), f"train.steps={steps}", f"train.pipeline={loop}",
                                                  f"robe.sharding_type={stype}", "checkpoint.every=3", "eval.every=2")]
        r = train.main(argv + (["--resume"] if resume else []))
        params[f"{name}{steps}"] = local_params(r.model)
    torch.save(params, os.path.join(out_dir, f"params{rank}.pt"))


@pytest.mark.parametrize("stype", ["row_wise", "data_parallel"])
def test_two_rank_pipeline_equals_plain_loop_and_resumes_exactly(tmp_path, stype, capfd):
    mp.spawn(_two_rank_worker, args=(2, [_free_port() for _ in range(4)], str(tmp_path), stype), nprocs=2, join=True)
    out = capfd.readouterr().out
    assert out.count("input dist a batch ahead for ['sparse_arch.embedding_bag_collection']") == 3, out[-2000:]  # rank 0
    assert_same_metrics(tmp_path / "plain", tmp_path / "pipe")
    for rank in (0, 1):
        p = torch.load(tmp_path / f"params{rank}.pt")
        assert_same_params(p["plain6"], p["pipe6"])
        assert_same_params(p["pipe6"], p["split6"])
    train_rows = lambda run: [r for r in metrics(tmp_path / run) if r["kind"] == "train"]  # noqa: E731
    full, split = train_rows("pipe"), train_rows("split")  # split: steps 1-3, then 4-6 after the resume
    assert [r["step"] for r in split] == [r["step"] for r in full] == [str(s) for s in range(1, 7)]
    for a, b in zip(full, split):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=RTOL) and a["lr"] == b["lr"], (a, b)
    assert float(metrics(tmp_path / "split")[-1]["logloss"]) == pytest.approx(float(metrics(tmp_path / "pipe")[-1]["logloss"]), rel=RTOL)
