"""Benchmarks of sdxl_kernels, one file per op: `python -m pytest benchmarks/ --benchmark`."""
