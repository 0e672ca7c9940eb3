"""The shapes Bedrock serves imported models in — Bedrock completion, OpenAI completion,
OpenAI chat completions — spoken by the local twin and sent to Bedrock: a chat-tuned model
answers a chat message as the evaluator scored it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.api.shapes import (
    ChatRequest,
    CompletionRequest,
    InvokeRequest,
    answer_of,
    body_of,
)
from shared import bedrock
from shared.bus import Bus
from tests.factories import api_settings
from tests.unit.services.test_api import app_env  # noqa: F401 - the API on a fresh var/

KEY = "test-key-123"
DECODING = {"max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0}


@contextmanager
def _serving(ctx):
    """The API over a stage context's records, signed in."""
    settings = api_settings(ctx, KEY)
    with TestClient(create_app(settings, bus=Bus(settings))) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client


@pytest.fixture(scope="module")
def twin(published_qwen):
    ctx, _, _ = published_qwen
    with _serving(ctx) as client:
        yield ctx, client


def test_a_chat_tuned_model_answers_a_chat_message_as_it_was_evaluated(twin):
    ctx, client = twin
    samples = ctx.jobs.manifest("qwen-job", "evaluate")["samples"]
    assert samples
    for sample in samples:
        body = {"messages": [{"role": "user", "content": sample["prompt"]}]}
        answer = client.post("/v1/models/test-terms/invoke", json=body)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["object"] == "chat.completion" and reply["model"] == "test-terms"
        (choice,) = reply["choices"]
        assert choice["message"] == {"role": "assistant", "content": sample["tuned"]}
        assert choice["finish_reason"] in ("stop", "length")
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_both_completion_shapes_take_the_prompt_as_it_is(twin):
    _, client = twin
    prompt = "What is Asthma"
    bedrock_shape = client.post(
        "/v1/models/test-terms/invoke", json={"prompt": prompt, "max_gen_len": 5}
    ).json()
    openai_shape = client.post(
        "/v1/models/test-terms/invoke", json={"prompt": prompt, "max_tokens": 5}
    ).json()
    assert set(bedrock_shape) == {
        "generation", "prompt_token_count", "generation_token_count", "stop_reason",
    }  # fmt: skip
    (choice,) = openai_shape["choices"]
    assert openai_shape["object"] == "text_completion"
    assert choice["text"] == bedrock_shape["generation"]
    assert openai_shape["usage"]["completion_tokens"] == bedrock_shape["generation_token_count"]
    assert bedrock_shape["generation_token_count"] <= 5


def test_a_model_without_a_chat_template_refuses_chat(app_env, published):  # noqa: F811
    client, _, app = app_env
    ctx, _, event = published
    store = app.state.jobs.store
    store.upload_dir(ctx.store.path(ctx.store.key_of(event.location)), "jobs/j/publish/model")
    location = store.uri("jobs/j/publish/model")
    app.state.jobs.register_model("t5", {"name": "t5", "target": "local", "location": location})
    body = {"messages": [{"role": "user", "content": "What is Asthma"}]}
    refused = client.post("/v1/models/t5/invoke", json=body)
    assert refused.status_code == 422
    assert "model 't5' has no chat template, so it cannot take chat messages" in refused.text
    mixed = client.post(
        "/v1/models/t5/invoke", json={"prompt": "x", "max_tokens": 2, "max_gen_len": 2}
    )
    assert mixed.status_code == 422  # one shape at a time


def test_bodies_sent_to_bedrock_carry_the_decoding_under_each_shapes_names():
    assert body_of(InvokeRequest(prompt="p"), DECODING) == {
        "prompt": "p", "max_gen_len": 8, "temperature": 0.0, "top_p": 1.0,
    }  # fmt: skip
    assert body_of(CompletionRequest(prompt="p", max_tokens=3), DECODING) == {
        "prompt": "p", "max_tokens": 3, "temperature": 0.0, "top_p": 1.0,
    }  # fmt: skip
    chat = ChatRequest(messages=[{"role": "user", "content": "p"}], temperature=0.5)
    assert body_of(chat, DECODING) == {
        "messages": [{"role": "user", "content": "p"}],
        "max_tokens": 8, "temperature": 0.5, "top_p": 1.0,
    }  # fmt: skip
    assert bedrock.chat_request_body("p", DECODING) == body_of(
        ChatRequest(messages=[{"role": "user", "content": "p"}]), DECODING
    )


@pytest.mark.parametrize(
    "body",
    [
        {"generation": "a drug", "prompt_token_count": 3, "generation_token_count": 2},
        {"choices": [{"text": "a drug", "finish_reason": "length"}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        {"choices": [{"message": {"role": "assistant", "content": "a drug"}}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        {"outputs": [{"text": "a drug"}]},
    ],
)  # fmt: skip
def test_every_answer_shape_bedrock_sends_back_is_read(body):
    answer = answer_of(body)
    assert answer.text == "a drug"
    if "outputs" not in body:
        assert (answer.prompt_tokens, answer.generated_tokens) == (3, 2)
    assert answer.stop_reason == ("length" if "length" in str(body) else "stop")


def test_the_cli_asks_a_chat_tuned_model_with_a_chat_message(twin, monkeypatch, capsys):
    import json

    import jsonschema

    from services.api.shapes import ChatResponse
    from services.cli import client as client_module
    from services.cli import display
    from services.cli.main import main

    ctx, http = twin
    client = client_module.Client("http://testserver", api_key=KEY)
    client.http = http
    monkeypatch.setattr(client_module, "Client", lambda *args, **kwargs: client)
    sample = ctx.jobs.manifest("qwen-job", "evaluate")["samples"][0]
    assert main(["invoke", "test-terms", sample["prompt"], "--chat", "--max-gen-len", "8"]) == 0
    reply = json.loads(capsys.readouterr().out)
    jsonschema.validate(reply, ChatResponse.model_json_schema())
    assert reply["choices"][0]["message"]["content"] == sample["tuned"]
    assert client.model("test-terms")["chat"] is True
    display.invoked(client, "test-terms", sample["prompt"])  # `termtune run`'s last line
    assert f"-> {sample['tuned']!r}" in capsys.readouterr().out


def test_messages_a_chat_template_refuses_are_the_callers_error(tiny_qwen):
    from services.api.inference import _check_chat
    from services.api.shapes import ask_of
    from shared.errors import ModelError
    from shared.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_qwen))
    ask = ask_of(ChatRequest(messages=[{"role": "system", "content": "be brief"}]))
    _check_chat("m", tokenizer, ask)  # ChatML renders a system message
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(ModelError, match="model 'm''s chat template refused these messages: "):
        _check_chat("m", tokenizer, ask)


@pytest.fixture(scope="module")
def gpt_oss_twin(published_gpt_oss):
    ctx, _, _ = published_gpt_oss
    with _serving(ctx) as client:
        yield ctx, client


def test_gpt_oss_answers_openais_shapes_with_its_final_channel_as_evaluated(gpt_oss_twin):
    ctx, client = gpt_oss_twin
    assert client.get("/v1/models/test-terms").json()["family"] == "gpt_oss"
    samples = ctx.jobs.manifest("oss-job", "evaluate")["samples"]
    assert any(s["tuned"] for s in samples)  # trained: it writes a final message
    for sample in samples:
        body = {"messages": [{"role": "user", "content": sample["prompt"]}]}
        reply = client.post("/v1/models/test-terms/invoke", json=body)
        assert reply.status_code == 200, reply.text
        content = reply.json()["choices"][0]["message"]["content"]
        assert content == sample["tuned"] and "<|" not in content and "final" not in content[:5]
    completion = client.post(
        "/v1/models/test-terms/invoke", json={"prompt": "What is Asthma", "max_tokens": 5}
    )
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    refused = client.post(
        "/v1/models/test-terms/invoke", json={"prompt": "What is Asthma", "max_gen_len": 5}
    )
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "model 'test-terms' is a GPT-OSS model, which Bedrock serves only in OpenAI's "
        "completion (prompt, max_tokens) and chat completions (messages) shapes: send "
        "max_tokens in place of max_gen_len, or chat messages"
    )
