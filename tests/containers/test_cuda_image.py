"""The GPU trainer image, built as ``docker compose up`` builds it on a GPU host: torch 2.13's
PyPI wheel (CUDA 13.0) with its nvidia-* wheels on slim Python, the trainer's lock, the app.

Building needs no GPU, so it is built here, with docker-compose.yml (no CPU override) and
the stand-ins' override: the Python stand-in as BASE, pip on a wheelhouse of PyPI's files.
What a GPU adds (the driver, the devices, a training step) is checked on a GPU host
(bench/gpu_qlora.py). Runs under ``make test-cuda-image`` (TERMTUNE_TEST_CUDA_IMAGE=1):
about 3 GB of wheels, downloaded once, and an image of about 10 GB.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.containers import engine

if os.environ.get("TERMTUNE_TEST_CUDA_IMAGE") != "1":
    pytest.skip(
        "the GPU trainer image is built under `make test-cuda-image` (~3 GB of wheels)",
        allow_module_level=True,
    )

IMAGE = "termtune/trainer:0.1.0"
FILES = ("docker-compose.yml", str(engine.HERE / "compose.standins.yml"))
#: what the image's Python says about its torch (run without a GPU: no driver, no devices)
PROBE = """
import json, os, torch, torch.backends.cudnn, bitsandbytes
print(json.dumps({
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "nccl": list(torch.cuda.nccl.version()),
    "cuda_available": torch.cuda.is_available(),
    "bitsandbytes": bitsandbytes.__version__,
    "cuda_toolkit_folder": os.path.exists("/usr/local/cuda"),
}))
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The GPU trainer image built by compose; the build's figures."""
    problem = engine.engine_problem() or engine.disk_problem()
    if problem:
        pytest.fail(f"make test-cuda-image: {problem}")
    env_file = tmp_path_factory.mktemp("cuda") / ".env"
    required = ("RABBITMQ_PASSWORD", "POSTGRES_PASSWORD", "S3_SECRET_KEY", "TERMTUNE_API_KEY")
    env_file.write_text("".join(f"{name}={secrets.token_urlsafe(12)}\n" for name in required))
    wheelhouse = engine.fill_cuda_wheelhouse(engine.CACHE / "wheelhouse-cuda")
    with engine.serve(wheelhouse, port=engine.WHEELHOUSE_PORT + 1) as url:
        engine.build_standins(url, only=[engine.PYTHON_IMAGE])  # BASE; needs no wheels
        compose = engine.Compose(
            "termtune-cuda", env_file, {"TERMTUNE_WHEELHOUSE_URL": url}, files=FILES
        )
        started = time.monotonic()
        compose("build", "trainer", timeout=5400)
        figures = {"build_s": round(time.monotonic() - started)}
    figures["image_mb"] = round(engine.image_size_mb(IMAGE))
    yield figures
    print(json.dumps(figures, indent=2))
    engine.reclaim()


def test_the_gpu_trainer_has_pypis_cuda_13_torch_and_one_copy_of_cuda(image):
    done = engine.run(["docker", "run", "--rm", IMAGE, "python", "-c", PROBE], timeout=300)
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    image.update(probe)
    assert probe["torch"] == "2.13.0+cu130", probe  # PyPI's build: CUDA 13.0, not +cpu
    assert probe["cuda"] == "13.0", probe
    assert probe["cudnn"] and probe["nccl"][0] == 2, probe  # from the nvidia-* wheels
    assert not probe["cuda_available"]  # no GPU here: it imports and says so
    assert not probe["cuda_toolkit_folder"], "a CUDA base image would hold CUDA twice"


def test_a_code_change_ships_only_the_small_app_layer(image):
    """The newest layers are the app's (a few hundred KB); the venv is below them."""
    history = engine.run(
        ["docker", "history", "--no-trunc", "--format", "{{json .}}", IMAGE]
    ).stdout.splitlines()
    layers = [json.loads(line) for line in history]
    [app] = [layer for layer in layers if re.search(r"\bCOPY\b.*/opt/app", layer["CreatedBy"])]
    image["app_layer"] = app["Size"]
    assert 10_000 < _bytes(app["Size"]) < 20_000_000, app
    newer = layers[: layers.index(app)]
    assert all("pip install" not in layer["CreatedBy"] for layer in newer), newer


def _bytes(size: str) -> float:
    """``docker history``'s sizes (decimal units: 0B, 512kB, 1.2MB, 3.4GB) in bytes."""
    number, unit = re.fullmatch(r"([\d.]+)\s*([kMG]?B)", size).groups()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_the_health_check_answers_without_importing_torch(image):
    """No heartbeat in a fresh container: unhealthy, said without importing torch."""
    check = ["-m", "services.trainer", "--health"]
    started = time.monotonic()
    done = engine.run(["docker", "run", "--rm", IMAGE, "python", *check], check=False)
    image["health_check_s"] = round(time.monotonic() - started, 2)  # the container's start too
    assert done.returncode != 0, done
    traced = ["docker", "run", "--rm", IMAGE, "python", "-X", "importtime", *check]
    imported = re.findall(r"\|\s*([\w.]+)$", engine.run(traced, check=False).stderr, re.M)
    assert imported and "torch" not in imported, imported
