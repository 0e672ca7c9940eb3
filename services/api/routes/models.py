"""/v1/models: published models — invoke in Bedrock's shape, delete — and /v1/imported-models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from services.api.deps import BedrockDep, JobsDep, ModelsDep
from services.api.routing import UniqueKeysRoute
from services.api.shapes import AnyRequest, AnyResponse, check_served
from shared.api_models import ImportedModelList, ModelDeleted, ModelEntry, ModelList
from shared.errors import ModelError, NotFound

router = APIRouter(tags=["models"], route_class=UniqueKeysRoute)


def _entry(jobs: JobsDep, name: str) -> dict[str, Any]:
    try:
        return jobs.model(name)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc


@router.get("/models")
def list_models(jobs: JobsDep) -> ModelList:
    """Every published model."""
    return ModelList.model_validate({"data": jobs.models()})


@router.get("/models/{name}")
def get_model(name: str, jobs: JobsDep) -> ModelEntry:
    """One published model."""
    return ModelEntry.model_validate(_entry(jobs, name))


@router.post("/models/{name}/invoke")
def invoke_model(
    name: str, request: AnyRequest, jobs: JobsDep, models: ModelsDep, imported: BedrockDep
) -> AnyResponse:
    """Ask a published model in any shape Bedrock serves imported models in (Bedrock
    completion, OpenAI completion, OpenAI chat completions; the answer comes in the
    request's): served here (local) or through bedrock-runtime (bedrock)."""
    entry = _entry(jobs, name)
    try:
        check_served(request, entry.get("family"), name)
        if entry.get("target") == "bedrock":
            return imported.invoke(entry, request)
        return models.invoke(name, request)
    except ModelError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc


@router.delete("/models/{name}")
def delete_model(name: str, jobs: JobsDep, models: ModelsDep, imported: BedrockDep) -> ModelDeleted:
    """Delete a published model; an imported one is deleted in Bedrock first (it costs)."""
    entry = _entry(jobs, name)
    deleted_arn = imported.delete(entry) if entry.get("target") == "bedrock" else None
    models.forget(name)
    if not jobs.delete_model(name, job_id=str(entry.get("job_id", ""))):
        raise HTTPException(  # what was deleted in Bedrock was the entry read above
            status.HTTP_409_CONFLICT,
            f"model {name!r} was published again by another job while being deleted: "
            f"the new one stays (deleted: the earlier job {entry.get('job_id')!r}'s)",
        )
    return ModelDeleted(deleted=name, imported_model_arn=deleted_arn)


@router.get("/imported-models")
def list_imported(jobs: JobsDep, imported: BedrockDep) -> ImportedModelList:
    """Every model imported into Bedrock in the account and region, marking termtune's."""
    ours = {m["bedrock"]["imported_model_arn"]: m["name"] for m in jobs.models() if "bedrock" in m}
    found = [{**m, "termtune_model": ours.get(m["modelArn"])} for m in imported.imported()]
    return ImportedModelList.model_validate({"data": found})
