"""Benchmarks: scripts that print side-by-side figures (and write JSON under bench/results/). Run one from
the repository root as a module, e.g. ``python -m bench.soak --clients``."""
