"""Where a dataset may come from: the object store, allowed buckets, allowed local folders.

Checked before anything is opened or downloaded. A local path is resolved with its symbolic
links followed, so a link inside an allowed folder that points outside is refused; S3 keys
with empty, ``.`` or ``..`` parts, control characters or backslashes are refused even though
S3 would read them literally, and so are keys that become such once percent-decoded, once
or several times. An ``s3://`` source names one object: a glob or a folder (prefix) is
refused, as globs and folders are read from local paths only. A local path that exists is
used as it is, brackets and all; only a path that does not is a glob pattern.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.errors import StoreLocationError
from shared.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
GLOB_CHARS = "*?["


#: characters that look like a slash or a dot, or hide what follows
LOOKALIKES = set("\\\u2215\u2044\uff0f\u29f8\uff0e\u2024\u3002\ufe52")


def _odd(text: str) -> bool:
    """Control, format (bidirectional overrides...) or separator characters, lookalikes."""
    return any(
        c in LOOKALIKES or unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
        for c in text
    )


def _decodings(key: str) -> list[str]:
    """The key and each percent-decoding of it in turn (``%252e`` → ``%2e`` → ``.``), to the
    last that changes it: a server or a later tool may decode it, more than once."""
    found = [key]
    while len(found) < 8 and unquote(found[-1]) != found[-1]:
        found.append(unquote(found[-1]))
    return found


def _bad_key(key: str) -> bool:
    """Empty parts, dot-only parts or parts starting with "..", odd characters, in the key
    or any percent-decoding of it."""
    for text in _decodings(key):
        parts = text.split("/")
        if not text or _odd(text) or any(p.strip(".") == "" or p.startswith("..") for p in parts):
            return True
    return False


def _refuse(source: str, why: str) -> StoreLocationError:
    return StoreLocationError(f"dataset.source: {source!r} {why}")


def _one_object(source: str) -> None:
    """Refuse an ``s3://`` source naming a folder (prefix) or a ``*`` glob, not one
    object."""
    key = source.removeprefix("s3://").partition("/")[2]
    only = "an s3:// source names one object (globs and folders are read from local paths only)"
    if not key or key.endswith("/"):
        raise _refuse(source, f"names a folder (prefix), not an object; {only}")
    if "*" in key:  # ? and [ are taken as written: keys such as glossary[v2].jsonl exist
        raise _refuse(source, f"is a glob pattern (*), not an object; {only}")


def check_s3(source: str, *, store_root: str, settings: Settings) -> None:
    """An ``s3://`` source inside the store or an allowed bucket, with a plain key naming
    one object."""
    if _odd(source):
        raise _refuse(source, "has control, format or lookalike characters")
    _one_object(source)
    if source.startswith(store_root + "/") and not _bad_key(source[len(store_root) + 1 :]):
        return
    parsed = urlparse(source)
    if parsed.scheme != "s3" or parsed.params or parsed.query or parsed.fragment:
        raise _refuse(source, "is not a plain s3://bucket/key URI")
    bucket, key = parsed.netloc, parsed.path[1:]
    if bucket not in settings.allowed_buckets:
        allowed = ", ".join(settings.allowed_buckets) or "none (TERMTUNE_ALLOWED_BUCKETS)"
        raise _refuse(source, f"is outside the object store and the allowed buckets: {allowed}")
    if _bad_key(key):
        raise _refuse(source, "has an empty, '.', '..' or control-character part in its key")


def check_local(source: str, path: str, *, settings: Settings) -> Path:
    """A local path (glob patterns: their fixed folder) inside an allowed folder; resolved.
    A path that exists is no pattern, whatever characters it holds."""
    if _odd(path):
        raise _refuse(source, "has control, format or lookalike characters")
    fixed = (
        path.split("*")[0].split("?")[0].split("[")[0]
        if any(c in path for c in GLOB_CHARS) and not os.path.lexists(path)
        else path
    )
    resolved = Path(os.path.realpath(fixed))
    roots = settings.allowed_paths
    if not roots and settings.environment == "development":
        return resolved
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if resolved == real_root or real_root in resolved.parents:
            return resolved
    allowed = ", ".join(map(str, roots)) or "none (TERMTUNE_ALLOWED_PATHS)"
    raise _refuse(source, f"is outside the allowed local folders: {allowed}")


def check_source(source: str, *, store_root: str, settings: Settings) -> str:
    """Refuse a source outside the allowed locations; its kind: store, s3, local or hub."""
    if _odd(source):  # before any parsing: urlparse silently drops tabs and newlines
        raise _refuse(source, "has control, format or lookalike characters")
    if source.startswith(store_root + "/") and not source.startswith("s3://"):
        if _bad_key(source[len(store_root) + 1 :]):
            raise _refuse(source, "has an empty, '.', '..' or control-character part")
        return "store"
    if source.startswith("s3://"):
        check_s3(source, store_root=store_root, settings=settings)
        return "store" if source.startswith(store_root + "/") else "s3"
    if source[:3].lower() == "s3:":  # s3:/bucket/key, S3://...: a typo, not a local folder
        raise _refuse(source, "is not a plain s3://bucket/key URI")
    if source.startswith("file://"):
        parsed = urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise _refuse(source, "names another host")
        check_local(source, unquote(parsed.path), settings=settings)
        return "local"
    if "://" in source or source.startswith("//"):
        raise _refuse(source, "uses a scheme other than s3:// and file://")
    if not is_hub_id(source):
        check_local(source, source, settings=settings)
        return "local"
    return "hub"


def is_hub_id(source: str) -> bool:
    """Whether a dataset source names a hub dataset (``owner/name``), not a file or a URI."""
    looks_local = (
        "://" in source
        or source.lower().endswith((".jsonl", ".json", ".csv", ".tsv", ".parquet"))
        or source.startswith((".", "/", "~"))
        or any(c in source for c in GLOB_CHARS)
        or "\\" in source
    )
    return not looks_local and bool(HUB_ID.match(source))
