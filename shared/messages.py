"""Every command and event that crosses the bus or lands in a job's events log.

Commands are verbs and go to one service's queue; events are past tense and record what
happened. Messages carry locations (``file://``, ``s3://``), never datasets or weights.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import MessageError

SCHEMA_VERSION = 1

Stage = Literal["prepare", "train", "evaluate", "publish"]
STAGES: tuple[Stage, ...] = ("prepare", "train", "evaluate", "publish")
#: every status a job can have, and those it ends in ("paused": a stage run in-process
#: finished and the next one waits for `termtune <stage> SPEC --job ID`)
JOB_STATUSES = ("queued", "running", "paused", "succeeded", "failed", "rejected", "cancelled")
ENDED = ("succeeded", "failed", "rejected", "cancelled")


def _now() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Fields every message carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(..., min_length=1, max_length=96, pattern=r"^[a-zA-Z0-9_.-]+$")
    schema_version: int = SCHEMA_VERSION
    created_at: datetime = Field(default_factory=_now)
    message_id: str = Field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def routing_key(self) -> str:
        """The topic routing key: ``cmd.<Type>`` or ``event.<Type>``."""
        kind = "cmd" if isinstance(self, Command) else "event"
        return f"{kind}.{self.type}"  # type: ignore[attr-defined]


class Command(Message):
    """A request for one service to do one stage of a job."""

    spec_uri: str = Field(..., description="Location of the job's validated spec.")


class PrepareDataset(Command):
    """Read, template, split and tokenize the job's dataset."""

    type: Literal["PrepareDataset"] = "PrepareDataset"


class TrainModel(Command):
    """Train a LoRA adapter on a prepared dataset."""

    type: Literal["TrainModel"] = "TrainModel"
    dataset_manifest: str


class EvaluateModel(Command):
    """Compare the base and the tuned model on the held-out split."""

    type: Literal["EvaluateModel"] = "EvaluateModel"
    dataset_manifest: str
    training_manifest: str


class PublishModel(Command):
    """Merge, export, check and register (or import) the tuned model."""

    type: Literal["PublishModel"] = "PublishModel"
    dataset_manifest: str
    training_manifest: str
    evaluation_manifest: str


class Event(Message):
    """Something that happened to a job."""


class JobSubmitted(Event):
    """The control plane accepted a job."""

    type: Literal["JobSubmitted"] = "JobSubmitted"
    spec_uri: str
    name: str


class StageStarted(Event):
    """A worker began a stage."""

    type: Literal["StageStarted"] = "StageStarted"
    stage: Stage
    worker: str
    attempt: int = 1


class StageProgress(Event):
    """A stage's progress (training step, loss, ...)."""

    type: Literal["StageProgress"] = "StageProgress"
    stage: Stage
    progress: dict[str, Any]


class TokenLengths(BaseModel):
    """One side's (source or target) token lengths over every split, and where it was cut."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_length: int = Field(..., description="Tokens kept (the resolved number, never auto).")
    setting: Literal["auto", "spec"] = Field(..., description="Chosen by auto or by the spec.")
    p50: int
    p99: int = Field(..., description="Before truncation.")
    truncated_share: float = Field(..., description="Share of rows longer than max_length.")
    unknown_share: float = Field(..., description="Share of kept tokens that are unknown.")


class DatasetPrepared(Event):
    """Data-prep wrote the tokenized splits and their manifest."""

    type: Literal["DatasetPrepared"] = "DatasetPrepared"
    stage: Literal["prepare"] = "prepare"
    manifest: str
    counts: dict[str, int]
    tokens: dict[Literal["source", "target"], TokenLengths] = Field(default_factory=dict)
    dropped: dict[str, int] = Field(
        default_factory=dict, description="Rows dropped by each cleaning rule."
    )
    bad_rows_skipped: int = Field(0, description="Malformed rows skipped (skip_bad_rows).")
    warnings: list[str] = Field(
        default_factory=list, description="Truncation above 5%, unknown tokens above 0.5%."
    )


class ModelTrained(Event):
    """The trainer stored the adapter and its training log."""

    type: Literal["ModelTrained"] = "ModelTrained"
    stage: Literal["train"] = "train"
    manifest: str
    train_loss: float | None
    steps: int
    tracking: dict[str, Any] | None = None
    """The job's experiment-tracking run (backend, run_id, experiment_id, url), if tracked."""


class ModelEvaluated(Event):
    """The evaluator stored its report and the gate's verdict."""

    type: Literal["ModelEvaluated"] = "ModelEvaluated"
    stage: Literal["evaluate"] = "evaluate"
    manifest: str
    passed: bool
    publish: bool
    reasons: list[str] = Field(default_factory=list)
    timing: dict[str, Any] | None = None
    """How long the base and tuned models took to answer the test split, on which device."""


class ModelPublished(Event):
    """The publisher exported the merged model and registered it."""

    type: Literal["ModelPublished"] = "ModelPublished"
    stage: Literal["publish"] = "publish"
    manifest: str
    model_name: str
    target: str
    location: str
    registered_model: dict[str, Any] | None = None
    """The model registry's version of this export (name, version, source), if tracked."""


class StageFailed(Event):
    """A stage failed for good; the job ends as failed."""

    type: Literal["StageFailed"] = "StageFailed"
    stage: Stage
    error: str
    error_type: str
    attempts: int = 1
    permanent: bool = Field(True, description="False: it failed after exhausting retries.")


class CancelRequested(Event):
    """A user asked to cancel the job."""

    type: Literal["CancelRequested"] = "CancelRequested"


class JobCancelled(Event):
    """A worker stopped the job after a cancel request; it ends as cancelled."""

    type: Literal["JobCancelled"] = "JobCancelled"
    stage: Stage


class JobRetried(Event):
    """The job resumes from the first stage it had not finished: a user retried it (failed
    or cancelled), or a stage found an earlier stage's stored output corrupt (``reason``)
    and that stage runs again."""

    type: Literal["JobRetried"] = "JobRetried"
    stage: Stage
    reason: str | None = Field(None, description="Why termtune resumed it itself.")


class JobPaused(Event):
    """A stage run in-process (``termtune prepare|train|evaluate``) finished; the job waits
    for its next stage to be run the same way."""

    type: Literal["JobPaused"] = "JobPaused"
    stage: Stage
    next: str = Field(description="The command that runs the next stage.")


AnyMessage = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads best spelled out
        PrepareDataset,
        TrainModel,
        EvaluateModel,
        PublishModel,
        JobSubmitted,
        StageStarted,
        StageProgress,
        DatasetPrepared,
        ModelTrained,
        ModelEvaluated,
        ModelPublished,
        StageFailed,
        CancelRequested,
        JobCancelled,
        JobRetried,
        JobPaused,
    ],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)

STAGE_OF_COMMAND: dict[str, Stage] = {
    "PrepareDataset": "prepare",
    "TrainModel": "train",
    "EvaluateModel": "evaluate",
    "PublishModel": "publish",
}


def parse_message(data: dict[str, Any] | str | bytes) -> Message:
    """Parse a message body (dict or JSON), raising MessageError naming the problem."""
    try:
        if isinstance(data, (str, bytes)):
            return _ADAPTER.validate_json(data)
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise MessageError(f"invalid message: {problems}") from exc


def dump_message(message: Message) -> dict[str, Any]:
    """The JSON-ready dict of a message."""
    return message.model_dump(mode="json")
