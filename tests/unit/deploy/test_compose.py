"""docker-compose.yml's decisions (the Compose schema is checked in `make lint-deploy`):
every termtune service reaches the job database, and starts only once it is healthy."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("api", "dataprep", "trainer", "evaluator", "publisher")
_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def _compose_loader():
    """deploy/lint/compose_schema.py: compose's YAML (``!reset``) and its file merging."""
    path = ROOT / "deploy/lint/compose_schema.py"
    spec = importlib.util.spec_from_file_location("compose_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
