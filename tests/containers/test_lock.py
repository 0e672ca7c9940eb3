"""`make lock` reproduces the committed locks: the images' and the tests' hashed
requirements agree with their .in files (a pin changed without `make lock` fails here).
uv resolves against PyPI, so this runs with the container tests (`make test-compose`)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.containers.engine import ROOT

if os.environ.get("TERMTUNE_TEST_CONTAINERS") != "1":
    pytest.skip(
        "runs under `make test-compose` (uv resolves against PyPI)", allow_module_level=True
    )

REQUIREMENTS = ROOT / "deploy/docker/requirements"


def test_make_lock_reproduces_every_committed_lock(tmp_path):
    folder = tmp_path / "requirements"
    shutil.copytree(REQUIREMENTS, folder)  # the old locks too: uv keeps what they pin
    done = subprocess.run(
        ["make", "lock", f"LOCK_DIR={folder}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    committed = sorted(p.name for p in REQUIREMENTS.glob("*.lock"))
    assert sorted(p.name for p in folder.glob("*.lock")) == committed
    for name in committed:
        fresh = (folder / name).read_text().replace(str(folder), "deploy/docker/requirements")
        assert fresh == (REQUIREMENTS / name).read_text(), f"{name} is stale: run make lock"
