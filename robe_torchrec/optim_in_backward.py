"""TorchRec's optimizer-in-backward idiom for ROBE arrays.

torchrec's examples choose the embedding optimizer with
``apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.02})``
(torch's ``_apply_optimizer_in_backward``): it tags each parameter with ``_optimizer_classes`` /
``_optimizer_kwargs``, and torchrec's sharders turn the tag into a fused FBGEMM optimizer. For ROBE
arrays the tag selects the matching fused ROBE optimizer:

- ``torch.optim.SGD`` / ``torchrec.optim.SGD`` -> ``sgd``
- ``torch.optim.Adagrad`` / ``torchrec.optim.Adagrad`` -> ``adagrad`` (exact, per element)
- ``torchrec.optim.RowWiseAdagrad`` -> ``rowwise_adagrad`` (one accumulator per Z-chunk)

with ``lr`` and ``eps`` from the kwargs (a missing one takes ``RobeFusedOptimizerConfig``'s default,
as a missing FBGEMM option takes FBGEMM's). Options the fused update cannot honour (momentum,
weight decay, lr decay, an initial accumulator, maximize, nesterov) raise, as does any other class.
torchrec's ``RowWiseAdagrad`` cannot be *constructed* on a 1-D tensor (it averages over dim 1), and
torch's ``_apply_optimizer_in_backward`` constructs one per parameter, so on ROBE's 1-D arrays that
call raises inside torchrec before any tag is set. :func:`apply_optimizer_in_backward` here is a
drop-in for torchrec's (same arguments): it tags ROBE arrays (:func:`tag_optimizer_in_backward`,
which sets the very same attributes without constructing the optimizer) and hands every other
parameter to torch's ``_apply_optimizer_in_backward``, so
``apply_optimizer_in_backward(RowWiseAdagrad, model.sparse_arch.parameters(), {"lr": 0.02})`` works
on a model that mixes ROBE arrays with stock tables or dense layers.

The plain module adopts the tag at its next forward (or ``fused_optimizer`` access); the sharder
reads it at planning / sharding time, where it takes precedence over the sharder's ``fused_params``
(torchrec's rule: per-parameter optimizer kwargs win over the sharder's).

No distributed code here: the plain module imports this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional

import torch
import torchrec.optim as trec_optim

from robe_torchrec.optim import RobeFusedOptimizer, RobeFusedOptimizerConfig

if TYPE_CHECKING:
    from robe_torchrec.modules.robe_embedding_bag_collection import RobeEmbeddingBagCollection

_CLASS_TO_FUSED: Dict[type, str] = {
    torch.optim.SGD: "sgd",
    trec_optim.SGD: "sgd",
    torch.optim.Adagrad: "adagrad",
    trec_optim.Adagrad: "adagrad",
    trec_optim.RowWiseAdagrad: "rowwise_adagrad",
}
SUPPORTED = (
    "torch.optim.SGD, torchrec.optim.SGD (fused sgd), torch.optim.Adagrad, torchrec.optim.Adagrad "
    "(fused adagrad), torchrec.optim.RowWiseAdagrad (fused rowwise_adagrad)"
)
# kwargs that must keep their neutral value (the fused update has no such term).
_NEUTRAL: Dict[str, Any] = {
    "momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
    "lr_decay": 0, "initial_accumulator_value": 0,
}
_IGNORED = ("foreach", "differentiable", "fused", "capturable")


def config_from_optimizer(optimizer_class: type, kwargs: Mapping[str, Any]) -> RobeFusedOptimizerConfig:
    """The fused ROBE optimizer matching a torch / torchrec optimizer class and its kwargs."""
    fused = _CLASS_TO_FUSED.get(optimizer_class)
    if fused is None:
        name = f"{getattr(optimizer_class, '__module__', '')}.{getattr(optimizer_class, '__qualname__', optimizer_class)}"
        raise ValueError(f"optimizer in backward {name} is not supported for ROBE arrays; supported: {SUPPORTED}")
    out: Dict[str, Any] = {"optimizer": fused}
    for key, value in kwargs.items():
        if key == "lr":
            out["lr"] = float(value)
        elif key == "eps":
            if fused != "sgd":
                out["eps"] = float(value)
        elif key in _NEUTRAL:
            if value != _NEUTRAL[key]:
                raise ValueError(
                    f"optimizer in backward {optimizer_class.__name__}: {key}={value!r} is not supported by the fused "
                    f"ROBE {fused} update (only lr and eps are; {key} must be {_NEUTRAL[key]!r})"
                )
        elif key not in _IGNORED:
            raise ValueError(f"optimizer in backward {optimizer_class.__name__}: unknown option {key!r} for ROBE arrays")
    return RobeFusedOptimizerConfig(**out)


def tag_optimizer_in_backward(
    optimizer_class: type, params: Iterable[torch.nn.Parameter], optimizer_kwargs: Mapping[str, Any]
) -> None:
    """Tag ``params`` as torch's ``_apply_optimizer_in_backward`` does (``_optimizer_classes``,
    ``_optimizer_kwargs``, ``_in_backward_optimizers``), without building the optimizer or a hook:
    the fused ROBE optimizer does the update. Checks the class and kwargs first."""
    config_from_optimizer(optimizer_class, optimizer_kwargs)
    for p in params:
        if not hasattr(p, "_in_backward_optimizers"):
            p._in_backward_optimizers = []  # type: ignore[attr-defined]
        if not hasattr(p, "_optimizer_classes"):
            p._optimizer_classes = []  # type: ignore[attr-defined]
            p._optimizer_kwargs = []  # type: ignore[attr-defined]
        p._optimizer_classes.append(optimizer_class)  # type: ignore[attr-defined]
        p._optimizer_kwargs.append(dict(optimizer_kwargs))  # type: ignore[attr-defined]


ROBE_ARRAY_ATTR = "_robe_array"


def mark_robe_array(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Mark ``param`` as a ROBE array (what :func:`apply_optimizer_in_backward` tags itself)."""
    setattr(param, ROBE_ARRAY_ATTR, True)
    return param


def is_robe_array(param: torch.Tensor) -> bool:
    return bool(getattr(param, ROBE_ARRAY_ATTR, False))


def apply_optimizer_in_backward(
    optimizer_class: type,
    params: Iterable[torch.nn.Parameter],
    optimizer_kwargs: Mapping[str, Any],
    register_hook: bool = True,
) -> None:
    """Drop-in for ``torchrec.optim.apply_optimizer_in_backward`` that accepts ROBE arrays.

    ROBE arrays (marked by the module that owns them) get the tag the sharder and the plain module
    read (their fused ROBE optimizer does the update; an unsupported class or option raises before
    anything is tagged); every other parameter goes to torch's ``_apply_optimizer_in_backward``
    unchanged (an optimizer built per parameter and stepped in backward, as torchrec does).
    """
    from torch.distributed.optim import _apply_optimizer_in_backward

    params = list(params)
    arrays = [p for p in params if is_robe_array(p)]
    others = [p for p in params if not is_robe_array(p)]
    if arrays:
        tag_optimizer_in_backward(optimizer_class, arrays, optimizer_kwargs)
    if others:
        _apply_optimizer_in_backward(optimizer_class, others, dict(optimizer_kwargs), register_hook=register_hook)


def param_config(param: torch.Tensor) -> Optional[RobeFusedOptimizerConfig]:
    """The fused config a parameter was tagged with by ``_apply_optimizer_in_backward``, or None."""
    classes = getattr(param, "_optimizer_classes", None)
    if not classes:
        return None
    kwargs = getattr(param, "_optimizer_kwargs", [{}] * len(classes))
    if len(classes) != 1 or len(kwargs) != 1:
        raise ValueError(f"a ROBE array takes one optimizer in backward, got {len(classes)}: {list(classes)}")
    return config_from_optimizer(classes[0], kwargs[0])


def arrays_config(arrays: Mapping[str, torch.Tensor]) -> Optional[RobeFusedOptimizerConfig]:
    """The one in-backward config of a collection's arrays ``{group: array}``, or None if untagged.

    A collection has one fused optimizer, so tagged arrays must agree and all be tagged.
    """
    configs: Dict[str, Optional[RobeFusedOptimizerConfig]] = {g: param_config(p) for g, p in arrays.items()}
    distinct = set(configs.values())
    if distinct == {None}:
        return None
    if len(distinct) != 1:
        raise ValueError(
            "all ROBE arrays of one collection need the same optimizer in backward (one fused optimizer per "
            f"collection); got {configs}"
        )
    (config,) = distinct
    return config


def adopt_in_backward_optimizer(module: "RobeEmbeddingBagCollection") -> None:
    """Give the plain module the fused optimizer its arrays were tagged with (no-op if untagged or done)."""
    config = arrays_config(dict(module.arrays.items()))
    if config is None:
        return
    current: Optional[RobeFusedOptimizer] = module._fused_optimizer
    if current is not None and current.config == config:
        return
    module._fused_optimizer = RobeFusedOptimizer(
        module._named_arrays(),
        {f"arrays.{g}": c.block_size for g, c in module.robe_configs().items()},
        config,
    )

