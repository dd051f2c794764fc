"""CUDA fallbacks for the few fbgemm ops torchrec's unsharded modules call, for machines whose
fbgemm is the CPU build (fbgemm-gpu-cpu) under a CUDA torch (a development tool).

The lent GPU machines have no network and cannot take the 465 MB CUDA fbgemm-gpu wheel; torchrec
then runs on fbgemm-gpu-cpu, whose ops have no CUDA kernels. torchrec's KeyedJaggedTensor computes
offsets with ``fbgemm::asynchronous_complete_cumsum``; registering a plain-torch CUDA kernel for it
lets the stock EmbeddingBagCollection (the full-table baseline) and DLRM run on the GPU. Only for
benchmarks and GPU checks; a real deployment installs the CUDA fbgemm-gpu.

Run a module with the shims installed (from the repository root)::

    python -m tools.fbgemm_shims robe_torchrec.bench.inference --device cuda --batch 65536
"""

from __future__ import annotations

import importlib
import runpy
import sys

import torch

_registered = False
_LIB: "torch.library.Library | None" = None


def _complete_cumsum(t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(t.shape[:-1] + (t.shape[-1] + 1,), dtype=t.dtype, device=t.device)
    torch.cumsum(t, dim=-1, out=out[..., 1:])
    return out


def install_cuda_shims() -> bool:
    """Register CUDA kernels for missing fbgemm ops; returns True if something was registered."""
    global _registered, _LIB
    if _registered or not torch.cuda.is_available():
        return False
    importlib.import_module("fbgemm_gpu")  # defines the fbgemm op schemas

    probe = torch.ones(2, dtype=torch.int64, device="cuda")
    try:
        torch.ops.fbgemm.asynchronous_complete_cumsum(probe)
        return False  # the CUDA build is present
    except (NotImplementedError, RuntimeError):
        pass
    _LIB = torch.library.Library("fbgemm", "IMPL")
    _LIB.impl("asynchronous_complete_cumsum", _complete_cumsum, "CUDA")
    _registered = True
    return True


def main(argv: "list[str] | None" = None) -> None:
    """``python -m tools.fbgemm_shims MODULE [ARGS...]``: install the shims, run MODULE as __main__."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    installed = install_cuda_shims()
    print(f"# fbgemm CUDA shims {'installed' if installed else 'not needed'}", file=sys.stderr, flush=True)
    module, sys.argv = argv[0], argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
