"""ROBE lookup ops: reference (PyTorch), cpu (C++), triton."""
