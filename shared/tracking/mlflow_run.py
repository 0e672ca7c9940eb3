"""The MLflow backend: the job's run on the deployment's tracking server, and a registry
version per export. Every call goes through MLflow's own client (its HTTP retries included);
a failure is a ``TrackingUnavailable``, which the worker retries like any unreachable
service."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import TrackingUnavailable
from shared.jobspec import JobSpec
from shared.settings import Settings
from shared.tracking.base import JOB_TAG, TrackedRun, flatten

log = logging.getLogger(__name__)

#: MLflow's limits on one log_batch call
_METRICS_PER_BATCH, _PARAMS_PER_BATCH = 1000, 100
#: a parameter's value is at most this long on every MLflow server termtune supports
_PARAM_CHARS = 500


@contextlib.contextmanager
def _calls(what: str) -> Iterator[None]:
    """MLflow's errors (and its unreachable server) as TrackingUnavailable, naming the call."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as exc:
        raise TrackingUnavailable(f"MLflow: {what} failed: {exc}") from exc


def _client(settings: Settings) -> Any:
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _already_exists(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


@dataclass
class MlflowRun(TrackedRun):
    """The job's MLflow run."""

    backend = "mlflow"

    client: Any
    run_id: str
    experiment_id: str
    url: str | None

    def ref(self) -> dict[str, Any]:
        """What the manifests and the job's result keep of the run."""
        return {
            "backend": "mlflow",
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "url": self.url,
        }

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened (``training.lora.r``); MLflow keeps the first value of each name."""
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:_PARAM_CHARS]) for k, v in flatten(params).items()]
        with _calls("logging parameters"):
            for i in range(0, len(flat), _PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=flat[i : i + _PARAMS_PER_BATCH])

    def log_metrics(self, rows: list[tuple[str, float, int]]) -> None:
        """(name, value, step) rows, in batches MLflow takes."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, step) for name, value, step in rows]
        with _calls("logging metrics"):
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i : i + _METRICS_PER_BATCH])

    def logged(self, names: set[str]) -> set[tuple[str, int]]:
        with _calls("reading the run's curves"):
            return {
                (name, metric.step)
                for name in names
                for metric in self.client.get_metric_history(self.run_id, name)
            }

    def log_text(self, artifact_file: str, text: str) -> None:
        with _calls(f"storing {artifact_file}"):
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, artifact_file: str, data: Any) -> None:
        with _calls(f"storing {artifact_file}"):
            self.client.log_dict(self.run_id, data, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        with _calls("tagging the run"):
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def register(self, name: str, location: str, folder: Path, tags: dict[str, str]) -> dict:
        """A version of ``name`` for this run's export (the same one again on a retry).

        An export in S3 is the version's source as it is; one on this machine's disk means
        nothing to the server's other users (and MLflow refuses local sources), so its folder
        is copied into the run's artifacts (``model/``) and the version points there.
        """
        with _calls(f"registering model {name!r}"):
            try:
                self.client.create_registered_model(name, tags={"termtune": "true"})
            except Exception as exc:
                if not _already_exists(exc):
                    raise
            found = self.client.search_model_versions(
                f"name = '{name}' and run_id = '{self.run_id}'"
            )
            if found:
                version = found[0]
            else:
                source = location
                if not location.startswith("s3://"):
                    self.client.log_artifacts(self.run_id, str(folder), "model")
                    source = f"runs:/{self.run_id}/model"
                version = self.client.create_model_version(
                    name, source=source, run_id=self.run_id, tags=tags
                )
        return {"name": name, "version": str(version.version), "source": version.source}

    def tag_version(self, registered: dict[str, Any] | None, tags: dict[str, str]) -> None:
        if registered is None:
            return
        with _calls(f"tagging model {registered['name']!r}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(
                    registered["name"], registered["version"], key, value
                )

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED: the job has ended."""
        with _calls("ending the run"):
            self.client.set_terminated(self.run_id, status)


def open_run(job_id: str, spec: JobSpec, settings: Settings) -> MlflowRun:
    """The job's run, created on first use and found again after (by its job id tag)."""
    client = _client(settings)
    name = experiment_name(spec)
    with _calls(f"opening experiment {name!r}"):
        experiment_id = _experiment(client, name)
        run_id = _find(client, experiment_id, job_id)
        if run_id is None:
            tags = {JOB_TAG: job_id, "termtune.job_name": spec.name}
            run_id = client.create_run(experiment_id, tags=tags, run_name=job_id).info.run_id
    return MlflowRun(client, run_id, experiment_id, _url(settings, experiment_id, run_id))


def attach_run(ref: dict[str, Any], settings: Settings) -> MlflowRun:
    """The run the trainer opened, from its reference."""
    if not settings.mlflow_tracking_uri:
        raise TrackingUnavailable(
            f"the job's MLflow run {ref['run_id']} cannot be reached: this service has no "
            "TERMTUNE_MLFLOW_TRACKING_URI"
        )
    return MlflowRun(_client(settings), ref["run_id"], ref["experiment_id"], ref.get("url"))


#: on a path that is already failing, MLflow is asked once, briefly: its own retries (7,
#: with backoff) would hold a failed stage or a cancel for minutes when the server is down
QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _quick() -> Iterator[None]:
    """MLflow's HTTP settings for one quick try (they are read at each request), restored."""
    import os

    before = {name: os.environ.get(name) for name in QUICK}
    os.environ.update(QUICK)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def end_quietly(job_id: str, spec: JobSpec, settings: Settings, status: str) -> None:
    """The job's run, if it has one, ends with ``status``; one quick try, never raises."""
    with _quick():
        _end(job_id, spec, settings, status)


def _end(job_id: str, spec: JobSpec, settings: Settings, status: str) -> None:
    try:
        client = _client(settings)
        found = client.get_experiment_by_name(experiment_name(spec))
        run_id = found and _find(client, found.experiment_id, job_id)
        if run_id:
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - tracking must not hide the job's failure
        log.warning("%s: could not mark its MLflow run %s: %s", job_id, status, exc)


def experiment_name(spec: JobSpec) -> str:
    return spec.tracking.experiment or f"termtune/{spec.name}"


def _find(client: Any, experiment_id: str, job_id: str) -> str | None:
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job_id}'", max_results=1
    )
    return found[0].info.run_id if found else None


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, tags={"termtune": "true"})
    except Exception as exc:  # another stage created it first
        if not _already_exists(exc):
            raise
        return client.get_experiment_by_name(name).experiment_id


def _url(settings: Settings, experiment_id: str, run_id: str) -> str | None:
    base = settings.mlflow_ui_url or settings.mlflow_tracking_uri or ""
    if not base.startswith(("http://", "https://")):
        return None
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
