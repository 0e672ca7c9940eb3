"""A full disk under the embedded deployment: its folder (store, queue, cache, logs) on a
real tmpfs of its own, filled to the last 64 KB while a job runs, at each stage in turn."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.display import TERMINAL
from tests.e2e.test_trainer_shutdown import _running
from tests.factories import FAST_LEASE, lease_settings, spec_dict

pytestmark = pytest.mark.e2e
STAGES = ("prepare", "train", "evaluate", "publish")
#: how long the disk stays full once filled (unless the job ends first)
FULL_FOR = 60.0


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/var`` on a 400 MB tmpfs of its own (mounting needs root, as CI runs)."""
    var = tmp_path / "var"
    var.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(var)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs for the full-disk scenario (root needed): {done.stderr}")
    yield var
    subprocess.run(["umount", "-l", str(var)], check=False)


def _fill(folder: Path, *, leave: int) -> Path:
    """A ballast file that leaves ``leave`` bytes free on ``folder``'s filesystem. The stage
    writes meanwhile: when it took some of the space measured, measure again (a full run
    failed here once, between the measure and the allocation)."""
    ballast = folder / "ballast"
    with open(ballast, "wb") as f:
        for _ in range(100):
            stat = os.statvfs(folder)
            have = os.fstat(f.fileno()).st_blocks * 512
            size = max(1, have + stat.f_bavail * stat.f_frsize - leave)
            try:
                os.posix_fallocate(f.fileno(), 0, size)  # real blocks, not a hole
                return ballast
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                time.sleep(0.01)
    raise AssertionError(f"could not fill {folder}: the services kept writing")


def _wait_for(launcher, client, job_id: str, done, timeout: float) -> dict:
    """The job once ``done(job)``, ``timeout`` seconds pass or a service has died."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        if done(job) or time.monotonic() > deadline or _dead(launcher):
            return job
        time.sleep(0.2)


def _dead(launcher) -> dict[str, int]:
    """Services that have exited, with their exit codes."""
    return {n: p.returncode for n, p in launcher.processes.items() if p.poll() is not None}


def _leftovers(var: Path) -> list[str]:
    """Half-written objects in the store and empty messages in the queue folder."""
    partial = [str(p) for p in (var / "store").rglob(".tmp-*")]
    empty = [str(p) for p in (var / "broker").rglob("*") if p.is_file() and p.stat().st_size == 0]
    return partial + empty


def test_a_full_disk_mid_job(scenario, small_disk, tmp_path, tiny_model):
    outcome = scenario(
        "a full disk mid-job",
        full=8,
        ci=4,
        must_hold="the job completes once space is freed, or fails naming the full disk and "
        "completes on retry; no half-written object or empty message is left; every "
        "service stays up",
        settings=lease_settings(FAST_LEASE),
    )
    env = {
        **FAST_LEASE,
        "TERMTUNE_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",  # not on the disk
    }
    with _running(tmp_path, env=env) as (launcher, client):
        for n in range(outcome.size):
            stage = STAGES[n % len(STAGES)]
            job_id = client.submit(spec_dict(tiny_model, name=f"disk-{n}"))["id"]
            job = _wait_for(
                launcher,
                client,
                job_id,
                lambda j, at=stage: j["stages"][at]["status"] != "pending",
                600,
            )
            ballast = _fill(small_disk, leave=64 * 1024)
            outcome.count(f"filled during {stage}")
            job = _wait_for(launcher, client, job_id, lambda j: j["status"] in TERMINAL, FULL_FOR)
            ballast.unlink()
            job = _wait_for(launcher, client, job_id, lambda j: j["status"] in TERMINAL, 600)
            if job["status"] == "failed":
                outcome.count("failed while full")
                reason = (job.get("error") or {}).get("reason", "")
                outcome.check(
                    "no space left" in reason.lower(),
                    f"{job_id} failed without naming the full disk: {job.get('error')!r}",
                )
                client.retry(job_id)
                job = _wait_for(launcher, client, job_id, lambda j: j["status"] in TERMINAL, 600)
            if outcome.check(job["status"] == "succeeded", f"{job_id}: {job['status']}"):
                outcome.count("completed")
            leftovers = _leftovers(small_disk)
            outcome.check(not leftovers, f"{job_id} left {leftovers[:5]}")
            dead = _dead(launcher)
            if not outcome.check(not dead, f"{job_id}: these services died: {dead}"):
                break
    outcome.verdict()
