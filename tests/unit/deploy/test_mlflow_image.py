"""deploy/docker/mlflow/serve.py: the MLflow image's start script, on the tests' PostgreSQL
server (the image itself runs under `make test-compose`)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests.factories import module_from_file

ROOT = Path(__file__).resolve().parents[3]


def _serve():
    return module_from_file(ROOT / "deploy/docker/mlflow/serve.py", "mlflow_serve")


def _databases(postgres) -> set[str]:
    with psycopg.connect(postgres.url().replace("+psycopg", ""), autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_the_server_gets_a_database_of_its_own_once(postgres, monkeypatch):
    serve = _serve()
    name = "mlflow_test_once"
    assert name not in _databases(postgres)
    monkeypatch.setattr(
        serve,
        "_connect",
        lambda *a: psycopg.connect(postgres.url().replace("+psycopg", ""), autocommit=True),
    )
    serve.ensure_database("unused", "unused", "unused", name)
    serve.ensure_database("unused", "unused", "unused", name)  # a restart: already there
    assert name in _databases(postgres)


def test_the_backend_uri_keeps_the_password_out_of_the_command_line(monkeypatch):
    serve = _serve()
    started = {}
    monkeypatch.setattr(serve, "ensure_database", lambda *a: None)
    monkeypatch.setattr(serve.os, "execvp", lambda f, argv: started.update(argv=argv))
    monkeypatch.setenv("POSTGRES_PASSWORD", "p@ss:w/rd")
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", "s3://termtune/mlflow")
    monkeypatch.delenv("MLFLOW_BACKEND_STORE_URI", raising=False)
    serve.main()
    assert "p@ss" not in " ".join(started["argv"])
    assert started["argv"][:2] == ["mlflow", "server"]
    uri = serve.os.environ["MLFLOW_BACKEND_STORE_URI"]
    assert uri == "postgresql+psycopg://termtune:p%40ss%3Aw%2Frd@postgres:5432/mlflow"
