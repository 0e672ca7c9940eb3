"""The order of stages: which command follows which event."""

from __future__ import annotations

from shared.messages import (
    Command,
    DatasetPrepared,
    EvaluateModel,
    Event,
    ModelEvaluated,
    ModelTrained,
    PrepareDataset,
    PublishModel,
    TrainModel,
)


def next_command(command: Command, event: Event) -> Command | None:
    """The command that continues a job after ``event`` answered ``command``; None at the end."""
    base = {"job_id": command.job_id, "spec_uri": command.spec_uri}
    if isinstance(event, DatasetPrepared):
        return TrainModel(**base, dataset_manifest=event.manifest)
    if isinstance(event, ModelTrained) and isinstance(command, TrainModel):
        return EvaluateModel(
            **base, dataset_manifest=command.dataset_manifest, training_manifest=event.manifest
        )
    if isinstance(event, ModelEvaluated) and isinstance(command, EvaluateModel) and event.publish:
        return PublishModel(
            **base,
            dataset_manifest=command.dataset_manifest,
            training_manifest=command.training_manifest,
            evaluation_manifest=event.manifest,
        )
    return None


def resume_command(job_id: str, spec_uri: str, manifests: dict[str, str | None]) -> Command:
    """The command of the first stage without a manifest (``manifests``: stage → URI)."""
    base = {"job_id": job_id, "spec_uri": spec_uri}
    dataset, training, evaluation = (manifests.get(s) for s in ("prepare", "train", "evaluate"))
    if dataset is None:
        return PrepareDataset(**base)
    if training is None:
        return TrainModel(**base, dataset_manifest=dataset)
    if evaluation is None:
        return EvaluateModel(**base, dataset_manifest=dataset, training_manifest=training)
    return PublishModel(
        **base,
        dataset_manifest=dataset,
        training_manifest=training,
        evaluation_manifest=evaluation,
    )
