"""torchx components for robe-torchrec training.

    torchx run -s local_cwd launch/components.py:train --nproc_per_node 2
    torchx run launch/components.py:train --nproc_per_node 2 --resume True   # (.torchxconfig: local_cwd)
    torchx run -s local_cwd launch/components.py:train --config configs/criteo_kaggle.yaml \\
        --overrides "data.train_paths=/data/train.txt data.val_paths=/data/val.txt"

Built on ``torchx.components.dist.ddp`` (torchrun under the hood): every process gets RANK,
WORLD_SIZE and LOCAL_RANK, and ``robe_torchrec.train`` initialises gloo (CPU) or nccl (CUDA).
With more than one process the ROBE arrays are trained data-parallel with the dense optimizer
(there is no ROBE sharder yet; see ``robe_torchrec/train.py``).
"""

import shlex
from typing import Dict, Optional

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
    return ddp(
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
