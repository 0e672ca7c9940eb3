"""A job's ``base_model`` as a folder ``from_pretrained`` can read on this machine.

``base_model`` is a hub id, a local folder, or a model folder uploaded into the object
store (``<store>/uploads/models/<digest>``, see shared.uploads). An uploaded one is used only
once its upload is finished (``_complete.json``); it is downloaded once per machine into
``<cache>/base-models/<digest>`` (staged beside it and renamed into place, so a concurrent
worker never sees half a folder) and each file is checked against its SHA-256 on the way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared import families
from shared.errors import ModelError, SpecError
from shared.store import LocalStore, Store
from shared.uploads import MARKER, MODELS, file_sha256, read_marker

CACHE_FOLDER = "base-models"
_UPLOADED = re.compile(rf"{MODELS}/([0-9a-f]{{64}})")
HOW = "`termtune submit SPEC --upload` uploads a local model folder"


def uploaded_digest(base_model: str, *, store: Store) -> str | None:
    """The digest of an uploaded base model; None for a hub id or a local folder; SpecError
    for any other location (another store, another folder of this one)."""
    if "://" not in base_model:
        return None
    where = f"{store.root_uri}/{MODELS}/<digest>"
    if not base_model.startswith(store.root_uri + "/"):
        raise SpecError(
            f"base_model: {base_model!r} is outside this deployment's object store: name a "
            f"model uploaded to {where} ({HOW}), a hub id or a folder on the services' machines"
        )
    found = _UPLOADED.fullmatch(base_model[len(store.root_uri) + 1 :].rstrip("/"))
    if found is None:
        raise SpecError(
            f"base_model: {base_model!r} is not an uploaded model folder; uploaded models "
            f"live at {where} ({HOW})"
        )
    return found.group(1)


def check_uploaded(base_model: str, *, store: Store) -> dict[str, Any] | None:
    """The finished upload's marker of an uploaded base model (None for a hub id or a local
    folder); SpecError when it is elsewhere or its upload is not finished."""
    digest = uploaded_digest(base_model, store=store)
    return None if digest is None else _finished(base_model, digest, store=store)


def _finished(base_model: str, digest: str, *, store: Store) -> dict[str, Any]:
    marker = read_marker(store, digest)
    if marker is None or marker.get("digest") != digest:
        raise SpecError(
            f"base_model: {base_model!r} is not a finished upload (no {MARKER}): upload the "
            f"folder again ({HOW}; POST /v1/uploads/models/<digest> finishes it)"
        )
    return marker


def resolve_base_model(base_model: str, *, store: Store, cache_dir: Path) -> str:
    """What to give ``from_pretrained``: an uploaded model's local folder (downloaded once),
    anything else as it is."""
    digest = uploaded_digest(base_model, store=store)
    if digest is None:
        return base_model
    if isinstance(store, LocalStore):  # the store is a folder here: read it in place
        _finished(base_model, digest, store=store)
        return str(store.path(f"{MODELS}/{digest}"))
    target = cache_dir / CACHE_FOLDER / digest
    if not (target / MARKER).is_file():
        _download(store, digest, _finished(base_model, digest, store=store), target)
    return str(target)


def base_model_config(base_model: str, *, store: Store, cache_dir: Path) -> str:
    """A folder holding at least the base model's config.json (all an estimate reads):
    for an uploaded model not downloaded here, only that file is fetched."""
    digest = uploaded_digest(base_model, store=store)
    if digest is None or isinstance(store, LocalStore):
        return resolve_base_model(base_model, store=store, cache_dir=cache_dir)
    whole = cache_dir / CACHE_FOLDER / digest
    if (whole / MARKER).is_file():
        return str(whole)
    _finished(base_model, digest, store=store)
    folder = cache_dir / CACHE_FOLDER / f"{digest}.config"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        os.close(fd)
        try:
            store.download_file(f"{MODELS}/{digest}/config.json", Path(staged))
            os.replace(staged, folder / "config.json")
        finally:
            Path(staged).unlink(missing_ok=True)
    return str(folder)


def _download(store: Store, digest: str, marker: dict[str, Any], target: Path) -> None:
    """Every file the marker names into ``target``, checked, staged and renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        for path, sha in marker["files"].items():
            local = staging / path
            local.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(f"{MODELS}/{digest}/{path}", local)
            if file_sha256(local) != sha:
                where = store.uri(f"{MODELS}/{digest}/{path}")
                raise ModelError(
                    f"base_model: {where} differs from what was uploaded (its SHA-256 is not "
                    f"{sha}); upload the folder again ({HOW})"
                )
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        try:
            staging.rename(target)
        except OSError:
            if not (target / MARKER).is_file():  # not another worker's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def base_model_family(base_model: str, *, store: Store, cache_dir: Path) -> families.Family | None:
    """The family of ``base_model`` where its config.json can be read without downloading
    the model (a folder, an upload, the hub's local cache); None where it cannot (a hub id
    not cached here: the stages check it when they load it). ModelError for a model of a
    family Bedrock does not import."""
    where = f"base_model {base_model!r}"
    folder = Path(base_model_config(base_model, store=store, cache_dir=cache_dir))
    if (folder / "config.json").is_file():
        config = folder / "config.json"
    else:
        config = _cached_hub_config(base_model)
        if config is None:
            return None
    return families.folder_family(config.parent, where=where)


def _cached_hub_config(base_model: str) -> Path | None:
    """config.json of a hub id from the hub's local cache, never asking the hub."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # a client-only install: the stages check the model
        return None
    try:
        found = try_to_load_from_cache(base_model, "config.json")
    except ValueError:  # not a repo id the hub would take; loading it will say why
        return None
    return Path(found) if isinstance(found, str) else None
