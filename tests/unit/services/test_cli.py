"""The termtune command in-process: estimate, and one-line reasons with exit 1."""

from __future__ import annotations

import json
import math
import re

import yaml

from services.cli.main import main
from tests.factories import spec_dict


def test_estimate_prepares_the_data_here_and_prices_it(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TERMTUNE_VAR_DIR", str(tmp_path / "var"))
    spec = spec_dict(tiny_model, training={"max_steps": -1, "epochs": 2, "batch_size": 4})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["estimate", "job.yaml", "--instance-type", "g5.2xlarge"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["dataset"]["train_rows"]
    assert rows > 100
    assert result["training"]["optimizer_steps"] == math.ceil(rows / 4) * 2
    assert result["training"]["price_per_hour_usd"] == 1.212
    assert not (tmp_path / "var" / "store" / "jobs").exists()  # an estimate records no job


def test_a_stage_run_here_leaves_the_job_paused_not_running(tmp_path, tiny_model, monkeypatch):
    from shared.jobs import open_records
    from shared.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TERMTUNE_VAR_DIR", str(tmp_path / "var"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict(tiny_model, name="here")))
    assert main(["prepare", "job.yaml"]) == 0
    job = open_records(Settings()).summary("here-local")
    assert job["status"] == "paused"
    assert job["next"] == "termtune train SPEC --job here-local"


def test_errors_are_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "termtune: estimate needs a SPEC (prepared here) or --job ID"


def _job(status, train=None, evaluate="pending"):
    stages = {s: {"status": "pending"} for s in ("prepare", "train", "evaluate", "publish")}
    stages["prepare"] = {"status": "succeeded"}
    if train is not None:
        stages["train"] = train
    stages["evaluate"] = {"status": evaluate}
    return {"id": "j-1", "status": status, "stages": stages}


class _FakeClient:
    def __init__(self, jobs):
        self.jobs = list(jobs)

    def job(self, job_id):
        return self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]


def test_follow_draws_live_bars_with_loss_and_eta(monkeypatch):
    import io

    from rich.console import Console

    from services.cli import display

    out = io.StringIO()
    bars = Console(file=out, force_terminal=True, width=120)
    monkeypatch.setattr(display, "progress_console", bars)  # stderr's console
    progress = {"step": 3, "total_steps": 6, "loss": 1.2345, "eta_s": 12.4, "examples_per_s": 8}
    jobs = [
        _job("running", {"status": "running", "progress": progress}),
        _job("running", {"status": "succeeded", "progress": {**progress, "step": 6}}, "running"),
        _job("failed", {"status": "succeeded"}, "failed"),
    ]
    job = display.follow(_FakeClient(jobs), "j-1", poll=0.01, bars=True)
    assert job["status"] == "failed"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without the colours
    assert "loss 1.234" in text and "ETA 12s" in text and "3/6" in text
    assert "6/6" in text  # the finished training bar


def test_follow_prints_lines_in_a_log(monkeypatch, capsys):
    from services.cli import display

    jobs = [_job("running", {"status": "running", "progress": {"step": 1, "total_steps": 2}})]
    jobs.append(_job("succeeded", {"status": "succeeded"}, "succeeded"))
    job = display.follow(_FakeClient(jobs), "j-1", poll=0.01, bars=False)
    assert job["status"] == "succeeded"
    printed = capsys.readouterr()
    assert "[train] step 1/2" in printed.err and printed.out == ""  # stdout: results only


def test_follow_lines_one_per_step_with_validation_loss_and_the_end_last(monkeypatch, capsys):
    from services.cli import display

    step = {"step": 4, "total_steps": 8, "loss": 2.5, "eval_loss": 2.75, "eta_s": 30.4}
    stored = {**step, "phase": "checkpoint stored"}
    last = {**step, "step": 8, "eta_s": 0.0}
    jobs = [
        _job("running", {"status": "running", "progress": step}),
        _job("running", {"status": "running", "progress": step}),  # nothing new: no line
        _job("running", {"status": "running", "progress": stored}),
        _job("succeeded", {"status": "succeeded", "progress": last}, "succeeded"),
    ]
    display.follow(_FakeClient(jobs), "j-1", poll=0.01, bars=False)
    lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
    train = [line for line in lines if "[train]" in line or line.startswith("train")]
    assert train == [
        "train running",
        "[train] step 4/8 loss 2.500 val loss 2.750 eta 30s",
        "[train] checkpoint stored at step 4",
        "[train] step 8/8 loss 2.500 val loss 2.750 eta 0s",
        "train succeeded",
    ]


def test_validation_errors_read_as_fields_not_python_lists():
    import httpx

    from services.cli.client import _detail

    response = httpx.Response(
        422,
        json={
            "detail": [
                {
                    "loc": ["body", "temperature"],
                    "msg": "Input should be a finite number",
                    "type": "finite_number",
                }
            ]
        },
    )
    assert _detail(response) == "field 'body.temperature': Input should be a finite number"


def test_the_readme_database_commands_run_as_written(tmp_path):
    """The README's "The job database" block, line by line with bash, on a var/ whose store
    holds a job in the old layout (events as objects)."""
    import os
    import re
    import subprocess

    from shared.jobspec import JobSpec
    from shared.ledger import migrate
    from shared.messages import JobSubmitted, StageStarted, dump_message
    from shared.store import LocalStore
    from tests.factories import ROOT

    section = (ROOT / "README.md").read_text().split("\n### The job database\n", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert [line.split("#")[0].split()[1:3] for line in lines] == [
        ["db", "upgrade"],
        ["db", "import-store"],
    ]
    store = LocalStore(tmp_path / "var" / "store")
    job_id = "terms-20261101000000000000-aaaaaa"
    store.put_bytes(f"jobs/{job_id}/spec.json", JobSpec(name="terms").model_dump_json().encode())
    submitted = JobSubmitted(
        job_id=job_id, spec_uri=store.uri(f"jobs/{job_id}/spec.json"), name="t"
    )
    started = StageStarted(job_id=job_id, stage="prepare", worker="w")
    for n, event in enumerate((submitted, started)):
        store.put_json(f"jobs/{job_id}/events/{n:020d}-x.json", dump_message(event))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "TERMTUNE_VAR_DIR": str(tmp_path / "var")}
    outputs = []
    for line in lines:
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert f"schema {migrate.head()} (the newest this termtune knows)" in outputs[0]
    assert outputs[1].startswith("imported 1 jobs and 0 models from file://")
    from shared.jobs import open_records
    from shared.settings import Settings

    job = open_records(Settings(var_dir=tmp_path / "var")).summary(job_id)
    assert job["status"] == "running" and job["stages"]["prepare"]["status"] == "running"


def test_termtune_up_starts_a_dead_service_again_with_a_growing_backoff(tmp_path):
    from services.cli.launcher import Launcher

    class Proc:
        def __init__(self, code=None):
            self.code = code

        def poll(self):
            return self.code

    launcher = Launcher(var_dir=tmp_path / "var")
    started = []
    launcher.start = lambda names, **_: [  # type: ignore[method-assign]
        started.append(n) or launcher.processes.__setitem__(n, Proc()) for n in names
    ]
    launcher.processes = {"api": Proc(), "dataprep": Proc(code=-9)}
    t = 1000.0
    assert launcher.supervise(now=t)[0].startswith("dataprep exited (-9); starting it again in 1 s")
    assert launcher.supervise(now=t + 0.5) == [] and started == []  # its backoff
    assert launcher.supervise(now=t + 1.0) == ["dataprep started again (restart 1 in a row)"]
    launcher.processes["dataprep"].code = 1  # dies again at once: 2 s, then 4 s
    assert "starting it again in 2 s" in launcher.supervise(now=t + 2)[0]
    launcher.supervise(now=t + 4)
    launcher.processes["dataprep"].code = 1
    assert "starting it again in 4 s" in launcher.supervise(now=t + 5)[0]
    launcher.supervise(now=t + 9)
    launcher.processes["dataprep"].code = 1  # after 5 minutes up, the count starts again
    assert "starting it again in 1 s" in launcher.supervise(now=t + 9 + 301)[0]
    assert started == ["dataprep"] * 3 and launcher.processes["api"].code is None
