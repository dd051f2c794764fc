"""ROBE lookup ops: the kernel API (api), reference (PyTorch), cpu (C++), triton; the lookup op (lookup)."""
