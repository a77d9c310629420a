"""
Benchmarks: they print numbers and never pass or fail (design.md §1).
"""
