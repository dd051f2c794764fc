"""Typed training configuration: dataclass sections loaded from YAML, checked, overridable.

A config file is a YAML mapping of sections (``data``, ``model``, ``robe``, ``optimizer``,
``train``, ``eval``, ``checkpoint``, ``logging``) to mappings of fields. Unknown sections or keys
and values of the wrong type are errors that name the valid keys / the expected type. Missing
keys keep their defaults. Command-line overrides use dotted paths:

    --set train.steps=100 robe.block_size=8      or      --train.steps 100 --robe.block_size=8

An override value is parsed as YAML and then checked against the field's type (``"100"`` -> 100
for an int field; ``"512,256,128"`` or ``"[512, 256, 128]"`` for a list of ints; ``null`` for an
optional field; a str field takes the text as is).

Files and overrides are read with the YAML 1.2 core schema, not PyYAML's YAML 1.1 one: ``1e-3``
and ``1E9`` are floats (YAML 1.1 wants ``1.0e-3``), ``010`` is 10 (not octal 8; ``0o10`` is),
only ``true`` / ``false`` are booleans (``yes``, ``no``, ``on``, ``off`` are strings, so a bool
field given one is an error rather than a guess), and ``1:30`` or ``1_000`` are not numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ----- YAML 1.2 core schema -------------------------------------------------------------------


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader with the YAML 1.2 core schema's implicit types (bool, int, float)
    instead of YAML 1.1's; null and everything else unchanged."""


_YAML11_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
# Resolvers are tried in the order added: int before float, so "100" is an int.
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL_RE, list("tTfF"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_RE, list("-+0123456789"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # leading zeros are decimal in YAML 1.2


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def yaml_load(text: Any) -> Any:
    """Parse YAML text (or a stream) with the YAML 1.2 core schema."""
    return yaml.load(text, Loader=Yaml12Loader)


@dataclass
class DataConfig:
    """Where the samples come from.

    ``source``: ``synthetic`` (robe_torchrec.data.synthetic, indexed by batch: exact resume),
    ``criteo_tsv`` (``train_paths``/``val_paths``: Criteo TSV files, plain or gzip),
    ``criteo_binary`` (torchrec's preprocessed ``day_<i>_{dense,sparse,labels}.npy`` files in
    ``binary_dir``: ``train_days`` for training, the first half of ``val_days[0]`` for
    validation as torchrec's ``dlrm_main.py`` does; ``multi_hot``: ``day_<i>_sparse_multi_hot.npz``).
    ``cardinalities`` / ``pooling_factors``: per categorical feature; empty means the data
    source's default (synthetic: Criteo Kaggle capped at 100k rows, one-hot).
    """

    source: str = "synthetic"
    train_paths: List[str] = field(default_factory=list)
    val_paths: List[str] = field(default_factory=list)
    num_dense: int = 13
    cardinalities: List[int] = field(default_factory=list)
    pooling_factors: List[int] = field(default_factory=list)
    teacher_strength: float = 2.0
    zipf_exponent: float = 1.1
    skip_malformed: bool = False
    binary_dir: str = ""
    train_days: List[int] = field(default_factory=lambda: list(range(23)))
    val_days: List[int] = field(default_factory=lambda: [23])
    multi_hot: bool = False


@dataclass
class ModelConfig:
    """torchrec.models.dlrm: ``dlrm`` (dot interaction) or ``dlrm_dcn`` (low-rank DCN v2).
    ``bottom_mlp[-1]`` must equal ``embedding_dim``; ``top_mlp[-1]`` must be 1."""

    arch: str = "dlrm"
    embedding_dim: int = 16
    bottom_mlp: List[int] = field(default_factory=lambda: [64, 16])
    top_mlp: List[int] = field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512


@dataclass
class RobeSection:
    """The ROBE arrays. Without ``groups`` one array (group ``default``) serves every table at
    ``compression`` (nominal elements / array elements). ``groups`` maps a group name to its own
    compression ratio and ``table_to_group`` maps table names (``t_cat_0`` ...) to groups;
    tables not listed go to the first group.

    Sharding (WORLD_SIZE > 1; see docs/sharding.md): ``sharding`` maps a group name (``default``
    for the single array) to ``data_parallel``, ``table_wise`` or ``row_wise``, handed to torchrec's
    EmbeddingShardingPlanner as ``ParameterConstraints``; groups not listed get ``sharding_type``
    (empty: the planner chooses). When no group is named ``default``, a ``default`` key applies
    to every group not listed by name."""

    compression: float = 1000.0
    block_size: int = 16
    seed: int = 0
    groups: Dict[str, float] = field(default_factory=dict)
    table_to_group: Dict[str, str] = field(default_factory=dict)
    kernel: str = "auto"
    build_on_meta: bool = True
    sharding: Dict[str, str] = field(default_factory=dict)
    sharding_type: str = ""


@dataclass
class OptimizerConfig:
    """``dense``: torch optimizer of the MLPs (``adagrad``, ``sgd``, ``adam``).
    ``sparse``: ``fused`` (update fused into the ROBE backward: the plain module on one process,
    table_wise / row_wise groups under DMP; data_parallel groups always use the dense optimizer)
    or ``dense`` (arrays get a gradient and join the dense optimizer; under DMP this makes every
    ROBE group data_parallel).
    ``fused_kind``: ``adagrad``, ``rowwise_adagrad`` or ``sgd``. ``sparse_lr`` null = ``lr``.
    Schedule: linear warmup over ``warmup_steps``; from ``decay_start`` the factor falls
    polynomially (``decay_power``) to ``end_lr_factor`` over ``decay_steps`` (0: no decay)."""

    dense: str = "adagrad"
    lr: float = 0.05
    eps: float = 1e-8
    sparse: str = "fused"
    fused_kind: str = "adagrad"
    sparse_lr: Optional[float] = None
    warmup_steps: int = 0
    decay_start: int = 0
    decay_steps: int = 0
    decay_power: float = 2.0
    end_lr_factor: float = 0.0


@dataclass
class TrainSection:
    """``global_batch_size`` is split evenly over ranks. ``target_auc``: stop early once an
    evaluation reaches it (null: never). ``device``: ``auto`` (cuda if available), cpu, cuda.
    ``fail_at_step`` (testing restarts; 0: never): rank ``fail_rank`` (-1: the last rank) exits
    with status 1 right after update ``fail_at_step``, once per run directory (a marker file
    ``<logging.dir>/failed_at_step_<N>`` records it), so a restarted job gets past it.
    ``pipeline``: the loop (robe_torchrec.app.loop): ``sparse_dist`` is torchrec's
    TrainPipelineSparseDist (the next batch's input dist overlaps this batch's step; one process
    gets a 1-rank process group and DistributedModelParallel so there is a sharded module to
    pipeline), ``plain`` the plain forward / backward / step loop, ``auto`` sparse_dist when
    WORLD_SIZE > 1 or on CUDA, plain on one CPU process. Same results either way."""

    steps: int = 300
    global_batch_size: int = 512
    seed: int = 0
    device: str = "auto"
    target_auc: Optional[float] = None
    log_every: int = 25
    fail_at_step: int = 0
    fail_rank: int = -1
    pipeline: str = "auto"


@dataclass
class EvalSection:
    """Validation every ``every`` steps (0: only at the end) on ``batches`` batches of
    ``batch_size`` (synthetic: held-out batch indices; criteo_tsv: the first batches of
    ``data.val_paths``). Every rank evaluates the same batches."""

    every: int = 100
    batches: int = 20
    batch_size: int = 1024


@dataclass
class CheckpointSection:
    """DCP checkpoints every ``every`` steps (0: none) under ``dir`` (empty: ``<logging.dir>/checkpoints``),
    keeping the newest ``keep``. ``final``: also checkpoint after the last step."""

    every: int = 0
    dir: str = ""
    keep: int = 2
    final: bool = False


@dataclass
class LoggingSection:
    """Run directory (``metrics.csv``, TensorBoard events, default checkpoint dir)."""

    dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    robe: RobeSection = field(default_factory=RobeSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    ("data", "source"): ("synthetic", "criteo_tsv", "criteo_binary"),
    ("model", "arch"): ("dlrm", "dlrm_dcn"),
    ("robe", "kernel"): ("auto", "reference", "cpu", "triton"),
    ("optimizer", "dense"): ("adagrad", "sgd", "adam"),
    ("optimizer", "sparse"): ("fused", "dense"),
    ("optimizer", "fused_kind"): ("sgd", "adagrad", "rowwise_adagrad"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "pipeline"): ("auto", "sparse_dist", "plain"),
}


# ----- type checking ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    name = "Optional" if origin is typing.Union else getattr(origin, "__name__", str(origin))
    if origin is typing.Union:
        args = _type_name([a for a in typing.get_args(tp) if a is not type(None)][0])
    return f"{name}[{args}]"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against ``tp`` (ints are accepted for floats); raises ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r} (bool)")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _hints(cls: Any) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_section(cls: Any, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(hints)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def from_dict(raw: Any, source: str = "config") -> TrainConfig:
    """A TrainConfig from a nested mapping, checked against the schema."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = _hints(TrainConfig)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections are {sorted(sections)}")
    cfg = TrainConfig(**{k: _build_section(sections[k], v, f"{source}: {k}") for k, v in raw.items()})
    validate(cfg)
    return cfg


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            raw = yaml_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    return {} if raw is None else raw


def _parse_override_value(text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if origin is typing.Union else [tp]
    base = inner[0] if inner else tp
    if base is str and text not in ("null", "~"):
        return text
    if typing.get_origin(base) in (list, List) and not text.strip().startswith("["):
        item = typing.get_args(base)[0]
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [p if item is str else yaml_load(p) for p in parts]
    return yaml_load(text)


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (returns a new mapping)."""
    out: Dict[str, Any] = {k: dict(v or {}) for k, v in raw.items()}
    sections = _hints(TrainConfig)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        if path.count(".") != 1:
            raise ConfigError(f"override {item!r}: expected section.key=value (one dot)")
        section, key = path.split(".")
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; valid sections are {sorted(sections)}")
        hints = _hints(sections[section])
        if key not in hints:
            raise ConfigError(f"override {item!r}: unknown key {key!r} in {section}; valid keys are {sorted(hints)}")
        try:
            value = _parse_override_value(text, hints[key])
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {' '.join(str(e).split())}") from e
        out.setdefault(section, {})[key] = value
    return out


def split_cli_overrides(args: Sequence[str]) -> List[str]:
    """``["--train.steps", "100", "--robe.block_size=8"]`` -> ``["train.steps=100", "robe.block_size=8"]``."""
    out: List[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key VALUE")
        if "=" in a:
            out.append(a[2:])
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a!r} has no value")
            out.append(f"{a[2:]}={args[i + 1]}")
            i += 2
    return out


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (or defaults when ``path`` is None) + overrides -> validated TrainConfig."""
    raw = load_yaml(path) if path else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return from_dict(apply_overrides(raw, overrides), source=path or "config")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks; raises ConfigError."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: must be one of {list(choices)}, got {value!r}")
    positive: List[Tuple[str, str]] = [
        ("train", "steps"), ("train", "global_batch_size"), ("eval", "batches"), ("eval", "batch_size"),
        ("model", "embedding_dim"), ("robe", "block_size"), ("data", "num_dense"),
    ]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{section}.{key}: must be >= 1")
    m = cfg.model
    if not m.bottom_mlp or m.bottom_mlp[-1] != m.embedding_dim:
        raise ConfigError(f"model.bottom_mlp must end with embedding_dim ({m.embedding_dim}), got {m.bottom_mlp}")
    if not m.top_mlp or m.top_mlp[-1] != 1:
        raise ConfigError(f"model.top_mlp must end with 1, got {m.top_mlp}")
    if m.embedding_dim % cfg.robe.block_size:
        raise ConfigError(f"robe.block_size ({cfg.robe.block_size}) must divide model.embedding_dim ({m.embedding_dim})")
    if cfg.robe.compression <= 0 or any(r <= 0 for r in cfg.robe.groups.values()):
        raise ConfigError("robe compression ratios must be > 0")
    bad = sorted(set(cfg.robe.table_to_group.values()) - set(cfg.robe.groups))
    if bad:
        raise ConfigError(f"robe.table_to_group names unknown group(s) {bad}; groups are {sorted(cfg.robe.groups)}")
    d = cfg.data
    if d.pooling_factors and d.cardinalities and len(d.pooling_factors) != len(d.cardinalities):
        raise ConfigError("data.pooling_factors needs one entry per data.cardinalities entry")
    if d.pooling_factors and d.source != "synthetic":
        raise ConfigError(
            f"data.pooling_factors only shapes synthetic data; {d.source} files carry their own bags "
            "(multi-hot Criteo: data.source=criteo_binary with data.multi_hot=true, torchrec's "
            "materialised day_<i>_sparse_multi_hot.npz files)"
        )
    if d.source in ("criteo_tsv", "criteo_binary") and not d.cardinalities:
        raise ConfigError(f"data.cardinalities (nominal table sizes) is required for {d.source}")
    if d.source == "criteo_binary" and (not d.train_days or not d.val_days):
        raise ConfigError("data.train_days and data.val_days must not be empty for criteo_binary")
    if cfg.train.target_auc is not None and not 0.5 <= cfg.train.target_auc <= 1.0:
        raise ConfigError("train.target_auc must be in [0.5, 1]")
    stypes = ("data_parallel", "table_wise", "row_wise")
    for group, stype in list(cfg.robe.sharding.items()) + [("robe.sharding_type", cfg.robe.sharding_type or "row_wise")]:
        if stype not in stypes:
            raise ConfigError(f"robe sharding of {group!r}: must be one of {list(stypes)}, got {stype!r}")
    groups = set(cfg.robe.groups) or {"default"}
    bad = sorted(set(cfg.robe.sharding) - groups - {"default"})
    if bad:
        raise ConfigError(f"robe.sharding names unknown group(s) {bad}; groups are {sorted(groups)}")
    if cfg.train.fail_at_step < 0:
        raise ConfigError("train.fail_at_step must be >= 0")
    o = cfg.optimizer
    for key, value in (("lr", o.lr), ("sparse_lr", o.sparse_lr)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"optimizer.{key}: must be a finite number > 0, got {value!r}")
    if not (math.isfinite(o.eps) and o.eps >= 0):
        raise ConfigError(f"optimizer.eps: must be a finite number >= 0, got {o.eps!r}")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
