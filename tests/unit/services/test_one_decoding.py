"""One decoding end to end: what the evaluator scored is what the published model serves."""

import json

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.evaluator.handler import handle as evaluate
from services.publisher.handler import handle as publish
from shared import bedrock
from shared.bus import Bus
from shared.errors import SpecError
from shared.jobspec import parse_spec
from shared.messages import EvaluateModel
from shared.pipeline import next_command
from tests.factories import api_settings, make_spec

KEY = "test-key-123"
# Not the library's defaults: each setting must travel to be seen.
DECODING = {
    "max_new_tokens": 12,
    "num_beams": 2,
    "no_repeat_ngram_size": 2,
    "repetition_penalty": 1.3,
}


@pytest.fixture(scope="module")
def evaluated_and_published(trained_job):
    """The trained adapter evaluated and published (fp32, local) under a non-default decoding."""
    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    spec = make_spec(
        trained_job["spec"].base_model,
        decoding=DECODING,
        publish={"dtype": "float32", "model_name": "one-decoding"},
    )
    job_id = "one-decoding"
    command = EvaluateModel(
        job_id=job_id,
        spec_uri=ctx.jobs.create(job_id, spec),
        dataset_manifest=cmd.dataset_manifest,
        training_manifest=cmd.training_manifest,
    )
    evaluated = evaluate(command, ctx)
    published = publish(next_command(command, evaluated), ctx)
    return ctx, ctx.jobs.manifest(job_id, "evaluate"), published


def test_export_carries_the_evaluated_decoding(evaluated_and_published):
    ctx, report, published = evaluated_and_published
    assert report["decoding"] == {**DECODING, "temperature": 0.0, "top_p": 1.0}
    folder = ctx.store.path(ctx.store.key_of(published.location))
    config = json.loads((folder / "generation_config.json").read_text())
    assert {k: config[k] for k in DECODING} == DECODING
    assert config["do_sample"] is False and "temperature" not in config
    assert ctx.jobs.model("one-decoding")["decoding"] == report["decoding"]


def test_evaluator_samples_equal_what_invoke_returns(evaluated_and_published):
    ctx, report, _ = evaluated_and_published
    settings = api_settings(ctx, KEY)
    samples = report["samples"]
    assert len(samples) == 8 and any(s["tuned"] for s in samples)
    with TestClient(create_app(settings, bus=Bus(settings))) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        served = [
            client.post("/v1/models/one-decoding/invoke", json={"prompt": s["prompt"]}).json()
            for s in samples
        ]
        # A request that names the spec's own settings gets the same answers.
        named = client.post(
            "/v1/models/one-decoding/invoke",
            json={"prompt": samples[0]["prompt"], "max_gen_len": 12, "temperature": 0.0},
        ).json()
    assert [a["generation"] for a in served] == [s["tuned"] for s in samples]
    assert all(a["generation_token_count"] <= DECODING["max_new_tokens"] for a in served)
    assert named["generation"] == samples[0]["tuned"]


def test_bedrock_target_refuses_what_bedrock_does_not_apply():
    for name, value in DECODING.items():
        if name == "max_new_tokens":
            continue
        with pytest.raises(SpecError, match=rf"decoding.{name} = {value} is not applied by "):
            parse_spec({"name": "x1", "publish": {"target": "bedrock"}, "decoding": {name: value}})
    spec = parse_spec(
        {
            "name": "x1",
            "publish": {"target": "bedrock"},
            "decoding": {"max_new_tokens": 100, "temperature": 0.5, "top_p": 0.9},
        }
    )
    assert (spec.decoding.temperature, spec.decoding.top_p) == (0.5, 0.9)
    assert parse_spec({"name": "x1", "decoding": DECODING}).decoding.num_beams == 2  # local


def test_older_specs_decoding_fields_are_read_from_evaluation():
    spec = parse_spec(
        {"name": "x1", "evaluation": {"max_new_tokens": 48, "no_repeat_ngram_size": 3}}
    )
    assert (spec.decoding.max_new_tokens, spec.decoding.no_repeat_ngram_size) == (48, 3)
    assert spec.decoding.temperature == 0.0  # sampling was off: its temperature was unused
    sampled = parse_spec({"name": "x1", "evaluation": {"sampling": True, "top_p": 0.9}})
    assert (sampled.decoding.temperature, sampled.decoding.top_p) == (1.0, 0.9)
    with pytest.raises(SpecError, match="give decoding.max_new_tokens only"):
        parse_spec(
            {"name": "x1", "evaluation": {"max_new_tokens": 4}, "decoding": {"max_new_tokens": 5}}
        )
    with pytest.raises(SpecError, match="decoding.no_repeat_ngram_size = 3 is not applied"):
        parse_spec(
            {
                "name": "x1",
                "publish": {"target": "bedrock"},
                "evaluation": {"no_repeat_ngram_size": 3},
            }
        )


def test_bedrock_requests_carry_the_spec_decoding():
    decoding = parse_spec({"name": "x1", "decoding": {"max_new_tokens": 30}}).decoding.model_dump()
    assert bedrock.request_body("What is X", decoding) == {
        "prompt": "What is X",
        "max_gen_len": 30,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    given = bedrock.request_body("What is X", decoding, max_gen_len=5, temperature=None)
    assert (given["max_gen_len"], given["temperature"]) == (5, 0.0)
    assert bedrock.request_body("p", {}) == {"prompt": "p"}  # older registry entries
