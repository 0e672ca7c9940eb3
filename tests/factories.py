"""Builders of specs, contexts and commands for tests."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from shared.jobs import JobRecords
from shared.jobspec import JobSpec, parse_spec
from shared.ledger import open_ledger
from shared.settings import ApiSettings, Settings
from shared.store import LocalStore, Store, open_store
from shared.worker import StageContext

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "data" / "medical_terms.jsonl"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def spec_dict(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast job spec on the tiny model and the shipped data."""
    base = {
        "name": "test-terms",
        "base_model": str(model_dir),
        "dataset": {"source": str(SAMPLE_DATA), "max_target_length": 64},
        "training": {
            "max_steps": 6,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 0.003,
            "logging_steps": 2,
        },
        "evaluation": {
            "bootstrap_samples": 200,
            "max_rows": 8,
            # A 6-step tiny model learns nothing: every gate rule off (the gate's tests turn
            # them on).
            "gate": {
                "require_lower_loss": False,
                "min_gain": None,
                "max_empty_share": None,
                "max_degenerate_share": None,
            },
        },
        "decoding": {"max_new_tokens": 8},
    }
    return _merge(base, overrides)


def make_spec(model_dir: Path, **overrides: Any) -> JobSpec:
    """A validated small job spec."""
    return parse_spec(spec_dict(model_dir, **overrides))


def tiny_tokenizers(root: Path, families: tuple[str, ...]) -> dict[str, Any]:
    """family -> the tokenizer of a tiny decoder-only model of it, built under ``root``."""
    from services.cli.tinycausal import build_tiny_causal
    from shared.modeling import load_tokenizer

    return {
        family: load_tokenizer(
            str(build_tiny_causal(family, root / family, data_file=SAMPLE_DATA, hidden=32))
        )
        for family in families
    }


def make_ctx(var_dir: Path, database_url: str | None = None) -> StageContext:
    """A stage context on a local store under a temporary folder (and the test's database,
    or ``database_url``)."""
    settings = Settings(var_dir=var_dir, **({"database_url": database_url} if database_url else {}))
    store = LocalStore(var_dir / "store")
    return StageContext(store=store, jobs=make_jobs(settings, store), settings=settings)


def make_jobs(settings: Settings, store: Store | None = None) -> JobRecords:
    """Job records on the settings' database (SQLite under var, or the test PostgreSQL
    server's fresh database) and store."""
    return JobRecords(store or open_store(settings), open_ledger(settings))


def launcher_jobs(launcher: Any) -> JobRecords:
    """The job records a launcher's services use (its database and store)."""
    url = launcher.service_env().get("TERMTUNE_DATABASE_URL")
    settings = Settings(var_dir=launcher.var_dir, **({"database_url": url} if url else {}))
    return make_jobs(settings)


def pinned_database(var_dir: Path, database_url: str | None) -> dict[str, str]:
    """The environment that keeps a long-lived launcher on one database: a test's own
    database (PostgreSQL runs) changes from test to test, and a service started later in
    another test (a replacement trainer) must find the same one."""
    return {"TERMTUNE_DATABASE_URL": database_url or f"sqlite:///{var_dir}/termtune.db"}


def lease_owner(launcher: Any, job_id: str, stage: str) -> str | None:
    """Who holds a stage's lease in a launcher's ledger."""
    import sqlalchemy as sa

    from shared.ledger import tables as t

    jobs = launcher_jobs(launcher)
    leases = t.leases.c
    with jobs.ledger.read() as conn:
        return conn.execute(
            sa.select(leases.owner).where(leases.job_id == job_id, leases.stage == stage)
        ).scalar()


ENDED_STATUSES = ("succeeded", "failed", "rejected", "cancelled")


def wait_for_job(http: Any, job_id: str, *, timeout: float, describe: Any = str) -> dict:
    """Poll ``GET /v1/jobs/{id}`` with an httpx client until the job ends; the job.
    ``describe()`` adds context (service logs) to the failure when it does not."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ENDED_STATUSES:
            return job
        time.sleep(1)
    pytest.fail(f"job {job_id} did not end in {timeout} s\n{describe()}")


def assert_trained_at_once(http: Any, job_ids: list[str]) -> None:
    """Each of two jobs trained exactly once, by two different trainers, at the same time."""
    from datetime import datetime

    spans = []
    for job_id in job_ids:
        events = http.get(f"/v1/jobs/{job_id}/events").json()["data"]
        started = [e for e in events if e["type"] == "StageStarted" and e["stage"] == "train"]
        ended = [e for e in events if e["type"] == "ModelTrained"]
        assert len(started) == len(ended) == 1, events  # trained once each
        spans.append(
            (
                datetime.fromisoformat(started[0]["created_at"]),
                datetime.fromisoformat(ended[0]["created_at"]),
                started[0]["worker"],
            )
        )
    (start_a, end_a, worker_a), (start_b, end_b, worker_b) = spans
    assert worker_a != worker_b
    assert max(start_a, start_b) < min(end_a, end_b)  # the two trainings overlapped


def module_from_file(path: Path, name: str) -> Any:
    """A script outside the packages (deploy/...) imported as a module, to test its parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def api_settings(ctx: StageContext, key: str) -> ApiSettings:
    """Settings of a control plane over a stage context's var folder and database (a
    broker in memory, an exchange of its own)."""
    return ApiSettings(
        var_dir=ctx.settings.var_dir,
        database_url=ctx.settings.database_url,
        broker_url="memory://",
        api_key=key,
        exchange=f"t{uuid.uuid4().hex[:8]}",
    )


#: what the reliability scenarios run with, so a killed worker's stage is taken over in
#: seconds (the defaults: 60 and 15)
FAST_LEASE = {"TERMTUNE_LEASE_SECONDS": "4", "TERMTUNE_RECONCILE_SECONDS": "1"}


def lease_settings(env: dict[str, str]) -> str:
    """The lease and reconcile settings a reliability scenario ran with (its recovery times
    depend on them), beside their defaults."""
    lease = env.get("TERMTUNE_LEASE_SECONDS", "60 (the default)")
    reconcile = env.get("TERMTUNE_RECONCILE_SECONDS", "15 (the default)")
    return f"TERMTUNE_LEASE_SECONDS={lease}, TERMTUNE_RECONCILE_SECONDS={reconcile}"


def token_rows(rows: int, source: int, target: int) -> Any:
    """A pyarrow table of ``rows`` random token rows (seeded), ``source`` and ``target`` long,
    as data-prep stores a split."""
    import pyarrow as pa
    import torch

    gen = torch.Generator().manual_seed(0)

    def draw(n: int) -> list[list[int]]:
        return [torch.randint(3, 100, (n,), generator=gen).tolist() for _ in range(rows)]

    return pa.table({"input_ids": draw(source), "labels": draw(target)})


def linked_checkout(work: Path, names: tuple[str, ...], copied: tuple[str, ...] = ()) -> Path:
    """A fresh checkout's view of the repository in ``work``: ``names`` linked, ``copied``
    copied (what a command may write to), no var/; its .venv must be up to date (`make`
    would otherwise reinstall it)."""
    work.mkdir()
    for name in names:
        (work / name).symlink_to(ROOT / name)
    for name in copied:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name)
        else:
            shutil.copy2(ROOT / name, work / name)
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=work, capture_output=True)
    assert stale.returncode == 0, "the .venv is older than pyproject.toml: run `make install`"
    return work
