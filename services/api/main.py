"""Builds the control plane app and serves it; nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.api.deps import require_api_key
from services.api.inference import BedrockModels, LocalModels
from services.api.middleware import (
    BodyLimit,
    Metrics,
    RedactSecrets,
    RequireKey,
    SecurityHeaders,
)
from services.api.routes import estimate, health, jobs, metrics, models, uploads, web
from shared.bus import Bus
from shared.errors import BedrockError, Conflict, NotFound, PermanentError, TermtuneError
from shared.jobs import open_records
from shared.lifetime import end_with_launcher
from shared.logs import configure_logging
from shared.outbox import Relay
from shared.reconciler import Reconciler
from shared.settings import ApiSettings, development_key

log = logging.getLogger(__name__)


def resolve_api_key(settings: ApiSettings) -> str:
    """The configured key; in development only, a generated one when none is set."""
    if settings.api_key:
        return settings.api_key
    if settings.environment != "development":
        raise SystemExit("TERMTUNE_API_KEY must be set outside development")
    key_file = settings.run_dir / "api_key"
    log.warning("TERMTUNE_API_KEY not set: the development key is in %s", key_file)
    return development_key(key_file)


def create_app(settings: ApiSettings | None = None, *, bus: Bus | None = None) -> FastAPI:
    """The FastAPI app wired to the store, database and bus the settings name."""
    settings = settings or ApiSettings()
    job_records = open_records(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.bus.declare()
        relay = Relay(job_records, app.state.bus)  # the outbox, published
        reconciler = Reconciler(job_records, every=settings.reconcile_seconds, settings=settings)
        relay.start()
        relay.kick()  # what was recorded while no relay ran (a broker outage, a restart)
        reconciler.start()
        yield
        reconciler.stop()
        relay.stop()
        app.state.bus.close()

    app = FastAPI(
        title="termtune",
        version="0.1.0",
        lifespan=lifespan,
        description="Teach a seq2seq model a field's terms and ship it to Bedrock.",
    )
    app.state.settings = settings
    app.state.api_key = resolve_api_key(settings)
    app.state.jobs = job_records
    app.state.bus = bus or Bus(settings)
    app.state.models = LocalModels(
        job_records,
        settings,
        max_batch=settings.inference_max_batch,
        wait_s=settings.inference_batch_wait_ms / 1000,
        max_seconds=settings.inference_max_seconds,
    )
    app.state.bedrock = BedrockModels()
    app.state.metrics = app_metrics = Metrics(job_records)
    app.include_router(health.router)
    app.include_router(web.router)
    app.include_router(metrics.router, dependencies=[Depends(require_api_key)])
    for router in (jobs.router, models.router, estimate.router, uploads.router):
        app.include_router(router, prefix="/v1", dependencies=[Depends(require_api_key)])
    app.add_middleware(lambda app: app_metrics.middleware(app))  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes, streamed=("/v1/uploads/",))
    app.add_middleware(RequireKey, key=app.state.api_key)  # before any body is read
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, refusals included

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's shape, without echoing the input: a NaN or infinity there is not JSON
        errors = [{k: e[k] for k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(TermtuneError)
    async def _termtune_error(_: Request, exc: TermtuneError) -> JSONResponse:
        code = 422 if isinstance(exc, PermanentError) else 503
        if isinstance(exc, BedrockError):
            code = 502  # Bedrock refused; the body says what to fix
        if isinstance(exc, Conflict):
            code = 409
        if isinstance(exc, NotFound):
            code = 404
        return JSONResponse({"detail": str(exc), "type": type(exc).__name__}, status_code=code)

    return app


def main() -> int:
    """Serve the control plane with uvicorn."""
    import uvicorn

    settings = ApiSettings()
    end_with_launcher()
    handler = configure_logging("api", level=settings.log_level, log_format=settings.log_format)
    handler.addFilter(RedactSecrets())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through the handler above (format, redaction)
    )
    return 0
