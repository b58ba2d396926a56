"""Benchmarks: each module runs as `python -m bench.NAME` from the repository root (see
bench/README.md for what each measures and the committed results)."""
