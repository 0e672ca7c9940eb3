"""Start MLflow's tracking server on the compose stack's PostgreSQL and bucket.

Creates the server's own database (``MLFLOW_DATABASE``, default ``mlflow``) on first start:
MLflow migrates the tables in it but does not create it, and it cannot share termtune's
(both keep Alembic's ``alembic_version`` table). Then replaces this process with
``mlflow server``, its backend URI in MLFLOW_BACKEND_STORE_URI. Settings (compose sets
them): POSTGRES_HOST, POSTGRES_USER, POSTGRES_PASSWORD, MLFLOW_DATABASE,
MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix), MLFLOW_S3_ENDPOINT_URL and the AWS_*
credentials, MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_WORKERS.
"""

from __future__ import annotations

import os
import time
from urllib.parse import quote

import psycopg
from psycopg import sql


def _connect(host: str, user: str, password: str) -> psycopg.Connection:
    """The maintenance database, waiting up to a minute for the server to accept."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return psycopg.connect(
                host=host, user=user, password=password, dbname="postgres", autocommit=True
            )
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def ensure_database(host: str, user: str, password: str, name: str) -> None:
    with _connect(host, user, password) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if found is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"created database {name}", flush=True)


def main() -> None:
    env = os.environ
    host, user = env.get("POSTGRES_HOST", "postgres"), env.get("POSTGRES_USER", "termtune")
    password, name = env["POSTGRES_PASSWORD"], env.get("MLFLOW_DATABASE", "mlflow")
    ensure_database(host, user, password, name)
    # In the environment, not on the command line: the password stays out of `ps`; mlflow
    # server reads MLFLOW_BACKEND_STORE_URI and MLFLOW_ARTIFACTS_DESTINATION itself.
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    os.environ["MLFLOW_BACKEND_STORE_URI"] = (
        f"postgresql+psycopg://{credentials}@{host}:5432/{name}"
    )
    if not env.get("MLFLOW_ARTIFACTS_DESTINATION"):
        raise SystemExit("set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix of the artifacts)")
    argv = ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
    argv += ["--workers", env.get("MLFLOW_WORKERS", "2")]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
