"""The Weights & Biases backend: the job's run written by W&B's own client, its files in the
store.

Each stage resumes the job's run (its id is the job id, its name the job id, its group the
job's name) with ``wandb.init(resume="allow")`` and finishes it when the stage ends, the way W&B
runs resumed by several processes work. ``TERMTUNE_WANDB_MODE=offline`` (the default) needs no
W&B server: the client writes the run's records (``run-<id>.wandb``) and files into a local
folder, and the stage stores that folder under ``jobs/<id>/tracking/wandb/``, one folder a
stage and attempt; ``wandb beta sync`` uploads them later, in order, as one run.
``online`` streams the run to the W&B server the client's own environment names
(``WANDB_API_KEY``, ``WANDB_BASE_URL``) while the stage runs, and stores the same folder.

The training curves are history with their own x axis, ``train/step`` (``define_metric``), so
a point logged after a later one is kept. Evaluation scalars, the gate's verdict and the tags
go to the run's summary; the report's files are the run's files, its samples a table, its
page an HTML panel. The export is a ``model`` artifact referring to the export's location
(no copy of the weights), with the job id, digest and Bedrock ARN as metadata; online it is
also linked into the W&B registry's collection of the model's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.errors import TrackingUnavailable
from shared.jobs import job_prefix
from shared.settings import Settings
from shared.store import Store
from shared.tracking.base import TrackedRun, flatten

log = logging.getLogger(__name__)

PREFIX = "tracking/wandb"
#: the training curves' x axis (an optimizer step)
STEP = "train/step"
#: the W&B registry collections models are linked into (online)
REGISTRY = "wandb-registry-model"

#: this process's open runs, by job id: a stage that fails ends its run (``end_open``)
_open: dict[str, WandbRun] = {}
_open_lock = threading.Lock()


@contextlib.contextmanager
def _calls(what: str) -> Iterator[None]:
    """W&B's errors (a refused key, an unreachable server) as TrackingUnavailable."""
    import wandb

    try:
        yield
    except (wandb.Error, OSError) as exc:
        raise TrackingUnavailable(f"W&B: {what} failed: {exc}") from exc


class WandbRun(TrackedRun):
    """One stage's part of the job's W&B run."""

    backend = "wandb"

    #: the shortest time between two copies of the run's folder to the store while it trains
    SYNC_EVERY_S = 60.0

    def __init__(
        self,
        store: Store,
        prefix: str,
        folder: Path,
        stage: str,
        *,
        job_id: str,
        project: str,
        entity: str | None,
        group: str,
        mode: str,
        home: Path,
    ) -> None:
        self.store, self.prefix, self.folder, self.stage = store, prefix, folder, stage
        self.job_id, self.project, self.entity, self.group = job_id, project, entity, group
        self.mode, self.home = mode, home
        self._pending_model: Any = None
        self._synced_at = time.monotonic()
        self._lock = threading.Lock()
        with _open_lock:
            earlier = _open.pop(job_id, None)
        if earlier is not None:  # an attempt of this process that failed without ending it
            with contextlib.suppress(Exception):
                earlier._finish(1)
        self.run = self._init()
        # The part's folder in the store: the client's kind of folder (offline-run, or run
        # when it streamed online), then the time to the nanosecond and the stage, so parts
        # (stages, attempts; any host) never share a name and sort in the order they began.
        kind = "offline-run" if self.run_dir.name.startswith("offline-") else "run"
        self.part = f"{kind}-{time.time_ns():020d}-{stage}"
        self.url = self.run.url if mode == "online" else None
        with _open_lock:
            _open[job_id] = self

    def _init(self) -> Any:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        for name in ("CONFIG", "CACHE", "DATA"):  # not $HOME, which may be read-only
            os.environ.setdefault(f"WANDB_{name}_DIR", str(self.home / name.lower()))
        settings = wandb.Settings(
            console="off",  # the stage's logs are its own (TERMTUNE_LOG_FORMAT)
            silent=True,
            reinit="create_new",  # one process may run stages of several jobs at once
            disable_git=True,
            save_code=False,
        )
        with _calls(f"opening run {self.job_id!r}"):
            run = wandb.init(
                project=self.project,
                entity=self.entity,
                id=self.job_id,
                name=self.job_id,
                group=self.group,
                job_type=self.stage,
                resume="allow",
                mode=self.mode,
                dir=str(self.folder),
                settings=settings,
            )
            run.define_metric(STEP, hidden=True)
            run.define_metric("train/*", step_metric=STEP)
        return run

    @property
    def run_dir(self) -> Path:
        """The client's folder of this stage's part of the run (``files/`` is ``run.dir``)."""
        return Path(self.run.dir).parent

    def ref(self) -> dict[str, Any]:
        return {
            "backend": "wandb",
            "run_id": self.job_id,
            "project": self.project,
            "entity": self.entity,
            "group": self.group,
            "location": self.store.uri(self.prefix),
            "url": self.url,
        }

    def log_params(self, params: dict[str, Any]) -> None:
        with self._lock, _calls("logging the parameters"):
            self.run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, rows: list[tuple[str, float, int]]) -> None:
        """Training curves (``train/...``) as history against ``train/step``, one entry a
        step; anything else (evaluation, the gate) into the run's summary."""
        by_step: dict[int, dict[str, float]] = {}
        summary: dict[str, float] = {}
        for name, value, step in rows:
            if name.startswith("train/"):
                by_step.setdefault(int(step), {})[name] = float(value)
            else:
                summary[name] = float(value)
        with self._lock, _calls("logging metrics"):
            for step in sorted(by_step):
                self.run.log({**by_step[step], STEP: step})
            if summary:
                self.run.summary.update(summary)

    def sync(self) -> None:
        """The run's folder as the client has written it so far, copied to the store (not
        more often than every ``SYNC_EVERY_S``; the client writes its records in blocks)."""
        if time.monotonic() - self._synced_at >= self.SYNC_EVERY_S:
            self._store_folder()

    def logged(self, names: set[str]) -> set[tuple[str, int]]:
        """The (name, step) curve points of ``names`` in the run's stored records (an
        earlier attempt's included)."""
        held: set[tuple[str, int]] = set()
        for key in self.store.list(self.prefix):
            if key.endswith(".wandb"):
                for entry in history(self.store.get_bytes(key)):
                    if STEP in entry:
                        held |= {(n, int(entry[STEP])) for n in entry if n in names}
        return held

    def log_text(self, artifact_file: str, text: str) -> None:
        """A file of the run (W&B's Files tab); an HTML page also as a panel."""
        import wandb

        self._save(artifact_file, text)
        if artifact_file.endswith(".html"):
            with self._lock, _calls(f"logging {artifact_file}"):
                self.run.summary[artifact_file.removesuffix(".html")] = wandb.Html(text)

    def log_dict(self, artifact_file: str, data: Any) -> None:
        """A JSON file of the run; a list of records (the samples) also as a table."""
        self._save(artifact_file, json.dumps(data, indent=2, default=str))
        if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            with self._lock, _calls(f"logging {artifact_file}"):
                self.run.summary[artifact_file.removesuffix(".json")] = _table(data)

    def _save(self, artifact_file: str, text: str) -> None:
        path = Path(self.run.dir) / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        with self._lock, _calls(f"saving {artifact_file}"):
            self.run.save(str(path), base_path=self.run.dir, policy="now")

    def set_tags(self, tags: dict[str, str]) -> None:
        """Key-value tags (the gate's verdict, where the model went) in the run's summary."""
        with self._lock, _calls("tagging the run"):
            self.run.summary.update(tags)

    def register(
        self, name: str, location: str, folder: Path, tags: dict[str, str]
    ) -> dict[str, Any]:
        """The export as a ``model`` artifact of ``name`` that refers to its location (the
        weights stay where they are; W&B lists the files of one on local disk), logged when
        the stage ends so the Bedrock ARN (``tag_version``) is in its metadata; the model
        card a file of the run."""
        import wandb

        with _calls(f"registering model {name!r}"):
            artifact = wandb.Artifact(name, type="model", metadata={**tags, "location": location})
            artifact.add_reference(location, name="export", checksum=False)
        card = folder / "README.md"
        if card.is_file():  # a run file: an artifact's own files wait outside the run's folder
            self._save("model/README.md", card.read_text())
        self._pending_model = artifact
        return {"name": name, "version": None, "alias": self.job_id, "source": location}

    def tag_version(self, registered: dict[str, Any] | None, tags: dict[str, str]) -> None:
        if registered is not None and self._pending_model is not None:
            self._pending_model.metadata.update(tags)

    def _log_model(self) -> None:
        artifact, self._pending_model = self._pending_model, None
        if artifact is None:
            return
        aliases = [self.job_id, "latest"]
        with _calls(f"logging model {artifact.name!r}"):
            if self.mode == "online":  # W&B's registry lives on its server
                self.run.link_artifact(artifact, f"{REGISTRY}/{artifact.name}", aliases=aliases)
            else:
                self.run.log_artifact(artifact, aliases=aliases)

    def finish_stage(self) -> None:
        self._finish(0)

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED, FAILED or KILLED (in the summary; W&B marks the run failed unless
        FINISHED)."""
        with self._lock, _calls("ending the run"):
            self.run.summary["termtune.status"] = status
        self._finish(0 if status == "FINISHED" else 1)

    def _finish(self, exit_code: int) -> None:
        with _open_lock:
            _open.pop(self.job_id, None)
        try:
            self._log_model()
        finally:
            try:
                with self._lock, _calls("finishing the stage's part of the run"):
                    self.run.finish(exit_code=exit_code)
            finally:  # what the client wrote is stored even when W&B's server refused it
                self._written()
                self._store_folder()

    def _written(self, timeout: float = 30.0) -> None:
        """Wait until W&B's service has written the part's records out: ``run.finish()``
        returns before the service closes the file, whose last block (the exit record in
        it) comes on closing. Done when the exit record is there and the file has stopped
        growing; after ``timeout`` what is there is stored, with a warning."""
        path = next(self.run_dir.glob("*.wandb"), None)
        if path is None:  # the client wrote nothing: nothing to wait for
            return
        deadline, seen = time.monotonic() + timeout, -1
        while time.monotonic() < deadline:
            size = path.stat().st_size
            if size == seen and _closed(path.read_bytes()):
                return
            seen = size
            time.sleep(0.05)
        log.warning("W&B run %s: %s not complete after %.0f s", self.job_id, path, timeout)

    def _store_folder(self) -> None:
        """The stage's run folder (records and files; not the client's debug logs)."""
        with self._lock:
            self._synced_at = time.monotonic()
            base = self.run_dir
            for path in sorted(p for p in base.rglob("*") if p.is_file()):
                relative = path.relative_to(base)
                if relative.parts[0] not in ("logs", "tmp"):
                    self.store.upload_file(path, f"{self.prefix}/{self.part}/{relative}")


def open_run(
    job_id: str, group: str, settings: Settings, *, store: Store, folder: Path
) -> WandbRun:
    """The job's run, opened by the trainer (``group``: the spec's experiment or name)."""
    prefix = f"{job_prefix(job_id)}/{PREFIX}"
    return _run(job_id, group, None, settings, store, prefix, folder, "train")


def attach_run(
    ref: dict[str, Any], settings: Settings, *, store: Store, folder: Path, stage: str
) -> WandbRun:
    """The run the trainer opened, resumed by a later stage from its reference."""
    prefix = store.key_of(ref["location"])
    return _run(ref["run_id"], ref["group"], ref, settings, store, prefix, folder, stage)


def _run(
    job_id: str,
    group: str,
    ref: dict[str, Any] | None,
    settings: Settings,
    store: Store,
    prefix: str,
    folder: Path,
    stage: str,
) -> WandbRun:
    return WandbRun(
        store,
        prefix,
        folder,
        stage,
        job_id=job_id,
        project=ref["project"] if ref else settings.wandb_project,
        entity=ref["entity"] if ref else settings.wandb_entity,
        group=group_of(group),
        mode=settings.wandb_mode,
        home=settings.cache_dir / "wandb",
    )


def end_open(job_id: str, status: str) -> None:
    """The job failed or was cancelled in a stage of this process: its part of the run ends
    so (failed, with ``termtune.status``) and is stored. Never raises."""
    with _open_lock:
        run = _open.get(job_id)
    if run is not None:
        with contextlib.suppress(Exception):
            run.end(status)


def _table(rows: list[dict[str, Any]]) -> Any:
    import wandb

    columns = list(dict.fromkeys(k for r in rows for k in r))
    data = [[_cell(r.get(c)) for c in columns] for r in rows]
    return wandb.Table(columns=columns, data=data)


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, default=str)


def group_of(name: str) -> str:
    """A W&B group for the job's name (its experiment)."""
    return re.sub(r"[^A-Za-z0-9 ._/-]", "-", name)[:128]


# The records of a ``.wandb`` file: W&B's header (":W&B", 0xBEE1, version 0), then the
# LevelDB log format (32 KiB blocks of records: CRC, length, type FULL/FIRST/MIDDLE/LAST),
# each record one ``wandb.internal.Record`` protobuf.
_BLOCK, _HEADER, _RECORD = 32768, 7, struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(data: bytes) -> Iterator[Any]:
    """The ``Record`` messages of a ``.wandb`` file's bytes; a record cut short (the file
    copied while the client wrote it, or a killed writer) ends them."""
    from wandb.proto.wandb_internal_pb2 import Record

    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    at, parts = _HEADER, b""
    while at + _RECORD.size <= len(data):
        room = _BLOCK - at % _BLOCK
        if room < _RECORD.size:  # a block's tail too short for a header is padding
            at += room
            continue
        _, length, kind = _RECORD.unpack_from(data, at)
        body = data[at + _RECORD.size : at + _RECORD.size + length]
        if kind == 0 or len(body) < length:
            break
        at += _RECORD.size + length
        if kind in (_FIRST, _MIDDLE):
            parts = (parts if kind == _MIDDLE else b"") + body
            continue
        body, parts = (parts + body if kind == _LAST else body), b""
        yield Record.FromString(body)


def _closed(data: bytes) -> bool:
    """The file holds its exit record (written when the client's service closes it)."""
    try:
        return any(record.HasField("exit") for record in records(data))
    except ValueError:  # not even its header yet
        return False


def history(data: bytes) -> Iterator[dict[str, Any]]:
    """Each history entry of a ``.wandb`` file's bytes, as {name: value}."""
    for record in records(data):
        if record.HasField("history"):
            yield {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }


def summary(data: bytes) -> dict[str, Any]:
    """The run's summary as the file leaves it (each update applied in order)."""
    found: dict[str, Any] = {}
    for record in records(data):
        if record.HasField("summary"):
            for item in record.summary.update:
                found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found
