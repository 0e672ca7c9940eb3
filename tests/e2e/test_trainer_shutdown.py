"""SIGTERM to a training worker (an ECS or Spot stop): checkpoint, exit 0, resume elsewhere."""

import json
import signal
import subprocess
import time

import pytest

from services.cli.client import Client
from services.cli.display import follow
from services.cli.launcher import Launcher
from tests.e2e.test_pipeline import _free_port
from tests.factories import spec_dict

pytestmark = pytest.mark.e2e
STEPS = 120


def _wait_for_step(client, job_id, step, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.job(job_id)["stages"]["train"].get("progress") or {}
        if progress.get("step", 0) >= step and "total_steps" in progress:
            return progress["step"]
        time.sleep(0.2)
    raise TimeoutError(f"training of {job_id} did not reach step {step}")


def test_sigterm_checkpoints_exits_and_the_job_resumes(tmp_path, tiny_model):
    launcher = Launcher(var_dir=tmp_path / "var", port=_free_port())
    launcher.start()
    try:
        launcher.wait_ready(timeout=120)
        client = Client(launcher.url, api_key=(launcher.run_dir / "api_key").read_text())
        spec = spec_dict(
            tiny_model,
            name="sigterm",
            training={"max_steps": STEPS, "logging_steps": 5, "checkpoint_every_steps": 10_000},
        )
        job = client.submit(spec)
        _wait_for_step(client, job["id"], 10)
        trainer = launcher.processes["trainer"]
        started = time.monotonic()
        trainer.send_signal(signal.SIGTERM)
        try:
            code = trainer.wait(timeout=25)
        except subprocess.TimeoutExpired:
            pytest.fail("the trainer did not exit within 25 s of SIGTERM")
        assert code == 0, launcher.logs_tail(40)
        assert time.monotonic() - started < 25
        train_dir = tmp_path / "var" / "store" / "jobs" / job["id"] / "train"
        saved = json.loads((train_dir / "checkpoints" / "latest.json").read_text())["step"]
        assert 10 <= saved < STEPS
        assert client.job(job["id"])["status"] == "running"
        launcher.start(("trainer",))  # a replacement worker takes the requeued job
        done = follow(client, job["id"], timeout=300, poll=0.5)
        assert done["status"] == "succeeded", launcher.logs_tail(40)
        manifest = json.loads((train_dir / "manifest.json").read_text())
        assert manifest["resumed_from_step"] == saved
        assert manifest["steps"] == STEPS
    except BaseException:
        print(launcher.logs_tail(60))
        raise
    finally:
        launcher.stop()
