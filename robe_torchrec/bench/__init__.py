"""Benchmarks (commands that print both sides measured in one run; not tests)."""
