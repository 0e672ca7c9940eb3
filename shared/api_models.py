"""What the control plane answers, as typed models: the OpenAPI schema describes them and
the CLI's client reads responses through them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.ledger.view import JOB_STATUSES
from shared.messages import STAGES

JobStatus = Literal[JOB_STATUSES]  # type: ignore[valid-type]
StageName = Literal[STAGES]  # type: ignore[valid-type]
StageStatus = Literal["pending", "running", "succeeded", "failed", "cancelled", "skipped"]


class StageView(BaseModel):
    """One stage of a job."""

    model_config = ConfigDict(extra="forbid")

    status: StageStatus
    started_at: str | None = None
    finished_at: str | None = None
    attempt: int | None = None
    worker: str | None = None
    progress: dict[str, Any] | None = Field(None, description="The stage's latest progress.")
    manifest: str | None = Field(None, description="URI of the stage's manifest once done.")
    error: str | None = None


class JobError(BaseModel):
    """Why a job failed."""

    stage: StageName
    reason: str
    type: str


class JobView(BaseModel):
    """A job: status, stages, results (each stage's outcome) and error."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    status: JobStatus
    model_name: str
    created_at: str
    error: JobError | None = None
    result: dict[StageName, dict[str, Any]] = Field(default_factory=dict)
    stages: dict[StageName, StageView]
    cancel_requested: bool = False
    retries: int = 0
    next: str | None = Field(None, description="The command that runs the next stage (paused).")


class JobPage(BaseModel):
    """A page of jobs, newest first."""

    data: list[JobView]
    count: int
    has_more: bool
    next_after: str | None = Field(None, description="Pass as ``after`` for the next page.")


class EventView(BaseModel):
    """One event of a job: its sequence number (1, 2, 3...) and the event as sent."""

    model_config = ConfigDict(extra="allow")

    seq: int
    type: str
    job_id: str
    created_at: str


class EventPage(BaseModel):
    """A job's events after a sequence number, oldest first."""

    data: list[EventView]
    last_seq: int = Field(description="Sequence number of the last event here (or ``after``).")
    has_more: bool


class ModelEntry(BaseModel):
    """A published model: where it lives and what made it (``bedrock``: the import)."""

    model_config = ConfigDict(extra="allow")

    name: str
    job_id: str | None = None
    target: str | None = Field(None, description="local or bedrock")
    location: str | None = Field(None, description="URI of the exported model folder.")


class ModelList(BaseModel):
    """Every published model, by name."""

    data: list[ModelEntry]


class ModelDeleted(BaseModel):
    """What a delete removed."""

    deleted: str
    imported_model_arn: str | None = None


class ImportedModel(BaseModel):
    """A model imported into Bedrock (Bedrock's summary), and termtune's name for it."""

    model_config = ConfigDict(extra="allow")

    modelArn: str  # noqa: N815 - Bedrock's field name
    termtune_model: str | None = None


class ImportedModelList(BaseModel):
    """Every model imported into Bedrock in the account and region."""

    data: list[ImportedModel]


class Health(BaseModel):
    """A liveness or readiness answer."""

    status: Literal["ok", "ready"]
