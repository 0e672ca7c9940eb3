"""What a stage service tells Prometheus: how long stages take and how they end, how long
commands wait in the queue, retries, dead letters, and the training's throughput and GPU
memory. Served on ``TERMTUNE_METRICS_PORT`` (one port a service; 0, the default, serves
none); the API keeps its own ``/metrics``.

Every label takes a known, short set of values (stage names, outcomes), so the series stay
bounded whatever the messages say.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()
#: from a second to half a day: a data-prep of a small file to a long training
STAGE_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400)
OUTCOMES = ("succeeded", "failed", "cancelled", "retried", "interrupted", "redone")

STAGE_SECONDS = Histogram(
    "termtune_stage_duration_seconds",
    "Time one run of a stage took, by how it ended (the _count is the runs by outcome).",
    ["stage", "outcome"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "termtune_queue_wait_seconds",
    "Time from a command's sending to a worker starting it (first attempts only).",
    ["stage"],
    buckets=WAIT_BUCKETS,
    registry=REGISTRY,
)
RETRIES = Counter(
    "termtune_stage_retries_total",
    "Commands started again after a failed or interrupted attempt.",
    ["stage"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "termtune_dead_letters_total",
    "Messages this service sent to the dead-letter queue (unreadable, or out of attempts).",
    ["service"],
    registry=REGISTRY,
)
EXAMPLES_PER_SECOND = Gauge(
    "termtune_train_examples_per_second",
    "Training throughput of the job this trainer runs (0 when idle).",
    registry=REGISTRY,
)
PEAK_MEMORY = Gauge(
    "termtune_peak_memory_bytes",
    "Peak memory of the running stage: the GPU's allocated peak on CUDA, else the process's.",
    ["stage"],
    registry=REGISTRY,
)


def serve(port: int) -> bool:
    """Serve the metrics on ``port`` (0: not at all). A port already taken (two workers on
    one host given the same one) costs the metrics, not the worker: logged as an error."""
    if not port:
        return False
    try:
        start_http_server(port, registry=REGISTRY)
    except OSError as exc:
        log.error(
            "metrics port %d: %s; this worker serves no metrics (give each worker on one "
            "host its own TERMTUNE_METRICS_PORT)",
            port,
            exc.strerror or exc,
        )
        return False
    log.info("metrics on :%d/metrics", port)
    return True


def outcome_of(event: Any) -> str:
    """The outcome label of what a stage run returned (None: it will be retried)."""
    if event is None:
        return "retried"
    kind = getattr(event, "type", "")
    if kind == "StageFailed":
        return "failed"
    if kind == "JobCancelled":
        return "cancelled"
    if kind == "JobRetried":
        return "redone"  # an earlier stage's output was corrupt: that stage runs again
    return "succeeded"


def observe_progress(stage: str, progress: dict[str, Any]) -> None:
    """The figures a stage reports that are gauges: throughput and peak memory."""
    if isinstance(progress.get("examples_per_s"), int | float):
        EXAMPLES_PER_SECOND.set(progress["examples_per_s"])
    if isinstance(progress.get("peak_memory_mb"), int | float):
        PEAK_MEMORY.labels(stage).set(progress["peak_memory_mb"] * 2**20)
