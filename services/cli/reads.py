"""The CLI's read commands: a table or lines for people, ``--json`` for scripts.

With ``--json`` a command prints the API's own objects, read through its response models
(`shared.api_models`), so the field names are those of the OpenAPI schema and change only
with it; a job carries every field, null where the server left it out. ``jobs`` and
``models`` print a JSON array, ``events`` one JSON object per line (JSON Lines, also while
following; each with its ``seq``, to resume after), ``status``, ``report`` and ``invoke`` one
object.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.cli.exits import Exit, job_exit
from shared.api_models import JobView

HIDDEN_EVENT_FIELDS = ("job_id", "schema_version", "message_id", "created_at", "type")


def _dump(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _every_field(job: dict[str, Any]) -> dict[str, Any]:
    """A job with all of its model's fields (scripts index them without checking)."""
    return JobView.model_validate(job).model_dump(mode="json")


def jobs(client: Any, args: argparse.Namespace) -> int:
    """The newest jobs (``--limit``, 20), every job (``--all``), those with ``--status``."""
    found = client.jobs(status=args.status, limit=None if args.all else args.limit)
    if args.json:
        _dump([_every_field(job) for job in found])
        return Exit.OK
    for job in found:
        print(f"{job['id']}\t{job['status']}\t{job['created_at']}\t{job['model_name']}")
    return Exit.OK


def events(client: Any, args: argparse.Namespace) -> int:
    """A job's events, oldest first; ``--follow`` streams them until the job ends, then
    exits as ``--wait`` does (3 for a job that failed or was cancelled)."""
    stream = client.stream_events(args.job_id) if args.follow else client.events(args.job_id)
    for event in stream:
        if args.json:
            print(json.dumps(event, ensure_ascii=False), flush=True)
            continue
        details = {k: v for k, v in event.items() if k not in HIDDEN_EVENT_FIELDS}
        print(f"{event['created_at']}  {event['type']:<16} {json.dumps(details)}", flush=True)
    return job_exit(client.job(args.job_id)) if args.follow else Exit.OK


def report(client: Any, args: argparse.Namespace) -> int:
    """A job's evaluation; exits 3 when its gate refused the model."""
    from services.cli import display

    found = client.report(args.job_id)
    if args.json:
        _dump(found)
    else:
        display.print_report(found)
    return Exit.OK if found["gate"]["publish"] else Exit.JOB_NOT_SUCCEEDED


def models(client: Any, args: argparse.Namespace) -> int:
    """Published models, or (``--imported``) every model imported into Bedrock."""
    if args.imported:
        found = client.imported_models()
        lines = [f"{m['modelName']}\t{m['modelArn']}\t{m['termtune_model'] or '-'}" for m in found]
    else:
        found = client.models()
        lines = [
            f"{m['name']}\t{m['target']}\t"
            + (m.get("bedrock", {}).get("imported_model_arn") or m["location"])
            for m in found
        ]
    if args.json:
        _dump(found)
    elif lines:
        print("\n".join(lines))
    return Exit.OK


def status(client: Any, args: argparse.Namespace) -> int:
    """A job's summary (always JSON: the API's job object, every field)."""
    _dump(_every_field(client.job(args.job_id)))
    return Exit.OK


COMMANDS = {"jobs": jobs, "events": events, "report": report, "models": models, "status": status}
