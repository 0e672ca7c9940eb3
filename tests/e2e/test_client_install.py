"""`pip install termtune` alone: the CLI and typed client in a clean virtual environment,
without torch or any service's dependency, talking to a running control plane; the commands
that need the services say how to get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.test_pipeline import _free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
KEY = "client-install-key"
#: what only `termtune[services]` brings
SERVICE_PACKAGES = ("torch", "transformers", "sqlalchemy", "kombu", "boto3", "fastapi", "numpy")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with the checkout installed as the README says
    (`pip install .`), its dependencies resolved by pip from the configured index."""
    venv = tmp_path_factory.mktemp("client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    install = [venv / "bin" / "python", "-m", "pip", "install", "-q", "."]
    subprocess.run(install, cwd=ROOT, check=True, timeout=900)
    return venv


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> str:
    """The control plane as a process of the development environment (no workers: the
    client's job stays queued)."""
    port, var = _free_port(), tmp_path_factory.mktemp("api") / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    env.update(TERMTUNE_PORT=str(port), TERMTUNE_VAR_DIR=str(var), TERMTUNE_API_KEY=KEY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.api"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def _termtune(venv: Path, *args: str, cwd: Path, url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    env.update(TERMTUNE_API_URL=url, TERMTUNE_API_KEY=KEY)
    return subprocess.run(
        [venv / "bin" / "termtune", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_client_installs_without_the_services_dependencies(client_venv):
    listed = subprocess.run(
        [client_venv / "bin" / "python", "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"termtune", "httpx", "pydantic", "rich"} <= installed
    assert installed.isdisjoint(SERVICE_PACKAGES), installed & set(SERVICE_PACKAGES)


def test_the_client_alone_submits_lists_and_cancels_a_job(client_venv, api, tmp_path):
    spec = {"name": "from-client", "dataset": {"source": str(ROOT / "data/medical_terms.jsonl")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    version = _termtune(client_venv, "--version", cwd=tmp_path, url=api)
    assert version.stdout == "termtune 0.1.0\n", version.stderr
    submitted = _termtune(client_venv, "submit", "job.yaml", cwd=tmp_path, url=api)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    listed = _termtune(client_venv, "jobs", "--json", "--status", "queued", cwd=tmp_path, url=api)
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id], listed.stderr
    status = json.loads(_termtune(client_venv, "status", job_id, cwd=tmp_path, url=api).stdout)
    assert status["status"] == "queued" and status["name"] == "from-client"
    cancelled = _termtune(client_venv, "cancel", job_id, cwd=tmp_path, url=api)
    assert cancelled.stdout == f"{job_id}: cancelled (cancel requested)\n", cancelled.stderr
    schema = json.loads(_termtune(client_venv, "schema", cwd=tmp_path, url=api).stdout)
    assert schema == json.loads((ROOT / "docs" / "job-spec.schema.json").read_text())
    refused = _termtune(client_venv, "submit", "missing.yaml", cwd=tmp_path, url=api)
    assert refused.returncode == 1 and refused.stderr.startswith("termtune: "), refused.stderr


def test_a_command_that_needs_the_services_says_how_to_get_them(client_venv, tmp_path):
    done = _termtune(client_venv, "build-tiny-model", cwd=tmp_path, url="http://127.0.0.1:9")
    assert done.returncode == 1
    assert done.stderr == (
        "termtune: `termtune build-tiny-model` needs the services' packages (torch is not "
        "installed): pip install 'termtune[services]'\n"
    )
