"""Reliability scenarios: faults injected for real, outcomes counted.

The test suite runs every scenario at a reduced size. ``make reliability`` runs them at full
size (``TERMTUNE_RELIABILITY_SIZE=full``) and writes ``docs/reliability.md``
(``TERMTUNE_RELIABILITY_REPORT``) from the counts and times measured, with the machine and
the date. Each scenario records what it saw in an :class:`Outcome`; a failed "must hold"
is a failed test and a "no" in the report, and so is a scenario that stopped on an error
(a job that never ended, say) before its verdict. A run that leaves any test out (``-k``,
a stop at the first failure, Ctrl-C) writes ``var/reliability-partial.md`` instead: the
page always comes from a whole run.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

FULL = os.environ.get("TERMTUNE_RELIABILITY_SIZE", "ci") == "full"
REPORT = os.environ.get("TERMTUNE_RELIABILITY_REPORT")


@dataclass
class Outcome:
    """What one scenario did and saw."""

    name: str
    must_hold: str
    size: int
    settings: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, key: str, n: int = 1) -> None:
        """Add to a counter (created at 0)."""
        self.counts[key] = self.counts.get(key, 0) + n

    def time(self, key: str, seconds: float) -> None:
        """Record one duration of a kind."""
        self.times.setdefault(key, []).append(seconds)

    def check(self, ok: bool, failure: str) -> bool:
        """Record ``failure`` unless ``ok``; ``ok``."""
        if not ok:
            self.failures.append(failure)
        return ok

    def verdict(self) -> None:
        """Fail the test if any must-hold was broken (after everything was counted)."""
        assert not self.failures, f"{self.name}: " + "; ".join(self.failures[:10])


_OUTCOMES: list[Outcome] = []
_STOPPED = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keep on the test what stopped its scenario (the error of a failed call)."""
    report = yield
    if call.when == "call" and call.excinfo is not None:
        item.stash[_STOPPED] = f"{call.excinfo.typename}: {call.excinfo.value}".splitlines()[0]
    return report


@pytest.fixture
def scenario(request: pytest.FixtureRequest):
    """Start a scenario: ``scenario(name, full=, ci=, must_hold=, settings=)`` → its
    Outcome (``settings``: those its times depend on, stated on the page)."""
    started = time.monotonic()
    made: list[Outcome] = []

    def start(name: str, *, full: int, ci: int, must_hold: str, settings: str = "") -> Outcome:
        outcome = Outcome(
            name=name, must_hold=must_hold, size=full if FULL else ci, settings=settings
        )
        made.append(outcome)
        return outcome

    yield start
    stopped = request.node.stash.get(_STOPPED, None)
    for outcome in made:
        outcome.seconds = time.monotonic() - started
        if stopped and not outcome.failures:  # an error before the verdict: not held
            outcome.failures.append(f"stopped before its verdict: {stopped[:300]}")
        _OUTCOMES.append(outcome)


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"p50 {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, max {ordered[-1]:.2f} s "
        f"(n={len(ordered)})"
    )


def render(outcomes: list[Outcome], machine: list[str], mode: str) -> str:
    """The reliability page."""
    page = [
        "# Reliability",
        "",
        "Written by `make reliability` (`tests/reliability/`, "
        f"`TERMTUNE_RELIABILITY_SIZE={mode}`) from what the scenarios counted and timed; "
        "the test suite runs the same scenarios at reduced size.",
        "",
        *machine,
        "",
        "| scenario | size | must hold | held | wall |",
        "|---|---:|---|---|---:|",
    ]
    for o in outcomes:
        held = "yes" if not o.failures else f"**no** ({len(o.failures)} failures)"
        page.append(f"| {o.name} | {o.size} | {o.must_hold} | {held} | {o.seconds:.0f} s |")
    for o in outcomes:
        page += ["", f"## {o.name}", "", f"Must hold: {o.must_hold}. Size {o.size}.", ""]
        page += [f"Settings: {o.settings}.", ""] if o.settings else []
        page += [f"- {key}: {value}" for key, value in sorted(o.counts.items())]
        page += [f"- {key}: {_percentiles(v)}" for key, v in sorted(o.times.items()) if v]
        page += [f"- failure: {failure}" for failure in o.failures[:20]]
    return "\n".join(page) + "\n"


#: where a run that did not run every scenario writes its page instead of the report
PARTIAL = Path("var/reliability-partial.md")
_SELECTED: list[str] = []
_FINISHED: set[str] = set()


def pytest_collection_finish(session: pytest.Session) -> None:
    _SELECTED[:] = [item.nodeid for item in session.items]


def pytest_runtest_logfinish(nodeid: str) -> None:
    _FINISHED.add(nodeid)


def unfinished(deselected: int) -> list[str]:
    """Why this run's page is not the whole report: tests left out (deselected, or not run
    after a stop or an interrupt); empty when every selected test ran to its end."""
    why = [f"{deselected} test(s) deselected"] if deselected else []
    left = [nodeid for nodeid in _SELECTED if nodeid not in _FINISHED]
    return why + ([f"{len(left)} test(s) not run, e.g. {left[0]}"] if left else [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Write the page after the session, when asked to: to the report when every scenario
    ran, else to var/ (a partial run never replaces the whole run's page)."""
    if not (REPORT and _OUTCOMES):
        return
    from bench.report import machine

    order = {name: n for n, name in enumerate(SCENARIO_ORDER)}
    outcomes = sorted(_OUTCOMES, key=lambda o: order.get(o.name, len(order)))
    left = unfinished(len(terminalreporter.stats.get("deselected", [])))
    target = PARTIAL if left else Path(REPORT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(outcomes, machine(), "full" if FULL else "ci"))
    if left:
        kept = f"{REPORT} kept: not every scenario ran ({'; '.join(left)})"
        terminalreporter.write_line(f"{kept}; this run's page: {target}")
    else:
        terminalreporter.write_line(f"reliability page written: {target}")


SCENARIO_ORDER = [
    "kill -9 a trainer at a random step",
    "kill -9 a trainer at a random step, default lease",
    "a corrupt checkpoint, then kill -9 the trainer",
    "a corrupt dataset shard, manifest or adapter in the store",
    "SIGTERM a trainer",
    "restart the broker with messages in flight",
    "crash the publisher between the import call and recording it",
    "poison message",
    "every message delivered twice",
    "a training job longer than the delivery timeout",
    "a full disk mid-job",
    "bad datasets and bad job specs",
    "unauthenticated and wrong-key requests",
    "fuzzed S3 URIs and local paths (production)",
    "fuzzed S3 URIs and local paths (development)",
    "fuzzed S3 URIs and local paths (development, any local path)",
    "secrets",
    "load: concurrent submissions and live event streams",
    "backlog: queued jobs, 3 trainers",
]
