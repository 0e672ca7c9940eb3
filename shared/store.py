"""The object store: a local folder or S3, addressed by ``file://`` and ``s3://`` URIs.

Keys are ``/``-separated paths below the store's root (``jobs/<id>/spec.json``). Every
write of one object is atomic: readers see the old object, the new one, or none.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from shared.errors import NotFound, StoreLocationError, StoreUnavailable
from shared.settings import Settings


def _check_key(key: str) -> str:
    parts = key.split("/")
    bad_part = any(p in ("", ".", "..") for p in parts)
    if not key or key.startswith("/") or bad_part or any(ord(c) < 32 for c in key):
        raise StoreLocationError(f"invalid store key {key!r}")
    return key


class Store(ABC):
    """Objects under one root, addressed by key."""

    root_uri: str

    def uri(self, key: str) -> str:
        """The URI of a key."""
        return f"{self.root_uri}/{_check_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store; StoreLocationError if it lies outside."""
        if not uri.startswith(self.root_uri + "/"):
            raise StoreLocationError(f"{uri} is outside the object store {self.root_uri}")
        return _check_key(uri[len(self.root_uri) + 1 :])

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write an object atomically."""

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Write an object only if none exists; True if this call wrote it."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """Read an object and a version tag of it (for put_if_version); NotFound if missing."""

    @abstractmethod
    def put_if_version(self, key: str, data: bytes, version: str) -> bool:
        """Replace an object only if it is still at ``version``; True if this call wrote it."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object (no error if it is missing)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read an object; NotFound if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix (``prefix/...``), sorted."""

    @abstractmethod
    def upload_file(self, path: Path, key: str) -> None:
        """Copy a local file to a key."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None:
        """Copy an object to a local file (NotFound when there is none)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under a prefix."""

    def put_json(self, key: str, obj: Any) -> None:
        """Write a JSON document atomically."""
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def get_json(self, key: str) -> Any:
        """Read a JSON document."""
        return json.loads(self.get_bytes(key))

    def upload_dir(self, folder: Path, prefix: str) -> list[str]:
        """Copy every file under a local folder below a prefix; the keys written."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            self.upload_file(path, key)
            keys.append(key)
        return keys

    def local_dir(self, prefix: str, cache_dir: Path) -> Path:
        """A local folder holding the objects under a prefix (downloaded if need be)."""
        target = cache_dir / _check_key(prefix)
        keys = self.list(prefix)
        if not keys:
            raise NotFound(f"nothing stored at {self.uri(prefix)}")
        for key in keys:
            path = target / key[len(prefix) + 1 :]
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                self.download_file(key, path)
        return target


class LocalStore(Store):
    """A folder on the local disk (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root_uri = self.root.as_uri()

    def path(self, key: str) -> Path:
        """The file behind a key."""
        return self.root / _check_key(key)

    @contextlib.contextmanager
    def _staged(self, path: Path) -> Iterator[Path]:
        """A temporary file beside ``path`` (a name no listing shows), removed unless the
        body moved it into place; a full disk is a StoreUnavailable naming the folder, and
        leaves nothing behind."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            os.close(fd)
        except OSError as exc:
            raise _disk_error(exc, path) from exc
        try:
            yield Path(tmp)
        except OSError as exc:
            raise _disk_error(exc, path) from exc
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        with self._staged(path) as tmp:
            tmp.write_bytes(data)
            os.replace(tmp, path)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        with self._staged(path) as tmp:
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)  # atomic and fails if the name exists
            except FileExistsError:
                return False
            return True

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_if_version(self, key: str, data: bytes, version: str) -> bool:
        path = self.path(key)
        with (path.parent / f".lock-{path.name}").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-compare-write as one step
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if hashlib.sha256(current).hexdigest() != version:
                return False
            self.put_bytes(key, data)
            return True

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFound(f"no object at {self.uri(key)}") from exc

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith((".tmp-", ".lock-"))
        )

    def upload_file(self, path: Path, key: str) -> None:
        target = self.path(key)
        with self._staged(target) as tmp:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)

    def download_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self.path(key), path)
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NotFound(f"no object at {self.uri(key)}") from exc

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def local_dir(self, prefix: str, cache_dir: Path) -> Path:
        """The folder itself: nothing to download."""
        if not self.list(prefix):
            raise NotFound(f"nothing stored at {self.uri(prefix)}")
        return self.path(prefix)


class S3Store(Store):
    """A bucket and prefix in S3 or an S3-compatible server (boto3)."""

    def __init__(self, bucket: str, prefix: str, *, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.root_uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object at s3://{self.bucket}/{kwargs.get('Key')}") from exc
            raise
        except BotoCoreError as exc:
            raise StoreUnavailable(f"S3 at {self.root_uri} unreachable: {exc}") from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Key=self._full(key), Body=data)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(self.client.put_object, Key=self._full(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        response = self._call(self.client.get_object, Key=self._full(key))
        return response["Body"].read(), response["ETag"]

    def put_if_version(self, key: str, data: bytes, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(self.client.put_object, Key=self._full(key), Body=data, IfMatch=version)
            return True
        except NotFound:
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "412",
                "ConditionalRequestConflict",
            ):
                return False
            raise

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Key=self._full(key))

    def get_bytes(self, key: str) -> bytes:
        return self._call(self.client.get_object, Key=self._full(key))["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Key=self._full(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        full = self._full(prefix) + "/"
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                keys.append(key[len(self.prefix) + 1 :] if self.prefix else key)
        return sorted(keys)

    def upload_file(self, path: Path, key: str) -> None:
        self.client.upload_file(str(path), self.bucket, self._full(key))

    def download_file(self, key: str, path: Path) -> None:
        self._call(
            lambda Bucket, **kw: self.client.download_file(Bucket, kw["Key"], str(path)),
            Key=self._full(key),
        )

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list(prefix):
            self._call(self.client.delete_object, Key=self._full(key))


def open_store(settings: Settings) -> Store:
    """The store named by ``settings.store_url``."""
    parsed = urlparse(settings.store_url)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path, client=s3_client(settings))
    raise StoreLocationError(
        f"TERMTUNE_STORE_URL must be file:///path or s3://bucket/prefix, got {settings.store_url!r}"
    )


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the store's server, signing with the key in
    ``settings.s3_credentials_file`` when one is set (read anew for each client, so a key
    s3-init replaced is taken up), else with boto3's own chain."""
    import boto3

    key = _file_key(settings.s3_credentials_file) if settings.s3_credentials_file else {}
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, **key)


def _file_key(path: Path) -> dict[str, str]:
    """The 'default' profile's key in a shared-credentials file, as boto3.client's arguments."""
    from botocore.configloader import raw_config_parse
    from botocore.exceptions import BotoCoreError

    where = f"TERMTUNE_S3_CREDENTIALS_FILE: {path}"
    if not path.is_file():
        raise StoreUnavailable(f"{where}: no such file (compose's s3-init writes it)")
    if not os.access(path, os.R_OK):  # configparser would skip it without a word
        raise StoreUnavailable(f"{where}: not readable by uid {os.getuid()}")
    try:
        profile = raw_config_parse(str(path), parse_subsections=False).get("default", {})
    except BotoCoreError as exc:  # not an INI file
        raise StoreUnavailable(f"{where}: {exc}") from exc
    names = ("aws_access_key_id", "aws_secret_access_key")
    missing = [name for name in names if not profile.get(name)]
    if missing:
        raise StoreUnavailable(f"{where}: profile 'default' has no {' or '.join(missing)}")
    return {name: profile[name] for name in names}


def _disk_error(exc: OSError, path: Path) -> Exception:
    """A full disk (or quota) as a retryable store error naming the folder; others as-is."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreUnavailable(f"no space left to write {path.parent} ({exc.strerror})")
    return exc
