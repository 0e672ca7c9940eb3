"""What the control plane answers (and the manifest a model upload sends), as typed models:
the OpenAPI schema describes them and the CLI's client reads responses through them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.messages import JOB_STATUSES, STAGES
from shared.uploads import check_model_path

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


class ReportMetric(BaseModel):
    """One metric of the base and the tuned model on the held-out rows."""

    model_config = ConfigDict(extra="allow")

    base: float
    tuned: float
    delta: float
    ci95: list[float] = Field(description="Paired bootstrap 95% interval of the delta.")
    lower_is_better: bool | None = None


class ReportGate(BaseModel):
    """The quality gate's verdict (``rules``: each rule, its figures and whether it passed)."""

    model_config = ConfigDict(extra="allow")

    passed: bool
    publish: bool = Field(description="Passed, or forced (evaluation.gate.force_publish).")
    forced: bool = False
    reasons: list[str] = []


class ReportSample(BaseModel):
    """A held-out row and both models' answers."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    reference: str
    base: str
    tuned: str


class EvaluationReport(BaseModel):
    """A job's held-out evaluation (the evaluator's report: metrics, gate, samples, timing,
    the data's account and versions)."""

    model_config = ConfigDict(extra="allow")

    rows: int
    metrics: dict[str, ReportMetric]
    gate: ReportGate
    samples: list[ReportSample] = []


def report_cap(report: dict[str, Any]) -> str | None:
    """ "N of M" where evaluation.max_rows sampled N of the test split's M rows, else None (a
    report without ``split_rows``, written before it had one: "N" where its rows reach the
    cap)."""
    cap, split = report.get("capped_at"), report.get("split_rows")
    if not cap:
        return None
    if split is None:
        return str(cap) if report["rows"] >= cap else None
    return f"{cap} of {split}" if split > report["rows"] else None


class ModelEntry(BaseModel):
    """A published model: where it lives and what made it (``bedrock``: the import)."""

    model_config = ConfigDict(extra="allow")

    name: str
    job_id: str | None = None
    target: str | None = Field(None, description="local or bedrock")
    location: str | None = Field(None, description="URI of the exported model folder.")
    chat: bool = Field(
        False,
        description="Trained on prompts in its chat template: ask it with chat messages "
        "(OpenAI chat completions), as it was evaluated.",
    )
    family: str | None = Field(
        None,
        description="Its family's model_type (shared.families): which request shapes Bedrock "
        "serves it in (GPT-OSS: OpenAI's completion and chat completions only).",
    )


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


class EstimateDataset(BaseModel):
    """The prepared train split the estimate rests on."""

    model_config = ConfigDict(extra="forbid")

    train_rows: int
    tokens_per_row: float


class EstimatePlan(BaseModel):
    """The plan the trainer would make on the instance's GPU (shared.planner)."""

    model_config = ConfigDict(extra="forbid")

    quantization: str
    precision: str
    batch_size: int
    gradient_accumulation_steps: int
    token_budget: int | None
    gpu_memory_gib: float | None
    notes: list[str]


class EstimateTraining(BaseModel):
    """Optimizer steps, tokens, time and cost, with what they rest on."""

    model_config = ConfigDict(extra="forbid")

    optimizer_steps: int
    examples_per_step: int
    tokens: int
    tokens_per_s: int
    hours: float
    cost_usd: float
    price_per_hour_usd: float
    basis: str


class Capacities(BaseModel):
    """Where a stage would load the base model on each EvaluatorPublisherCapacity, or what
    does not fit."""

    model_config = ConfigDict(extra="forbid")

    Fargate: str  # noqa: N815 - the stack parameter's value
    Gpu: str  # noqa: N815 - the stack parameter's value


class EstimateStages(BaseModel):
    """The evaluator's and the publisher's placement on the stack's capacities."""

    model_config = ConfigDict(extra="forbid")

    evaluate: Capacities
    publish: Capacities
    basis: str


class EstimateBedrock(BaseModel):
    """Bedrock's cost per active hour of the imported model."""

    model_config = ConfigDict(extra="forbid")

    custom_model_units: int
    cost_per_active_hour_usd: float
    weights_gb_bf16: float
    basis: str


class Estimate(BaseModel):
    """Training time and cost on a g5 instance, where the later stages fit, and Bedrock's
    cost; every figure with its basis."""

    model_config = ConfigDict(extra="forbid")

    instance_type: str
    gpus: int
    processes: int
    dataset: EstimateDataset
    plan: EstimatePlan
    training: EstimateTraining
    stages: EstimateStages
    bedrock: EstimateBedrock


class Health(BaseModel):
    """A liveness or readiness answer."""

    status: Literal["ok", "ready"]


class DatasetUpload(BaseModel):
    """A dataset file put into the object store."""

    location: str = Field(description="Its store URI: give it as dataset.source.")
    sha256: str = Field(description="SHA-256 of the file (part of the location).")
    bytes: int


class ModelFileUpload(BaseModel):
    """One file of a model folder put into the object store."""

    path: str
    sha256: str
    bytes: int


class ModelFile(BaseModel):
    """One file of a model folder's manifest."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=700, description="Path inside the folder, /-separated.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lowercase hex SHA-256.")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_model_path(value)


class ModelManifest(BaseModel):
    """Every file of a model folder and its SHA-256: finishes its upload."""

    model_config = ConfigDict(extra="forbid")

    files: list[ModelFile] = Field(min_length=1, max_length=1000)

    @field_validator("files")
    @classmethod
    def _once_each(cls, value: list[ModelFile]) -> list[ModelFile]:
        paths = [f.path for f in value]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is named twice")
        return value

    def by_path(self) -> dict[str, str]:
        """The files as path -> SHA-256."""
        return {f.path: f.sha256 for f in self.files}


class ModelUpload(BaseModel):
    """A model folder whose upload is finished: give ``location`` as base_model."""

    location: str = Field(description="Its store URI: give it as base_model.")
    digest: str = Field(description="SHA-256 over the sorted '<file> <sha256>' lines.")
    files: dict[str, str] = Field(description="Each file and its SHA-256.")
    bytes: int


# -- a published model's answers: the shape of the request it answers (Bedrock's) ------


class InvokeResponse(BaseModel):
    """Bedrock's completion response for imported models."""

    generation: str
    prompt_token_count: int
    generation_token_count: int
    stop_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    index: int = 0
    finish_reason: Literal["stop", "length"]


class CompletionChoice(_Choice):
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class _OpenAIResponse(BaseModel):
    model: str
    usage: Usage


class CompletionResponse(_OpenAIResponse):
    """OpenAI's completion response."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatResponse(_OpenAIResponse):
    """OpenAI's chat completions response."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


AnyResponse = InvokeResponse | CompletionResponse | ChatResponse


def invoke_response_shape(body: dict[str, Any]) -> type[BaseModel]:
    """The answer's model for an invoke request ``body``, as the API picks its shape: chat
    messages get a chat completion, ``max_tokens`` an OpenAI completion, the rest Bedrock's
    completion."""
    if "messages" in body:
        return ChatResponse
    return CompletionResponse if "max_tokens" in body else InvokeResponse
