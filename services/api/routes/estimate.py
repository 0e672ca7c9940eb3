"""/v1/estimate: training time and cost on a g5 instance, and Bedrock's cost, before spending."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from services.api.deps import JobsDep, SettingsDep
from services.api.routing import UniqueKeysRoute
from shared.api_models import Estimate
from shared.basemodel import base_model_config
from shared.errors import NotFound, SpecError
from shared.estimate import G5_INSTANCES, Prices, estimate
from shared.jobspec import parse_spec
from shared.settings import BedrockSettings
from shared.trainplan import model_shape

router = APIRouter(tags=["estimate"], route_class=UniqueKeysRoute)


class EstimateRequest(BaseModel):
    """A job whose dataset is prepared, the instance to price, and optional spec changes."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(..., min_length=1, max_length=96, description="A job past data-prep.")
    instance_type: str = Field("g5.xlarge", max_length=32, description="A g5 instance type.")
    spec: dict[str, Any] | None = Field(
        None, description="A spec to price instead of the job's (same dataset), e.g. more epochs."
    )


@router.post("/estimate")
def estimate_job(request: EstimateRequest, jobs: JobsDep, settings: SettingsDep) -> Estimate:
    """Estimate from the prepared dataset's token counts; every figure names its basis."""
    try:
        spec = jobs.spec(request.job_id)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    dataset = jobs.manifest(request.job_id, "prepare")
    if dataset is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {request.job_id!r} has no prepared dataset yet; estimate after data-prep",
        )
    try:
        if request.spec is not None:
            spec = parse_spec(request.spec, source="spec")
        prices = Prices(
            instances={
                name: (gpus, settings.g5_prices.get(name, price))
                for name, (gpus, price) in G5_INSTANCES.items()
            },
            cmu_price_per_minute=BedrockSettings().cmu_price_per_minute,
        )
        result = estimate(
            spec,
            dataset,
            instance_type=request.instance_type,
            shape=model_shape(
                base_model_config(spec.base_model, store=jobs.store, cache_dir=settings.cache_dir)
            ),
            prices=prices,
        )
    except SpecError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return Estimate.model_validate(result)
