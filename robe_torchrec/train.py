"""Train DLRM / DLRM-DCN with ROBE embeddings from a YAML config.

    python -m robe_torchrec.train --config configs/synthetic_small.yaml [--set train.steps=100 ...]
    torchrun --nproc_per_node 2 -m robe_torchrec.train --config configs/synthetic_small.yaml
    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2

Loop (``train.pipeline``, :mod:`robe_torchrec.app.loop`): torchrec's TrainPipelineSparseDist
when WORLD_SIZE > 1 or on CUDA (``auto``), the plain forward / backward / step loop on one CPU
process; either can be forced (``sparse_dist`` / ``plain``) and both give the same results.

Parallelism: one process with the plain loop trains the plain module (no process group), with
the ROBE optimizer fused into backward when ``optimizer.sparse`` is ``fused``; one process with
the pipeline gets a 1-rank process group and DMP (a sharded module for the pipeline to
pipeline). Under a process group torchrec's EmbeddingShardingPlanner plans
the model with ``[RobeEmbeddingBagCollectionSharder(fused_params=...), *get_default_sharders()]``
under the ``robe.sharding`` / ``robe.sharding_type`` constraints (one per ROBE group), rank 0
prints the plan, and DistributedModelParallel shards it: table_wise / row_wise groups are updated
by the sharder's fused optimizer (``dmp.fused_optimizer``, LR driven by the schedule), while
data_parallel groups and the MLPs are DDP-replicated and stepped by the dense optimizer (a
torchrec ``KeyedOptimizerWrapper``). Checkpoints hold ``dmp.state_dict()`` and
``dmp.fused_optimizer.state_dict()`` (ShardedTensors under the unsharded keys) via DCP.

Failures (docs/usage.md, section 4): data files, run and checkpoint directories are checked
before the model is built; ``--resume`` takes the newest checkpoint that verifies against its
manifest and refuses one written under another model / ROBE layout / optimizer kind
(:mod:`robe_torchrec.app.compat`); each step checks the loss and the parameters and stops at the
first NaN / inf without writing a checkpoint. Errors that concern all ranks are agreed on by all
of them (one small all_reduce a step), so no rank is left waiting in a collective.
``python -m`` exits 0, 1 (data / checkpoint / divergence error, one line) or 2 (config error).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from robe_torchrec.app import checkpoint
from robe_torchrec.app.compat import check_compatible, checkpoint_signature
from robe_torchrec.app.config import ConfigError, TrainConfig, load_config, split_cli_overrides
from robe_torchrec.app.data import check_data, describe_data, train_batches, validation_batches
from robe_torchrec.app.dist_env import DistEnv, init_one_process_group, setup, teardown
from robe_torchrec.app.loop import Batches, BatchModel, choose_loop, make_loop
from robe_torchrec.app.metrics import EvalResult, MetricsLogger, evaluate_batches
from robe_torchrec.app.model import build_model, memory_report
from robe_torchrec.app.optim import build_dense_optimizer, lr_factor, set_lr, trainable_dense_params
from robe_torchrec.data import DataError


@dataclass
class TrainResult:
    step: int
    last_eval: Optional[EvalResult]
    stopped_early: bool
    model: torch.nn.Module  # unwrapped (under DMP: the sharded module tree, DMP's .module)
    config: TrainConfig
    plan: Optional[Any] = None  # torchrec ShardingPlan (WORLD_SIZE > 1)


def parse_args(argv: Optional[Sequence[str]]) -> "tuple[TrainConfig, bool]":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_small.yaml", help="YAML config file")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="overrides")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args, rest = p.parse_known_args(argv)
    cfg = load_config(args.config, list(args.set) + split_cli_overrides(rest))
    return cfg, args.resume


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Wrapped:
    """The model the loop calls (a BatchModel, or DMP around one), the DLRM (for evaluation: it
    shares the BatchModel's children, sharded ones included), the optimizers and their base LRs."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: Any  # dense optimizer (torch optimizer, or a torchrec KeyedOptimizerWrapper under DMP)
    fused: Optional[Any]  # RobeFusedOptimizer (one process) or dmp.fused_optimizer; None when unused
    base_lrs: List[float]
    plan: Optional[Any] = None

    @property
    def optimizers(self) -> List[Any]:
        return [self.optimizer] + ([self.fused] if self.fused is not None else [])


def sparse_lr(cfg: TrainConfig) -> float:
    return cfg.optimizer.sparse_lr if cfg.optimizer.sparse_lr is not None else cfg.optimizer.lr


def sharding_constraints(cfg: TrainConfig, groups: Sequence[str]) -> "dict[str, Any]":
    """``{group: ParameterConstraints(sharding_types=[...])}`` from ``robe.sharding`` / ``robe.sharding_type``."""
    from torchrec.distributed.planner import ParameterConstraints

    prefs = dict(cfg.robe.sharding)
    fallback = cfg.robe.sharding_type or ("" if "default" in groups else prefs.get("default", ""))
    dense = cfg.optimizer.sparse == "dense"
    out = {}
    for g in groups:
        stype = prefs.get(g, fallback)
        if dense and stype not in ("", "data_parallel"):
            # A dense torch optimizer over a table/row-wise shard keeps plain per-rank state that
            # DCP would take for replicated: only the fused optimizer's state is sharded.
            raise ConfigError(
                f"ROBE group {g!r}: {stype} needs optimizer.sparse=fused; with optimizer.sparse=dense "
                "the arrays can only be data_parallel"
            )
        if dense:
            stype = "data_parallel"
        if stype:
            out[g] = ParameterConstraints(sharding_types=[stype])
    return out


def wrap(cfg: TrainConfig, env: DistEnv) -> Wrapped:
    """Build the model: the plain module without a process group, DMP under one (any world size)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        model = build_model(cfg, env.device, fused=cfg.optimizer.sparse == "fused", for_dmp=False)
        optimizer = build_dense_optimizer(cfg.optimizer, trainable_dense_params(model))
        fused = model.sparse_arch.embedding_bag_collection._fused_optimizer
        base_lrs = [cfg.optimizer.lr] + ([fused.config.lr] if fused is not None else [])
        return Wrapped(BatchModel(model), model, optimizer, fused, base_lrs)

    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from robe_torchrec.sharding import RobeEmbeddingBagCollectionSharder

    model = build_model(cfg, env.device, fused=False, for_dmp=True)
    opt = cfg.optimizer
    fused_params = (
        {"optimizer": opt.fused_kind, "lr": sparse_lr(cfg), "eps": opt.eps} if opt.sparse == "fused" else None
    )
    dense_class = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[opt.dense]
    sharders = [
        RobeEmbeddingBagCollectionSharder(fused_params=fused_params, dense_optimizer_class=dense_class),
        *get_default_sharders(),
    ]
    groups = list(model.sparse_arch.embedding_bag_collection.robe_configs())
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(env.world_size)))
    topology = Topology(world_size=env.world_size, local_world_size=local_world, compute_device=env.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=sharding_constraints(cfg, groups))
    pg = dist.group.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    if env.is_main:
        print(f"sharding plan:\n{plan}")
    dmp = DistributedModelParallel(
        BatchModel(model), env=ShardingEnv.from_process_group(pg), plan=plan, sharders=sharders, device=env.device
    )
    # Dense optimizer: MLPs + data_parallel arrays (+ table/row-wise shards when not fused).
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizer = KeyedOptimizerWrapper(dense_params, lambda ps: build_dense_optimizer(opt, ps))
    fused = dmp.fused_optimizer if dmp.fused_optimizer.params else None
    base_lrs = [opt.lr] + ([sparse_lr(cfg)] if fused is not None else [])
    return Wrapped(dmp, model, optimizer, fused, base_lrs, plan)


def _maybe_fail(cfg: TrainConfig, env: DistEnv, step: int) -> None:
    """``train.fail_at_step``: kill this worker once per run directory (restart tests)."""
    n = cfg.train.fail_at_step
    rank = cfg.train.fail_rank if cfg.train.fail_rank >= 0 else env.world_size - 1
    if not n or step != n or env.rank != rank:
        return
    marker = os.path.join(cfg.logging.dir, f"failed_at_step_{n}")
    if os.path.exists(marker):
        return
    os.makedirs(cfg.logging.dir, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"rank {env.rank} exited at step {n}\n")
    print(f"train.fail_at_step={n}: rank {env.rank} exits now (simulated worker failure)", flush=True)
    os._exit(1)


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN / inf; training stopped, no checkpoint was written."""


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Train; raises on failure (ConfigError, DataError, CheckpointError, TrainingDiverged, ...)."""
    cfg, resume = parse_args(argv)
    env = setup(cfg.train.device)
    completed = False
    try:
        if choose_loop(cfg.train.pipeline, env.world_size, env.device) == "sparse_dist" and env.world_size == 1:
            init_one_process_group(env)  # DMP on one rank: a sharded module for the pipeline
        result = run(cfg, env, resume)
        completed = True
        return result
    finally:
        teardown(completed)


# Errors that are the user's data / files / settings, not bugs: one line, no traceback.
_CLEAN_ERRORS = (DataError, checkpoint.CheckpointError, checkpoint.NonFiniteStateError, TrainingDiverged)


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m robe_torchrec.train``: :func:`main` with exit codes. 0: done; 2: bad config or
    arguments (one line on stderr); 1: a data, checkpoint or divergence error (one line on stderr)."""
    try:
        main(argv)  # the result (and the sharded model holding the process group) is dropped here
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except _CLEAN_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _all_ranks(fn: Any, what: str) -> Any:
    """Run ``fn`` on every rank; if it raises on any rank, every rank raises (none waits forever)."""
    try:
        result, error = fn(), None
    except Exception as e:  # re-raised below
        result, error = None, e
    if checkpoint.any_rank(error is not None):
        if error is not None:
            raise error
        raise DataError(f"{what} failed on another rank (see its log)")
    return result


def _warn_if_starting_over(ckpt_dir: str, say: Any) -> None:
    """A run without --resume in a directory with checkpoints starts over, as asked, but says so:
    it replaces those checkpoints as it reaches their steps (and prunes the older ones)."""
    existing = checkpoint.list_checkpoints(ckpt_dir)
    if existing:
        say(
            f"warning: {ckpt_dir} holds checkpoints of an earlier run ({', '.join(existing[-3:])}); this run starts "
            "from step 0 (no --resume) and replaces them as it goes: pass --resume to continue that run instead, "
            "or set logging.dir / checkpoint.dir to keep both"
        )


def _finite_params(model: torch.nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.numel() and p.device.type != "meta" and p.is_floating_point()]


def _step_status(loss: torch.Tensor, params: List[torch.Tensor], data_error: bool, exhausted: bool) -> List[float]:
    """[loss, loss bad, params bad, data error, data exhausted] with the flags agreed by all ranks
    (one small all_reduce and one device sync a step)."""
    import torch.distributed as dist

    loss = loss.detach().float()
    norm = torch.nn.utils.get_total_norm(params, norm_type=float("inf"), foreach=True) if params else loss.new_zeros(())
    flags = torch.stack([
        (~torch.isfinite(loss)).float(), (~torch.isfinite(norm)).float().to(loss.device),
        loss.new_tensor(float(data_error)), loss.new_tensor(float(exhausted)),
    ])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return torch.cat([loss.reshape(1), flags]).tolist()


def run(cfg: TrainConfig, env: DistEnv, resume: bool) -> TrainResult:
    seed_everything(cfg.train.seed)
    say = print if env.is_main else (lambda *a, **k: None)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.logging.dir, "checkpoints")
    writes_checkpoints = bool(cfg.checkpoint.every) or cfg.checkpoint.final

    # Pre-flight: everything that can be checked before a step runs (no work is lost to it).
    checkpoint.on_main(lambda: check_data(cfg, env.world_size), "the data check")
    _all_ranks(lambda: checkpoint.check_writable(cfg.logging.dir, "run directory (logging.dir)"), "the run directory check")
    if writes_checkpoints or resume:
        _all_ranks(lambda: checkpoint.check_writable(ckpt_dir, "checkpoint directory"), "the checkpoint directory check")
    if writes_checkpoints and not resume:
        _warn_if_starting_over(ckpt_dir, say)
    val = _all_ranks(lambda: validation_batches(cfg), "reading the validation data")
    say(memory_report(cfg))

    w = wrap(cfg, env)
    model, unwrapped, optimizer, fused = w.model, w.unwrapped, w.optimizer, w.fused
    optimizers, base_lrs = w.optimizers, w.base_lrs

    signature = checkpoint_signature(cfg)
    start = 0
    if resume:
        found = checkpoint.on_main(lambda: checkpoint.find_resume_checkpoint(ckpt_dir, say), "finding the checkpoint")
        if found is None:
            say(f"--resume: no checkpoint in {ckpt_dir} yet; starting from step 0")
        else:
            path, manifest = found
            check_compatible(path, manifest, signature)
            start = checkpoint.load(path, model, optimizer, fused)
            say(f"resumed from {path} (step {start})")
    meta = {"signature": signature, "config": cfg.to_dict(), "world_size": env.world_size}

    data = Batches(train_batches(cfg, start, env.rank, env.world_size), limit=max(cfg.train.steps - start, 0))
    if start < cfg.train.steps:
        failed, _ = data.next_missing(0)
        if failed or data.ran_out:
            if data.error is not None:
                raise data.error
            raise DataError(f"{describe_data(cfg, 'train')}: no training batch for step {start + 1} (on some rank)")
    kind = choose_loop(cfg.train.pipeline, env.world_size, env.device)
    loop = make_loop(kind, model, optimizer, env.device)
    logger = MetricsLogger(cfg.logging.dir, env.is_main, cfg.logging.tensorboard)
    progress = None
    if env.is_main and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True)

    result: Optional[EvalResult] = None
    stopped_early = False
    exhausted = False
    step = start
    params = _finite_params(model)
    t0 = tick = time.perf_counter()
    running, n_running = 0.0, 0
    model.train()
    try:
        while step < cfg.train.steps and not stopped_early and not exhausted:
            lr = set_lr(optimizers, base_lrs, lr_factor(cfg.optimizer, step))
            loss = loop.step(data)  # a fused ROBE optimizer updates the arrays in its backward
            step += 1
            if step == start + 1:
                say(f"{loop.describe()} (train.pipeline={cfg.train.pipeline})")
            _maybe_fail(cfg, env, step)
            failed, ran_out = data.next_missing(step - start) if step < cfg.train.steps else (False, False)
            loss_value, bad_loss, bad_params, data_error, no_data = _step_status(loss, params, failed, ran_out)
            if bad_loss or bad_params:
                what = f"the loss is {loss_value}" if bad_loss else "the parameters hold NaN or inf after the update"
                latest = checkpoint.latest_step_dir(ckpt_dir)
                raise TrainingDiverged(
                    f"step {step}: training diverged: {what} (lr {lr:g}); stopped without writing a checkpoint; "
                    + (f"the last good checkpoint is {latest}" if latest else "there is no checkpoint")
                )
            exhausted = bool(no_data)
            last = step == cfg.train.steps or exhausted
            running += loss_value
            n_running += 1

            if step % cfg.train.log_every == 0 or last:
                now = time.perf_counter()
                rate = n_running / max(now - tick, 1e-9)
                logger.log(step, "train", loss=running / n_running, lr=lr, steps_per_s=rate, elapsed_s=now - t0)
                if progress is not None:
                    progress.set_postfix(loss=f"{running / n_running:.4f}", auc=f"{result.auc:.4f}" if result else "-")
                running, n_running, tick = 0.0, 0, now
            if progress is not None:
                progress.update(1)

            if (cfg.eval.every and step % cfg.eval.every == 0) or last:
                loop.pause()  # the DLRM is called outside the loop's step
                result = evaluate_batches(unwrapped, val, env.device)
                logger.log(step, "eval", auc=result.auc, logloss=result.logloss, elapsed_s=time.perf_counter() - t0)
                if progress is None:
                    say(f"step {step}: val AUC {result.auc:.4f} logloss {result.logloss:.4f}")
                target = cfg.train.target_auc
                if target is not None and result.auc >= target:
                    stopped_early = step < cfg.train.steps
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                cfg.checkpoint.final and (last or stopped_early)
            ):
                checkpoint.save(ckpt_dir, step, model, optimizer, fused, keep=cfg.checkpoint.keep, meta=meta)
            if stopped_early:
                say(f"target AUC {cfg.train.target_auc} reached at step {step}")
            if exhausted:
                say(f"training data exhausted after step {step} (train.steps {cfg.train.steps})")
            if data_error:  # the next batch is bad: this step's state is good and was checkpointed as due
                if data.error is not None:
                    raise data.error
                raise DataError(f"{describe_data(cfg, 'train')}: reading the training data failed on another rank")
    finally:
        loop.close()
        if progress is not None:
            progress.close()
        logger.close()
    elapsed = time.perf_counter() - t0
    if result is not None:
        say(
            f"done: step {step} in {elapsed:.1f}s ({(step - start) / max(elapsed, 1e-9):.1f} steps/s); "
            f"val AUC {result.auc:.4f} logloss {result.logloss:.4f} on {result.num_samples:,} samples"
        )
    return TrainResult(step=step, last_eval=result, stopped_early=stopped_early, model=unwrapped, config=cfg, plan=w.plan)


if __name__ == "__main__":
    from robe_torchrec.quiet import silence_fx_tracing_notice

    silence_fx_tracing_notice()
    faulthandler.enable()  # a native crash (SIGABRT, SIGSEGV) prints every thread's Python stack
    code = cli()
    gc.collect()  # free the model's process-group references while the interpreter is alive
    sys.exit(code)
