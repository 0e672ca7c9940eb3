"""Settings every service shares, read from ``TERMTUNE_*`` environment variables.

The defaults are the embedded setup: kombu's ``filesystem://`` broker, a local folder
store and an SQLite ledger, all under ``./var``. Deployments set ``TERMTUNE_BROKER_URL``
(``amqp://...``, ``sqs://``), ``TERMTUNE_STORE_URL`` (``s3://bucket/prefix``) and
``TERMTUNE_DATABASE_URL`` (``postgresql+psycopg://...``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Environment-driven settings of any termtune process."""

    # Errors name the variable, never its value (it may be a password).
    model_config = SettingsConfigDict(
        env_prefix="TERMTUNE_", extra="ignore", hide_input_in_errors=True
    )

    environment: Literal["development", "production"] = Field(
        "development", description="production refuses development shortcuts."
    )
    var_dir: Path = Field(Path("var"), description="Root of the embedded broker and store.")
    broker_url: str = Field("filesystem://", description="kombu broker URL.")
    store_url: str = Field("", description="file:///path or s3://bucket/prefix (default: var).")
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the job ledger: sqlite:///path (default: var/termtune.db) "
        "or postgresql+psycopg://user@host:5432/db.",
    )
    database_password: str | None = Field(
        None,
        repr=False,
        description="Password put into database_url (kept apart so it can come from a secret).",
    )
    database_password_secret: str | None = Field(
        None,
        description="AWS Secrets Manager secret (ARN or name) holding the database password: "
        "a JSON object's 'password' (RDS's managed secret) or the whole text. Read when a "
        "connection opens and again when the database refuses it, so a rotated password is "
        "taken up without a restart. Set this or database_password, not both.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO...).")
    s3_credentials_file: Path | None = Field(
        None,
        description="A shared-credentials file (the AWS CLI's format, profile 'default') with "
        "the key the store's S3 clients sign with; compose's s3-init writes the app's "
        "least-privilege key there. Unset: boto3's own chain (the task role on ECS, AWS_* "
        "variables).",
    )
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated buckets datasets may come from."
    )
    allowed_paths: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated local folders datasets may come from (none set: any "
        "local path in development, none in production).",
    )
    exchange: str = Field("termtune", description="Name prefix of exchanges and queues.")
    max_attempts: int = Field(3, ge=1, description="Deliveries before a message is dead.")
    amqp_queue_type: Literal["quorum", "classic"] = Field(
        "quorum",
        description="RabbitMQ queue type: quorum (replicated; the broker dead-letters a "
        "message redelivered past amqp_delivery_limit) or classic (for queues an earlier "
        "termtune declared: RabbitMQ refuses to declare a queue again with another type).",
    )
    amqp_delivery_limit: int = Field(
        10,
        ge=1,
        description="Quorum queues: deliveries after which RabbitMQ itself dead-letters a "
        "message (one that kills its worker every time, before it can count an attempt).",
    )
    poll_seconds: float = Field(1.0, gt=0, description="Worker wait for a message per poll.")
    lease_seconds: float = Field(
        60.0, gt=0, description="Life of a stage lease; renewed every third of it."
    )
    reconcile_seconds: float = Field(
        15.0, gt=0, description="How often the control plane re-sends jobs whose lease expired."
    )
    database_patience_seconds: float = Field(
        120.0,
        ge=0,
        description="How long a worker waits for an unavailable job database before it "
        "hands the command back to the queue.",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Log lines as JSON objects or text; auto: text on a terminal, else JSON.",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A stage service's Prometheus metrics port (0: none; the API serves "
        "/metrics on its own port).",
    )
    tracking: Literal["none", "mlflow", "tensorboard", "wandb"] = Field(
        "none", description="Experiment tracking of jobs whose spec leaves tracking.backend unset."
    )
    tracking_live_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds between sends of a training job's curves to its run while it "
        "trains (the rest when the stage ends).",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server (http://host:5000) the stages log runs to and "
        "register models in.",
    )
    mlflow_ui_url: str | None = Field(
        None,
        description="Base of the run links the web page and CLI show (default: the tracking "
        "URI when it is http(s)).",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="W&B runs (tracking.backend: wandb): offline writes each stage's run files "
        "to the store (jobs/<id>/tracking/wandb/, for wandb beta sync); online also streams "
        "them to the W&B server of the client's WANDB_API_KEY and WANDB_BASE_URL.",
    )
    wandb_project: str = Field(
        "termtune",
        min_length=1,
        max_length=128,
        pattern=r"^[^/\\#?%:]+$",
        description="W&B project of the jobs' runs.",
    )
    wandb_entity: str | None = Field(
        None, description="W&B entity (user or team) of the runs (default: the key's own)."
    )
    sqs_region: str | None = Field(None, description="SQS region (default: AWS_DEFAULT_REGION).")
    sqs_visibility_seconds: int = Field(
        900,
        ge=2,
        le=43200,
        description="SQS visibility timeout; a leased worker extends it while it works.",
    )
    sqs_is_secure: bool = Field(True, description="HTTPS to SQS (false for a local stand-in).")

    @field_validator("allowed_buckets", "allowed_paths", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _one_password_source(self) -> Settings:
        if self.database_password and self.database_password_secret:
            raise ValueError(
                "set TERMTUNE_DATABASE_PASSWORD or TERMTUNE_DATABASE_PASSWORD_SECRET, not both"
            )
        return self

    def model_post_init(self, __context: object) -> None:
        """Resolve relative folders once, so every process agrees on them."""
        self.var_dir = self.var_dir.resolve()
        if not self.store_url:
            self.store_url = (self.var_dir / "store").as_uri()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.var_dir / 'termtune.db'}"

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem:// transport."""
        return self.var_dir / "broker"

    @property
    def run_dir(self) -> Path:
        """Folder of worker heartbeat files."""
        return self.var_dir / "run"

    @property
    def cache_dir(self) -> Path:
        """Folder where artifacts fetched from the store are cached."""
        return self.var_dir / "cache"


class ApiSettings(Settings):
    """Settings of the control plane."""

    api_key: str | None = Field(None, description="Bearer key clients must present.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    g5_prices: dict[str, float] = Field(
        default_factory=dict,
        description="USD/hour overrides of g5 on-demand prices for estimates, as JSON.",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body accepted (413 above)."
    )
    max_upload_bytes: int = Field(
        5 * 2**30,
        ge=1,
        description="Largest file accepted by /v1/uploads (one dataset file, one file of a "
        "model folder); streamed to disk, never held in memory (413 above).",
    )
    inference_max_batch: int = Field(
        8, ge=1, le=256, description="Concurrent invoke requests answered in one batch (1: off)."
    )
    inference_max_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest a local invoke generates; the answer is cut there (length).",
    )
    inference_batch_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="How long a lone invoke request waits for company."
    )


class BedrockSettings(BaseSettings):
    """Where and how the publisher imports models into Amazon Bedrock (``TERMTUNE_BEDROCK_*``).

    Deployment settings, not job settings: a job cannot pick another role or bucket.
    """

    model_config = SettingsConfigDict(env_prefix="TERMTUNE_BEDROCK_", extra="ignore")

    region: str = Field("us-east-1", description="AWS region of the import.")
    aws_profile: str | None = Field(
        None,
        description="AWS profile for Bedrock and its bucket, when the store's credentials "
        "are another account's (MinIO in compose).",
    )
    role_arn: str = Field("", description="Service role Bedrock assumes to read the bucket.")
    s3_uri: str = Field("", description="s3://bucket/prefix the importable folders go to.")
    endpoint_url: str | None = Field(None, description="Bedrock control-plane endpoint override.")
    runtime_endpoint_url: str | None = Field(None, description="bedrock-runtime endpoint override.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint override for the upload.")
    cmu_price_per_minute: float = Field(
        0.057, ge=0, description="USD per Custom Model Unit-minute (us-east-1, early 2026)."
    )
    poll_seconds: float = Field(15.0, gt=0, description="First wait between import polls.")
    poll_max_seconds: float = Field(120.0, gt=0, description="Longest wait between polls.")
    import_timeout_minutes: float = Field(120.0, gt=0, description="Give up on an import after.")
    quota_wait_minutes: float = Field(
        180.0,
        gt=0,
        description="How long to wait for the one-concurrent-import quota, and out throttling.",
    )
    role_retry_minutes: float = Field(
        5.0, ge=0, description="How long a freshly created role may be reported invalid."
    )
    not_ready_retries: int = Field(10, ge=0, description="Invoke tries while the model warms up.")
    not_ready_wait_seconds: float = Field(30.0, ge=0, description="Wait between those tries.")
    read_timeout_seconds: int = Field(300, ge=1, description="Invoke read timeout.")
    upload_concurrency: int = Field(8, ge=1, le=64, description="Parallel parts per upload.")
    multipart_mb: int = Field(64, ge=5, description="Multipart threshold and part size (MB).")


def development_key(key_file: Path) -> str:
    """The development API key kept in ``key_file``, made on first use (random, and readable
    by its owner only from the first byte: the file is created with mode 0600)."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return key_file.read_text().strip()
