"""A stage service's Prometheus metrics, counted by a real worker loop (kombu's in-memory
transport) and served over HTTP as Prometheus scrapes them."""

from __future__ import annotations

import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared import worker_metrics
from shared.errors import DatasetError
from shared.messages import DatasetPrepared
from tests.unit.shared.test_worker import _serve, env  # noqa: F401 - the fixture

SAMPLE = worker_metrics.REGISTRY.get_sample_value


def _count(stage: str, outcome: str) -> float:
    labels = {"stage": stage, "outcome": outcome}
    return SAMPLE("termtune_stage_duration_seconds_count", labels) or 0.0


def test_a_run_that_succeeds_is_timed_and_its_queue_wait_observed(env):  # noqa: F811
    before = _count("prepare", "succeeded")
    waits = SAMPLE("termtune_queue_wait_seconds_count", {"stage": "prepare"}) or 0.0

    def handler(command, ctx):
        ctx.progress({"examples_per_s": 12.5, "peak_memory_mb": 3.0}, force=True)
        return DatasetPrepared(job_id=command.job_id, manifest="file:///m", counts={"train": 3})

    _serve(env, handler, until="DatasetPrepared")
    assert _count("prepare", "succeeded") == before + 1
    assert SAMPLE("termtune_queue_wait_seconds_count", {"stage": "prepare"}) == waits + 1
    assert SAMPLE("termtune_peak_memory_bytes", {"stage": "prepare"}) == 3 * 2**20
    assert SAMPLE("termtune_train_examples_per_second") == 12.5


def test_retries_failures_and_dead_letters_are_counted(env):  # noqa: F811
    retried, failed = _count("prepare", "retried"), _count("prepare", "failed")
    retries = SAMPLE("termtune_stage_retries_total", {"stage": "prepare"}) or 0.0
    dead = SAMPLE("termtune_dead_letters_total", {"service": "dataprep"}) or 0.0

    def handler(command, ctx):
        raise RuntimeError("flaky")

    _serve(env, handler, until="StageFailed")  # 3 attempts, then dead-lettered
    assert _count("prepare", "retried") == retried + 2
    assert _count("prepare", "failed") == failed + 1
    assert SAMPLE("termtune_stage_retries_total", {"stage": "prepare"}) == retries + 2
    assert SAMPLE("termtune_dead_letters_total", {"service": "dataprep"}) == dead + 1


def test_a_permanent_failure_is_one_failed_run_and_no_dead_letter(env):  # noqa: F811
    failed = _count("prepare", "failed")
    dead = SAMPLE("termtune_dead_letters_total", {"service": "dataprep"}) or 0.0

    def handler(command, ctx):
        raise DatasetError("dataset.source: file not found: x.jsonl")

    _serve(env, handler, until="StageFailed")
    assert _count("prepare", "failed") == failed + 1
    assert (SAMPLE("termtune_dead_letters_total", {"service": "dataprep"}) or 0.0) == dead


def test_the_metrics_are_served_on_the_port_prometheus_scrapes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker_metrics.serve(port)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "termtune_stage_duration_seconds",
        "termtune_queue_wait_seconds",
        "termtune_stage_retries",  # counters lose _total in the parsed family name
        "termtune_dead_letters",
        "termtune_train_examples_per_second",
        "termtune_peak_memory_bytes",
    } <= names


def test_a_taken_metrics_port_costs_the_metrics_not_the_worker(caplog):
    """Seen in CI: every compose service given 9100, run as processes on one host, died."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level("ERROR", logger="shared.worker_metrics"):
            assert worker_metrics.serve(port) is False
    assert f"metrics port {port}: Address already in use; this worker serves no metrics" in (
        caplog.text
    )
    assert worker_metrics.serve(0) is False
