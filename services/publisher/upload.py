"""Uploading an exported model folder to S3 for Bedrock: multipart, parallel, checksummed,
skipping files already there with the same digest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from shared.errors import StoreUnavailable
from shared.uploads import file_sha256

DIGEST_KEY = "sha256"  # object metadata: the file's SHA-256, hex


def digests(folder: Path) -> dict[str, str]:
    """Each top-level file of a folder and its SHA-256."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


class _Bytes:
    """Counts uploaded bytes across transfer threads and reports now and then."""

    def __init__(self, total: int, report: Callable[..., None]) -> None:
        self.total, self.done, self.report = total, 0, report
        self.lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self.lock:
            self.done += count
            done = self.done
        self.report({"phase": "uploading", "bytes_done": done, "bytes_total": self.total})


def upload_folder(
    s3: Any,
    folder: Path,
    bucket: str,
    prefix: str,
    *,
    files: dict[str, str],
    report: Callable[..., None],
    concurrency: int = 8,
    part_mb: int = 64,
) -> dict[str, Any]:
    """Upload each file of ``files`` (name → SHA-256) under ``prefix``; what was sent/skipped."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=part_mb * 2**20,
        multipart_chunksize=part_mb * 2**20,
        max_concurrency=concurrency,
    )
    sizes = {name: (folder / name).stat().st_size for name in files}
    progress = _Bytes(sum(sizes.values()), report)
    sent, skipped = [], []
    for name, sha in sorted(files.items()):
        key = f"{prefix}/{name}"
        if _same_object(s3, bucket, key, sha, sizes[name]):
            skipped.append(name)
            progress(sizes[name])
            continue
        try:
            s3.upload_file(
                str(folder / name),
                bucket,
                key,
                ExtraArgs={"Metadata": {DIGEST_KEY: sha}, "ChecksumAlgorithm": "SHA256"},
                Config=config,
                Callback=progress,
            )
        except (ClientError, S3UploadFailedError) as exc:  # upload_file raises the latter
            raise StoreUnavailable(f"uploading {name} to s3://{bucket}/{key}: {exc}") from exc
        sent.append(name)
    return {"sent": sent, "skipped": skipped, "bytes": sum(sizes.values())}


def _same_object(s3: Any, bucket: str, key: str, sha: str, size: int) -> bool:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StoreUnavailable(f"checking s3://{bucket}/{key}: {exc}") from exc
    return head.get("Metadata", {}).get(DIGEST_KEY) == sha and head["ContentLength"] == size
