"""`termtune up` as a user runs it: its settings from the environment, and no service left
running after it is stopped by a signal or killed outright."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_pipeline import _free_port

pytestmark = pytest.mark.e2e
TERMTUNE = str(Path(sys.executable).parent / "termtune")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _up(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen, dict[str, int], dict[str, str]]:
    """`termtune up` on TERMTUNE_PORT and TERMTUNE_VAR_DIR (and other settings); once it says
    it is up (its own readiness check passed, the supervisor running), its services' pids."""
    port, var = _free_port(), tmp_path / "var"
    env = {**os.environ, "TERMTUNE_PORT": str(port), "TERMTUNE_VAR_DIR": str(var), **settings}
    env.pop("TERMTUNE_API_URL", None)
    env.pop("TERMTUNE_API_KEY", None)
    launcher = subprocess.Popen(
        [TERMTUNE, "up"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    said = ""
    while time.monotonic() < deadline and "termtune is up" not in said:
        assert launcher.poll() is None, f"termtune up exited: {said}"
        ready, _, _ = select.select([launcher.stdout], [], [], 1.0)
        if ready:
            said += launcher.stdout.readline()
    if "termtune is up" not in said:
        launcher.kill()
        pytest.fail("termtune up was not ready on TERMTUNE_PORT within 600 s")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    return launcher, json.loads((var / "run" / "pids.json").read_text()), env


def _survivors(pids: dict[str, int], within: float) -> list[str]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.2)
    return [name for name, pid in pids.items() if _alive(pid)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_service_outlives_termtune_up(tmp_path, sig):
    launcher, pids, env = _up(tmp_path)
    try:
        assert set(pids) == {"api", "dataprep", "trainer", "evaluator", "publisher"}
        # the client finds the API and its key through the same two settings
        jobs = subprocess.run([TERMTUNE, "jobs"], env=env, cwd=tmp_path, capture_output=True)
        assert jobs.returncode == 0, jobs.stderr.decode()
        launcher.send_signal(sig)
        code = launcher.wait(timeout=60)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)  # up: stopping is its end
        assert _survivors(pids, within=45) == []
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free now."""
    for _ in range(50):
        base = _free_port()
        try:
            for offset in range(count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


def test_termtune_up_starts_a_killed_service_again(tmp_path, tiny_model):
    """Issue 19: one `kill -9` of a worker ended every service in 7-11 s. Now the dead one is
    started again (after a 1 s backoff) and the deployment keeps working. Issue 23: with
    TERMTUNE_METRICS_PORT each worker serves its metrics on its own port (the restarted one
    on its old one), and with TERMTUNE_LOG_FORMAT=json its log lines are JSON carrying the
    job they are about."""
    from prometheus_client.parser import text_string_to_metric_families

    from services.cli.client import Client
    from tests.factories import spec_dict

    metrics = _free_ports(5)
    launcher, pids, env = _up(
        tmp_path, TERMTUNE_METRICS_PORT=str(metrics), TERMTUNE_LOG_FORMAT="json"
    )
    var = tmp_path / "var"
    try:
        os.kill(pids["dataprep"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        new = pids["dataprep"]
        while time.monotonic() < deadline and new == pids["dataprep"]:
            new = json.loads((var / "run" / "pids.json").read_text())["dataprep"]
            time.sleep(0.2)
        assert new != pids["dataprep"] and _alive(new)
        assert launcher.poll() is None
        assert all(_alive(pids[n]) for n in ("api", "trainer", "evaluator", "publisher"))
        client = Client(f"http://127.0.0.1:{env['TERMTUNE_PORT']}",
                        api_key=(var / "run" / "api_key").read_text().strip())  # fmt: skip
        job = client.submit(spec_dict(tiny_model, name="after-restart"))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            prepare = client.job(job["id"])["stages"]["prepare"]["status"]
            if prepare not in ("pending", "running"):
                break
            time.sleep(0.5)
        assert prepare == "succeeded"  # the restarted data-prep took the job
        scraped = httpx.get(f"http://127.0.0.1:{metrics + 1}/metrics", timeout=10).text
        runs = {
            (s.labels["stage"], s.labels["outcome"]): s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "termtune_stage_duration_seconds_count"
        }
        assert runs == {("prepare", "succeeded"): 1.0}
        for offset in (2, 3, 4):  # trainer, evaluator, publisher: their own ports
            assert httpx.get(f"http://127.0.0.1:{metrics + offset}/metrics").status_code == 200
        lines = [json.loads(line) for line in (var / "logs" / "dataprep.log").open()]
        about = [line for line in lines if line.get("job_id") == job["id"]]
        assert about and {line["stage"] for line in about} == {"prepare"}, lines
        assert {line["service"] for line in lines} == {"dataprep"}
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        current = json.loads((var / "run" / "pids.json").read_text()) if (
            var / "run" / "pids.json").exists() else {}  # fmt: skip
        for pid in {**pids, **current}.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
