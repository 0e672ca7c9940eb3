"""Files uploaded into the object store: datasets and base model folders.

Both are content-addressed, so the same bytes uploaded again land at the same location::

    uploads/datasets/<sha256>/<filename>        one dataset file
    uploads/models/<digest>/<file>              a base model folder's files
    uploads/models/<digest>/_complete.json      written last: the folder is whole
    uploads/model-parts/<digest>/<file>         what each uploaded file hashed to

A model's digest is the SHA-256 over its sorted ``<file> <sha256>`` lines, so it names the
folder's content. A file of a model is checked against the manifest only when the upload
is finished, which writes the marker; a folder without the marker is never loaded.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import Conflict, NotFound, UploadError
from shared.store import Store

#: the suffixes data-prep reads (services/dataprep/sources.py FILE_SUFFIXES; a test keeps
#: the two equal)
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
DATASETS = "uploads/datasets"
MODELS = "uploads/models"
PARTS = "uploads/model-parts"
MARKER = "_complete.json"
MAX_NAME = 128
MAX_DEPTH = 4  # folders a model file may lie in, below the model folder
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
NAME_RULE = (
    f"letters, digits, '.', '_' and '-' only, 1-{MAX_NAME} characters, not starting with a dot"
)


def check_dataset_name(name: str) -> str:
    """A dataset file name the store and data-prep accept; UploadError saying the rule."""
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise UploadError(f"{name[:MAX_NAME]!r}: {NAME_RULE}")
    if not name.endswith(DATASET_SUFFIXES):
        raise UploadError(f"{name!r} must end in one of {', '.join(DATASET_SUFFIXES)}")
    return name


def check_model_path(path: str) -> str:
    """A file path inside a model folder (``/``-separated parts, each a plain name)."""
    parts = path.split("/")
    if len(parts) > MAX_DEPTH + 1 or any(
        len(p) > MAX_NAME or not _NAME.fullmatch(p) for p in parts
    ):
        raise UploadError(
            f"{path[:200]!r}: each part {NAME_RULE}; at most {MAX_DEPTH} folders deep"
        )
    if path == MARKER:
        raise UploadError(f"{MARKER} is the upload's own marker, not a model file")
    return path


def check_sha256(value: str, *, what: str = "digest") -> str:
    """A lowercase hex SHA-256."""
    if not _SHA256.fullmatch(value):
        raise UploadError(f"{what} {value[:80]!r} is not a lowercase hex SHA-256")
    return value


def upload_name(name: str) -> str:
    """The name a local dataset file is uploaded under: odd characters replaced with
    ``_``, the suffix lowercased, no leading dot, at most 128 characters."""
    path = Path(name)
    suffix = path.suffix.lower()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".") or "dataset"
    return check_dataset_name(stem[: MAX_NAME - len(suffix)] + suffix)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(files: dict[str, str]) -> str:
    """One digest for a folder: SHA-256 over its sorted ``<file> <sha256>`` lines."""
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_files(folder: Path) -> dict[str, Path]:
    """The files of a local model folder to upload: its regular files, by name (what
    ``from_pretrained`` reads; subfolders and hidden files are left out); UploadError on
    a symbolic link or a folder that holds no config.json."""
    if folder.is_symlink() or not folder.is_dir():
        raise UploadError(f"base_model: {folder} is not a folder (a symbolic link is refused)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink():
            raise UploadError(
                f"base_model: {path} is a symbolic link; only regular files are uploaded "
                "(copy the folder with `cp -rL` first)"
            )
        if path.is_file():
            try:
                files[check_model_path(path.name)] = path
            except UploadError as exc:
                raise UploadError(f"base_model: {path}: {exc}") from exc
    if "config.json" not in files:
        raise UploadError(
            f"base_model: {folder} has no config.json: not a folder `save_pretrained` wrote"
        )
    return files


def dataset_key(sha256: str, filename: str) -> str:
    """Where a dataset file with this content and name is stored."""
    return f"{DATASETS}/{check_sha256(sha256, what='sha256')}/{check_dataset_name(filename)}"


def model_prefix(digest: str) -> str:
    """Where the files of a model folder with this digest are stored."""
    return f"{MODELS}/{check_sha256(digest)}"


def store_dataset(store: Store, received: Path, *, sha256: str, filename: str) -> str:
    """Put a received dataset file into the store (unless it is there already); its key."""
    key = dataset_key(sha256, filename)
    if not store.exists(key):
        store.upload_file(received, key)
    return key


def read_marker(store: Store, digest: str) -> dict[str, Any] | None:
    """The marker of a finished model upload, or None while it is not finished."""
    try:
        return store.get_json(f"{model_prefix(digest)}/{MARKER}")
    except NotFound:
        return None


def store_model_file(
    store: Store, received: Path, *, digest: str, path: str, sha256: str, size: int
) -> None:
    """Put one received file of a model folder into the store and record its SHA-256; a
    finished upload's files cannot change (Conflict), and are not written again."""
    marker = read_marker(store, digest)
    if marker is not None:
        if marker["files"].get(path) == sha256:
            return
        raise Conflict(
            f"the upload of model {digest} is finished; its file {path!r} cannot change "
            "(another folder has another digest)"
        )
    store.upload_file(received, f"{model_prefix(digest)}/{check_model_path(path)}")
    store.put_json(f"{PARTS}/{digest}/{path}", {"sha256": sha256, "bytes": size})


def finish_model(store: Store, digest: str, files: dict[str, str]) -> dict[str, Any]:
    """Check every file of the manifest arrived with its SHA-256, then write the marker;
    the marker. UploadError for a manifest of another digest, Conflict naming the files
    missing or different."""
    if folder_digest(files) != check_sha256(digest):
        raise UploadError(
            f"the manifest's digest is {folder_digest(files)}, not {digest}: the digest is "
            "the SHA-256 over the sorted '<file> <sha256>' lines of the manifest"
        )
    marker = read_marker(store, digest)
    if marker is not None:
        return marker
    sizes, problems = {}, []
    for path, sha in sorted(files.items()):
        part = _part(store, digest, path)
        if part is None or not store.exists(f"{model_prefix(digest)}/{path}"):
            problems.append(f"{path} (not uploaded)")
        elif part["sha256"] != sha:
            problems.append(f"{path} (uploaded with SHA-256 {part['sha256']}, not {sha})")
        else:
            sizes[path] = part["bytes"]
    if problems:
        more = f" and {len(problems) - 10} more" if len(problems) > 10 else ""
        shown = ", ".join(problems[:10]) + more
        raise Conflict(
            f"the upload of model {digest} is not complete: {shown}; put those files, "
            "then finish the upload again"
        )
    _drop_extra(store, digest, files)
    marker = {
        "digest": digest,
        "files": dict(sorted(files.items())),
        "bytes": sum(sizes.values()),
        "completed_at": datetime.now(UTC).isoformat(),
    }
    store.put_json(f"{model_prefix(digest)}/{MARKER}", marker)
    store.delete_prefix(f"{PARTS}/{digest}")
    return marker


def _part(store: Store, digest: str, path: str) -> dict[str, Any] | None:
    try:
        return store.get_json(f"{PARTS}/{digest}/{check_model_path(path)}")
    except NotFound:
        return None


def _drop_extra(store: Store, digest: str, files: dict[str, str]) -> None:
    """Delete files put under the digest that its manifest does not name."""
    prefix = model_prefix(digest)
    for key in store.list(prefix):
        if key[len(prefix) + 1 :] not in files:
            store.delete(key)
