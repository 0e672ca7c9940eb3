"""The container tests keep each test's outcome, so a fixture can print the logs of every
container when a test failed."""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report
