"""A job's record: its state in the ledger (SQL), its artifacts in the object store.

    ledger  jobs          one row per job: spec, status, current stage, folded view
            events        the job's events, numbered 1, 2, 3... with no gaps
            leases        which worker runs a stage, until when (shared.leases)
            outbox        commands and events to publish, written with the record
            models        published models and where they live
    store   jobs/<id>/spec.json                the validated spec (commands point at it)
            jobs/<id>/<stage>/...              a stage's outputs
            jobs/<id>/<stage>/manifest.json    written last: the stage is done

An event is appended and the job's view updated in one transaction; the messages that must
follow it are written to the outbox in the same transaction, and a relay publishes them
(shared.outbox), so a broker outage delays a job and never strands it. The queue only rings
the doorbell: a stage that finds its manifest does no work again.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
import tenacity
from sqlalchemy.engine import Connection

from shared import leases
from shared.errors import Conflict, LedgerUnavailable, NotFound, SpecError
from shared.jobspec import JobSpec, parse_spec
from shared.ledger import Ledger, open_ledger
from shared.ledger import tables as t
from shared.ledger.core import wall_clock
from shared.ledger.view import ENDED, JOB_STATUSES, current_stage, fold, new_view, user_retry
from shared.messages import (
    STAGE_OF_COMMAND,
    STAGES,
    Command,
    Event,
    JobCancelled,
    Message,
    Stage,
    dump_message,
    parse_message,
)
from shared.pipeline import resume_command
from shared.settings import Settings
from shared.store import Store, open_store

__all__ = [
    "ENDED",
    "JOB_STATUSES",
    "OUTCOMES",
    "RETRYABLE",
    "JobRecords",
    "new_job_id",
    "open_records",
]
log = logging.getLogger(__name__)
T = TypeVar("T")


def new_job_id(name: str) -> str:
    """A sortable, unique job id that starts with the job's name."""
    return f"{name}-{datetime.now(UTC):%Y%m%d%H%M%S%f}-{secrets.token_hex(3)}"


_JOB_ID = re.compile(r"[a-zA-Z0-9_.-]{1,96}")


def job_prefix(job_id: str) -> str:
    """``jobs/<id>``; NotFound for an id no job can have (path tricks, control characters)."""
    if not _JOB_ID.fullmatch(job_id) or set(job_id) == {"."}:
        raise NotFound(f"no job {job_id!r}")
    return f"jobs/{job_id}"


#: the statuses of a job that a user may retry
RETRYABLE = ("failed", "cancelled")

#: the event that records each stage's success
OUTCOMES = {
    "prepare": "DatasetPrepared",
    "train": "ModelTrained",
    "evaluate": "ModelEvaluated",
    "publish": "ModelPublished",
}

#: a message to publish once the record that calls for it is committed: (message, headers)
Outgoing = tuple[Message, dict[str, Any]]


def _outgoing(send: Iterable[Message | Outgoing | None]) -> list[Outgoing]:
    return [m if isinstance(m, tuple) else (m, {}) for m in send if m is not None]


def read_manifest(store: Store, key: str) -> dict[str, Any]:
    """A stage's manifest: NotFound when there is none, ValueError when it is not a JSON
    object (cut short, emptied, damaged)."""
    try:
        found = store.get_json(key)
    except ValueError as exc:
        raise ValueError(f"it is not JSON ({exc})") from exc
    if not isinstance(found, dict):
        raise ValueError("it is not a JSON object")
    return found


class JobRecords:
    """Reads and writes job records: the ledger for state, the store for artifacts."""

    def __init__(self, store: Store, ledger: Ledger, *, patience: float = 0.0) -> None:
        self.store, self.ledger = store, ledger
        #: how long a write waits for an unavailable database to come back (a worker rides
        #: out a database restart; the API answers 503 at once)
        self.patience = patience
        #: called after a commit that wrote to the outbox (the relay publishes at once)
        self.on_outbox: Any = None

    def _durably(self, write: Callable[[], T]) -> T:
        """Run a write, again while the database is unavailable, for up to ``patience``."""
        if self.patience <= 0:
            return write()
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(LedgerUnavailable),
            stop=tenacity.stop_after_delay(self.patience),
            wait=tenacity.wait_exponential(multiplier=0.5, max=5),
            before_sleep=lambda state: log.warning(
                "job database unavailable; trying again: %s", state.outcome.exception()
            ),
            reraise=True,
        )
        return retrying(write)

    # -- jobs -----------------------------------------------------------------------------

    @staticmethod
    def spec_key(job_id: str) -> str:
        """Key of a job's spec."""
        return f"{job_prefix(job_id)}/spec.json"

    @staticmethod
    def stage_prefix(job_id: str, stage: Stage) -> str:
        """Prefix under which a stage writes its outputs."""
        return f"{job_prefix(job_id)}/{stage}"

    def manifest_key(self, job_id: str, stage: Stage) -> str:
        """Key of a stage's manifest."""
        return f"{self.stage_prefix(job_id, stage)}/manifest.json"

    def create(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        submitted: Event | None = None,
        send: Sequence = (),
        own_name: bool = False,
    ) -> str:
        """Record a new job (once; the same id again changes nothing) and its spec's object;
        with ``submitted``, its first event and ``send`` in the same transaction. With
        ``own_name``, a model name another job not ended is to publish under is refused
        (SpecError, nothing kept) in that transaction: a job submitted after it would train
        only to be refused at publish, and two submissions at once meet here. The spec's
        URI."""
        key = self.spec_key(job_id)
        self.store.put_bytes_if_absent(key, spec.model_dump_json(indent=2).encode())
        uri = self.store.uri(key)
        try:
            exists = self._create(job_id, spec, uri, submitted, send, own_name=own_name)
        except SpecError:
            self.store.delete(key)
            raise
        if exists is None and send:
            self.outbox_written()
        return uri

    def _create(
        self,
        job_id: str,
        spec: JobSpec,
        uri: str,
        submitted: Event | None,
        send: Sequence,
        *,
        own_name: bool,
    ) -> Any:
        """``create``'s transaction; the job's row if it existed already."""
        with self.ledger.write() as conn:
            exists = conn.execute(sa.select(t.jobs.c.number).where(t.jobs.c.id == job_id)).first()
            if exists is None:
                if own_name:
                    _refuse_pending_name(conn, spec.model_name)
                self._insert_job(conn, job_id, spec, uri)
                if submitted is not None:
                    self._append(conn, submitted)
                    self._enqueue(conn, job_id, _outgoing(send))
        return exists

    def restore(
        self, job_id: str, spec: JobSpec, events: Sequence[Event], *, cancel_requested: bool
    ) -> None:
        """Record a job with its whole history in one transaction (an import); the spec's
        object must already be in the store."""
        with self.ledger.write() as conn:
            self._insert_job(conn, job_id, spec, self.store.uri(self.spec_key(job_id)))
            for event in events:
                self._append(conn, event)
            if cancel_requested:
                conn.execute(
                    t.jobs.update().where(t.jobs.c.id == job_id).values(cancel_requested=True)
                )

    def _insert_job(self, conn: Connection, job_id: str, spec: JobSpec, uri: str) -> None:
        now = wall_clock()
        created = datetime.fromtimestamp(now, UTC).isoformat()
        conn.execute(
            t.jobs.insert().values(
                id=job_id,
                name=spec.name,
                status="queued",
                created_at=now,
                updated_at=now,
                spec=spec.model_dump(mode="json"),
                spec_uri=uri,
                view=new_view(job_id, spec.name, spec.model_name, created),
            )
        )
        _count(conn, "queued", +1)

    def spec(self, job_id: str) -> JobSpec:
        """A job's spec; NotFound if there is no such job."""
        row = self._row(job_id, t.jobs.c.spec)
        return parse_spec(row.spec, source=f"job {job_id}")

    def spec_uri(self, job_id: str) -> str:
        """Where the job's spec object is (what its commands point at)."""
        return self._row(job_id, t.jobs.c.spec_uri).spec_uri

    def exists(self, job_id: str) -> bool:
        """Whether a job was submitted."""
        with self.ledger.read() as conn:
            found = conn.execute(sa.select(t.jobs.c.number).where(t.jobs.c.id == job_id))
            return found.first() is not None

    def summary(self, job_id: str) -> dict[str, Any]:
        """Status, stages, results and error of a job (its folded view)."""
        return self._row(job_id, t.jobs.c.view).view

    def _row(self, job_id: str, *columns: Any) -> Any:
        job_prefix(job_id)  # NotFound for an id no job can have (PostgreSQL refuses NUL)
        with self.ledger.read() as conn:
            row = conn.execute(sa.select(*columns).where(t.jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    def page(
        self, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Jobs newest first (optionally with one status), after the job ``after``; the
        views and whether more follow."""
        query = sa.select(t.jobs.c.view).order_by(t.jobs.c.number.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(t.jobs.c.status == status)
        with self.ledger.read() as conn:
            if after is not None:
                job_prefix(after)
                number = conn.execute(
                    sa.select(t.jobs.c.number).where(t.jobs.c.id == after)
                ).scalar()
                if number is None:
                    raise NotFound(f"no job {after!r} to page after")
                query = query.where(t.jobs.c.number < number)
            views = [row.view for row in conn.execute(query)]
        return views[:limit], len(views) > limit

    def counts(self) -> dict[str, int]:
        """How many jobs have each status (kept with every status change, not counted)."""
        counts = t.status_counts.c
        query = sa.select(counts.status, counts.jobs).where(counts.jobs > 0)
        with self.ledger.read() as conn:
            return {status: n for status, n in conn.execute(query)}

    # -- events ---------------------------------------------------------------------------

    def record(
        self, event: Event, *, send: Sequence = (), patient: bool = True, again: bool = False
    ) -> int:
        """Append an event to its job's log and fold it into the job's view; ``send``
        (messages, or (message, headers)) goes to the outbox in the same transaction.
        The event's sequence number. ``patient=False``: no waiting for the database
        (progress, which the next report replaces). ``again``: the commands sent run their
        stages again (``_enqueue``)."""

        def write() -> int:
            with self.ledger.write() as conn:
                seq = self._append(conn, event)
                self._enqueue(conn, event.job_id, _outgoing(send), again=again)
            return seq

        seq = self._durably(write) if patient else write()
        if send:
            self.outbox_written()
        return seq

    def send(self, job_id: str, *messages: Message | Outgoing, again: bool = False) -> None:
        """Publish messages through the outbox (no event recorded); ``again``: the commands
        run their stages again (``_enqueue``)."""

        def write() -> None:
            with self.ledger.write() as conn:
                self._enqueue(conn, job_id, _outgoing(messages), again=again)

        self._durably(write)
        self.outbox_written()

    def _append(self, conn: Connection, event: Event) -> int:
        """Number the event, fold it into the view and store both: two statements. The
        first takes the next number and locks the job's row (one writer at a time, so
        numbers follow commit order); on PostgreSQL the event's INSERT rides in the second
        (a data-modifying CTE)."""
        jobs = t.jobs.c
        row = conn.execute(
            t.jobs.update()
            .where(jobs.id == event.job_id)
            .values(last_seq=jobs.last_seq + 1)
            .returning(jobs.view, jobs.last_seq)
        ).first()
        if row is None:
            raise NotFound(f"no job {event.job_id!r}")
        data, seq = dump_message(event), row.last_seq
        view = fold(row.view, data)
        values: dict[str, Any] = {
            "view": view,
            "status": view["status"],
            "stage": current_stage(view),
            "updated_at": wall_clock(),
        }
        if data["type"] == "JobRetried":
            values["retry_seq"] = seq
            if user_retry(data):  # a redo of a corrupt output keeps a user's cancel
                values["cancel_requested"] = False
        if data["type"] == "CancelRequested":
            values["cancel_requested"] = True
        insert = t.events.insert().values(
            job_id=event.job_id,
            seq=seq,
            type=data["type"],
            stage=data.get("stage"),
            created_at=wall_clock(),
            body=data,
        )
        update = t.jobs.update().where(jobs.id == event.job_id).values(**values)
        if conn.dialect.name == "postgresql":
            conn.execute(update.add_cte(insert.cte("appended")))
        else:
            conn.execute(insert)
            conn.execute(update)
        if view["status"] != row.view["status"]:
            _count(conn, row.view["status"], -1)
            _count(conn, view["status"], +1)
        return seq

    def append(
        self, conn: Connection, event: Event, *, send: Sequence = (), again: bool = False
    ) -> int:
        """``record`` inside a caller's write transaction (call ``outbox_written`` after
        the commit when ``send`` was given)."""
        seq = self._append(conn, event)
        self._enqueue(conn, event.job_id, _outgoing(send), again=again)
        return seq

    def _enqueue(
        self, conn: Connection, job_id: str, outgoing: list[Outgoing], *, again: bool = False
    ) -> None:
        """Write messages to the outbox. ``again``: the commands run their stages again (a
        stage handing its command back, a user's retry), superseding the stages' leases
        (``leases.supersede``); a worker still holding one is finishing or gone. Not for a
        command that may be a duplicate of one a worker runs now."""
        if not outgoing:
            return
        conn.execute(
            t.outbox.insert(),
            [
                {
                    "job_id": job_id,
                    "body": dump_message(message),
                    "headers": headers,
                    "created_at": wall_clock(),
                }
                for message, headers in outgoing
            ],
        )
        stages = {STAGE_OF_COMMAND[m.type] for m, _ in outgoing if m.type in STAGE_OF_COMMAND}  # type: ignore[attr-defined]
        if again and stages:
            leases.supersede(conn, job_id, stages, self.ledger)

    def outbox_written(self) -> None:
        """Tell the relay (if one is attached) that the outbox has messages to send."""
        if self.on_outbox is not None:
            self.on_outbox()

    def events(self, job_id: str) -> list[Message]:
        """A job's events, oldest first."""
        return [message for _, message in self.events_after(job_id)]

    def events_after(
        self, job_id: str, after: int = 0, *, limit: int | None = None
    ) -> list[tuple[int, Message]]:
        """(sequence number, event) of a job's events after number ``after``, oldest first."""
        job_prefix(job_id)
        ev = t.events.c
        query = (
            sa.select(ev.seq, ev.body)
            .where(ev.job_id == job_id, ev.seq > after)
            .order_by(ev.seq)
            .limit(limit)
        )
        with self.ledger.read() as conn:
            return [(row.seq, parse_message(row.body)) for row in conn.execute(query)]

    def _since_retry(self, job_id: str, *where: Any) -> list[Message]:
        """The job's events after its last user retry that match ``where``, oldest first."""
        ev = t.events.c
        retry = sa.select(t.jobs.c.retry_seq).where(t.jobs.c.id == job_id).scalar_subquery()
        query = sa.select(ev.body).where(ev.job_id == job_id, ev.seq > retry, *where)
        with self.ledger.read() as conn:
            return [parse_message(row.body) for row in conn.execute(query.order_by(ev.seq))]

    def since_retry(self, job_id: str) -> list[Message]:
        """A job's events after the last user retry (all of them if none)."""
        return self._since_retry(job_id)

    def outcome(self, job_id: str, stage: str) -> Message | None:
        """The stage's recorded success (since the last retry), if it has one."""
        found = self._since_retry(job_id, t.events.c.type == OUTCOMES[stage])
        return found[0] if found else None

    def finished(self, job_id: str, stage: str) -> bool:
        """Whether the stage's success is recorded since the job last resumed (a user's
        retry, or a ``JobRetried`` that makes a corrupt output again). A manifest alone is
        not: a worker that died between writing it and recording the event left the stage
        unfinished, and its command must be sent again."""
        return self.outcome(job_id, stage) is not None

    def failure(self, job_id: str) -> Message | None:
        """The job's recorded failure since it last resumed (a ``StageFailed`` of any stage),
        if it failed: nothing of it runs again until a retry."""
        found = self._since_retry(job_id, t.events.c.type == "StageFailed")
        return found[-1] if found else None

    def cancelled(self, job_id: str) -> bool:
        """Whether the job was recorded as cancelled (since the last retry)."""
        return bool(self._since_retry(job_id, t.events.c.type == "JobCancelled"))

    def started(self, job_id: str, stage: str) -> bool:
        """Whether the stage was started (since the last retry)."""
        ev = t.events.c
        return bool(self._since_retry(job_id, ev.type == "StageStarted", ev.stage == stage))

    def deaths(self, job_id: str, stage: str) -> int:
        """Times ``stage`` was started (since the last retry) and its worker vanished
        without an outcome.

        A start followed by another start, or the last start with no outcome when a new
        delivery arrives, is a worker that died (killed, out of memory, crashed) while on
        the command. A graceful interruption (shutdown, lost lease) records itself and does
        not count.
        """
        ev = t.events.c
        marks = sa.or_(ev.type != "StageProgress", sa.cast(ev.body, sa.Text).like("%interrupted%"))
        deaths, open_start = 0, False
        for event in self._since_retry(job_id, ev.stage == stage, marks):
            if event.type == "StageStarted":  # type: ignore[attr-defined]
                deaths += open_start
                open_start = True
            elif event.type != "StageProgress" or event.progress.get("interrupted"):  # type: ignore[attr-defined]
                open_start = False
        return deaths + open_start

    # -- cancel ---------------------------------------------------------------------------

    def cancel(self, job_id: str, *, cancelled: Event, requested: Event) -> dict[str, Any]:
        """Ask a job to stop, in one transaction: Conflict if it has ended; a job nothing
        runs (queued, paused, or between stages: its next command waiting for a worker)
        is cancelled at once (``cancelled``). The job's view."""
        with self.ledger.write() as conn:
            row = conn.execute(
                sa.select(t.jobs.c.view, t.jobs.c.cancel_requested)
                .where(t.jobs.c.id == job_id)
                .with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            status = row.view["status"]
            if status in ENDED:
                raise Conflict(f"job {job_id!r} has already ended ({status})")
            if not row.cancel_requested:
                self._append(conn, requested)
            if status in ("queued", "paused") or _between_stages(
                conn, job_id, row.view, self.ledger.now
            ):
                self._append(conn, cancelled)
        return self.summary(job_id)

    def cancel_abandoned(self, conn: Connection, job_id: str, stage: str) -> bool:
        """In ``conn``'s transaction: record a job whose stage's worker was lost while it was
        being cancelled as cancelled at ``stage`` (JobCancelled, also published), as that
        worker would have; False if it ended meanwhile or its cancel was withdrawn."""
        row = conn.execute(
            sa.select(t.jobs.c.status, t.jobs.c.cancel_requested)
            .where(t.jobs.c.id == job_id)
            .with_for_update()
        ).first()
        if row is None or row.status in ENDED or not row.cancel_requested:
            return False
        cancelled = JobCancelled(job_id=job_id, stage=stage)
        self.append(conn, cancelled, send=[cancelled])
        return True

    # -- retry ----------------------------------------------------------------------------

    def retry(self, job_id: str, *, retried: Event, send: Sequence = ()) -> dict[str, Any]:
        """Resume a failed or cancelled job (``retried``, and ``send`` to the outbox) in one
        transaction that holds the job's row: Conflict if it is neither (a second retry of
        the same failure finds it queued). The job's view."""
        with self.ledger.write() as conn:
            row = conn.execute(
                sa.select(t.jobs.c.view).where(t.jobs.c.id == job_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            status = row.view["status"]
            if status not in RETRYABLE:
                raise Conflict(
                    f"job {job_id!r} is {status}; only failed or cancelled jobs are retried"
                )
            self.append(conn, retried, send=send, again=True)
        if send:
            self.outbox_written()
        return self.summary(job_id)

    def request_cancel(self, job_id: str) -> bool:
        """Record that a user asked the job to stop (CancelRequested); False if already
        asked. The running stage stops at its next check."""
        from shared.messages import CancelRequested

        with self.ledger.write() as conn:
            asked = conn.execute(
                t.jobs.update()
                .where(t.jobs.c.id == job_id, t.jobs.c.cancel_requested.is_(False))
                .values(cancel_requested=True)
            ).rowcount
            if asked:
                self._append(conn, CancelRequested(job_id=job_id))
        return bool(asked)

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a user asked to cancel the job (and did not retry it since)."""
        return bool(self._row(job_id, t.jobs.c.cancel_requested).cancel_requested)

    # -- manifests (the store) ------------------------------------------------------------

    def manifest(self, job_id: str, stage: Stage) -> dict[str, Any] | None:
        """A stage's manifest, or None while the stage is not done. An unreadable one is set
        aside (``set_aside``) and is None too: the stage runs again."""
        try:
            return read_manifest(self.store, self.manifest_key(job_id, stage))
        except NotFound:
            return None
        except ValueError as exc:  # cut short, emptied, not a JSON object
            self.set_aside(job_id, stage, str(exc))
            return None

    def resume_command(self, job_id: str) -> Command:
        """The command that resumes the job at the first stage without a readable manifest."""
        manifests = {
            stage: self.store.uri(self.manifest_key(job_id, stage))
            if self.manifest(job_id, stage) is not None
            else None
            for stage in STAGES
        }
        return resume_command(job_id, self.spec_uri(job_id), manifests)

    def set_aside(self, job_id: str, stage: Stage, reason: str) -> str | None:
        """Move a stage's manifest to ``manifest.corrupt-<UTC time>.json`` beside it (kept
        for a look, read by nothing), so the stage counts as not done; the new key, or None
        when there was no manifest."""
        key = self.manifest_key(job_id, stage)
        try:
            data = self.store.get_bytes(key)
        except NotFound:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        kept = key.removesuffix(".json") + f".corrupt-{stamp}.json"
        self.store.put_bytes(kept, data)
        self.store.delete(key)
        log.warning("%s: the %s stage's output is set aside (%s): %s", job_id, stage, reason, kept)
        return kept

    def write_manifest(self, job_id: str, stage: Stage, manifest: dict[str, Any]) -> str:
        """Write a stage's manifest (last, atomically); returns its URI."""
        key = self.manifest_key(job_id, stage)
        self.store.put_json(key, manifest)
        return self.store.uri(key)

    # -- published models -----------------------------------------------------------------

    def check_model_name(self, name: str, *, overwrite: bool, job_id: str | None = None) -> None:
        """Refuse a name that another job's model holds, unless ``overwrite`` (SpecError)."""
        if overwrite:
            return
        try:
            entry = self.model(name)
        except NotFound:
            return
        if job_id is None or entry.get("job_id") != job_id:
            raise _name_taken(name, entry)

    def claim_model_name(self, name: str, *, job_id: str, overwrite: bool) -> None:
        """Hold ``name`` for ``job_id``'s publish, before it uploads or imports anything. A
        name another job's model holds is refused unless ``overwrite``, and one another job
        is still publishing under is refused either way (SpecError: two imports of one name
        at once leave one of them unrecorded); a claim whose job has ended is taken over."""
        with self.ledger.write() as conn:
            holder = _hold(conn, t.model_claims, name, job_id=job_id, claimed_at=wall_clock())
            if holder != job_id and _publishing(conn, holder):
                raise SpecError(
                    f"field 'publish.model_name': job {holder} is publishing a model named "
                    f"{name!r} now; retry this job once that one has ended (with "
                    "publish.overwrite: true to replace its model), or choose another "
                    "publish.model_name"
                )
            if not overwrite:
                self._refuse_held(conn, name, job_id)
            conn.execute(
                t.model_claims.update()
                .where(t.model_claims.c.name == name)
                .values(job_id=job_id, claimed_at=wall_clock())
            )

    def _refuse_held(self, conn: Connection, name: str, job_id: str) -> None:
        """SpecError if another job's published model holds ``name``."""
        held = conn.execute(sa.select(t.models.c.entry).where(t.models.c.name == name)).first()
        if held is not None and held.entry.get("job_id") != job_id:
            raise _name_taken(name, held.entry)

    def register_model(self, name: str, entry: dict[str, Any], *, overwrite: bool = False) -> None:
        """Record a published model under its name (its claim ends). Without ``overwrite``
        the first job to register a name keeps it: another job's entry is never replaced
        (SpecError)."""
        entry = _jsonable(entry)
        job_id = str(entry.get("job_id", ""))
        values = {"job_id": job_id, "entry": entry, "updated_at": wall_clock()}
        with self.ledger.write() as conn:
            holder = _hold(conn, t.models, name, **values)
            if holder != job_id and not overwrite:
                self._refuse_held(conn, name, job_id)
            conn.execute(t.models.update().where(t.models.c.name == name).values(**values))
            claims = t.model_claims.c
            conn.execute(
                t.model_claims.delete().where(claims.name == name, claims.job_id == job_id)
            )

    def model(self, name: str) -> dict[str, Any]:
        """A published model's entry; NotFound if none."""
        if "\x00" in name:
            raise NotFound(f"no published model {name!r}")
        with self.ledger.read() as conn:
            entry = conn.execute(sa.select(t.models.c.entry).where(t.models.c.name == name))
            found = entry.scalar()
        if found is None:
            raise NotFound(f"no published model {name!r}")
        return found

    def delete_model(self, name: str, *, job_id: str) -> bool:
        """Forget a published model (its job's artifacts stay) if ``job_id`` still holds the
        name: False when another job's publish registered it meanwhile (that one stays)."""
        with self.ledger.write() as conn:
            gone = conn.execute(
                t.models.delete().where(t.models.c.name == name, t.models.c.job_id == job_id)
            )
        return gone.rowcount == 1

    def models(self) -> list[dict[str, Any]]:
        """Every published model, by name."""
        with self.ledger.read() as conn:
            query = sa.select(t.models.c.entry).order_by(t.models.c.name)
            return [row.entry for row in conn.execute(query)]


def _count(conn: Connection, status: str, change: int) -> None:
    """Add ``change`` to the number of jobs with ``status``, in one upsert (two first jobs
    of a status at once must not both try to create its row)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(t.status_counts).values(status=status, jobs=change)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["status"], set_={"jobs": t.status_counts.c.jobs + change}
        )
    )


def _name_taken(name: str, entry: dict[str, Any]) -> SpecError:
    """The refusal of a name another job's published model (``entry``) holds."""
    return SpecError(
        f"field 'publish.model_name': a model named {name!r} is already published by job "
        f"{entry.get('job_id')} ({entry.get('location')}); set publish.overwrite: true to "
        "replace it, or choose another publish.model_name"
    )


def _hold(conn: Connection, table: sa.Table, name: str, **values: Any) -> str:
    """The job holding the row named ``name`` (inserted with ``values`` if there is none),
    locked until the transaction ends: two first writers at once meet on the row, one
    inserting and the other waiting for it, with no integrity error and no row gone missing
    between a look and a lock."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(table).values(name=name, **values)
    upsert = insert.on_conflict_do_update(  # a no-op update: it locks and returns the row
        index_elements=["name"], set_={"name": insert.excluded.name}
    ).returning(table.c.job_id)
    return str(conn.execute(upsert).scalar_one())


def _refuse_pending_name(conn: Connection, name: str) -> None:
    """SpecError naming the newest job not ended that is to publish as ``name``; on
    PostgreSQL the name's advisory lock is held to the transaction's end first, so two
    submissions of one name at once take turns (SQLite's write lock already does that)."""
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(f"termtune model name:{name}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))
    jobs = t.jobs.c
    query = (
        sa.select(jobs.id, jobs.name, jobs.spec)
        .where(jobs.status.notin_(ENDED))  # the (status, number) index: few rows
        .order_by(jobs.number.desc())
    )
    for row in conn.execute(query):
        if ((row.spec.get("publish") or {}).get("model_name") or row.name) == name:
            raise SpecError(
                f"field 'publish.model_name': job {row.id} is to publish a model named {name!r} "
                "and has not ended; set publish.overwrite: true to replace its model once it "
                "has, or choose another publish.model_name"
            )


def _between_stages(conn: Connection, job_id: str, view: dict[str, Any], now: Any) -> bool:
    """Whether no stage of a running job is running: none shows running, and no worker
    holds a live lease on one (it took the lease and has not recorded its start yet). Its
    next command waits for a worker, which finds the job cancelled and runs nothing."""
    if view["status"] != "running":
        return False
    if any(stage["status"] == "running" for stage in view["stages"].values()):
        return False
    leases = t.leases.c
    held = sa.select(leases.stage).where(
        leases.job_id == job_id, leases.expires_at > now, leases.redispatched_for.is_(None)
    )
    return conn.execute(held.limit(1)).first() is None


def _publishing(conn: Connection, job_id: str) -> bool:
    """Whether ``job_id`` may still go on publishing (it exists and has not ended)."""
    status = conn.execute(sa.select(t.jobs.c.status).where(t.jobs.c.id == job_id)).scalar()
    return status is not None and status not in ENDED


def _jsonable(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry as JSON types (paths and times become strings)."""
    import json

    return json.loads(json.dumps(entry, default=str))


def open_records(settings: Settings, *, patience: float = 0.0) -> JobRecords:
    """The job records of the settings' store and database."""
    return JobRecords(open_store(settings), open_ledger(settings), patience=patience)
