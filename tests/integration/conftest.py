"""Real servers for the integration tests: a private RabbitMQ node (Debian's
rabbitmq-server) started and stopped here, and the S3-compatible server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts, without the su wrapper
RABBITMQ_USER, RABBITMQ_PASSWORD = "termtune", "integration-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rabbitmq_server() -> str:
    for candidate in (RABBITMQ_BIN / "rabbitmq-server", shutil.which("rabbitmq-server")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("rabbitmq-server is not installed: `make brokers` installs it (Debian package)")


def _amqp_ready(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=1) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


class RabbitNode:
    """A private RabbitMQ node with the deployment's settings; stop and start keep its data
    (durable queues and persistent messages survive a restart, as in production)."""

    def __init__(self, base: Path, extra_config: str = "") -> None:
        self.base, self.port, self.dist = base, free_port(), free_port()
        for folder in ("mnesia", "log"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "plugins").write_text("[].\n")
        config = (ROOT / "deploy/rabbitmq/rabbitmq.conf").read_text()
        listener = f"listeners.tcp.default = 127.0.0.1:{self.port}"
        (base / "rabbitmq.conf").write_text(f"{config}\n{listener}\n{extra_config}\n")
        self.node = f"termtune-test-{self.port}@localhost"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_DEFAULT_USER": RABBITMQ_USER,
            "RABBITMQ_DEFAULT_PASS": RABBITMQ_PASSWORD,
        }
        self.url = f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@127.0.0.1:{self.port}//"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """host:port of the node."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        """Start the node and wait until it takes AMQP connections."""
        log = (self.base / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [_rabbitmq_server()], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not _amqp_ready(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                tail = (self.base / "server.log").read_text()[-2000:]
                pytest.fail(f"RabbitMQ did not start: {tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node the way an operator does (rabbitmqctl stop)."""
        ctl = RABBITMQ_BIN / "rabbitmqctl"
        subprocess.run(
            [str(ctl) if ctl.exists() else "rabbitmqctl", "-n", self.node, "stop"],
            env=self.env,
            capture_output=True,
            timeout=60,
        )
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """host:port of a fresh RabbitMQ node with the deployment's settings and user."""
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node.address
    node.stop()
