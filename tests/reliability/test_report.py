"""The reliability page comes from a whole run: a run that left a scenario out writes its
page to var/ and keeps the report (tests/reliability/conftest.py, run by pytest itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import ROOT

SCENARIOS = """
def test_one(scenario):
    scenario("one", full=2, ci=1, must_hold="it holds").verdict()


def test_two(scenario):
    outcome = scenario("two", full=2, ci=1, must_hold="it holds")
    outcome.check(os.environ.get("BREAK_TWO") != "1", "two broke")
    outcome.verdict()
"""


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """A folder of two scenarios under the reliability conftest, and an old page."""
    shutil.copy(ROOT / "tests" / "reliability" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_scenarios.py").write_text("import os\n" + SCENARIOS)
    (tmp_path / "page.md").write_text("the whole run's page\n")
    return tmp_path


def _pytest(suite: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TERMTUNE_", "PYTEST_"))},
        "PYTHONPATH": str(ROOT),
        "TERMTUNE_RELIABILITY_REPORT": str(suite / "page.md"),
        **env,
    }
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=suite, env=environment, capture_output=True, text=True)


def test_a_whole_run_writes_the_page_failures_included(suite):
    done = _pytest(suite, BREAK_TWO="1")
    assert done.returncode == 1, done.stdout
    page = (suite / "page.md").read_text()
    assert "| one | 1 | it holds | yes |" in page
    assert "| two | 1 | it holds | **no** (1 failures) |" in page
    assert "- failure: two broke" in page
    assert f"reliability page written: {suite / 'page.md'}" in done.stdout
    assert not (suite / "var").exists()


@pytest.mark.parametrize(
    ("args", "ran", "left_out", "why"),
    [
        (("-k", "one"), "| one | 1 | it holds | yes |", "| two |", "1 test(s) deselected"),
        (("-x", "test_scenarios.py::test_two", "test_scenarios.py::test_one"),
         "| two | 1 | it holds | **no** (1 failures) |", "| one |",
         "1 test(s) not run, e.g. test_scenarios.py::test_one"),
    ],
)  # fmt: skip
def test_a_partial_run_keeps_the_page_and_writes_its_own_to_var(suite, args, ran, left_out, why):
    done = _pytest(suite, *args, BREAK_TWO="1")
    assert (suite / "page.md").read_text() == "the whole run's page\n", done.stdout
    assert f"page.md kept: not every scenario ran ({why}); this run's page: " in done.stdout
    partial = (suite / "var" / "reliability-partial.md").read_text()
    assert ran in partial
    assert left_out not in partial
