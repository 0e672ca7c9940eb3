"""The job ledger at scale: jobs × events generated into SQLite and PostgreSQL, then each
read through the HTTP API (in-process, FastAPI's test client) and each write on the ledger,
timed at a small and a large number of jobs.

Reads: the first page of jobs, a status filter (failed: 1 job in 20), a deep page (keyset
``after`` the job at position 10,000, or the last page when there are fewer), one job's
detail, one job's events after number 40, /metrics. Writes: an event appended to a job
(its view folded in the same transaction), a lease renewed. p50 and p95 over ``--repeat``
calls each, on random jobs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shared.jobs import JobRecords
from shared.jobspec import JobSpec
from shared.leases import Lease
from shared.ledger import Ledger
from shared.ledger import tables as t
from shared.ledger.view import fold, new_view
from shared.messages import (
    DatasetPrepared,
    JobSubmitted,
    ModelEvaluated,
    ModelPublished,
    ModelTrained,
    StageProgress,
    StageStarted,
    dump_message,
)
from shared.store import LocalStore

SPEC = JobSpec(name="bench")
#: the fewest events a finished job has: submitted, then each of 4 stages started and done
FEWEST_EVENTS = 1 + 2 * 4
CHUNK = 2_000  # jobs inserted per statement batch


def _history(job_id: str, events: int) -> list[dict[str, Any]]:
    """A finished job's events (``events`` of them): submit, 4 stages, progress between."""
    stages = [
        ("prepare", DatasetPrepared(job_id=job_id, manifest="file:///m", counts={"train": 200})),
        ("train", ModelTrained(job_id=job_id, manifest="file:///m", steps=120, train_loss=1.2)),
        ("evaluate", ModelEvaluated(job_id=job_id, manifest="m", passed=True, publish=True)),
        ("publish", ModelPublished(
            job_id=job_id, manifest="m", location="x", model_name="bench", target="local"
        )),
    ]  # fmt: skip
    out = [JobSubmitted(job_id=job_id, spec_uri="file:///s", name="bench")]
    progress = events - FEWEST_EVENTS
    for n, (stage, outcome) in enumerate(stages):
        out.append(StageStarted(job_id=job_id, stage=stage, worker="w"))
        steps = progress if stage == "train" else 0
        out += [
            StageProgress(job_id=job_id, stage=stage, progress={"step": s, "loss": 1.0 / (s + 1)})
            for s in range(steps)
        ]
        out.append(outcome)
        del n
    return [dump_message(e) for e in out]


def fill(ledger: Ledger, start: int, stop: int, events: int) -> None:
    """Jobs number ``start``..``stop``-1, each with ``events`` events; 1 in 20 failed."""
    template = _history("JOBID", events)
    view = new_view("JOBID", "bench", "bench", template[0]["created_at"])
    for data in template:
        view = fold(view, data)
    failed = fold(view, {**template[-1], "type": "StageFailed", "stage": "publish",
                         "error": "boom", "error_type": "E"})  # fmt: skip
    view_text, failed_text = json.dumps(view), json.dumps(failed)
    bodies = [json.dumps(d) for d in template]
    spec = SPEC.model_dump(mode="json")
    # the same tables with untyped columns: JSON already serialized goes in as text
    jobs_rows = sa.table("jobs", *(sa.column(c.name) for c in t.jobs.columns))
    events_rows = sa.table("events", *(sa.column(c.name) for c in t.events.columns))
    now = time.time()
    for first in range(start, stop, CHUNK):
        numbers = range(first, min(first + CHUNK, stop))
        jobs, evs = [], []
        for n in numbers:
            job_id = f"bench-{n:08d}"
            bad = n % 20 == 7
            jobs.append({
                "number": n + 1, "id": job_id, "name": "bench",
                "status": "failed" if bad else "succeeded", "stage": "publish",
                "created_at": now + n, "updated_at": now + n, "spec": json.dumps(spec),
                "spec_uri": "file:///s",
                "view": (failed_text if bad else view_text).replace("JOBID", job_id),
                "last_seq": len(bodies), "retry_seq": 0, "cancel_requested": False,
            })  # fmt: skip
            evs += [
                {"job_id": job_id, "seq": k + 1, "type": template[k]["type"],
                 "stage": template[k].get("stage"), "created_at": now + n,
                 "body": body.replace("JOBID", job_id)}
                for k, body in enumerate(bodies)
            ]  # fmt: skip
        with ledger.write() as conn:
            conn.execute(jobs_rows.insert(), jobs)
            conn.execute(events_rows.insert(), evs)
    with ledger.write() as conn:  # a bulk load: the counts the ledger keeps, counted once
        conn.execute(t.status_counts.delete())
        by_status = sa.select(t.jobs.c.status, sa.func.count()).group_by(t.jobs.c.status)
        conn.execute(t.status_counts.insert().from_select(["status", "jobs"], by_status))
    if ledger.engine.dialect.name == "postgresql":
        with ledger.engine.connect() as conn:
            conn.execute(sa.text("SELECT setval('jobs_number_seq', :n)"), {"n": stop})
            conn.commit()
        with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("ANALYZE"))
    else:
        with ledger.engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")


def _percentiles(times: list[float]) -> tuple[float, float]:
    ordered = sorted(times)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def measure(ledger: Ledger, store_dir: Path, n_jobs: int, repeat: int) -> dict[str, tuple]:
    """p50/p95 (ms) of each operation with ``n_jobs`` jobs in the ledger."""
    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from shared.settings import ApiSettings

    settings = ApiSettings(
        var_dir=store_dir, database_url=str(ledger.url.render_as_string(False)), api_key="k"
    )
    app = create_app(settings)
    client = TestClient(app, headers={"Authorization": "Bearer k"})
    jobs = JobRecords(LocalStore(store_dir / "store"), ledger)
    rng = random.Random(n_jobs)
    deep = f"bench-{max(n_jobs - 10_000, 20):08d}"  # the 10,000th newest (or the last page)

    def job() -> str:
        return f"bench-{rng.randrange(n_jobs):08d}"

    lease = Lease(ledger, "bench-00000000", "train", owner="bench", ttl=60)
    lease.acquire()
    ops: dict[str, Any] = {
        "list, first page": lambda: client.get("/v1/jobs?limit=20"),
        "list, status=failed": lambda: client.get("/v1/jobs?status=failed&limit=20"),
        "list, deep page": lambda: client.get(f"/v1/jobs?limit=20&after={deep}"),
        "job detail": lambda: client.get(f"/v1/jobs/{job()}"),
        "events after 40": lambda: client.get(f"/v1/jobs/{job()}/events?after=40"),
        "/metrics": lambda: client.get("/metrics"),
        "event append": lambda: jobs.record(
            StageProgress(job_id=job(), stage="train", progress={"step": 1, "loss": 0.5})
        ),
        "lease renew": lambda: lease.renew(),
    }  # fmt: skip
    out = {}
    for name, op in ops.items():
        for _ in range(5):  # warm-up
            op()
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            result = op()
            times.append((time.perf_counter() - started) * 1000)
            if hasattr(result, "status_code"):
                assert result.status_code == 200, (name, result.status_code, result.text[:200])
        out[name] = _percentiles(times)
    client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,100000", help="job counts, comma-separated")
    parser.add_argument("--events", type=int, default=50, help="events per job")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    if args.events < FEWEST_EVENTS:
        parser.error(f"--events {args.events}: a finished job has at least {FEWEST_EVENTS}")
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[tuple[str, int], dict[str, tuple]] = {}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
            server, url = _database(backend, Path(tmp))
            try:
                ledger = Ledger(url)
                with ledger.read():
                    pass  # migrated
                filled = 0
                for size in sizes:
                    started = time.monotonic()
                    fill(ledger, filled, size, args.events)
                    took = time.monotonic() - started
                    print(f"{backend}: {size:,} jobs x {args.events} events "
                          f"(+{size - filled:,} jobs in {took:.0f} s)", flush=True)  # fmt: skip
                    filled = size
                    results[backend, size] = measure(ledger, Path(tmp), size, args.repeat)
                ledger.dispose()
            finally:
                if server is not None:
                    server.stop("immediate")
    _table(results, sizes, args.backends.split(","))


def _database(backend: str, tmp: Path) -> tuple[Any, str]:
    if backend == "sqlite":
        return None, f"sqlite:///{tmp / 'ledger.db'}"
    from tests.postgres import PostgresServer

    tmp.chmod(0o755)
    server = PostgresServer(tmp / "postgres")
    # A managed server's memory for its cache (RDS: a quarter of the instance's memory), not
    # the 128 MB PostgreSQL ships with: 100,000 jobs x 50 events is about 2 GB.
    server.start("shared_buffers=2GB")
    return server, server.fresh_database()


def _table(results: dict, sizes: list[int], backends: list[str]) -> None:
    head = " | ".join(f"{b} {s:,} jobs p50 / p95 ms" for b in backends for s in sizes)
    print(f"| operation | {head} |")
    print("|---|" + "---:|" * (len(backends) * len(sizes)))
    for name in next(iter(results.values())):
        cells = " | ".join(
            "{:.1f} / {:.1f}".format(*results[b, s][name]) for b in backends for s in sizes
        )
        print(f"| {name} | {cells} |")
    worst = max(p95 for r in results.values() for n, (_, p95) in r.items() if "append" not in n
                and "renew" not in n)  # fmt: skip
    writes = max(p95 for r in results.values() for n, (_, p95) in r.items() if "append" in n)
    print(f"slowest read p95 {worst:.1f} ms (goal < 50); event append p95 {writes:.1f} ms "
          "(goal < 5)")  # fmt: skip


if __name__ == "__main__":
    main()
