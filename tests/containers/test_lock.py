"""`make lock` reproduces the committed locks: the images' and the tests' hashed
requirements agree with their .in files (a pin changed without `make lock` fails here).
uv resolves against PyPI, so this runs with the container tests (`make test-compose`)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.containers.engine import ROOT
from tests.factories import linked_checkout

if os.environ.get("TERMTUNE_TEST_CONTAINERS") != "1":
    pytest.skip(
        "runs under `make test-compose` (uv resolves against PyPI)", allow_module_level=True
    )

REQUIREMENTS = ROOT / "deploy/docker/requirements"


def test_make_lock_reproduces_every_committed_lock(tmp_path):
    """`make lock` as the README gives it, in a checkout whose deploy/ is a copy (the old
    locks too: uv keeps what they pin)."""
    work = linked_checkout(
        tmp_path / "termtune", (".venv", "Makefile", "pyproject.toml"), ("deploy",)
    )
    done = subprocess.run(
        ["bash", "-c", "make lock"], cwd=work, capture_output=True, text=True, timeout=1200
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = work / "deploy/docker/requirements"
    committed = sorted(p.name for p in REQUIREMENTS.glob("*.lock"))
    assert sorted(p.name for p in folder.glob("*.lock")) == committed
    for name in committed:
        fresh = (folder / name).read_text()
        assert fresh == (REQUIREMENTS / name).read_text(), f"{name} is stale: run make lock"
