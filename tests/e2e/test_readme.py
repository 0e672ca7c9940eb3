"""The README's "Using it" commands, run as written, in order, on a fresh var/.

The command block is read from README.md when the test runs, so a change to the README
that breaks a command fails here. Each line runs with bash in a working folder of its own
that links the repository's files (so `make up` finds `.venv/.installed` up to date and
installs nothing) and starts with no var/: no tiny model, no store, no API key. The lines
share their environment as they would in one shell: the `export` line's API key reaches
every line after it. Bedrock's lines talk to the repository's Bedrock stand-in, reached
through the TERMTUNE_BEDROCK_* endpoint settings, not to AWS.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.test_pipeline import _free_port
from tests.factories import linked_checkout
from tests.standins.bedrock import ACCOUNT, REGION, BedrockStandIn

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
LINKED = (
    ".venv",
    "Makefile",
    "pyproject.toml",
    "deploy",
    "examples",
    "data",
    "services",
    "shared",
)
FOREIGN_ARN = f"arn:aws:bedrock:{REGION}:{ACCOUNT}:imported-model/someone-elses"


def using_it_lines() -> list[str]:
    """The command lines of the README's "Using it" block (comment-only lines left out)."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Using it\n", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert block, "README.md's 'Using it' section has no ```bash block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _argv(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _subcommand(line: str) -> str:
    """`submit`, `models --imported`, ...: what a termtune line does ('' for other lines)."""
    argv = _argv(line)
    if not argv or not argv[0].endswith("termtune"):
        return ""
    return " ".join([argv[1], *(a for a in argv[2:] if a in ("--imported", "--json"))])


class Shell:
    """Runs lines with bash in one folder, carrying exported variables from line to line."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env, self.ran = cwd, env, []
        self.env_file = cwd.parent / "shell.env"

    def run(self, line: str, timeout: float = 300) -> subprocess.CompletedProcess:
        script = f'{line}\n__rc=$?\nenv -0 > "{self.env_file}"\nexit $__rc\n'
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.ran.append((line, done))
        print(f"$ {line}\n{done.stdout}{done.stderr}(exit {done.returncode})", flush=True)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stderr}"
        entries = self.env_file.read_bytes().decode().split("\0")
        self.env = dict(e.split("=", 1) for e in entries if "=" in e)
        return done

    def start(self, line: str, log: Path) -> subprocess.Popen:
        """A long-running line (`make up`) in the background, in a process group of its own."""
        with log.open("w") as out:
            return subprocess.Popen(
                ["bash", "-c", line],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def _wait_until_up(up: subprocess.Popen, var: Path, port: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert up.poll() is None, f"`make up` exited {up.returncode}:\n{log.read_text()}"
        if (var / "run" / "api_key").exists() and len(list(var.glob("run/*.heartbeat"))) == 4:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    pytest.fail(f"`make up` was not ready within 240 s:\n{log.read_text()}")


def _wait_for_status(shell: Shell, job_id: str, wanted: str, within: float = 180) -> None:
    url = f"http://127.0.0.1:{shell.env['TERMTUNE_PORT']}/v1/jobs/{job_id}"
    headers = {"Authorization": f"Bearer {shell.env['TERMTUNE_API_KEY']}"}
    deadline, status = time.monotonic() + within, None
    while time.monotonic() < deadline:
        status = httpx.get(url, headers=headers).json()["status"]
        if status == wanted:
            return
        time.sleep(0.5)
    pytest.fail(f"job {job_id} is {status}, not {wanted}, after {within:.0f} s")


def _stop(up: subprocess.Popen, work: Path, env: dict[str, str]) -> None:
    """Ctrl-C, as the README says; then `termtune down` and a kill for whatever is left."""
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(timeout=30)
    subprocess.run(
        [str(work / ".venv/bin/termtune"), "down"],
        cwd=work,
        env={**env, "TERMTUNE_VAR_DIR": str(work / "var")},
        capture_output=True,
        timeout=120,
    )


def _print_logs(work: Path, up_log: Path) -> None:
    print(f"--- make up ---\n{up_log.read_text() if up_log.exists() else '(none)'}")
    for log in sorted((work / "var" / "logs").glob("*.log")):
        print(f"--- {log.name} (last 80 lines) ---")
        print("\n".join(log.read_text(errors="replace").splitlines()[-80:]))


def _retry_spec(work: Path) -> str:
    """The example with its own name and a short training: the job `cancel` and `retry` are
    run on. Both need a job that has not ended (cancel) or that was cancelled (retry), and
    the README's own job has succeeded by then; a short run keeps the test's time down, and
    force_publish keeps its one epoch from being judged (the README's job is)."""
    spec = yaml.safe_load((work / "examples" / "medical-terms.yaml").read_text())
    spec["name"] = "readme-retry"
    spec["training"]["epochs"] = 1
    spec["evaluation"] = {"max_rows": 8, "bootstrap_samples": 100, "gate": {"force_publish": True}}
    path = work / "readme-retry.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path.name


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh checkout's view of the repository: its files linked, no var/."""
    return linked_checkout(tmp_path / "termtune", LINKED)


@pytest.fixture
def bedrock(s3_endpoint):
    """The Bedrock stand-in, holding one model someone else imported into the account."""
    standin = BedrockStandIn(s3_endpoint)
    server = standin.start()
    standin.models[FOREIGN_ARN] = {
        "modelArn": FOREIGN_ARN,
        "modelName": "someone-elses-model",
        "creationTime": time.time(),
        "modelArchitecture": "T5",
    }
    yield standin
    server.should_exit = True


# The example's training and a short one: 17 minutes measured on 2 cores shared with other
# test runs (load average 7), too close to the suite's 20-minute limit.
@pytest.mark.timeout(3600)
def test_the_readme_using_it_commands_work_as_written(workdir, bedrock, s3_endpoint):
    lines = using_it_lines()
    assert lines[0].startswith("make up"), "the block starts the services first"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    env.update(
        TERMTUNE_PORT=str(port),  # the README's 8000 may be taken on a shared machine
        TERMTUNE_BEDROCK_REGION=REGION,
        TERMTUNE_BEDROCK_ENDPOINT_URL=bedrock.url,
        TERMTUNE_BEDROCK_RUNTIME_ENDPOINT_URL=bedrock.url,
        TERMTUNE_BEDROCK_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",  # noqa: S106 - the stand-in's, not a secret
        AWS_DEFAULT_REGION=REGION,
    )
    shell = Shell(workdir, env)
    up_log = workdir.parent / "make-up.log"
    up = shell.start(lines[0], up_log)
    job_id = retry_id = None
    seen: set[str] = set()
    try:
        _wait_until_up(up, workdir / "var", port, up_log)
        for line in lines[1:]:
            command = _subcommand(line)
            seen.add(command)
            if command in ("cancel", "retry") and retry_id is None:
                # The README's job has ended: cancel and retry get a job of their own.
                submitted = shell.run(f".venv/bin/termtune submit {_retry_spec(workdir)}")
                retry_id = submitted.stdout.split()[0]
            target = retry_id if command in ("cancel", "retry") else job_id
            if "<job-id>" in line:
                assert target, f"`{line}` comes before a job was submitted"
                line = line.replace("<job-id>", target)
            if command == "retry":
                _wait_for_status(shell, retry_id, "cancelled")
            done = shell.run(line, timeout=1800)
            out = done.stdout
            if command == "submit":
                job_id = out.split()[0]
                assert "quality gate: passed" in out
                # var/ was fresh: submit built the tiny model the example names
                assert "building the embedded tiny model in var/models/tiny-flan-t5" in done.stderr
            elif command == "jobs":
                rows = out.splitlines()
                assert any(row.startswith(f"{job_id}\tsucceeded\t") for row in rows), out
            elif command == "jobs --json":
                listed = json.loads(out)
                assert job_id in [j["id"] for j in listed], listed
                assert {j["status"] for j in listed} == {"succeeded"}, listed
                assert set(listed[0]) >= {"id", "name", "status", "model_name", "stages"}
            elif command == "schema":
                written = (workdir / "job-spec.schema.json").read_text(encoding="utf-8")
                assert written == (ROOT / "docs" / "job-spec.schema.json").read_text("utf-8")
            elif command == "--version":
                assert re.fullmatch(r"termtune \d+\.\d+\.\d+\n", out), out
            elif command == "status":
                job = json.loads(out)
                assert job["status"] == "succeeded", job
                assert {s["status"] for s in job["stages"].values()} == {"succeeded"}
            elif command == "report":
                assert "quality gate: passed" in out
                assert re.search(r"^  pass  ", out, re.MULTILINE), out
            elif command == "events":
                assert out.splitlines()[-1].split()[1] == "ModelPublished", out
            elif command == "cancel":
                assert out.strip().endswith("(cancel requested)"), out
            elif command == "retry":
                assert re.match(rf"{retry_id}: \w+ \(retry 1\)\n", out), out
            elif command == "estimate":
                estimate = json.loads(out)
                assert estimate["instance_type"] == "g5.12xlarge", estimate
                assert estimate["training"]["optimizer_steps"] > 0, estimate
                # the tiny model fits every capacity: the default StageMemory holds it
                publish = estimate["stages"]["publish"]
                assert publish["Fargate"].startswith("StageMemory 16384: bf16 "), publish
            elif command == "models":
                assert re.search(r"^medical-terms\tlocal\t", out, re.MULTILINE), out
            elif command == "invoke":
                answer = json.loads(out)
                assert answer["generation_token_count"] >= 1, answer
                assert answer["stop_reason"] in ("stop", "length"), answer
            elif command == "models --imported":
                assert f"someone-elses-model\t{FOREIGN_ARN}\t-" in out.splitlines(), out
                assert bedrock.calls_to("ListImportedModels"), "Bedrock was not asked"
            elif command == "delete-model":
                assert out.strip() == "deleted medical-terms", out
        assert {"submit", "status", "report", "invoke", "models --imported", "schema"} <= seen
    except BaseException:
        _print_logs(workdir, up_log)
        raise
    finally:
        _stop(up, workdir, shell.env)


def first_commands() -> list[str]:
    """The README's first code block: the run command and the test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)\n```", readme, re.DOTALL)
    assert block, "README.md starts with no ```bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]


@pytest.mark.timeout(3600)
def test_the_readme_run_command_runs_the_job_on_a_fresh_machine(workdir):
    """`make run`, literally, on a fresh var/ (`make test` is what CI itself runs)."""
    run, test = first_commands()
    assert (run, test) == ("make run", "make test")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    env["TERMTUNE_PORT"] = str(_free_port())  # the README's 8000 may be taken here
    done = Shell(workdir, env).run(run, timeout=3000)
    out = done.stdout + done.stderr
    assert "building the embedded tiny model in var/models/tiny-flan-t5" in out  # fresh var/
    assert re.search(r"publish\s+succeeded", out), out[-3000:]
    assert "quality gate: passed" in out  # the example passes the default gate's rules
    # the evaluation's timing reaches the summary through the job's result
    timing = r"evaluation: base [\d.]+ s \+ tuned [\d.]+ s on cpu \(float32\), batches of \d+ "
    assert re.search(timing + "by length", out), out[-3000:]
    assert re.search(r"invoke 'medical-terms': '[^']+'\s+-> '[^']+", out), out[-3000:]
    assert not (workdir / "var" / "run" / "pids.json").exists()  # every service stopped


def stage_lines() -> list[str]:
    """The command lines of the README's in-process stage block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("Each stage also runs alone", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert block, "README.md's in-process stages have no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.timeout(3600)
def test_the_readme_stage_commands_run_as_written(workdir):
    """Each stage in-process, literally as the README gives them, on a fresh var/: one job
    (medical-terms-local) paused between stages, then published."""
    lines = stage_lines()
    assert [_argv(line)[1] for line in lines] == ["prepare", "train", "evaluate", "publish"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERMTUNE_")}
    shell = Shell(workdir, env)
    events = []
    for line in lines:
        out = shell.run(line, timeout=1200).stdout
        events.append(json.loads(out[out.index("{") :]))
    assert {e["job_id"] for e in events} == {"medical-terms-local"}
    assert [e["type"] for e in events] == [
        "DatasetPrepared",
        "ModelTrained",
        "ModelEvaluated",
        "ModelPublished",
    ]
    assert events[2]["publish"] is True and events[3]["target"] == "local"
    assert (workdir / "var" / "termtune.db").exists()  # the embedded ledger
