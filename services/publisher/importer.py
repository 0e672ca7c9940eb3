"""Driving a Bedrock Custom Model Import job to completion, exactly once per artifact.

The import's identity (names, S3 location, ``clientRequestToken``) is derived from the job
and the artifact digest and written to the job's record **before** the create call; a retried
or duplicated publish reads it back and sends the same token, so Bedrock answers with the
same import job instead of starting a second one. Only an import Bedrock marked Failed is
replaced, by the next attempt's names and token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import tenacity
from botocore.exceptions import BotoCoreError, ClientError

from shared import bedrock
from shared.errors import BedrockError, NotFound, RetryableError, TermtuneError
from shared.settings import BedrockSettings
from shared.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportRecord:
    """What an import is, fixed before Bedrock is called; ``job_arn`` once it answered."""

    job_name: str
    imported_model_name: str
    s3_uri: str
    client_token: str
    digest: str
    job_arn: str | None = None
    attempt: int = 1  # a failed import is imported again under the next attempt's names


#: the longest jobName and importedModelName CreateModelImportJob takes
NAME_MAX = 63


def plan_import(
    job_id: str, model_name: str, digest: str, settings: BedrockSettings, *, attempt: int = 1
) -> ImportRecord:
    """Names, location and idempotency token for importing one artifact (``attempt``: the
    how-manyth import of it, after failed ones)."""
    short = digest[:10]
    suffix = f"-{short}-import" + (f"-{attempt}" if attempt > 1 else "")
    token = f"{job_id}:{digest}" + (f":{attempt}" if attempt > 1 else "")
    base = settings.s3_uri.rstrip("/")
    return ImportRecord(
        job_name=_bedrock_name(model_name[: NAME_MAX - len(suffix)] + suffix),
        imported_model_name=_bedrock_name(f"{model_name[:50]}-{short}"),
        s3_uri=f"{base}/{model_name}/{short}/",
        client_token=hashlib.sha256(token.encode()).hexdigest()[:64],
        digest=digest,
        attempt=attempt,
    )


def _bedrock_name(name: str) -> str:
    """A name without the runs of '-' that importedModelName's pattern refuses (termtune
    names may hold them)."""
    return re.sub(r"-{2,}", "-", name)


class ImportRecords:
    """The import record of one job in the store (first writer wins)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def claim(self, planned: ImportRecord) -> ImportRecord:
        """The record already stored for this job, or ``planned`` once stored."""
        self.store.put_bytes_if_absent(self.key, json.dumps(asdict(planned)).encode())
        return self.load()

    def load(self) -> ImportRecord:
        """The stored record; NotFound if none."""
        return ImportRecord(**self.store.get_json(self.key))

    def set_job_arn(self, record: ImportRecord, job_arn: str) -> ImportRecord:
        """Record the import job Bedrock answered with."""
        return self.replace(ImportRecord(**{**asdict(record), "job_arn": job_arn}))

    def replace(self, record: ImportRecord) -> ImportRecord:
        """Store ``record`` in place of the job's record."""
        self.store.put_json(self.key, asdict(record))
        return record


#: CreateModelImportJob errors waited out for ``quota_wait_minutes``, and the phase reported
_QUOTA_WAITS = {
    "ServiceQuotaExceededException": "waiting for the import quota",
    "ThrottlingException": "waiting: Bedrock is throttling",
}


@dataclass
class Importer:
    """Creates (once), waits for, and describes one import job."""

    client: Any
    settings: BedrockSettings
    report: Callable[..., None]
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def run(self, records: ImportRecords, record: ImportRecord) -> dict[str, Any]:
        """Import to the end: the imported model's ARN, units and hourly cost."""
        if record.job_arn is None:
            record = records.set_job_arn(record, self.create(record))
        job = self.wait(record.job_arn or "")
        model = self._call("GetImportedModel", modelIdentifier=job["importedModelArn"])
        units = int(model.get("customModelUnits", {}).get("customModelUnitsPerModelCopy", 0))
        return {
            "job_arn": record.job_arn,
            "imported_model_arn": job["importedModelArn"],
            "imported_model_name": record.imported_model_name,
            "s3_uri": record.s3_uri,
            "client_token": record.client_token,
            "digest": record.digest,  # the export Bedrock imported (an earlier one's, adopted)
            "model_architecture": model.get("modelArchitecture"),
            "custom_model_units": units,
            "cost_per_active_hour_usd": round(units * self.settings.cmu_price_per_minute * 60, 2),
            "region": self.settings.region,
        }

    def create(self, record: ImportRecord) -> str:
        """``create_model_import_job``: waits out the one-import quota and throttling (for
        ``quota_wait_minutes``) and a fresh role, the waits doubling from ``poll_seconds`` up
        to ``poll_max_seconds``."""
        start, idle = self.clock(), []  # idle: quota refusals met with no import running

        def call() -> str:
            response = self.client.create_model_import_job(
                jobName=record.job_name,
                importedModelName=record.imported_model_name,
                roleArn=self.settings.role_arn,
                modelDataSource={"s3DataSource": {"s3Uri": record.s3_uri}},
                clientRequestToken=record.client_token,
                jobTags=[{"key": "termtune:digest", "value": record.digest[:64]}],
            )
            return str(response["jobArn"])

        retrying = self._retrying(
            retry=tenacity.retry_if_exception(lambda exc: self._waits_out(exc, start, idle)),
            stop=tenacity.stop_never,
        )
        try:
            return retrying(call)
        except (ClientError, BotoCoreError) as exc:
            if len(idle) >= 2:
                raise self._models_quota(str(exc)) from exc
            raise self._refused(exc) from exc

    def _waits_out(self, exc: BaseException, start: float, idle: list[bool]) -> bool:
        """Whether a CreateModelImportJob error is one to wait out now (and say so). A quota
        refusal with no import running twice, a wait apart (an import that ended between the
        refusal and the look is not mistaken), is the imported-models quota: no wait frees
        it."""
        code, message = bedrock.error_code(exc), str(exc)
        elapsed = self.clock() - start
        if code == "ServiceQuotaExceededException" and not self._import_running():
            idle.append(True)
            if len(idle) >= 2:
                return False
        if code in _QUOTA_WAITS:  # past its minutes, throttling is retried by the queue
            if elapsed < self.settings.quota_wait_minutes * 60:
                self.report({"phase": _QUOTA_WAITS[code], "detail": message})
                return True
            return False
        if code == "ValidationException" and "role" in message.lower():
            if elapsed < self.settings.role_retry_minutes * 60:
                self.report({"phase": "waiting for the role to propagate"})
                return True
            return False
        return False

    def _refused(self, exc: ClientError | BotoCoreError) -> Exception:
        """The error CreateModelImportJob ended with, naming what to fix."""
        message = str(exc)
        if bedrock.error_code(exc) == "ValidationException" and "role" in message.lower():
            return BedrockError(
                f"CreateModelImportJob: the role {self.settings.role_arn} was still refused "
                f"after {self.settings.role_retry_minutes} minutes (trust policy for "
                f"bedrock.amazonaws.com, s3:GetObject and s3:ListBucket on the bucket): "
                f"{message}"
            )
        return bedrock.explain(exc, "CreateModelImportJob")

    def _import_running(self) -> bool:
        """Whether an import job of the account is in progress (the one-import quota); an
        unanswered question counts as yes (the quota is then waited out as before)."""
        try:
            listed = self.client.list_model_import_jobs(statusEquals="InProgress", maxResults=1)
        except (ClientError, BotoCoreError):
            return True
        return bool(listed.get("modelImportJobSummaries"))

    def _models_quota(self, message: str) -> BedrockError:
        """The refusal when no import runs: the account holds all the imported models its
        quota allows, and only deleting one (or a higher quota) makes room."""
        try:
            names = [m.get("modelName", "?") for m in bedrock.imported_models(self.client)]
        except TermtuneError:
            names = []
        held = f" ({len(names)}: {', '.join(sorted(names))})" if names else ""
        return BedrockError(
            f"CreateModelImportJob: ServiceQuotaExceededException with no import running: "
            f"the account's imported models{held} fill its quota in "
            f"{self.settings.region}. Delete one (`termtune models --imported` names the "
            f"termtune model of each, for `termtune delete-model MODEL`; others with `aws "
            f"bedrock delete-imported-model`) or ask AWS for a higher 'Imported models per "
            f"account' quota, then retry the job ({message})"
        )

    def started(self, job_name: str) -> str | None:
        """The ARN of the import job named ``job_name`` if Bedrock has one (a create that
        succeeded before its answer was recorded), else None. A refused question (a role
        without bedrock:ListModelImportJobs) is logged and answered None, as before it was
        asked: a second import is possible then, a failed job is not."""
        try:
            pages = self.client.get_paginator("list_model_import_jobs").paginate(
                nameContains=job_name
            )
            jobs = [j for page in pages for j in page.get("modelImportJobSummaries", [])]
        except (ClientError, BotoCoreError) as exc:
            error = bedrock.explain(exc, "ListModelImportJobs")
            if isinstance(error, RetryableError):
                raise error from exc
            log.warning("an earlier import %s not looked for: %s", job_name, error)
            return None
        return next((str(j["jobArn"]) for j in jobs if j.get("jobName") == job_name), None)

    def failure(self, job_arn: str) -> str | None:
        """Bedrock's failureMessage if the import job ``job_arn`` failed, else None."""
        job = self._call("GetModelImportJob", jobIdentifier=job_arn)
        if job["status"] != "Failed":
            return None
        return str(job.get("failureMessage") or "no failure message")

    def wait(self, job_arn: str) -> dict[str, Any]:
        """Poll ``get_model_import_job`` with backoff until Completed; Failed raises."""
        start = self.clock()
        deadline = start + self.settings.import_timeout_minutes * 60

        def poll() -> dict[str, Any]:
            job = self._call("GetModelImportJob", jobIdentifier=job_arn)
            elapsed = round(self.clock() - start)
            self.report({"phase": "importing", "status": job["status"], "elapsed_s": elapsed})
            if job["status"] == "Failed":
                raise BedrockError(
                    f"Bedrock import job {job_arn} failed: {job.get('failureMessage', '?')}"
                )
            return job

        retrying = self._retrying(
            retry=tenacity.retry_if_result(lambda job: job["status"] != "Completed"),
            stop=lambda state: self.clock() >= deadline,
        )
        try:
            return retrying(poll)
        except tenacity.RetryError as exc:
            status = exc.last_attempt.result()["status"]
            raise RetryableError(
                f"Bedrock import job {job_arn} still {status} after "
                f"{self.settings.import_timeout_minutes} minutes"
            ) from None

    def _retrying(self, **conditions: Any) -> tenacity.Retrying:
        """Retries with this importer's sleep, the waits doubling up to poll_max_seconds."""
        wait = tenacity.wait_exponential(
            multiplier=self.settings.poll_seconds,
            min=self.settings.poll_seconds,
            max=self.settings.poll_max_seconds,
        )
        return tenacity.Retrying(wait=wait, sleep=self.sleep, reraise=True, **conditions)

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        method = getattr(self.client, _snake(operation))
        try:
            return dict(method(**params))
        except ClientError as exc:
            if bedrock.error_code(exc) == "ResourceNotFoundException":
                raise NotFound(f"{operation}: {exc}") from exc
            raise bedrock.explain(exc, operation) from exc
        except BotoCoreError as exc:
            raise bedrock.explain(exc, operation) from exc


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
