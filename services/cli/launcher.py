"""Starts the control plane and the four workers as separate OS processes.

These are the containers' own entry points (``python -m services.<name>``), run with the
embedded defaults: kombu's filesystem broker and a local folder store under ``var/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli.client import local_url
from shared.errors import TermtuneError
from shared.health import check_health
from shared.lifetime import PARENT_ENV
from shared.settings import Settings, development_key

WORKERS = ("dataprep", "trainer", "evaluator", "publisher")
STABLE_SECONDS = 300.0
MAX_BACKOFF_SECONDS = 60.0
SERVICES = ("api", *WORKERS)
#: the signals that stop a launcher (Ctrl-C, SIGTERM, SIGHUP)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LaunchError(TermtuneError):
    """A service did not start or become healthy."""


@dataclass
class Launcher:
    """The set of service processes of one embedded deployment."""

    var_dir: Path = Path("var")
    port: int = 8000
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    #: process name → (restarts in a row, when it was last started), for supervise()
    restarts: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: process name → when supervise() saw it exited (it waits out its backoff)
    exited: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.var_dir = self.var_dir.resolve()
        self.run_dir = self.var_dir / "run"
        self.log_dir = self.var_dir / "logs"

    @property
    def url(self) -> str:
        """Where the control plane listens."""
        return local_url(self.port)

    def api_key(self) -> str:
        """The deployment's API key (var/run/api_key), made on first use, readable by its owner
        only from the moment it exists."""
        return development_key(self.run_dir / "api_key")

    def service_env(self) -> dict[str, str]:
        """The environment every service process gets; their logs are files people read,
        so text unless TERMTUNE_LOG_FORMAT says otherwise."""
        return {
            "TERMTUNE_LOG_FORMAT": "text",
            **os.environ,
            "TERMTUNE_VAR_DIR": str(self.var_dir),
            "TERMTUNE_PORT": str(self.port),
            "TERMTUNE_API_KEY": self.api_key(),
            "PYTHONUNBUFFERED": "1",
            PARENT_ENV: str(os.getpid()),
            **self.env,
        }

    def start(self, services: tuple[str, ...] = SERVICES, *, trainers: int = 1) -> None:
        """Start each service as its own process, logging to var/logs/<name>.log.

        ``trainers`` > 1 starts competing trainer processes (trainer, trainer-2, ...). A
        Ctrl-C (or SIGTERM, SIGHUP) meanwhile takes effect once each process started is
        recorded, so ``stop`` stops every one; no more are started after it.
        """
        if "trainer" in services and trainers > 1:
            services = (*services, *(f"trainer-{n}" for n in range(2, trainers + 1)))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self.service_env()
        with _signals_held() as signalled:
            for name in services:
                with (self.log_dir / f"{name}.log").open("ab") as log:
                    self.processes[name] = subprocess.Popen(
                        [sys.executable, "-m", f"services.{service_of(name)}"],
                        env=metrics_env(env, name),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                if signalled():
                    break
            (self.run_dir / "pids.json").write_text(
                json.dumps({n: p.pid for n, p in self.processes.items()})
            )

    def supervise(self, *, now: float | None = None) -> list[str]:
        """Start again each service that exited, after a backoff that doubles with each
        restart in a row (1 s, 2 s, 4 s... 60 s at most; a service that ran for 5 minutes
        starts the count again). One line per restart, for the user."""
        now = time.monotonic() if now is None else now
        said = []
        for name, proc in list(self.processes.items()):
            code = proc.poll()
            if code is None:
                continue
            count, started = self.restarts.get(name, (0, 0.0))
            if now - started > STABLE_SECONDS:
                count = 0
            delay = min(2.0**count, MAX_BACKOFF_SECONDS)
            exited = self.exited.get(name)
            if exited is None:
                self.exited[name] = now
                tail = self.logs_tail(5, names=(name,))
                said.append(f"{name} exited ({code}); starting it again in {delay:.0f} s\n{tail}")
                continue
            if now - exited < delay:
                continue
            self.start((name,))
            del self.exited[name]
            self.restarts[name] = (count + 1, now)
            said.append(f"{name} started again (restart {count + 1} in a row)")
        return said

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the API answers and every worker's heartbeat is fresh."""
        from services.cli.client import Client

        settings = Settings(var_dir=self.var_dir)
        client = Client(self.url, api_key="unused")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise LaunchError(f"{', '.join(dead)} exited at start:\n{self.logs_tail()}")
            workers = {service_of(n) for n in self.processes if n != "api"}
            if (client.healthy() or "api" not in self.processes) and all(
                check_health(settings, n) for n in workers
            ):
                return
            time.sleep(0.5)
        raise LaunchError(f"services not ready after {timeout:.0f}s:\n{self.logs_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every process, then SIGKILL (its session: what it started too) what is
        left after the timeout, or at once on a second stop signal (Ctrl-C again): no
        signal cuts the stop short or leaves a service running, not even one that comes
        before the stop holds them back."""
        while True:
            try:
                self._stop(timeout)
                return
            except KeyboardInterrupt:  # a second signal before the hold: the rest at once
                timeout = 0.0

    def _stop(self, timeout: float) -> None:
        with _signals_held(then_run=False) as asked_again:
            for proc in self.processes.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            running = list(self.processes.values())
            while running and time.monotonic() < deadline and not asked_again():
                time.sleep(0.1)
                running = [p for p in running if p.poll() is None]
            for proc in running:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # a session leader (start_new_session)
                proc.wait()
            (self.run_dir / "pids.json").unlink(missing_ok=True)

    def logs_tail(self, lines: int = 30, names: tuple[str, ...] = ()) -> str:
        """The last lines of every service's log (or of ``names``)."""
        parts = []
        for name in names or tuple(self.processes) or SERVICES:
            path = self.log_dir / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)


@contextlib.contextmanager
def _signals_held(*, then_run: bool = True) -> Iterator[Callable[[], bool]]:
    """Hold back the Python handlers of ``STOP_SIGNALS`` inside the block (a Ctrl-C raised
    inside ``Popen`` would lose the process it just started), then (``then_run``) run the
    handlers of those that came, in the order they came, until one raises; the block gets
    whether one came. The handlers are
    swapped with the signals blocked, so none lands between two swaps. Only the main
    thread has handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    came: list[tuple[int, object]] = []
    replaced: dict[int, Callable[..., Any]] = {}
    try:
        with _blocked():
            for signum in STOP_SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):  # SIG_DFL and SIG_IGN (nohup's) stay as they are
                    replaced[signum] = handler
                    signal.signal(signum, lambda n, frame: came.append((n, frame)))
        yield lambda: bool(came)
    finally:
        with _blocked():
            for signum, handler in replaced.items():
                signal.signal(signum, handler)
        first: dict[int, object] = {}
        for signum, frame in came:
            first.setdefault(signum, frame)
        for signum, frame in first.items() if then_run else ():  # in turn, until one raises
            replaced[signum](signum, frame)


@contextlib.contextmanager
def _blocked() -> Iterator[None]:
    """``STOP_SIGNALS`` blocked in this thread inside the block (delivered after it)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # read, changed in the try: a
    try:  # handler run by the call that blocks (one pending) must not leave them blocked
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def service_of(name: str) -> str:
    """The service a process name runs ("trainer-2" runs the trainer)."""
    return name.split("-", 1)[0]


def stop_recorded(var_dir: Path = Path("var"), timeout: float = 30.0) -> list[str]:
    """Stop the processes a detached `termtune up` recorded; the names stopped."""
    pids_file = var_dir / "run" / "pids.json"
    if not pids_file.exists():
        return []
    pids: dict[str, int] = json.loads(pids_file.read_text())
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pids_file.unlink(missing_ok=True)
    return list(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def metrics_env(env: dict[str, str], name: str) -> dict[str, str]:
    """A service's environment with its own metrics port: TERMTUNE_METRICS_PORT (when set)
    plus the service's place (dataprep +1, trainer +2, evaluator +3, publisher +4,
    trainer-2 +5...), as processes on one machine cannot share a port; the API keeps
    /metrics on its own port."""
    base = int(env.get("TERMTUNE_METRICS_PORT") or 0)
    if not base or name == "api":
        return {k: v for k, v in env.items() if k != "TERMTUNE_METRICS_PORT"}
    offset = (
        SERVICES.index(name) if name in SERVICES else len(SERVICES) + int(name.split("-")[1]) - 2
    )
    return {**env, "TERMTUNE_METRICS_PORT": str(base + offset)}
