"""The importer's waits (tenacity): doubling up to the cap, each wait's own deadline, and
the error it ends with; on a clock that moves only when the importer sleeps."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from services.publisher.importer import Importer, ImportRecord
from shared.errors import BedrockError, RetryableError
from shared.settings import BedrockSettings

ROLE = "arn:aws:iam::123456789012:role/termtune-import"
RECORD = ImportRecord("job", "model", "s3://bucket/models/m/", "token", "d" * 64)


def _error(code: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "CreateModelImportJob")


class _Bedrock:
    """Answers CreateModelImportJob with ``errors`` in turn, then a job ARN; every
    GetModelImportJob with ``status``."""

    def __init__(
        self, errors: list[ClientError], status: str = "InProgress", running: list[bool] = ()
    ) -> None:
        self.errors, self.status, self.creates = list(errors), status, 0
        self.running = list(running)  # what each look for a running import finds (then: yes)

    def list_model_import_jobs(self, **query):
        assert query == {"statusEquals": "InProgress", "maxResults": 1}
        running = self.running.pop(0) if self.running else True
        jobs = [{"jobArn": "arn:other", "status": "InProgress"}] if running else []
        return {"modelImportJobSummaries": jobs}

    def get_paginator(self, operation):
        assert operation == "list_imported_models"
        pages = [{"modelSummaries": [{"modelName": "a-1"}, {"modelName": "b-2"}]}]
        return type("Pages", (), {"paginate": lambda self: pages})()

    def create_model_import_job(self, **request):
        self.creates += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"jobArn": "arn:job"}

    def get_model_import_job(self, jobIdentifier):  # noqa: N803 - boto3's name
        return {"status": self.status, "importedModelArn": "arn:model"}


@pytest.fixture
def clock():
    """(importer maker, the waits it slept, phases it reported)."""
    now, slept, phases = [0.0], [], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    settings = BedrockSettings(
        role_arn=ROLE, poll_seconds=10, poll_max_seconds=60, role_retry_minutes=3,
        quota_wait_minutes=2, import_timeout_minutes=5,
    )  # fmt: skip

    def make(client) -> Importer:
        report = lambda progress: phases.append(progress["phase"])  # noqa: E731
        return Importer(client, settings, report, sleep=sleep, clock=lambda: now[0])

    return make, slept, phases


def test_a_fresh_role_is_waited_out_with_doubling_waits(clock):
    make, slept, phases = clock
    refused = _error("ValidationException", "Could not assume the role")
    client = _Bedrock([refused] * 3 + [_error("ThrottlingException", "slow down")])
    assert make(client).create(RECORD) == "arn:job"
    assert slept == [10, 20, 40, 60]  # doubled from poll_seconds, capped at poll_max_seconds
    assert phases == ["waiting for the role to propagate"] * 3 + ["waiting: Bedrock is throttling"]


def test_a_role_still_refused_after_its_minutes_names_what_to_fix(clock):
    make, slept, _ = clock
    client = _Bedrock([_error("ValidationException", "role not assumable")] * 50)
    with pytest.raises(BedrockError, match=r"role .*still refused after 3.0 minutes.*trust policy"):
        make(client).create(RECORD)
    assert sum(slept[:-1]) < 180 <= sum(slept)  # it tried once more at the 3 minutes
    assert client.creates == len(slept) + 1


def test_the_import_quota_is_waited_out_for_its_own_minutes(clock):
    make, slept, phases = clock
    client = _Bedrock([_error("ServiceQuotaExceededException", "one import at a time")] * 50)
    with pytest.raises(BedrockError, match="ServiceQuotaExceededException"):
        make(client).create(RECORD)
    assert sum(slept[:-1]) < 120 <= sum(slept)
    assert set(phases) == {"waiting for the import quota"}


def test_the_imported_models_quota_fails_after_a_second_look_finds_no_import(clock):
    make, slept, phases = clock
    quota = _error("ServiceQuotaExceededException", "quota reached")
    client = _Bedrock([quota] * 50, running=[False, False])
    with pytest.raises(BedrockError, match=r"the account's imported models \(2: a-1, b-2\)"):
        make(client).create(RECORD)
    assert client.creates == 2 and slept == [10]  # one wait, to look again
    assert phases == ["waiting for the import quota"]


def test_an_import_that_ended_before_the_look_is_not_taken_for_the_models_quota(clock):
    """Refused for the one running import, which then ended before the look: waited for."""
    make, slept, _ = clock
    quota = _error("ServiceQuotaExceededException", "one import at a time")
    client = _Bedrock([quota, quota], running=[False, True])
    assert make(client).create(RECORD) == "arn:job"
    assert client.creates == 3 and slept == [10, 20]


def test_throttling_is_waited_out_for_the_quota_minutes_then_left_to_the_queue(clock):
    make, slept, phases = clock
    client = _Bedrock([_error("ThrottlingException", "Rate exceeded")] * 50)
    with pytest.raises(RetryableError, match="CreateModelImportJob: ThrottlingException"):
        make(client).create(RECORD)
    assert sum(slept[:-1]) < 120 <= sum(slept)  # quota_wait_minutes=2, not forever
    assert set(phases) == {"waiting: Bedrock is throttling"}
    assert client.creates == len(slept) + 1


def test_another_error_is_not_retried(clock):
    make, slept, _ = clock
    client = _Bedrock([_error("AccessDeniedException", "no bedrock:CreateModelImportJob")])
    with pytest.raises(BedrockError, match="access denied to CreateModelImportJob"):
        make(client).create(RECORD)
    assert slept == [] and client.creates == 1


def test_an_import_still_running_at_its_timeout_is_retryable(clock):
    make, slept, phases = clock
    with pytest.raises(RetryableError, match="still InProgress after 5.0 minutes"):
        make(_Bedrock([])).wait("arn:job")
    assert slept[:3] == [10, 20, 40] and set(slept[3:]) == {60}
    assert sum(slept[:-1]) < 300 <= sum(slept)
    assert phases == ["importing"] * (len(slept) + 1)


def test_a_completed_import_ends_the_wait(clock):
    make, slept, _ = clock
    assert make(_Bedrock([], status="Completed")).wait("arn:job")["status"] == "Completed"
    assert slept == []
