import pytest

from shared.errors import MessageError
from shared.messages import (
    DatasetPrepared,
    PrepareDataset,
    StageFailed,
    TrainModel,
    dump_message,
    parse_message,
)


def test_round_trip_keeps_type_and_fields():
    cmd = TrainModel(job_id="j-1", spec_uri="file:///s/spec.json", dataset_manifest="file:///m")
    parsed = parse_message(dump_message(cmd))
    assert parsed == cmd
    assert isinstance(parsed, TrainModel)


def test_routing_keys_separate_commands_and_events():
    assert PrepareDataset(job_id="j", spec_uri="u").routing_key == "cmd.PrepareDataset"
    event = DatasetPrepared(job_id="j", manifest="m", counts={"train": 1})
    assert event.routing_key == "event.DatasetPrepared"


def test_every_message_carries_version_and_time():
    event = StageFailed(job_id="j", stage="train", error="boom", error_type="X")
    data = dump_message(event)
    assert data["schema_version"] == 1
    assert data["created_at"] and data["message_id"]


def test_unknown_type_is_refused():
    with pytest.raises(MessageError, match="invalid message"):
        parse_message({"type": "Nope", "job_id": "j"})


def test_missing_field_is_named():
    with pytest.raises(MessageError, match="dataset_manifest"):
        parse_message({"type": "TrainModel", "job_id": "j", "spec_uri": "u"})


def test_bad_job_id_is_refused():
    with pytest.raises(MessageError, match="job_id"):
        parse_message('{"type": "PrepareDataset", "job_id": "../etc", "spec_uri": "u"}')


def test_messages_are_frozen():
    cmd = PrepareDataset(job_id="j", spec_uri="u")
    with pytest.raises(ValueError):
        cmd.job_id = "other"
