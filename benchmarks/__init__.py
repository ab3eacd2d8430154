"""Benchmark harness of lrpfunc (see benchmarks/README.md); run ``python benchmarks/run.py``."""
