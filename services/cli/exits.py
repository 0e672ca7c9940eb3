"""The command line's exit statuses: one meaning each, for scripts (listed in ``--help``)."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Exit(IntEnum):
    """What a ``termtune`` command's exit status means."""

    OK = 0  # also `up` stopped by SIGTERM: its normal end
    ERROR = 1  # termtune could not do it: a refused spec, an API or store error, a timeout
    USAGE = 2  # the command line itself is wrong (argparse)
    JOB_NOT_SUCCEEDED = 3  # the job it waited for failed or was cancelled; a gate refused
    INTERRUPTED = 130  # Ctrl-C or SIGHUP (every service it started is stopped)


MEANINGS = {
    Exit.OK: "done (a job it waited for succeeded; `up` stopped by SIGTERM)",
    Exit.ERROR: "termtune could not do it: a refused spec, an API, store or database error",
    Exit.USAGE: "the command line is wrong",
    Exit.JOB_NOT_SUCCEEDED: "the job it ran or waited for failed or was cancelled, or (report) "
    "its gate refused the model",
    Exit.INTERRUPTED: "interrupted (Ctrl-C, SIGHUP; `run` also SIGTERM); every service it "
    "started was stopped",
}


def epilog() -> str:
    """The exit statuses as ``--help`` lists them."""
    return "exit statuses:\n" + "\n".join(f"  {int(c):<4} {MEANINGS[c]}" for c in Exit)


def job_exit(job: dict[str, Any]) -> Exit:
    """OK for a job that succeeded, JOB_NOT_SUCCEEDED for one that failed or was cancelled."""
    return Exit.OK if job["status"] == "succeeded" else Exit.JOB_NOT_SUCCEEDED
