"""Benchmarks: each prints figures. The test suite runs them only at the smoke size
(``TERMTUNE_BENCH_SIZE=smoke make bench``), to know they run; no test reads a figure."""

from collections.abc import Callable


def percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` (0..1) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def child_run(
    module: str, model: object, prepared: dict, name: str, lr: float, epochs: float, *more: object
) -> dict:
    """One training run in a fresh process (``python -m module --child ...``, ``more`` after
    the epochs): the figures it prints as its last line."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--child", str(model), json.dumps(prepared), name,
         repr(lr), str(epochs), *map(str, more)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def best_rate(
    run: Callable[[float], dict],
    rates: tuple[float, ...] | list[float],
    label: str,
    grid: int | None = None,
) -> tuple[float, dict]:
    """Each learning rate once (the first ``grid`` of them: a smoke run's 1): the one with
    the lowest held-out loss, and its run."""
    tried = {lr: run(lr) for lr in rates[:grid]}
    for lr, r in tried.items():
        print(f"  {label} at lr {lr:g}: held-out loss {r['heldout_loss']:.4f}, "
              f"{r['seconds']:.1f}s", flush=True)  # fmt: skip
    best = min(tried, key=lambda lr: tried[lr]["heldout_loss"])
    return best, tried[best]


def in_turns(
    run: Callable[[str, float, int], dict], rates: dict[str, float], repeats: int
) -> dict[str, list[dict]]:
    """``repeats`` rounds of one run of each way at its learning rate, taking turns: a
    slower spell of the machine (its speed drifts by 15% over minutes) falls on every way
    alike rather than on whichever ran then. ``run`` gets the round's index (0, 1, ...),
    which a way may take as its seed."""
    runs: dict[str, list[dict]] = {way: [] for way in rates}
    for round_ in range(repeats):
        for way, lr in rates.items():
            runs[way].append({**run(way, lr, round_), "lr": lr})
        times = ", ".join(
            f"{way} {done[-1]['seconds']:.1f}s (loss {done[-1]['heldout_loss']:.4f})"
            for way, done in runs.items()
        )
        print(f"  round {round_ + 1}: {times}", flush=True)
    return runs
