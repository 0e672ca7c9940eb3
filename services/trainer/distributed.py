"""Data-parallel training across every GPU of the machine, through torchrun.

The worker process keeps the job's lease, the bus and the job records; it starts
``torchrun --standalone --nproc-per-node N -m services.trainer.distributed LAUNCH.json`` in
its own session (a SIGTERM meant for the worker does not reach the ranks directly) and talks
to the ranks through files in a scratch folder:

- ``launch.json``: the TrainJob, the store location and the worker's pid;
- ``stop``: written by the worker with a reason (cancel, shutdown, lost), again when a
  stronger one comes (a lease lost during a shutdown: no checkpoint for a job another worker
  owns); the ranks agree on it at the next optimizer step, store a checkpoint when shutting
  down, and exit. The worker asks for the reason off its loop, as a single process does
  (``callbacks.PolledStop``): a database hiccup does not end the ranks' run;
- ``rank-N.pid``: each rank's process id. torchrun starts every rank in its own session, so
  when the ranks do not stop on their own after a failing worker wrote ``stop``, they are
  killed by these, not only torchrun;
- ``progress.jsonl``: progress records from the first rank, relayed as events;
- ``result.json``: the first rank's summary, or the error that ended it;
- ``compile-failed``: written by a rank that torch.compile failed (the plan's note). The
  ranks that compiled wait for it in a collective call, so it ends them all (torchrun stops
  the others when one fails) and the worker starts them again without compile.

A rank that finds the worker gone stops as if its lease were lost: a job is never trained by
an orphan beside the worker that picked it up again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from services.trainer.callbacks import PolledStop
from services.trainer.fit import TrainJob, fit
from shared import errors
from shared.errors import CompileFailed, ProcessFailed, SpecError
from shared.jobspec import TrainingSpec

POLL_SECONDS = 0.5


def processes(spec: TrainingSpec, device: str) -> int:
    """How many training processes to run: one per visible GPU unless the spec says."""
    if spec.data_parallel == "auto":
        return max(torch.cuda.device_count(), 1) if device == "cuda" else 1
    gpus = torch.cuda.device_count()
    if device == "cuda" and spec.data_parallel > gpus:
        raise SpecError(
            f"training.data_parallel: {spec.data_parallel} processes asked for, "
            f"but this machine has {gpus} GPU(s)"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device != "cuda" and spec.data_parallel > (cores or 1):
        raise SpecError(
            f"training.data_parallel: {spec.data_parallel} processes asked for on a CPU "
            f"worker with {cores} core(s); at most one process a core (on CPU this only "
            "exercises the multi-GPU path)"
        )
    return spec.data_parallel


@dataclasses.dataclass
class _Files:
    folder: Path

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    launch = property(lambda self: self.folder / "launch.json")
    stop = property(lambda self: self.folder / "stop")
    progress = property(lambda self: self.folder / "progress.jsonl")
    result = property(lambda self: self.folder / "result.json")
    compile_failed = property(lambda self: self.folder / "compile-failed")
    log = property(lambda self: self.folder / "ranks.log")

    def table(self, split: str) -> Path:
        return self.folder / f"{split}.parquet"

    def rank_pid(self, rank: str) -> Path:
        return self.folder / f"rank-{rank}.pid"

    def rank_pids(self) -> list[int]:
        """The ranks still running: the process ids they wrote, each checked to be a rank of
        this launch by its command line (a pid the system gave to another process since is
        left alone)."""
        found = (p.read_text().strip() for p in self.folder.glob("rank-*.pid"))
        return [int(pid) for pid in found if pid.isdigit() and self._is_rank(int(pid))]

    def _is_rank(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(self.launch).encode() in argv


def launch(
    job: TrainJob,
    train_table: pa.Table,
    eval_table: pa.Table | None,
    *,
    store_url: str,
    s3_endpoint_url: str | None,
    report: Callable[..., None],
    should_stop: Callable[[], str | None],
    folder: Path,
) -> dict[str, Any]:
    """Run ``job.processes`` ranks to the end; the first rank's summary (as ``fit`` returns)."""
    files = _Files(folder)
    pq.write_table(train_table, files.table("train"))
    if eval_table is not None:
        pq.write_table(eval_table, files.table("validation"))
    files.launch.write_text(
        json.dumps(
            {
                "job": dataclasses.asdict(job),
                "store_url": store_url,
                "s3_endpoint_url": s3_endpoint_url,
                "worker_pid": os.getpid(),
                "validation": eval_table is not None,
            }
        )
    )
    command = _torchrun(files, job.processes)
    with files.log.open("wb") as log, PolledStop(should_stop, every=POLL_SECONDS) as polled:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        relay, told = _Relay(files.progress, report), None
        try:
            while proc.poll() is None:
                if (reason := polled()) != told:  # the strongest yet (PolledStop keeps it)
                    _write_atomic(files.stop, reason)
                    told = reason
                relay.drain()
                time.sleep(POLL_SECONDS)
        finally:
            if proc.poll() is None:  # the worker itself is failing: take the ranks down
                _write_atomic(files.stop, "lost")
                _wait_or_kill(proc, files)
        relay.drain()
    return _result(files, proc.returncode)


def _torchrun(files: _Files, processes: int) -> list[str]:
    """The command that starts the ranks."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "services.trainer.distributed",
        str(files.launch),
    ]


def _result(files: _Files, returncode: int) -> dict[str, Any]:
    """The first rank's summary; its error re-raised; a crash as ProcessFailed; any rank's
    compile failure as CompileFailed (whatever the ranks it left waiting said of it)."""
    if files.compile_failed.exists():
        raise CompileFailed(files.compile_failed.read_text())
    if files.result.exists():
        result = json.loads(files.result.read_text())
        if "error" in result:
            kind = getattr(errors, result["error"]["type"], None)
            if isinstance(kind, type) and issubclass(kind, errors.TermtuneError):
                raise kind(result["error"]["message"])
            raise ProcessFailed(f"training rank failed: {result['error']['message']}")
        if returncode == 0:
            return result["summary"]
    tail = files.log.read_text(errors="replace").strip().splitlines()[-5:]
    raise ProcessFailed(
        f"data-parallel training exited with code {returncode}: " + " | ".join(tail)
    )


def _wait_or_kill(proc: subprocess.Popen[bytes], files: _Files, grace: float = 20.0) -> None:
    """torchrun and its ranks gone: on their own within ``grace`` seconds of the stop file,
    else killed, each rank's session with torchrun's (a rank still loading the model or
    compiling reads no stop file, and would keep its GPU)."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        for pid in (proc.pid, *files.rank_pids()):
            _kill_session(pid)
        proc.wait()


def _kill_session(pid: int) -> None:
    """SIGKILL to ``pid``, and to its process group where it leads one (torchrun and, as
    torchrun starts them, each rank: the compile workers a rank started go with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write one file at once
    tmp.write_text(text)
    tmp.replace(path)


class _Relay:
    """Forwards the progress records the first rank appends to a file."""

    def __init__(self, path: Path, report: Callable[..., None]) -> None:
        self.path, self.report, self.offset = path, report, 0

    def drain(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith(b"\n"):  # still being written
                    break
                self.offset += len(line)
                record = json.loads(line)
                self.report(record["progress"], force=record["force"])


# -- inside each rank -------------------------------------------------------------------


def _rank_report(path: Path) -> Callable[..., None]:
    def report(progress: dict[str, Any], *, force: bool = False) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps({"progress": progress, "force": force}) + "\n")

    return report


def _rank_should_stop(files: _Files, worker_pid: int) -> Callable[[], str | None]:
    def should_stop() -> str | None:
        if files.stop.exists():
            return files.stop.read_text().strip() or "lost"
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return "lost"
        return None

    return should_stop


def main(launch_path: str) -> None:
    """One rank: train with the others; the first rank writes the result."""
    from shared.settings import Settings
    from shared.store import open_store

    files = _Files(Path(launch_path).parent)
    launch_doc = json.loads(files.launch.read_text())
    job = TrainJob(**launch_doc["job"])
    rank = os.environ.get("RANK", "0")
    _write_atomic(files.rank_pid(rank), str(os.getpid()))
    first = rank == "0"
    try:
        settings = Settings(
            store_url=launch_doc["store_url"], s3_endpoint_url=launch_doc["s3_endpoint_url"]
        )
        summary = fit(
            job,
            pq.read_table(files.table("train")),
            pq.read_table(files.table("validation")) if launch_doc["validation"] else None,
            store=open_store(settings),
            report=_rank_report(files.progress),
            # a file and a process check: cheap enough for every step
            should_stop=lambda: None,
            immediate_stop=_rank_should_stop(files, launch_doc["worker_pid"]),
        )
    except Exception as exc:
        if isinstance(exc, CompileFailed):  # any rank: the others may fail only after it
            _write_atomic(files.compile_failed, str(exc))
        if first:
            error = {"type": type(exc).__name__, "message": str(exc) or repr(exc)}
            _write_atomic(files.result, json.dumps({"error": error}))
        raise
    if first:
        _write_atomic(files.result, json.dumps({"summary": summary}))


if __name__ == "__main__":
    main(sys.argv[1])
