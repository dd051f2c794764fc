"""robe-torchrec: ROBE (Random Offset Block Embedding) arrays as a TorchRec plugin.

One flat learned array stands in for all embedding tables; see docs/design.md.

The public names load on first use (PEP 562), so ``import robe_torchrec.serve`` in a serving
process pulls in the artifact loader and the ``robe::`` ops only, not the module classes,
optimizers or training code. ``from robe_torchrec import RobeEmbeddingBagCollection`` (or any name
below) imports its module then, as an eager import would.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "HASH_VERSION": "robe_torchrec.hashing",
    "RobeConfig": "robe_torchrec.config",
    "RobeEmbeddingBagCollection": "robe_torchrec.modules.robe_embedding_bag_collection",
    "apply_optimizer_in_backward": "robe_torchrec.optim_in_backward",
    "RobeHybridEmbeddingBagCollection": "robe_torchrec.conversion",
    "robe_ify": "robe_torchrec.conversion",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'robe_torchrec' has no attribute {name!r}")


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(_PUBLIC))
