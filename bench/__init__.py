"""Benchmarks: each prints figures; none runs in the test suite."""


def percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
