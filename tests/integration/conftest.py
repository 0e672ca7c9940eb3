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


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> str:
    """host:port of a fresh RabbitMQ node with the deployment's settings and user."""
    base = tmp_path_factory.mktemp("rabbitmq")
    port, dist = free_port(), free_port()
    (base / "mnesia").mkdir()
    (base / "log").mkdir()
    (base / "plugins").write_text("[].\n")
    config = (ROOT / "deploy/rabbitmq/rabbitmq.conf").read_text()
    (base / "rabbitmq.conf").write_text(f"{config}\nlisteners.tcp.default = 127.0.0.1:{port}\n")
    node = f"termtune-test-{port}@localhost"
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
        "RABBITMQ_DEFAULT_USER": RABBITMQ_USER,
        "RABBITMQ_DEFAULT_PASS": RABBITMQ_PASSWORD,
    }
    log = (base / "server.log").open("wb")
    proc = subprocess.Popen([_rabbitmq_server()], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@127.0.0.1:{port}//"
    deadline = time.monotonic() + 90
    while not _amqp_ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"RabbitMQ did not start: {(base / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    ctl = RABBITMQ_BIN / "rabbitmqctl"
    subprocess.run(
        [str(ctl) if ctl.exists() else "rabbitmqctl", "-n", node, "stop"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
