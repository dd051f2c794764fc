"""Development-only tools (not installed with the package): run them from the repository root,
e.g. ``python -m tools.triton_sweep`` (Triton tuning sweep) or ``python -m tools.fbgemm_shims``
(CUDA fallbacks for a CPU-only fbgemm build)."""
