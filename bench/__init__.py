"""
Benchmarks: they print numbers and never pass or fail (docs/architecture.rst, "Parts").
"""
