"""A guard for tests: every way torch.export.load could unpickle raises while it is active.

``torch.load`` (any ``weights_only``: a pickle-free artifact needs no torch.load at all),
``pickle.load`` / ``loads``, building a ``pickle.Unpickler`` and torch's script-object unpickler
(``torch._C._pickle_load_obj``) are replaced by functions that raise ``AssertionError`` naming
the call. Importable by a fresh subprocess as well as by pytest.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any, Iterator, List, Tuple

import torch

_TARGETS: List[Tuple[Any, str]] = [
    (torch, "load"),
    (pickle, "load"),
    (pickle, "loads"),
    (torch._C, "_pickle_load_obj"),
]
_REAL_UNPICKLER = pickle.Unpickler


class _RefusingUnpickler(_REAL_UNPICKLER):  # type: ignore[misc,valid-type]
    """Still a class (modules imported meanwhile may subclass pickle.Unpickler); refuses to be built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle.Unpickler built: loading must not unpickle")


def _refusing(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} called (args {kwargs or ''}): loading must not unpickle")

    return refuse


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """Within the block, any unpickling entry point raises AssertionError."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in _TARGETS]
    try:
        for owner, name in _TARGETS:
            setattr(owner, name, _refusing(f"{getattr(owner, '__name__', owner)}.{name}"))
        pickle.Unpickler = _RefusingUnpickler  # type: ignore[misc]
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        pickle.Unpickler = _REAL_UNPICKLER  # type: ignore[misc]
