"""Benchmarks: swiftdist against the tools users would pick instead, measured side by side.

`python -m benchmarks.run --suite cpu|gpu` (see benchmarks/README.md).
"""
