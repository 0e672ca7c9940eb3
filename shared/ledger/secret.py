"""The job database's password read from AWS Secrets Manager when a connection is opened.

RDS keeps the master password of a ``ManageMasterUserPassword`` instance in Secrets Manager
and rotates it (every 7 days by default). A password handed to a task at its start is then
wrong for every connection the task opens after the rotation. So a deployment names the
secret (``TERMTUNE_DATABASE_PASSWORD_SECRET``) instead, and each new connection uses the
password read last; when the database refuses a connection, the secret is read again (at
most once per ``min_refresh_s``) and the connection tried once more if it changed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.errors import LedgerUnavailable

MIN_REFRESH_S = 10.0


def _client_for(secret_id: str) -> Any:
    """A Secrets Manager client in the secret's region (from its ARN; else the default), from
    a session of its own (boto3's default session is not for several threads at once)."""
    import boto3

    parts = secret_id.split(":")
    region = parts[3] if secret_id.startswith("arn:") and len(parts) > 3 else None
    return boto3.session.Session().client("secretsmanager", region_name=region or None)


def password_from(secret_id: str, secret_string: str | None) -> str:
    """The password in a secret's value: a JSON object's ``password`` (RDS's managed secret
    holds ``{"username": ..., "password": ...}``) or the whole string."""
    if not secret_string:
        raise LedgerUnavailable(
            f"TERMTUNE_DATABASE_PASSWORD_SECRET: the secret {secret_id} has no text value "
            "(a binary secret cannot hold the database password)"
        )
    try:
        value = json.loads(secret_string)
    except ValueError:
        return secret_string
    if not isinstance(value, dict):
        return secret_string
    password = value.get("password")
    if not isinstance(password, str) or not password:
        raise LedgerUnavailable(
            f"TERMTUNE_DATABASE_PASSWORD_SECRET: the secret {secret_id} is a JSON object "
            "without a text field 'password'"
        )
    return password


class SecretPassword:
    """The password in one secret: read when first needed and again after a refusal."""

    def __init__(
        self,
        secret_id: str,
        *,
        client: Callable[[str], Any] = _client_for,
        min_refresh_s: float = MIN_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.secret_id = secret_id
        self._client = client
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: str | None = None
        self._refreshed_at = float("-inf")
        self.reads = 0

    def current(self) -> str:
        """The password read last (read now if never read)."""
        with self._lock:
            if self._value is None:
                self._value = self._read()
            return self._value

    def refreshed(self) -> str | None:
        """Read the secret again after the database refused the password: the new password,
        or None when it has not changed (or was read again less than ``min_refresh_s`` ago,
        so a database that is down is not answered with a Secrets Manager request per
        attempt)."""
        with self._lock:
            if self._clock() - self._refreshed_at < self._min_refresh_s:
                return None
            self._refreshed_at = self._clock()
            value = self._read()
            changed = value != self._value
            self._value = value
            return value if changed else None

    def _read(self) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client(self.secret_id).get_secret_value(SecretId=self.secret_id)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise LedgerUnavailable(
                f"TERMTUNE_DATABASE_PASSWORD_SECRET: cannot read the secret {self.secret_id} "
                f"({code}: {exc.response.get('Error', {}).get('Message', '')})"
            ) from exc
        except BotoCoreError as exc:
            raise LedgerUnavailable(
                f"TERMTUNE_DATABASE_PASSWORD_SECRET: cannot read the secret {self.secret_id} "
                f"({exc})"
            ) from exc
        self.reads += 1
        return password_from(self.secret_id, answer.get("SecretString"))
