"""Benchmarks: speed and memory goals, printed as ratios against a baseline of the same run."""
