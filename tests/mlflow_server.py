"""A real MLflow tracking server for the tests: `mlflow server` from its own environment
(`make tracking-server`: MLflow's server pins a pyarrow the services' lock does not), on a
free port, its runs in SQLite or the tests' PostgreSQL, its artifacts served from a folder."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in ``root``; ``uri`` is its tracking URI."""

    def __init__(self, root: Path, backend_store_uri: str | None = None) -> None:
        if not MLFLOW.exists():
            pytest.fail(f"{MLFLOW} is missing: `make tracking-server` installs MLflow's server")
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port = root, _free_port()
        self.backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        argv = [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--backend-store-uri", self.backend, "--workers", "1"]
        argv += ["--artifacts-destination", (self.root / "artifacts").as_uri()]
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited at start: {self.log_tail()}")
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server not up after {timeout} s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
