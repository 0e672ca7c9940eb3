"""The compose services as processes: each one's exact command and environment, read from
docker-compose.yml, its .env and its Dockerfile, with only what a container isolates
translated for one machine:

- service hostnames (``rabbitmq``, ``s3``, ``postgres``) → the loopback servers the test
  started (the database: a fresh one on the tests' PostgreSQL server);
- the s3-credentials volume (``/run/termtune-s3``, where s3-init writes the app's key) → a
  folder with the key the test gives;
- container paths (``/home/termtune/...``) → a temporary folder per service instance;
- the API's container port and ``0.0.0.0`` → a free loopback port; each worker's metrics
  port (9100 in every container) → a free port of its own;
- ``python`` → this interpreter (whose environment has the package installed, as the image).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ("api", "dataprep", "trainer", "evaluator", "publisher")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable syntax: ${X}, ${X:-default}, ${X:?error}, $$ for a dollar."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = variables.get(name)
        if op and op.endswith("?") and not value:
            raise ValueError(f"{name}: {arg}")
        if op and op.endswith("-") and not value:
            return arg
        return value or ""

    return _VAR.sub(one, text)


def dockerfile(path: Path) -> tuple[list[str], dict[str, str]]:
    """The image's CMD and the ENV it sets (last stage)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    cmd: list[str] = []
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            env = {}  # a new stage starts from its base
        elif line.startswith("ENV "):
            for pair in re.findall(r'(\w+)=("[^"]*"|\S+)', line[4:]):
                env[pair[0]] = pair[1].strip('"')
        elif line.startswith("CMD "):
            cmd = json.loads(line[4:])
    return cmd, env


@dataclass
class ServiceProcess:
    """How to start one compose service as a process."""

    name: str
    command: list[str]
    env: dict[str, str]


def service_processes(
    variables: dict[str, str], *, amqp: str, s3: str, database: str, s3_key: Path
) -> dict[str, Any]:
    """Command and environment of each termtune service in docker-compose.yml; ``s3_key``:
    the shared-credentials file s3-init would have written."""
    compose = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), variables))
    out = {}
    for name in WORKERS:
        service = compose["services"][name]
        cmd, image_env = dockerfile(ROOT / service["build"]["dockerfile"])
        env = dict(image_env)
        if service.get("env_file"):
            env.update(variables)  # the .env file's variables reach the container
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
        env = {
            k: v.replace("rabbitmq:5672", amqp)
            .replace("http://s3:8333", s3)
            .replace("postgres:5432/termtune", database)
            .replace("/run/termtune-s3/credentials", str(s3_key))
            for k, v in env.items()
        }
        out[name] = ServiceProcess(name, service.get("command") or cmd, env)
    return out


def start(service: ServiceProcess, folder: Path, *, port: int | None = None) -> subprocess.Popen:
    """Start a service instance in its own folder, as its container would run."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    for key, value in service.env.items():
        if key == "PATH":
            continue  # the image's venv on PATH: here, this interpreter's environment
        env[key] = value.replace("/home/termtune", str(folder))
    if port is not None:
        env.update(TERMTUNE_HOST="127.0.0.1", TERMTUNE_PORT=str(port))
    if "TERMTUNE_METRICS_PORT" in env:  # a container's own port; one host: one each
        env["TERMTUNE_METRICS_PORT"] = str(_free_port())
    command = [sys.executable if c == "python" else c for c in service.command]
    log = (folder / "service.log").open("wb")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
