"""docker-compose.yml's decisions (the Compose schema is checked in `make lint-deploy`):
every termtune service reaches the job database and the store, and starts only once they are
ready; a supported RabbitMQ and a maintained S3 server; GPUs and shared memory per trainer;
the trainer image's torch."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.factories import module_from_file

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("api", "dataprep", "trainer", "evaluator", "publisher")
_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def _compose_loader():
    """deploy/lint/compose_schema.py: compose's YAML (``!reset``) and its file merging."""
    return module_from_file(ROOT / "deploy/lint/compose_schema.py", "compose_schema")


def _defaults(text: str) -> str:
    """``${X:-default}`` as compose would read it with X unset."""
    return _DEFAULT.sub(lambda m: m.group(2), text)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module", params=["gpu", "cpu"])
def services(request):
    """The services as `docker compose up` sees them, and with the CPU override merged."""
    lint = _compose_loader()
    merged = lint.load(ROOT / "docker-compose.yml")
    if request.param == "cpu":
        merged = lint.strip(lint.merge(merged, lint.load(ROOT / "deploy/compose.cpu.yml")))
    return merged["services"]


def test_postgres_keeps_its_data_and_reports_health(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"].startswith("postgres:")
    volume = postgres["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data"
    assert volume[0] in compose["volumes"]  # a named volume, not a bind mount
    assert "ports" not in postgres  # reached over the compose network only
    test = _defaults(" ".join(postgres["healthcheck"]["test"]))
    assert "pg_isready" in test
    assert "-U termtune" in test and "-d termtune" in test
    env = postgres["environment"]
    assert env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
    assert env["POSTGRES_DB"] == "termtune"


@pytest.mark.parametrize("name", SERVICES)
def test_every_service_gets_the_database_and_waits_for_it(services, name):
    service = services[name]
    assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    env = service["environment"]
    postgres = services["postgres"]["environment"]
    url = env["TERMTUNE_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://")
    assert _defaults(url) == "postgresql+psycopg://termtune@postgres:5432/termtune"
    assert url == (
        f"postgresql+psycopg://{postgres['POSTGRES_USER']}@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    # The password stays out of the URL, in its own variable, the one postgres is given.
    assert env["TERMTUNE_DATABASE_PASSWORD"] == postgres["POSTGRES_PASSWORD"]


def test_env_example_lists_the_database_password():
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=\S+", example, re.MULTILINE)


def _conf(path: Path) -> dict[str, str]:
    """``key = value`` lines of a rabbitmq.conf."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.lstrip().startswith("#")}


def test_rabbitmq_is_a_4x_release_with_its_config_and_health_check(compose):
    """3.13 is out of community support; 4.3 is the series in it."""
    rabbitmq = compose["services"]["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:4\.\d+-management", rabbitmq["image"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in rabbitmq["volumes"]}
    config = mounts["/etc/rabbitmq/conf.d/20-termtune.conf"]
    assert config == "./deploy/rabbitmq/rabbitmq.conf"
    assert rabbitmq["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "check_running"]
    # A stage runs for hours unacked: quorum queues time consumers out after 30 min by default.
    assert int(_conf(ROOT / config)["consumer_timeout"]) >= 24 * 3600 * 1000


def test_s3_server_is_maintained_pinned_and_published_on_loopback(services):
    """The pinned MinIO release was unmaintained (with an advisory) and not reachable."""
    s3 = services["s3"]
    image, _, tag = s3["image"].partition(":")
    assert "minio" not in image  # no MinIO images are published any more
    assert tag and tag != "latest"
    endpoint = urlsplit(services["api"]["environment"]["TERMTUNE_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "s3"
    published = [_defaults(p).split(":") for p in s3["ports"]]
    assert ["127.0.0.1", str(endpoint.port), str(endpoint.port)] in published  # the S3 API
    assert len(published) == 2 and all(p[0] == "127.0.0.1" for p in published)  # + console
    assert f"http://127.0.0.1:{endpoint.port}/" in " ".join(s3["healthcheck"]["test"])
    # The admin identity comes from .env; s3-init may change identities through the IAM API.
    assert s3["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${S3_SECRET_KEY:?")
    assert "-s3.iam.readOnly=false" in s3["command"]


@pytest.mark.parametrize("name", [*SERVICES, "mlflow"])
def test_services_sign_with_the_apps_key_not_the_admins(services, name):
    """s3-init writes the app's key into a volume the services mount read-only; the admin's
    secret, which env_file would bring with the rest of .env, is blanked."""
    service, init = services[name], services["s3-init"]
    env = service["environment"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    [written] = [v for v in init["volumes"] if v.startswith("s3-credentials:")]
    folder = written.split(":")[1]
    assert f"s3-credentials:{folder}:ro" in service["volumes"]
    variable = "AWS_SHARED_CREDENTIALS_FILE" if name == "mlflow" else "TERMTUNE_S3_CREDENTIALS_FILE"
    assert env[variable] == f"{folder}/credentials"
    if "env_file" in service:
        assert env["S3_SECRET_KEY"] == ""
    # The buckets datasets may come from, as the services read them from .env: the key may
    # read those too.
    assert init["environment"]["TERMTUNE_ALLOWED_BUCKETS"] == "${TERMTUNE_ALLOWED_BUCKETS:-}"
    assert "TERMTUNE_ALLOWED_BUCKETS" in (ROOT / "deploy/s3/init.sh").read_text()


#: the policy actions SeaweedFS's IAM API maps to its own (weed/iam/helpers.go,
#: baseS3ActionMap, at 4.44): PutUserPolicy refuses the whole policy for any other action,
#: such as AWS's s3:ListBucketMultipartUploads (SeaweedFS names it ListMultipartUploads).
SEAWEEDFS_ACTIONS = {
    "DeleteObject", "PutObject", "GetObject", "DeleteObjectVersion", "GetObjectVersion",
    "PutObjectAcl", "GetObjectAcl", "GetBucketPolicy", "ListBucket", "ListBucketVersions",
    "ListAllMyBuckets", "GetBucketLocation", "GetBucketVersioning", "CreateMultipartUpload",
    "UploadPart", "CompleteMultipartUpload", "AbortMultipartUpload", "ListMultipartUploads",
    "ListParts", "GetObjectRetention", "GetObjectLegalHold",
}  # fmt: skip


def test_the_apps_policy_names_only_actions_seaweedfs_maps():
    """s3-init's policy: what the store calls (objects, listing, multipart), every action one
    SeaweedFS's IAM API and AWS both know, none that creates or deletes a bucket."""
    script = (ROOT / "deploy/s3/init.sh").read_text()
    actions = set(re.findall(r'\\"s3:(\w+)\\"', script))
    assert actions == {
        "ListBucket", "GetBucketLocation", "GetObject", "PutObject", "DeleteObject",
        "AbortMultipartUpload",
    }  # fmt: skip
    assert actions <= SEAWEEDFS_ACTIONS


def test_s3_data_lives_in_a_named_volume(compose):
    volume = compose["services"]["s3"]["volumes"][0].split(":")
    assert volume[0] in compose["volumes"] and volume[1] == "/data"


@pytest.mark.parametrize("name", SERVICES)
def test_the_bucket_exists_before_a_service_starts(services, name):
    init = services["s3-init"]
    assert init["depends_on"] == {"s3": {"condition": "service_healthy"}}
    [mount] = [v for v in init["volumes"] if v.endswith(":ro")]
    source, target, _ = mount.split(":")
    assert init["entrypoint"] == ["/bin/sh", target]
    script = (ROOT / source).read_text()
    assert 'create-bucket --bucket "$TERMTUNE_BUCKET"' in script
    env = services[name]["environment"]
    assert init["environment"]["AWS_ENDPOINT_URL"] == env["TERMTUNE_S3_ENDPOINT_URL"]
    assert env["TERMTUNE_STORE_URL"].startswith(f"s3://{init['environment']['TERMTUNE_BUCKET']}/")
    assert services[name]["depends_on"]["s3-init"] == {
        "condition": "service_completed_successfully"
    }


def test_trainer_has_shared_memory_for_nccl(services):
    size = re.fullmatch(r"(\d+)gb", services["trainer"]["shm_size"])
    assert size and int(size.group(1)) >= 1  # Docker's default is 64 MB


def test_gpus_are_given_per_trainer_not_shared_by_scaling(compose):
    """`--scale trainer=N` gives every replica every GPU: a trainer is given its GPUs."""
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [
        {"driver": "nvidia", "device_ids": ["${TRAINER_GPUS:-all}"], "capabilities": ["gpu"]}
    ]
    header = (ROOT / "docker-compose.yml").read_text().split("\nx-termtune:")[0]
    assert "TRAINER_GPUS" in header and "--scale trainer=N" in header
    guide = (ROOT / "deploy/README.md").read_text()
    assert "TRAINER_GPUS" in guide and "device_ids" in guide


def test_cpu_override_drops_the_gpus_and_builds_cpu_torch():
    lint = _compose_loader()
    base, cpu = lint.load(ROOT / "docker-compose.yml"), lint.load(ROOT / "deploy/compose.cpu.yml")
    merged = lint.strip(lint.merge(base, cpu))
    trainer = merged["services"]["trainer"]
    assert "deploy" not in trainer
    dockerfile = (ROOT / trainer["build"]["dockerfile"]).read_text()
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    assert trainer["build"]["args"] == {"TORCH_INDEX": "cpu"}
    assert set(trainer["build"]["args"]) <= declared


def test_trainer_image_takes_torch_from_pypi_on_a_slim_base():
    """PyTorch publishes no CUDA 12.8 builds from 2.12 on; PyPI's wheel (CUDA 13.0) brings its
    CUDA libraries, so a CUDA base image would only hold them twice."""
    text = (ROOT / "services/trainer/Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.MULTILINE))
    assert "cu128" not in text and "nvidia/cuda" not in text
    assert args["BASE"] == "python:3.11-slim-bookworm"
    assert args["TORCH_INDEX"] in ("", '""')  # no index: PyPI
    install = re.search(r"pip install (torch==\S+)(.*)", re.sub(r"\\\n\s*", " ", text))
    version = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert install.group(1) == f"torch=={version.group(1)}"  # as `make install` on a GPU host
    assert install.group(2).strip() == (
        "${TORCH_INDEX:+--index-url https://download.pytorch.org/whl/${TORCH_INDEX}}"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_mlflow_keeps_runs_in_the_stack_database_and_artifacts_in_its_bucket(services, name):
    mlflow = services["mlflow"]
    env, postgres = mlflow["environment"], services["postgres"]["environment"]
    assert env["POSTGRES_HOST"] == "postgres"
    assert env["POSTGRES_USER"] == postgres["POSTGRES_USER"]
    assert env["POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    bucket = services["s3-init"]["environment"]["TERMTUNE_BUCKET"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{bucket}/mlflow"
    stage = services[name]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == stage["TERMTUNE_S3_ENDPOINT_URL"]
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == stage["TERMTUNE_S3_CREDENTIALS_FILE"]
    assert mlflow["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "s3-init": {"condition": "service_completed_successfully"},
    }
    # The stages reach it by its service name (a Host header it accepts); the links the web
    # page shows are the host's published loopback port.
    uri = urlsplit(stage["TERMTUNE_MLFLOW_TRACKING_URI"])
    assert (uri.hostname, uri.port) == ("mlflow", 5000)
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    [published] = [_defaults(p) for p in mlflow["ports"]]
    assert published == "127.0.0.1:5000:5000"
    assert _defaults(stage["TERMTUNE_MLFLOW_UI_URL"]) == "http://127.0.0.1:5000"
