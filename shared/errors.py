"""One exception tree for every termtune service.

    TermtuneError
    ├── PermanentError            retrying cannot help: the job fails with the reason
    │   ├── SpecError             the job spec is invalid (names the field)
    │   ├── DatasetError          the dataset cannot be used (names file, row, column)
    │   ├── CorruptOutput         a stage's stored output is unreadable or not what its
    │   │                         manifest says: that stage runs again (once)
    │   ├── ModelError            the model or adapter cannot be loaded or used
    │   ├── PreflightError        an export breaks a Bedrock import rule (names the rule)
    │   ├── BedrockError          Bedrock refused: access, region, a failed import
    │   ├── StoreLocationError    a URI outside the object store or its allowed buckets
    │   ├── UploadError           an upload that cannot be stored (a name, a manifest)
    │   ├── MessageError          a bus message that is not a known, valid message
    │   ├── OutOfMemory           training or inference ran out of device memory
    │   ├── LedgerSchemaError     the job database's schema is newer than this code
    │   └── Cancelled             a user cancelled the job
    ├── RetryableError            a later attempt may succeed (network, broker, throttling)
    │   ├── StoreUnavailable      the object store could not be reached
    │   ├── LedgerUnavailable     the job database could not be reached
    │   ├── Interrupted           the worker is stopping; the stage resumes elsewhere
│   ├── TrackingUnavailable   the experiment tracking server failed a call
    │   └── ProcessFailed         a child process (a data-parallel rank) died
    ├── Conflict                  the request contradicts the job's state (409)
    └── NotFound (+ KeyError)     a job, artifact or model that does not exist

A stage handler raises a ``PermanentError`` to fail the job at once; anything else it
raises is retried by the worker up to its attempt limit, then fails the job.
"""

from __future__ import annotations


class TermtuneError(Exception):
    """Root of every error termtune raises on purpose."""


class PermanentError(TermtuneError):
    """An error that no retry can fix; the job fails with this message."""


class SpecError(PermanentError, ValueError):
    """The job specification is invalid."""


class DatasetError(PermanentError, ValueError):
    """The dataset is missing, malformed or lacks what the spec names."""


class CorruptOutput(PermanentError):
    """A stage's stored output (its manifest, a dataset shard, the adapter) is missing,
    unreadable or does not match its manifest: no retry of the stage that found it can help,
    but running ``stage``, the stage that wrote it, again can (``run_stage`` sets its
    manifest aside and sends its command, once a job)."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class ModelError(PermanentError):
    """The model, tokenizer or adapter cannot be loaded or used."""


class PreflightError(PermanentError):
    """An exported model breaks a Bedrock Custom Model Import rule."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule


class BedrockError(PermanentError):
    """Amazon Bedrock refused a call or an import failed; the message says what to fix."""


class StoreLocationError(PermanentError, ValueError):
    """A location outside the object store or the buckets the deployment allows."""


class UploadError(PermanentError, ValueError):
    """An uploaded file or model folder that cannot be stored: a bad name, a link, a
    manifest that does not match its digest."""


class MessageError(PermanentError, ValueError):
    """A bus message that cannot be parsed as a known message."""


class OutOfMemory(PermanentError):
    """The device ran out of memory; the message names the sizes used and what to lower."""


class Cancelled(PermanentError):
    """A user cancelled the job."""


class RetryableError(TermtuneError):
    """An error that a later attempt may not meet again."""


class StoreUnavailable(RetryableError):
    """The object store could not be reached."""


class LedgerUnavailable(RetryableError):
    """The job database could not be reached (or is busy past its timeout)."""


class LedgerSchemaError(PermanentError):
    """The job database's schema is newer than this termtune knows, or not a ledger."""


class TrackingUnavailable(RetryableError):
    """The experiment tracking server (MLflow) could not be reached or refused a call."""


class Conflict(TermtuneError):
    """The request contradicts the job's state (cancel an ended job, retry a running one)."""


class Interrupted(RetryableError):
    """The worker was asked to stop (SIGTERM) and saved its progress; requeue, not a failure."""


class NotFound(TermtuneError, KeyError):
    """A job, artifact or model that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ProcessFailed(RetryableError):
    """A child process the stage started (a data-parallel training rank) exited abnormally."""


class CompileFailed(TermtuneError):
    """torch.compile failed in one of several data-parallel ranks: the others wait in a
    collective call it never makes, so the ranks end and start again without compile. The
    message is the plan's note saying why."""
