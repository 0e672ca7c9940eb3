"""Benchmarks: each prints figures; none runs in the test suite."""
