"""Model assembly: tables from the data config, ROBE arrays from the robe section, DLRM on top."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.app.config import TrainConfig
from robe_torchrec.app.data import embedding_tables
from robe_torchrec.config import full_table_elements
from robe_torchrec.optim import RobeFusedOptimizerConfig, state_numel

BYTES_PER_FLOAT = 4


def build_tables(cfg: TrainConfig) -> List[EmbeddingBagConfig]:
    """The configured data's embedding tables (see :func:`robe_torchrec.app.data.embedding_tables`)."""
    return embedding_tables(cfg)


def robe_configs(cfg: TrainConfig, tables: List[EmbeddingBagConfig]) -> "tuple[Dict[str, RobeConfig], Optional[Dict[str, str]]]":
    """({group: RobeConfig}, table_to_group or None): one array, or one per configured group."""
    r = cfg.robe
    if not r.groups:
        return {"default": RobeConfig.from_compression(tables, r.compression, r.block_size, r.seed)}, None
    names = [t.name for t in tables]
    unknown = sorted(set(r.table_to_group) - set(names))
    if unknown:
        raise ValueError(f"robe.table_to_group names unknown table(s) {unknown}; tables are {names}")
    first = next(iter(r.groups))
    mapping = {t.name: r.table_to_group.get(t.name, first) for t in tables}
    configs = {}
    for group, ratio in r.groups.items():
        members = [t for t in tables if mapping[t.name] == group]
        if not members:
            raise ValueError(f"robe group {group!r} serves no table")
        configs[group] = RobeConfig.from_compression(members, ratio, r.block_size, r.seed)
    return configs, mapping


def build_model(
    cfg: TrainConfig, device: torch.device, fused: bool, for_dmp: bool
) -> torch.nn.Module:
    """DLRM or DLRM_DCN with ROBE embeddings; on ``meta`` when DMP will materialise it."""
    tables = build_tables(cfg)
    robe, mapping = robe_configs(cfg, tables)
    build_device = torch.device("meta") if (for_dmp and cfg.robe.build_on_meta) else device
    opt = cfg.optimizer
    fused_cfg = (
        RobeFusedOptimizerConfig(
            optimizer=opt.fused_kind, lr=opt.sparse_lr if opt.sparse_lr is not None else opt.lr, eps=opt.eps
        )
        if fused
        else None
    )
    ebc = RobeEmbeddingBagCollection(
        tables=tables,
        robe=robe if mapping is not None else robe["default"],
        table_to_group=mapping,
        device=build_device,
        kernel=cfg.robe.kernel,
        fused_optimizer=fused_cfg,
    )
    m = cfg.model
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=cfg.data.num_dense,
        dense_arch_layer_sizes=list(m.bottom_mlp),
        over_arch_layer_sizes=list(m.top_mlp),
        dense_device=build_device,
    )
    if m.arch == "dlrm_dcn":
        return DLRM_DCN(dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim, **common)
    return DLRM(**common)


def memory_report(cfg: TrainConfig) -> str:
    """Full-table bytes vs ROBE array bytes (+ fused optimizer state), from the configs alone."""
    tables = build_tables(cfg)
    robe, _ = robe_configs(cfg, tables)
    full = full_table_elements(tables) * BYTES_PER_FLOAT
    used = sum(c.num_elements for c in robe.values()) * BYTES_PER_FLOAT
    state = 0
    if cfg.optimizer.sparse == "fused":
        state = sum(state_numel(cfg.optimizer.fused_kind, c.num_elements, c.block_size) for c in robe.values())
    elif cfg.optimizer.dense == "adagrad":
        state = sum(c.num_elements for c in robe.values())
    elif cfg.optimizer.dense == "adam":
        state = 2 * sum(c.num_elements for c in robe.values())
    rows = sum(t.num_embeddings for t in tables)
    return (
        f"{len(tables)} tables, {rows:,} nominal rows of dim {cfg.model.embedding_dim}; "
        f"{len(robe)} ROBE array(s) {sorted(robe)} (Z={cfg.robe.block_size})\n"
        f"embedding memory: full tables {full:,} B ({full / 2**30:.3f} GiB) -> ROBE {used:,} B "
        f"({used / 2**20:.2f} MiB), {full / used:.0f}x smaller, {full - used:,} B saved; "
        f"optimizer state on the arrays {state * BYTES_PER_FLOAT:,} B"
    )
