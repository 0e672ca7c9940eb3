"""The bedrock target: upload the exported folder, import it once, smoke-invoke it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.publisher import cmi, upload
from services.publisher.importer import Importer, ImportRecord, ImportRecords, plan_import
from shared import bedrock
from shared.errors import BedrockError, Cancelled, LedgerUnavailable, PermanentError
from shared.messages import StageProgress
from shared.settings import BedrockSettings
from shared.stage import StageContext

log = logging.getLogger(__name__)


def plan(
    job_id: str,
    files: list[str],
    digest: str,
    *,
    model_name: str,
    settings: BedrockSettings,
    attempt: int = 1,
) -> ImportRecord:
    """The import of these files (the ``attempt``-th), checked (region, settings, names
    against the API's patterns, S3 URI and key characters) before anything is uploaded."""
    bedrock.check_region(settings.region)
    if not settings.role_arn or not settings.s3_uri.startswith("s3://"):
        raise BedrockError(
            "publish.target bedrock needs TERMTUNE_BEDROCK_ROLE_ARN (the import service role) "
            "and TERMTUNE_BEDROCK_S3_URI (s3://bucket/prefix for the model files)"
        )
    planned = plan_import(job_id, model_name, digest, settings, attempt=attempt)
    cmi.check_import(
        planned.job_name,
        planned.imported_model_name,
        planned.client_token,
        planned.s3_uri,
        files,
    )
    return planned


def to_bedrock(
    job_id: str,
    ctx: StageContext,
    folder: Path,
    files: dict[str, str],
    digest: str,
    *,
    model_name: str,
    smoke_request: dict[str, Any],
    settings: BedrockSettings | None = None,
) -> dict[str, Any]:
    """Import the folder into Bedrock; the imported model's ARN, cost and smoke answer (to
    ``smoke_request``: Bedrock's invoke body with the spec's decoding)."""
    settings = settings or BedrockSettings()
    planned = plan(job_id, list(files), digest, model_name=model_name, settings=settings)
    records = ImportRecords(ctx.store, f"{ctx.jobs.stage_prefix(job_id, 'publish')}/import.json")
    record = records.claim(planned)
    importer = Importer(bedrock.control_client(settings), settings, ctx.progress)
    if record.job_arn is None and record.digest != digest:
        record = _earlier_or(planned, record, records, importer)
    failure = importer.failure(record.job_arn) if record.job_arn else None
    if failure is not None:  # it made no model: import again under new names and token
        attempt = record.attempt + 1
        ctx.progress(
            {
                "phase": f"the earlier import failed ({failure}); importing again",
                "attempt": attempt,
            },
            force=True,
        )
        again = plan(
            job_id, list(files), digest, model_name=model_name, settings=settings, attempt=attempt
        )
        record = records.replace(again)
    sent: dict[str, Any] = {"sent": [], "skipped": list(files), "bytes": 0}
    if record.job_arn is None:  # once an import runs, its files stay as they are
        sent = _upload(folder, files, record.s3_uri, settings, ctx)
    try:
        result = importer.run(records, record)
    except Cancelled:  # Bedrock has no call that stops an import: say what goes on
        started = records.load().job_arn
        if started:
            _leave_word(
                ctx,
                job_id,
                f"the Bedrock import job {started} goes on (Bedrock cannot stop one) and "
                f"makes the model {record.imported_model_name}: retry the job to use it (no "
                "second import), or delete it once imported (`aws bedrock "
                f"delete-imported-model --model-identifier {record.imported_model_name}`)",
            )
        raise
    arn = result["imported_model_arn"]
    ctx.progress({"phase": "smoke test", "model": arn}, force=True)
    try:
        answer = bedrock.invoke(
            bedrock.runtime_client(settings),
            arn,
            smoke_request,
            retries=settings.not_ready_retries,
            wait_seconds=settings.not_ready_wait_seconds,
        )
    except PermanentError as exc:  # the model is imported, and costs storage until deleted
        exc.args = (
            f"smoke test: {exc}; the imported model {arn} stays in Bedrock: retry the job to "
            "test it again (no second import), or delete it (`aws bedrock "
            f"delete-imported-model --model-identifier {arn}`)",
        )
        raise
    return {
        **result,
        "upload": sent,
        "smoke_test": {**smoke_request, "generation": answer["generation"]},
    }


def _leave_word(ctx: StageContext, job_id: str, text: str) -> None:
    """Say, in the job's events and the log, what a cancelled publish leaves behind (a
    cancel is recorded with no message of its own)."""
    log.warning("%s: cancelled: %s", job_id, text)
    progress = {"phase": "cancelled: what is left in Bedrock", "detail": text}
    try:
        ctx.jobs.record(
            StageProgress(job_id=job_id, stage="publish", progress=progress), patient=False
        )
    except LedgerUnavailable as exc:
        log.warning("%s: not recorded: %s", job_id, exc)


def _earlier_or(
    planned: ImportRecord, earlier: ImportRecord, records: ImportRecords, importer: Importer
) -> ImportRecord:
    """An earlier attempt exported other bytes (the merge check's figures, the merge device)
    and left no answer recorded: the import it may have started (its files were whole in S3
    before the call), else this attempt's plan in its place."""
    started = importer.started(earlier.job_name)
    if started is not None:  # its create succeeded, its worker died before recording it
        return records.set_job_arn(earlier, started)
    return records.replace(planned)


def _upload(
    folder: Path, files: dict[str, str], s3_uri: str, settings: BedrockSettings, ctx: StageContext
) -> dict[str, Any]:
    parsed = urlparse(s3_uri)
    s3 = bedrock.aws_client(settings, "s3", endpoint_url=settings.s3_endpoint_url)
    return upload.upload_folder(
        s3,
        folder,
        parsed.netloc,
        parsed.path.strip("/"),
        files=files,
        report=ctx.progress,
        concurrency=settings.upload_concurrency,
        part_mb=settings.multipart_mb,
    )
