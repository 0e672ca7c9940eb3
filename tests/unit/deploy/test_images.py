"""The images: each service runs with only the packages its requirements file lists, from
a hashed lock that agrees with its requirements and with the versions the tests run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import SAMPLE_DATA, make_spec

ROOT = Path(__file__).resolve().parents[3]
REQUIREMENTS = ROOT / "deploy/docker/requirements"
IMPORT_NAMES = {
    "pyyaml": "yaml",
    "rouge-score": "rouge_score",
    "pydantic-settings": "pydantic_settings",
    "uvicorn": "uvicorn",
}
# Every third-party package any service imports; torch comes from the Dockerfile.
ALL = {
    "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "safetensors",
    "tokenizers", "pyarrow", "kombu", "boto3", "fastapi", "uvicorn", "httpx", "pydantic",
    "pydantic_settings", "yaml", "rouge_score", "sacrebleu", "numpy", "tenacity", "rich",
    "prometheus_client", "sqlalchemy", "alembic", "psycopg",
}  # fmt: skip
SERVICES = ("api", "dataprep", "trainer", "evaluator", "publisher")


def pins(service: str) -> list[str]:
    """The requirement lines of a service's .in file, following -r."""
    found: list[str] = []
    pending = [REQUIREMENTS / f"{service}.in"]
    while pending:
        for line in pending.pop().read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                pending.append(REQUIREMENTS / line[3:].strip())
            elif line:
                found.append(line)
    return found


def allowed(service: str) -> set[str]:
    """Import names of a service's requirements (following -r), plus torch if its image
    installs it."""
    names: set[str] = set()
    for line in pins(service):
        name = re.split(r"[\[=<>]", line)[0].lower()
        names.add(IMPORT_NAMES.get(name, name.replace("-", "_")))
    dockerfile = (ROOT / f"services/{service}/Dockerfile").read_text()
    if re.search(r"pip install[^\n]*torch==", dockerfile):
        names.add("torch")
    return names


def _run_without(service: str, code: str) -> subprocess.CompletedProcess[str]:
    blocked = sorted(ALL - allowed(service))
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize("service", SERVICES)
def test_every_pinned_requirement_is_in_pyproject(service):
    pyproject = (ROOT / "pyproject.toml").read_text()
    for line in (REQUIREMENTS / f"{service}.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name = re.split(r"[\[=]", line)[0]
            assert f'"{name}' in pyproject, line


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_with_only_its_requirements(service):
    modules = [f"services.{service}.main"]
    if service != "api":
        modules.append(f"services.{service}.handler")
    if service == "trainer":
        modules += ["services.trainer.distributed", "services.trainer.fit"]
    if service == "publisher":
        modules += ["services.publisher.target", "shared.bedrock"]
    done = _run_without(service, "".join(f"import {m}\n" for m in modules))
    assert done.returncode == 0, done.stderr[-3000:]


def test_dataprep_prepares_a_dataset_without_torch(tiny_model, tmp_path):
    spec = make_spec(tiny_model).model_dump_json()
    code = f"""
from shared.jobspec import JobSpec
from shared.messages import PrepareDataset
from services.dataprep.handler import handle
from tests.factories import make_ctx
from pathlib import Path
ctx = make_ctx(Path({str(tmp_path / "var")!r}))
spec = JobSpec.model_validate_json({spec!r})
event = handle(PrepareDataset(job_id="j", spec_uri=ctx.jobs.create("j", spec)), ctx)
manifest = ctx.manifest_at(event.manifest)
print(sum(manifest["counts"].values()))
"""
    done = _run_without("dataprep", code)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sum(1 for line in SAMPLE_DATA.read_text().splitlines() if line.strip())
    assert int(done.stdout.strip()) == rows


@pytest.mark.parametrize("service", SERVICES)
def test_the_model_cache_volume_folder_belongs_to_the_service_user(service):
    """Issue 20: compose mounts the model-cache volume at HF_HOME, a folder no image created,
    so Docker made it root's and the first download failed (blaming the hub)."""
    final = (ROOT / f"services/{service}/Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    home = re.search(r"HF_HOME=(\S+)", final).group(1)
    run = final.split("\nUSER ", 1)[0]  # what runs as root, before the service's user
    assert f"mkdir -p {home}" in run and "chown -R termtune:termtune /home/termtune/.cache" in run
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"model-cache:{home}" in compose


def _locked(lock: Path) -> dict[str, str]:
    """Package → version of a lock file (each pin followed by its hashes)."""
    pins = re.findall(r"^([A-Za-z0-9_.\[\],-]+)==(\S+) \\$", lock.read_text(), re.MULTILINE)
    return {_name(name): version for name, version in pins}


def _name(requirement: str) -> str:
    return re.split(r"\[", requirement)[0].lower().replace("_", "-")


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_installs_its_lock_with_hashes_and_the_lock_holds_its_pins(service):
    dockerfile = (ROOT / f"services/{service}/Dockerfile").read_text()
    assert f"pip install --require-hashes -r /tmp/{service}.lock" in dockerfile
    lock = REQUIREMENTS / f"{service}.lock"
    assert "Generated by `make lock`" in lock.read_text().splitlines()[0]
    locked = _locked(lock)
    assert "torch" not in locked and "triton" not in locked  # torch has its own line
    assert not [n for n in locked if n.startswith(("nvidia-", "cuda-"))]
    for line in pins(service):
        name, version = line.split("==")
        assert locked.get(_name(name)) == version, (service, line)


@pytest.mark.parametrize("service", SERVICES)
def test_every_image_runs_the_versions_the_tests_run(service):
    """make install installs dev.lock: an image's lock may not differ from it."""
    dev = _locked(REQUIREMENTS / "dev.lock")
    image = _locked(REQUIREMENTS / f"{service}.lock")
    assert {n: (v, dev.get(n)) for n, v in image.items() if dev.get(n) != v} == {}


def test_make_install_installs_the_tests_from_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r deploy/docker/requirements/dev.lock" in makefile
