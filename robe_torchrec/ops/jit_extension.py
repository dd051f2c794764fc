"""Build-once, cache-across-processes loader for a C++ extension compiled with ``cpp_extension.load``.

Why a shared helper: every CPU extension of the package needs the same rules (compile on first
use, once per process, in torch's extension cache ``$TORCH_EXTENSIONS_DIR``; say so on stderr when
a compile is coming; remember a failure so that callers fall back to their pure-torch path at once
instead of rebuilding). ``ops/cpu.py`` predates it and has its own copy of the same pattern, which
a later cleanup can replace by a :class:`JitExtension`.
"""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType
from typing import List, Optional, Sequence

# No -march=native (a cached build may be reused on another machine of the same cluster);
# -ffp-contract=off keeps a*b+c as two roundings, as PyTorch's own CPU kernels compute it.
DEFAULT_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
DEFAULT_LDFLAGS = ("-fopenmp",)


class JitExtension:
    """One C++ extension: ``load()`` builds it on first call (thread-safe) or raises RuntimeError.

    Args:
        name: the extension's module name; bump a version suffix when its API changes.
        sources: absolute paths of its C++ files.
        what: a few words naming it in messages ("the frequency-aware CPU ops").
        fallback: what callers do without it, for the failure message.
    """

    def __init__(self, name: str, sources: Sequence[str], what: str, fallback: str,
                 cflags: Sequence[str] = DEFAULT_CFLAGS, ldflags: Sequence[str] = DEFAULT_LDFLAGS) -> None:
        self.name = name
        self.sources: List[str] = list(sources)
        self.what = what
        self.fallback = fallback
        self.cflags = list(cflags)
        self.ldflags = list(ldflags)
        self._lock = threading.Lock()
        self._module: Optional[ModuleType] = None
        self._error: Optional[str] = None

    def _build_is_cached(self) -> bool:
        """Whether torch's extension cache holds a build newer than every source (no compile)."""
        try:
            from torch.utils.cpp_extension import _get_build_directory  # private but long-stable

            built = os.path.join(_get_build_directory(self.name, verbose=False), self.name + ".so")
            return all(os.path.getmtime(built) >= os.path.getmtime(s) for s in self.sources)
        except Exception:  # noqa: BLE001 - any doubt means "say that we compile"
            return False

    def load(self) -> ModuleType:
        """The compiled module (built once per process, cached across processes).

        Raises:
            RuntimeError: if it cannot be built or loaded; remembered, later calls raise at once.
        """
        if self._module is not None:
            return self._module
        with self._lock:
            if self._module is not None:
                return self._module
            if self._error is not None:
                raise RuntimeError(self._error)
            try:
                from torch.utils.cpp_extension import load

                if not self._build_is_cached():
                    print(f"[robe-torchrec] compiling {self.what} once (about a minute)...", file=sys.stderr, flush=True)
                self._module = load(name=self.name, sources=self.sources, extra_cflags=self.cflags,
                                    extra_ldflags=self.ldflags, verbose=False)
            except Exception as exc:  # noqa: BLE001 - compiler / ninja missing, build or load error
                self._error = (
                    f"robe-torchrec: {self.what} could not be built; it needs a C++ compiler with OpenMP "
                    f"(e.g. g++) and ninja ({self.fallback}). Cause: {type(exc).__name__}: {exc}"
                )
                raise RuntimeError(self._error) from exc
            return self._module

    def is_available(self) -> bool:
        """True if the extension is built (building it now if needed) and loads; never raises."""
        try:
            self.load()
            return True
        except RuntimeError:
            return False
