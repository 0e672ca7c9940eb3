"""The container tests' care for the engine they share with their host: repeated runs reuse
the unchanged layers and remove only what termtune's own builds left behind, and a disk too
full for a build is refused up front, by name, before a build fails half-way."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.containers import engine

if os.environ.get("TERMTUNE_TEST_CONTAINERS") != "1":
    pytest.skip("runs under `make test-compose` (a Docker engine)", allow_module_level=True)

OURS = "termtune-test/reclaim:1"
THEIRS = "termtune-test/not-ours:1"


@pytest.fixture(scope="module", autouse=True)
def _engine() -> None:
    problem = engine.engine_problem()
    if problem:
        pytest.fail(f"make test-compose needs a Docker engine: {problem}")
    engine.build_debian()


def _dockerfile(folder: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text("\n".join([f"FROM {engine.DEBIAN_IMAGE}", *lines]) + "\n")
    return folder


def _build(tag: str, context: Path, stamp: str, *, check: bool = True) -> str:
    engine.run(
        ["docker", "build", "-t", tag, "--build-arg", f"STAMP={stamp}", str(context)],
        env={"DOCKER_BUILDKIT": "0"},
        timeout=600,
        check=check,
    )
    return image_id(tag) if check else ""


def image_id(name: str) -> str:
    return engine.run(["docker", "image", "inspect", "-f", "{{.Id}}", name]).stdout.strip()


def containers(label: str) -> set[str]:
    out = engine.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"label={label}"])
    return set(out.stdout.split())


def test_reclaim_removes_only_what_termtunes_builds_left(tmp_path):
    ours = _dockerfile(
        tmp_path / "ours", f"LABEL {engine.OWN_LABEL}", "ARG STAMP", "RUN echo $STAMP > /stamp"
    )
    failing = _dockerfile(tmp_path / "failing", f"LABEL {engine.OWN_LABEL}", "ARG STAMP")
    (failing / "Dockerfile").write_text((failing / "Dockerfile").read_text() + "RUN exit 3\n")
    theirs = _dockerfile(tmp_path / "theirs", "ARG STAMP", "RUN echo $STAMP > /stamp")
    superseded = _build(OURS, ours, "first")
    current = _build(OURS, ours, "second")  # the first build is now untagged: a leftover
    their_old = _build(THEIRS, theirs, "first")
    _build(THEIRS, theirs, "second")  # someone else's untagged image: not ours to remove
    before = containers(engine.OWN_LABEL)
    _build("termtune-test/failing:1", failing, "x", check=False)
    failed_run = containers(engine.OWN_LABEL) - before  # the classic builder keeps it
    project = engine.run(
        ["docker", "create", "--label", "com.docker.compose.project=someones-stack", OURS, "true"]
    ).stdout.strip()
    try:
        assert len(failed_run) == 1, failed_run
        engine.reclaim()
        assert not engine.image_exists(superseded)
        assert not containers(engine.OWN_LABEL) & failed_run
        assert engine.image_exists(current)
        assert engine.image_exists(their_old)
        assert project in containers("com.docker.compose.project=someones-stack")
    finally:
        engine.run(["docker", "rm", "-f", project], check=False)
        engine.run(["docker", "rmi", "-f", OURS, THEIRS, their_old], check=False)


def test_a_disk_too_full_for_a_build_is_named_before_building():
    problem = engine.disk_problem(need_gb=10**9)
    assert problem is not None
    root = engine.run(["docker", "info", "-f", "{{.DockerRootDir}}"]).stdout.strip()
    assert f"({root}) has " in problem
    assert "needs about 1000000000 GB" in problem
    assert engine.disk_problem(need_gb=0) is None


def test_the_wheelhouse_keeps_its_url_across_runs_and_moves_when_the_port_is_taken(tmp_path):
    (tmp_path / "a.whl").write_bytes(b"wheel")
    with engine.serve(tmp_path) as first:
        assert first == f"http://127.0.0.1:{engine.WHEELHOUSE_PORT}/"
        with engine.serve(tmp_path) as second:  # the port is taken: another one
            assert second != first
            assert urllib.request.urlopen(second + "a.whl", timeout=10).read() == b"wheel"
    with engine.serve(tmp_path) as again:
        assert again == first
    with socket.socket() as sock:  # released
        sock.bind(("127.0.0.1", engine.WHEELHOUSE_PORT))
