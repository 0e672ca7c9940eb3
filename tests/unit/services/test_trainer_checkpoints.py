"""The trainer's checkpoints in the store: which one a job resumes from, and which ones a
save keeps, after the newest stored one turned out broken."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from services.trainer.checkpoints import CheckpointStore
from shared.store import LocalStore

PREFIX = "jobs/job-1/train/checkpoints"


def _save(tmp_path, checkpoints, step):
    """A checkpoint folder as the Trainer writes it (state and adapter), uploaded."""
    folder = tmp_path / "saved" / f"checkpoint-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"lora_A": torch.full((2, 2), float(step))}, folder / "adapter_model.safetensors")
    checkpoints.upload(folder, step)


def _resumed_step(checkpoints, tmp_path, name):
    resumed = checkpoints.download_latest(tmp_path / name)
    return json.loads((resumed / "trainer_state.json").read_text())["global_step"]


@pytest.fixture
def fell_back(tmp_path):
    """Checkpoints 2 and 4 stored, 4's adapter then cut short: the job resumed from 2."""
    store = LocalStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, PREFIX)
    _save(tmp_path, checkpoints, 2)
    _save(tmp_path, checkpoints, 4)
    store.put_bytes(f"{PREFIX}/step-00000004/adapter_model.safetensors", b"\x08\x00")
    assert _resumed_step(checkpoints, tmp_path, "first") == 2
    return store, checkpoints


def test_a_save_after_a_fallback_keeps_the_checkpoint_resumed_from(fell_back, tmp_path):
    """The review's case: the save after the fallback (a shutdown at step 3) deleted step 2,
    the one resumed from, and kept the broken step 4 as one of the two newest; the new
    checkpoint lost in turn, nothing whole was left to resume from."""
    store, checkpoints = fell_back
    _save(tmp_path, checkpoints, 3)
    assert checkpoints.steps() == [3, 2]
    store.delete_prefix(f"{PREFIX}/step-00000003")  # a second fault, as the first
    assert _resumed_step(checkpoints, tmp_path, "second") == 2


def test_a_broken_checkpoint_is_set_aside_with_why(fell_back):
    store, checkpoints = fell_back
    aside = f"{PREFIX}/set-aside/step-00000004"
    assert store.get_bytes(f"{aside}/adapter_model.safetensors") == b"\x08\x00"
    assert "adapter_model.safetensors cannot be read" in store.get_json(f"{aside}.json")["problem"]
    assert checkpoints.steps() == [2]
    assert checkpoints.latest_step() == 2  # the pointer names the checkpoint resumed from


def test_a_set_aside_checkpoint_is_never_resumed(fell_back, tmp_path):
    """Not with the pointer gone, and not mixed into the step a run saves again."""
    store, checkpoints = fell_back
    store.delete(checkpoints.pointer)
    assert _resumed_step(checkpoints, tmp_path, "pointerless") == 2
    _save(tmp_path, checkpoints, 4)
    assert _resumed_step(checkpoints, tmp_path, "again") == 4
    assert checkpoints.steps() == [4, 2]


def test_the_fallback_is_logged_as_it_happened(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, PREFIX)
    _save(tmp_path, checkpoints, 2)
    _save(tmp_path, checkpoints, 4)
    store.delete_prefix(f"{PREFIX}/step-00000004")  # gone: nothing to set aside
    with caplog.at_level(logging.WARNING, logger="services.trainer.checkpoints"):
        assert _resumed_step(checkpoints, tmp_path, "resumed") == 2
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint at step 4 cannot be resumed (trainer_state.json is missing or empty; "
        "nothing of it is stored); trying an older one"
    ]
    assert not store.list(f"{PREFIX}/set-aside")


def test_an_upload_cut_short_before_its_pointer_is_set_aside_too(tmp_path):
    """A crash between storing step 4 and pointing at it: the job resumes from step 2 (the
    pointer's), and the save after it keeps step 2, not the unfinished step 4."""
    store = LocalStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, PREFIX)
    _save(tmp_path, checkpoints, 2)
    _save(tmp_path, checkpoints, 4)
    store.put_json(checkpoints.pointer, {"step": 2, "prefix": "step-00000002"})
    store.delete(f"{PREFIX}/step-00000004/trainer_state.json")
    assert _resumed_step(checkpoints, tmp_path, "resumed") == 2
    _save(tmp_path, checkpoints, 3)
    assert checkpoints.steps() == [3, 2]
    assert store.get_json(f"{PREFIX}/set-aside/step-00000004.json")["step"] == 4
