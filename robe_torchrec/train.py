"""Train DLRM / DLRM-DCN with ROBE embeddings from a YAML config.

    python -m robe_torchrec.train --config configs/synthetic_small.yaml [--set train.steps=100 ...]
    torchrun --nproc_per_node 2 -m robe_torchrec.train --config configs/synthetic_small.yaml
    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2

Parallelism: one process trains the plain module (no wrapper, no process group), and may fuse the
ROBE optimizer into backward. With WORLD_SIZE > 1 the model is wrapped in torchrec's
DistributedModelParallel. There is no ROBE sharder yet, so DMP leaves the ROBE collection
unsharded and DDP-wraps its arrays with the MLPs: pure data parallelism. A fused update would
skip DDP's gradient all-reduce and let the replicas drift, so with WORLD_SIZE > 1 the arrays
always use the dense optimizer (``optimizer.sparse`` is switched to ``dense``, with a message).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from robe_torchrec.app import checkpoint
from robe_torchrec.app.config import TrainConfig, load_config, split_cli_overrides
from robe_torchrec.app.data import eval_batches, train_batches
from robe_torchrec.app.dist_env import DistEnv, setup, teardown
from robe_torchrec.app.metrics import EvalResult, MetricsLogger, evaluate
from robe_torchrec.app.model import build_model, memory_report
from robe_torchrec.app.optim import build_dense_optimizer, lr_factor, set_lr, trainable_dense_params


@dataclass
class TrainResult:
    step: int
    last_eval: Optional[EvalResult]
    stopped_early: bool
    model: torch.nn.Module  # unwrapped
    config: TrainConfig


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


def wrap(cfg: TrainConfig, env: DistEnv) -> "tuple[torch.nn.Module, torch.nn.Module]":
    """(module to call, unwrapped module) for this world size."""
    if env.world_size == 1:
        # One process: no DMP. DMP needs a process group, and with no sharder for ROBE it would
        # only add a 1-rank DDP wrapper; the plain module trains identically.
        model = build_model(cfg, env.device, fused=cfg.optimizer.sparse == "fused", for_dmp=False)
        return model, model
    from torchrec.distributed.model_parallel import DistributedModelParallel

    model = build_model(cfg, env.device, fused=False, for_dmp=True)
    dmp = DistributedModelParallel(model, device=env.device)
    # DMP materialises the meta arrays and resets them (RobeEmbeddingBagCollection's arrays
    # reset themselves); its DDP wrapper then starts every rank from rank 0's parameters.
    return dmp, dmp.module


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    cfg, resume = parse_args(argv)
    env = setup(cfg.train.device)
    try:
        return run(cfg, env, resume)
    finally:
        teardown()


def run(cfg: TrainConfig, env: DistEnv, resume: bool) -> TrainResult:
    if env.world_size > 1 and cfg.optimizer.sparse == "fused":
        cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, sparse="dense"))
        if env.is_main:
            print("WORLD_SIZE > 1: ROBE arrays are data-parallel (no sharder yet); using the dense optimizer for them")
    seed_everything(cfg.train.seed)
    say = print if env.is_main else (lambda *a, **k: None)
    say(memory_report(cfg))

    model, unwrapped = wrap(cfg, env)
    optimizer = build_dense_optimizer(cfg.optimizer, trainable_dense_params(unwrapped))
    ebc = unwrapped.sparse_arch.embedding_bag_collection
    fused = ebc._fused_optimizer
    optimizers: List[Any] = [optimizer] + ([fused] if fused is not None else [])
    base_lrs = [cfg.optimizer.lr] + ([fused.config.lr] if fused is not None else [])

    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.logging.dir, "checkpoints")
    start = 0
    if resume:
        path = checkpoint.latest_step_dir(ckpt_dir)
        if path is None:
            say(f"--resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            start = checkpoint.load(path, unwrapped, optimizer, fused)
            say(f"resumed from {path} (step {start})")

    logger = MetricsLogger(cfg.logging.dir, env.is_main, cfg.logging.tensorboard)
    val = eval_batches(cfg)
    data = train_batches(cfg, start, env.rank, env.world_size)
    progress = None
    if env.is_main and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True)

    result: Optional[EvalResult] = None
    stopped_early = False
    step = start
    t0 = tick = time.perf_counter()
    running, n_running = 0.0, 0
    model.train()
    while step < cfg.train.steps:
        batch = next(data, None)
        if batch is None:
            say("training data exhausted")
            break
        batch = batch.to(env.device)
        lr = set_lr(optimizers, base_lrs, lr_factor(cfg.optimizer, step))
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()  # a fused ROBE optimizer updates the arrays here
        optimizer.step()
        step += 1
        running += loss.item()
        n_running += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            rate = n_running / max(now - tick, 1e-9)
            logger.log(step, "train", loss=running / n_running, lr=lr, steps_per_s=rate, elapsed_s=now - t0)
            if progress is not None:
                progress.set_postfix(loss=f"{running / n_running:.4f}", auc=f"{result.auc:.4f}" if result else "-")
            running, n_running, tick = 0.0, 0, now
        if progress is not None:
            progress.update(1)

        if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
            result = evaluate(model, val, env.device)
            logger.log(step, "eval", auc=result.auc, logloss=result.logloss, elapsed_s=time.perf_counter() - t0)
            if progress is None:
                say(f"step {step}: val AUC {result.auc:.4f} logloss {result.logloss:.4f}")
            target = cfg.train.target_auc
            if target is not None and result.auc >= target:
                stopped_early = step < cfg.train.steps
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
            cfg.checkpoint.final and (step == cfg.train.steps or stopped_early)
        ):
            checkpoint.save(ckpt_dir, step, unwrapped, optimizer, fused, keep=cfg.checkpoint.keep)
        if stopped_early:
            say(f"target AUC {cfg.train.target_auc} reached at step {step}")
            break

    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t0
    if result is not None:
        say(
            f"done: step {step} in {elapsed:.1f}s ({(step - start) / max(elapsed, 1e-9):.1f} steps/s); "
            f"val AUC {result.auc:.4f} logloss {result.logloss:.4f} on {result.num_samples:,} samples"
        )
    logger.close()
    return TrainResult(step=step, last_eval=result, stopped_early=stopped_early, model=unwrapped, config=cfg)


if __name__ == "__main__":
    main()
