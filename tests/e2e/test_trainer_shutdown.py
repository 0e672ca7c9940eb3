"""A training worker stopped (SIGTERM: an ECS or Spot stop) or killed (kill -9) mid-training."""

import contextlib
import json
import signal
import subprocess
import time

import pytest

from services.cli.client import Client
from services.cli.display import follow
from services.cli.launcher import Launcher
from tests.e2e.test_pipeline import _free_port
from tests.factories import lease_owner, spec_dict

pytestmark = pytest.mark.e2e
STEPS = 120


@contextlib.contextmanager
def _running(tmp_path, env=None, trainers=1):
    """All services as processes; their logs printed if the test fails."""
    launcher = Launcher(var_dir=tmp_path / "var", port=_free_port(), env=env or {})
    launcher.start(trainers=trainers)
    try:
        launcher.wait_ready(timeout=120)
        yield launcher, Client(launcher.url, api_key=(launcher.run_dir / "api_key").read_text())
    except BaseException:
        print(launcher.logs_tail(60))
        raise
    finally:
        launcher.stop()


def _submit(client, tiny_model, name, *, checkpoint_every):
    spec = spec_dict(
        tiny_model,
        name=name,
        training={
            "max_steps": STEPS,
            "logging_steps": 5,
            "checkpoint_every_steps": checkpoint_every,
        },
    )
    return client.submit(spec)["id"]


def _train_dir(tmp_path, job_id):
    return tmp_path / "var" / "store" / "jobs" / job_id / "train"


def _wait_for_step(client, job_id, step, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.job(job_id)["stages"]["train"].get("progress") or {}
        if progress.get("step", 0) >= step and "total_steps" in progress:
            return progress["step"]
        time.sleep(0.2)
    raise TimeoutError(f"training of {job_id} did not reach step {step}")


def _finish_on_a_new_trainer(launcher, client, job_id):
    launcher.start(("trainer",))
    done = follow(client, job_id, timeout=900, poll=0.5)
    assert done["status"] == "succeeded", launcher.logs_tail(40)
    return done


def test_sigterm_checkpoints_exits_and_the_job_resumes(tmp_path, tiny_model):
    with _running(tmp_path) as (launcher, client):
        job_id = _submit(client, tiny_model, "sigterm", checkpoint_every=10_000)
        _wait_for_step(client, job_id, 10)
        trainer = launcher.processes["trainer"]
        started = time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        try:
            code = trainer.wait(timeout=25)
        except subprocess.TimeoutExpired:
            pytest.fail("the trainer did not exit within 25 s of SIGTERM")
        assert code == 0, launcher.logs_tail(40)
        assert time.monotonic() - started < 25
        train_dir = _train_dir(tmp_path, job_id)
        saved = json.loads((train_dir / "checkpoints" / "latest.json").read_text())["step"]
        assert 10 <= saved < STEPS
        assert lease_owner(launcher, job_id, "train") is None  # released on the way out
        assert client.job(job_id)["status"] == "running"
        _finish_on_a_new_trainer(launcher, client, job_id)
        manifest = json.loads((train_dir / "manifest.json").read_text())
        assert manifest["resumed_from_step"] == saved
        assert manifest["steps"] == STEPS


def test_kill_9_trainer_the_job_resumes_on_another_from_its_checkpoint(tmp_path, tiny_model):
    fast = {"TERMTUNE_LEASE_SECONDS": "4", "TERMTUNE_RECONCILE_SECONDS": "1"}
    with _running(tmp_path, env=fast) as (launcher, client):
        job_id = _submit(client, tiny_model, "kill-9", checkpoint_every=20)
        train_dir = _train_dir(tmp_path, job_id)
        pointer = train_dir / "checkpoints" / "latest.json"
        deadline = time.monotonic() + 120
        while not pointer.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        launcher.processes["trainer"].send_signal(signal.SIGKILL)
        launcher.processes["trainer"].wait(timeout=10)
        saved = json.loads(pointer.read_text())["step"]
        killed_at = time.monotonic()
        _finish_on_a_new_trainer(launcher, client, job_id)
        manifest = json.loads((train_dir / "manifest.json").read_text())
        assert manifest["resumed_from_step"] >= saved
        assert manifest["steps"] == STEPS
        phases = [
            e["progress"].get("phase")
            for e in client.events(job_id)
            if e["type"] == "StageProgress"
        ]
        assert "worker lost (lease expired); job sent again" in phases
        print(f"recovered {time.monotonic() - killed_at:.1f}s after kill -9")
