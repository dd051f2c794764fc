"""torchx components for robe-torchrec training.

    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2
    torchx run launch/components.py:train --nproc_per_node 2 --resume True   # (.torchxconfig: local_cwd)
    torchx run -s local_cwd launch/components.py:train --config configs/criteo_kaggle.yaml \\
        --overrides "data.train_paths=/data/train.txt data.val_paths=/data/val.txt"

Built on ``torchx.components.dist.ddp`` (torchrun under the hood): every process gets RANK,
WORLD_SIZE and LOCAL_RANK, and ``robe_torchrec.train`` initialises gloo (CPU) or nccl (CUDA).
With more than one process torchrec's planner shards the model with the ROBE sharder
(``robe.sharding`` / ``robe.sharding_type`` in the config; see ``robe_torchrec/train.py``).

``max_retries`` sets both the scheduler's retries (slurm, kubernetes, ...) and torchrun's
``--max_restarts`` (torchelastic restarts the failed node's workers in place; the local
schedulers have no retries of their own). Pair it with ``resume=True`` so a restarted worker
continues from the latest checkpoint.

``evaluate`` and ``predict`` run ``python -m robe_torchrec.evaluate`` in one process (DCP
reshards any training checkpoint to it).
"""

import shlex
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp


def train(
    config: str = "configs/synthetic_small.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    max_retries: int = 0,
    overrides: str = "",
    resume: bool = False,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Train DLRM with ROBE embeddings from a YAML config (``python -m robe_torchrec.train``).

    Args:
        config: path of the YAML config, relative to the working directory.
        nnodes: number of nodes (hosts).
        nproc_per_node: training processes per node (one per GPU on GPU hosts).
        max_retries: how many times torchx restarts the job after a failure; combine with
            ``resume`` so that a restart continues from the latest checkpoint.
        overrides: space-separated ``section.key=value`` config overrides,
            e.g. ``"train.steps=100 robe.block_size=8"``.
        resume: continue from the latest checkpoint in the config's checkpoint directory.
        image: container image (ignored by the local_cwd scheduler).
        cpu: CPUs per replica (scheduler resource request).
        gpu: GPUs per replica (scheduler resource request).
        memMB: memory per replica in MB (scheduler resource request).
        rdzv_port: rendezvous port of the c10d rendezvous.
        env: extra environment variables for every process.

    Returns:
        The torchx AppDef of the job.
    """
    args = ["--config", config]
    extra = shlex.split(overrides)
    if extra:
        args += ["--set", *extra]
    if resume:
        args.append("--resume")
    app = ddp(
        *args,
        m="robe_torchrec.train",
        name="robe_train",
        image=image,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    if max_retries > 0:
        _add_torchrun_restarts(app, max_retries)
    return app


def _add_torchrun_restarts(app: specs.AppDef, max_restarts: int) -> None:
    """``torchrun --max_restarts N``: torchelastic restarts all local workers when one fails."""
    role = app.roles[0]
    assert role.args[0] == "-c" and role.args[1].startswith("torchrun "), role.args
    role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max_restarts {max_restarts} ", 1)


def _single(
    module_args: List[str], name: str, image: str, cpu: int, gpu: int, memMB: int, env: Optional[Dict[str, str]]
) -> specs.AppDef:
    """One process running ``python -m robe_torchrec.evaluate ...``."""
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=name,
                image=image,
                entrypoint="python",
                args=["-m", "robe_torchrec.evaluate", *module_args],
                env=dict(env or {}),
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB),
            )
        ],
    )


def evaluate(
    config: str = "configs/synthetic_small.yaml",
    checkpoint: str = "",
    output: str = "",
    overrides: str = "",
    exported: str = "",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Evaluate a training checkpoint (AUC, log loss) on the config's validation data.

    Args:
        config: path of the YAML config the checkpoint was trained with.
        checkpoint: a ``step_N`` checkpoint directory, or a checkpoint directory (its ``latest``);
            empty: the config's checkpoint directory.
        output: JSON file for the metrics (empty: print only).
        overrides: space-separated ``section.key=value`` config overrides.
        exported: a serving artifact (``python -m robe_torchrec.export_checkpoint``) to evaluate
            instead of a checkpoint (no training code runs).
        image: container image (ignored by the local_cwd scheduler).
        cpu: CPUs (scheduler resource request).
        gpu: GPUs (scheduler resource request).
        memMB: memory in MB (scheduler resource request).
        env: extra environment variables.

    Returns:
        The torchx AppDef of the job.
    """
    args = ["evaluate", "--config", config]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if exported:
        args += ["--exported", exported]
    if output:
        args += ["--output", output]
    extra = shlex.split(overrides)
    if extra:
        args += ["--set", *extra]
    return _single(args, "robe_evaluate", image, cpu, gpu, memMB, env)


def predict(
    input: str,
    output: str,
    config: str = "configs/criteo_kaggle.yaml",
    checkpoint: str = "",
    overrides: str = "",
    batch_size: int = 4096,
    exported: str = "",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Write click probabilities (one per line, input order) for Criteo TSV files without labels.

    Args:
        input: space-separated Criteo TSV path(s) (``.gz`` ok; with or without the label column).
        output: file for the probabilities.
        config: path of the YAML config the checkpoint was trained with.
        checkpoint: a ``step_N`` checkpoint directory, or a checkpoint directory (its ``latest``);
            empty: the config's checkpoint directory.
        overrides: space-separated ``section.key=value`` config overrides.
        batch_size: samples per forward.
        exported: a serving artifact (``python -m robe_torchrec.export_checkpoint``) to predict
            with instead of a checkpoint (no training code runs).
        image: container image (ignored by the local_cwd scheduler).
        cpu: CPUs (scheduler resource request).
        gpu: GPUs (scheduler resource request).
        memMB: memory in MB (scheduler resource request).
        env: extra environment variables.

    Returns:
        The torchx AppDef of the job.
    """
    args = ["predict", "--config", config, "--input", *shlex.split(input), "--output", output,
            "--batch_size", str(batch_size)]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    if exported:
        args += ["--exported", exported]
    extra = shlex.split(overrides)
    if extra:
        args += ["--set", *extra]
    return _single(args, "robe_predict", image, cpu, gpu, memMB, env)
