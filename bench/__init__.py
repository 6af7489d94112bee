"""Benchmarks of the proxy against the fake upstream, nginx and two reference apps.

`./dev bench` (or `python -m bench.run`) measures; nothing here asserts a time. The figures
land in bench/RESULTS.md and bench/results.png.
"""
