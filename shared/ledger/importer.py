"""``termtune db import-store``: the job records of the old object-store layout, into the
ledger, so a deployment that ran it keeps its history.

    jobs/<id>/spec.json                the spec
    jobs/<id>/events/<ns>-<id>.json    one object per event, in time order
    jobs/<id>/cancel                   a cancel request
    models/<name>.json                 a published model

Each job is imported in one transaction (all of it or none); a job already in the ledger is
left as it is, so the import can be run again. A job whose objects cannot be read is
reported by key and skipped; the others are imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from shared.errors import NotFound, SpecError, TermtuneError
from shared.jobs import JobRecords
from shared.jobspec import parse_spec
from shared.messages import Event, parse_message


@dataclass
class ImportReport:
    """What an import did."""

    imported: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    models: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def import_store(jobs: JobRecords) -> ImportReport:
    """Import every job and model of the store's old layout into the ledger."""
    report = ImportReport()
    keys = jobs.store.list("jobs")
    found = {k.split("/")[1] for k in keys if k.endswith("/spec.json")}
    # oldest first (ids end in -<UTC time>-<random>), so the ledger lists them newest first
    for job_id in sorted(found, key=lambda i: (i.rsplit("-", 2)[-2:], i)):
        if jobs.exists(job_id):
            report.already.append(job_id)
            continue
        try:
            _import_job(jobs, job_id, [k for k in keys if k.startswith(f"jobs/{job_id}/")])
        except (TermtuneError, ValueError, ValidationError) as exc:
            report.failed[job_id] = str(exc).splitlines()[0][:300]
            continue
        report.imported.append(job_id)
    for key in jobs.store.list("models"):
        if not key.endswith(".json"):
            continue
        entry = _json(jobs, key)
        name = key.removeprefix("models/").removesuffix(".json")
        try:
            jobs.model(name)
        except NotFound:
            jobs.register_model(name, entry, overwrite=True)
            report.models += 1
    return report


def _import_job(jobs: JobRecords, job_id: str, keys: list[str]) -> None:
    spec_key = jobs.spec_key(job_id)
    try:
        spec = parse_spec(_json(jobs, spec_key), source=jobs.store.uri(spec_key))
    except SpecError as exc:
        raise SpecError(f"{jobs.store.uri(spec_key)}: {exc}") from exc
    events: list[Event] = []
    for key in sorted(k for k in keys if "/events/" in k and k.endswith(".json")):
        data = _json(jobs, key)
        try:
            events.append(parse_message(data))  # type: ignore[arg-type]
        except (ValueError, ValidationError, TermtuneError) as exc:
            raise SpecError(f"{jobs.store.uri(key)}: not an event ({type(exc).__name__})") from exc
    jobs.restore(job_id, spec, events, cancel_requested=f"jobs/{job_id}/cancel" in keys)


def _json(jobs: JobRecords, key: str) -> Any:
    try:
        return json.loads(jobs.store.get_bytes(key))
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"{jobs.store.uri(key)}: not JSON (line {exc.lineno}, column {exc.colno})"
        ) from exc
