"""Benchmarks: each prints figures; none runs in the test suite."""


def percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def child_run(
    module: str, model: object, prepared: dict, name: str, lr: float, epochs: float
) -> dict:
    """One training run in a fresh process (``python -m module --child ...``): the figures
    it prints as its last line."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--child", str(model), json.dumps(prepared), name,
         repr(lr), str(epochs)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])
