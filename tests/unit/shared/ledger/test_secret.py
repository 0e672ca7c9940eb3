"""The database password from Secrets Manager (moto's server over HTTP), against a PostgreSQL
server that checks passwords as RDS does: a rotation is taken up without a restart."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

from shared.errors import LedgerUnavailable
from shared.ledger import Ledger, open_ledger
from shared.ledger.secret import SecretPassword, password_from
from shared.settings import Settings
from tests.postgres import PostgresServer


@pytest.fixture
def secrets(s3_endpoint, monkeypatch):
    """A Secrets Manager client; termtune's own clients reach the same server (botocore
    reads the service's endpoint from AWS_ENDPOINT_URL_SECRETS_MANAGER)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", s3_endpoint)
    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def checked_server():
    """A PostgreSQL server whose TCP connections must give their role's password."""
    root = Path(tempfile.mkdtemp(prefix="termtune-pg-pw-"))
    root.chmod(0o755)
    server = PostgresServer(root / "server", password="superuser-pw")
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def _app_role(server: PostgresServer, name: str, password: str) -> str:
    """A role owning a fresh database, signing in with ``password``; the URL without it."""
    url = server.fresh_database()
    database = url.rsplit("/", 1)[1]
    admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" OWNER TO {name}')
    admin.dispose()
    return f"postgresql+psycopg://{name}@127.0.0.1:{server.port}/{database}"


def _rotate(server: PostgresServer, secrets, arn: str, name: str, password: str) -> None:
    """What RDS's managed rotation does: a new password in the secret and in the database."""
    secrets.put_secret_value(
        SecretId=arn, SecretString=json.dumps({"username": name, "password": password})
    )
    admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"ALTER ROLE {name} PASSWORD '{password}'")
    admin.dispose()


def _rds_secret(secrets, name: str, password: str) -> str:
    answer = secrets.create_secret(
        Name=f"rds!db-{name}", SecretString=json.dumps({"username": name, "password": password})
    )
    return answer["ARN"]


def _count_jobs(ledger: Ledger) -> int:
    with ledger.read() as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one()


def test_a_rotated_password_is_taken_up_without_a_restart(checked_server, secrets):
    url = _app_role(checked_server, "rotating", "first-pw")
    arn = _rds_secret(secrets, "rotating", "first-pw")
    ledger = Ledger(url, password_secret=arn)
    assert _count_jobs(ledger) == 0  # migrated and read, signed in with the secret's password
    started_with = Ledger(url, password="first-pw")  # a password handed over at the start
    assert _count_jobs(started_with) == 0

    _rotate(checked_server, secrets, arn, "rotating", "second-pw")
    ledger.dispose()  # pooled connections stay signed in; new ones must sign in again
    started_with.dispose()

    assert _count_jobs(ledger) == 0
    assert ledger.secret.reads == 2  # read at the first connection and after the refusal
    with pytest.raises(LedgerUnavailable, match="password authentication failed"):
        _count_jobs(started_with)
    # Later connections use the new password at once: the secret is not read again.
    ledger.dispose()
    assert _count_jobs(ledger) == 0 and ledger.secret.reads == 2
    started_with.dispose()
    ledger.dispose()


def test_the_deployed_settings_reach_the_database_through_the_secret(checked_server, secrets):
    url = _app_role(checked_server, "deployed", "deployed-pw")
    arn = _rds_secret(secrets, "deployed", "deployed-pw")
    ledger = open_ledger(Settings(database_url=url, database_password_secret=arn))
    assert ledger.secret is not None and ledger.secret.secret_id == arn
    assert _count_jobs(ledger) == 0
    ledger.dispose()


def test_a_wrong_password_fails_clearly_and_the_secret_is_not_read_per_attempt(
    checked_server, secrets
):
    url = _app_role(checked_server, "refused", "right-pw")
    arn = _rds_secret(secrets, "refused", "wrong-pw")
    ledger = Ledger(url, password_secret=arn)
    for _ in range(3):
        with pytest.raises(LedgerUnavailable, match="password authentication failed") as info:
            _count_jobs(ledger)
        assert "wrong-pw" not in str(info.value) and "right-pw" not in str(info.value)
    assert ledger.secret.reads == 2  # the first read, then one refresh within 10 s
    ledger.dispose()


def test_a_secret_that_cannot_be_read_names_it(secrets):
    missing = "arn:aws:secretsmanager:us-east-1:123456789012:secret:rds!db-missing-AbCdEf"
    with pytest.raises(LedgerUnavailable, match="rds!db-missing-AbCdEf.*ResourceNotFound"):
        SecretPassword(missing).current()


@pytest.mark.parametrize(
    ("text", "password"),
    [
        ('{"username": "termtune", "password": "p@ss:w/rd"}', "p@ss:w/rd"),
        ("plain-text-password", "plain-text-password"),
        ('"a JSON string"', '"a JSON string"'),
    ],
)
def test_the_password_is_the_json_field_or_the_whole_text(text, password):
    assert password_from("s", text) == password


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"username": "termtune"}', "without a text field 'password'"),
        ('{"password": 12}', "without a text field 'password'"),
        (None, "has no text value"),
        ("", "has no text value"),
    ],
)
def test_a_secret_without_a_password_is_refused_naming_it(text, error):
    with pytest.raises(LedgerUnavailable, match=f"the secret my-secret .*{error}"):
        password_from("my-secret", text)


def test_refreshes_are_spaced_and_report_only_a_change():
    values = iter(["one", "one", "two"])
    now = [0.0]

    class Client:
        def get_secret_value(self, SecretId):  # noqa: N803 (boto3's argument name)
            return {"SecretString": next(values)}

    secret = SecretPassword("s", client=lambda _: Client(), clock=lambda: now[0])
    assert secret.current() == "one"
    now[0] = 1.0
    assert secret.refreshed() is None and secret.reads == 2  # the first refusal: read, same
    now[0] = 9.0
    assert secret.refreshed() is None and secret.reads == 2  # within 10 s of it: not read
    now[0] = 12.0
    assert secret.refreshed() == "two" and secret.current() == "two"
    assert secret.reads == 3


def test_both_password_settings_are_refused_without_echoing_them():
    with pytest.raises(ValueError, match="not both") as info:
        Settings(database_password="hunter2", database_password_secret="arn:secret")
    assert "hunter2" not in str(info.value)


def test_the_secret_is_read_in_its_own_region(monkeypatch):
    from shared.ledger.secret import _client_for

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    arn = "arn:aws:secretsmanager:eu-central-1:123456789012:secret:rds!db-x-AbCdEf"
    assert _client_for(arn).meta.region_name == "eu-central-1"
    assert _client_for("termtune/db-password").meta.region_name == "us-east-1"
