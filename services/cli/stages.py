"""Running one stage in-process, with the same handler code the services run."""

from __future__ import annotations

import importlib
from typing import Any

from shared.errors import PermanentError, SpecError
from shared.jobs import JobRecords, open_records
from shared.jobspec import JobSpec
from shared.messages import (
    STAGES,
    Command,
    EvaluateModel,
    Event,
    JobCancelled,
    JobPaused,
    PrepareDataset,
    PublishModel,
    Stage,
    StageFailed,
    TrainModel,
)
from shared.settings import Settings
from shared.stage import StageContext, run_stage

SERVICE_OF_STAGE = {
    "prepare": "dataprep",
    "train": "trainer",
    "evaluate": "evaluator",
    "publish": "publisher",
}


def command_for(stage: Stage, job_id: str, spec_uri: str, jobs: JobRecords) -> Command:
    """The command of a stage, pointing at the manifests of the stages before it."""
    needed = {
        "prepare": [],
        "train": ["prepare"],
        "evaluate": ["prepare", "train"],
        "publish": ["prepare", "train", "evaluate"],
    }[stage]
    uris: dict[str, str] = {}
    for earlier in needed:
        key = jobs.manifest_key(job_id, earlier)  # type: ignore[arg-type]
        if not jobs.store.exists(key):
            raise SpecError(
                f"job {job_id} has no {earlier} output yet: run "
                f"`termtune {earlier} SPEC --job {job_id}` first"
            )
        uris[earlier] = jobs.store.uri(key)
    base = {"job_id": job_id, "spec_uri": spec_uri}
    if stage == "prepare":
        return PrepareDataset(**base)
    if stage == "train":
        return TrainModel(**base, dataset_manifest=uris["prepare"])
    if stage == "evaluate":
        return EvaluateModel(
            **base, dataset_manifest=uris["prepare"], training_manifest=uris["train"]
        )
    return PublishModel(
        **base,
        dataset_manifest=uris["prepare"],
        training_manifest=uris["train"],
        evaluation_manifest=uris["evaluate"],
    )


def run_local(
    stage: Stage, spec: JobSpec, *, job_id: str | None = None, settings: Settings | None = None
) -> tuple[str, Event]:
    """Run one stage of a job in this process; the job id and the stage's event."""
    settings = settings or Settings()
    jobs = open_records(settings)
    job_id = job_id or f"{spec.name}-local"
    spec_uri = jobs.create(job_id, spec)
    if jobs.spec(job_id) != spec:
        raise SpecError(f"job {job_id} exists with a different spec; pass --job NEW_ID")
    handler: Any = importlib.import_module(f"services.{SERVICE_OF_STAGE[stage]}.handler").handle
    ctx = StageContext(store=jobs.store, jobs=jobs, settings=settings)
    event = run_stage(command_for(stage, job_id, spec_uri, jobs), handler, ctx)
    if isinstance(event, StageFailed):
        raise PermanentError(f"{stage} failed: {event.error}")
    following = STAGES.index(stage) + 1
    if following < len(STAGES) and not isinstance(event, JobCancelled):
        nxt = f"termtune {STAGES[following]} SPEC --job {job_id}"
        jobs.record(JobPaused(job_id=job_id, stage=stage, next=nxt))
    return job_id, event  # type: ignore[return-value]
