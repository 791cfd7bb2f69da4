"""labkit's benchmarks: each prints ratios against a baseline measured in the same run.

Run one with ``python -m bench.<name>``; the latest figures are in README.md.
"""
