"""Experiment tracking: one run a job, from training to the registered model.

``tracking.backend`` (the spec's, else the deployment's ``TERMTUNE_TRACKING``, fixed when the
job is submitted) chooses where: ``mlflow`` (the deployment's MLflow server,
``mlflow_run``), ``tensorboard`` (event files in the store, ``tensorboard_run``), ``wandb``
(a Weights & Biases run written by W&B's own client, its files in the store, ``wandb_run``)
or ``none``. The trainer opens the job's run and logs the spec and the resolved plan as
parameters and the training curves by step, while it trains (``live``); the evaluator logs
both models' metrics with the change and its 95% interval, the gate's verdict and (MLflow,
W&B) the report; the publisher registers the export (MLflow: a version of the registry's
model of the published name, tagged with the job id, the folder's digest and, once
imported, the Bedrock model ARN; W&B: a model artifact with those as metadata) and ends the
run. The run's reference travels in the training manifest and the job's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import SpecError
from shared.jobs import job_prefix
from shared.jobspec import JobSpec
from shared.settings import Settings
from shared.store import Store
from shared.tracking import mlflow_run, tensorboard_run, wandb_run
from shared.tracking.base import JOB_TAG, TrackedRun, history_rows
from shared.tracking.live import LiveCurves

__all__ = [
    "JOB_TAG",
    "LiveCurves",
    "TrackedRun",
    "attach",
    "backend",
    "end_quietly",
    "history_rows",
    "resolve",
    "start",
]


def backend(spec: JobSpec, settings: Settings) -> str:
    """The job's tracking backend: the spec's, else the deployment's."""
    return spec.tracking.backend or settings.tracking


def resolve(spec: JobSpec, settings: Settings) -> JobSpec:
    """The spec as the job keeps it: its backend fixed now, refused if it cannot be used."""
    chosen = backend(spec, settings)
    if chosen == "mlflow" and not settings.mlflow_tracking_uri:
        raise SpecError(
            "tracking.backend is mlflow but this deployment has no MLflow server: set "
            "TERMTUNE_MLFLOW_TRACKING_URI (or choose tracking.backend: none or tensorboard)"
        )
    tracking = spec.tracking.model_copy(update={"backend": chosen})
    return spec.model_copy(update={"tracking": tracking})


def start(
    job_id: str, spec: JobSpec, settings: Settings, *, store: Store, folder: Path
) -> TrackedRun | None:
    """The job's run, opened by the trainer (None: not tracked). ``folder``: local scratch."""
    chosen = backend(spec, settings)
    if chosen == "mlflow":
        resolve(spec, settings)  # no server: refused, naming the setting
        return mlflow_run.open_run(job_id, spec, settings)
    if chosen == "tensorboard":
        prefix = f"{job_prefix(job_id)}/{tensorboard_run.PREFIX}"
        return tensorboard_run.TensorBoardRun(store, prefix, folder, "train")
    if chosen == "wandb":
        group = spec.tracking.experiment or spec.name
        return wandb_run.open_run(job_id, group, settings, store=store, folder=folder)
    return None


def attach(
    ref: dict[str, Any] | None, settings: Settings, *, store: Store, folder: Path, stage: str
) -> TrackedRun | None:
    """The run the trainer opened, from its reference in the training manifest."""
    ref = ref or {}
    chosen = ref.get("backend")
    if chosen == "mlflow":
        return mlflow_run.attach_run(ref, settings)
    if chosen == "tensorboard":
        prefix = store.key_of(ref["location"])
        return tensorboard_run.TensorBoardRun(store, prefix, folder, stage)
    if chosen == "wandb":
        return wandb_run.attach_run(ref, settings, store=store, folder=folder, stage=stage)
    return None


def end_quietly(job_id: str, spec: JobSpec, settings: Settings, status: str) -> None:
    """The job failed (FAILED) or was cancelled (KILLED) in a stage: its MLflow run, if it
    has one, ends so; its W&B run, if this process has it open, ends failed. Never raises:
    the job's own error is what the stage reports."""
    chosen = backend(spec, settings)
    if chosen == "mlflow" and settings.mlflow_tracking_uri:
        mlflow_run.end_quietly(job_id, spec, settings, status)
    elif chosen == "wandb":
        wandb_run.end_open(job_id, status)
