"""The request and response shapes Bedrock serves for imported models, and the one form
termtune answers them from.

Bedrock's InvokeModel answers an imported model in the shape of the request's body:

- Bedrock completion: ``{"prompt", "max_gen_len", "temperature", "top_p"}`` ->
  ``{"generation", "prompt_token_count", "generation_token_count", "stop_reason"}``;
- OpenAI completion: ``{"prompt", "max_tokens", ...}`` -> ``{"choices": [{"text",
  "finish_reason"}], "usage"}``;
- OpenAI chat completions: ``{"messages": [{"role", "content"}], "max_tokens", ...}`` ->
  ``{"choices": [{"message": {"role", "content"}, "finish_reason"}], "usage"}``; the model's
  chat template renders the messages (a model without one cannot chat).

The local twin and ``/v1/models/{name}/invoke`` take and give the same three. What a request
leaves out is the model's decoding (the job spec's, which the evaluator scored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.api_models import (
    AnyResponse,
    AssistantMessage,
    ChatChoice,
    ChatResponse,
    CompletionChoice,
    CompletionResponse,
    InvokeResponse,
    Usage,
)
from shared.bedrock import generation_of
from shared.errors import ModelError
from shared.families import FAMILIES

MAX_PROMPT_CHARS = 20_000


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0: greedy decoding (default: decoding's)."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling mass (default: decoding's)."
    )


def _limit() -> Any:
    return Field(None, ge=1, le=4096, description="Most tokens to generate (default: decoding's).")


class _Prompted(_Sampling):
    prompt: str = Field(
        ..., min_length=1, max_length=MAX_PROMPT_CHARS, description="The input text, as it is."
    )


class InvokeRequest(_Prompted):
    """Bedrock's completion body for imported models."""

    max_gen_len: int | None = _limit()


class CompletionRequest(_Prompted):
    """OpenAI's completion body, which Bedrock also takes for imported models."""

    max_tokens: int | None = _limit()


class ChatMessage(BaseModel):
    """One message of a chat."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)


class ChatRequest(_Sampling):
    """OpenAI's chat completions body: the model's chat template renders the messages."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=64)
    max_tokens: int | None = _limit()


AnyRequest = InvokeRequest | CompletionRequest | ChatRequest


@dataclass(frozen=True)
class Ask:
    """One request in termtune's form: a prompt as it is, or chat messages to render."""

    prompt: str | None
    messages: tuple[dict[str, str], ...] | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    generated_tokens: int
    stop_reason: Literal["stop", "length"]


def check_served(request: AnyRequest, model_type: str | None, name: str) -> None:
    """ModelError when Bedrock does not serve the model's family in the request's shape
    (GPT-OSS imports answer OpenAI's shapes only), here and in Bedrock alike."""
    family = FAMILIES.get(str(model_type))
    if family is not None and not family.bedrock_completion and isinstance(request, InvokeRequest):
        raise ModelError(
            f"model {name!r} is a {family.label} model, which Bedrock serves only in OpenAI's "
            "completion (prompt, max_tokens) and chat completions (messages) shapes: send "
            "max_tokens in place of max_gen_len, or chat messages"
        )


def ask_of(request: AnyRequest) -> Ask:
    """The request in termtune's form."""
    sampling = {"temperature": request.temperature, "top_p": request.top_p}
    if isinstance(request, ChatRequest):
        messages = tuple(m.model_dump() for m in request.messages)
        return Ask(None, messages, request.max_tokens, **sampling)
    limit = request.max_gen_len if isinstance(request, InvokeRequest) else request.max_tokens
    return Ask(request.prompt, None, limit, **sampling)


def respond(request: AnyRequest, answer: Answer, model: str) -> AnyResponse:
    """The answer in the request's shape."""
    if isinstance(request, InvokeRequest):
        return InvokeResponse(
            generation=answer.text,
            prompt_token_count=answer.prompt_tokens,
            generation_token_count=answer.generated_tokens,
            stop_reason=answer.stop_reason,
        )
    usage = Usage(
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.generated_tokens,
        total_tokens=answer.prompt_tokens + answer.generated_tokens,
    )
    if isinstance(request, ChatRequest):
        choice = ChatChoice(
            message=AssistantMessage(content=answer.text), finish_reason=answer.stop_reason
        )
        return ChatResponse(model=model, choices=[choice], usage=usage)
    return CompletionResponse(
        model=model,
        choices=[CompletionChoice(text=answer.text, finish_reason=answer.stop_reason)],
        usage=usage,
    )


def body_of(request: AnyRequest, decoding: dict[str, Any]) -> dict[str, Any]:
    """What to send Bedrock: the request's body, with what it leaves out taken from the
    spec's decoding (a ``DecodingSpec`` dump) under the shape's own names."""
    body = request.model_dump(exclude_none=True)
    limit = "max_gen_len" if isinstance(request, InvokeRequest) else "max_tokens"
    defaults = {
        limit: decoding.get("max_new_tokens"),
        "temperature": decoding.get("temperature"),
        "top_p": decoding.get("top_p"),
    }
    return {**{k: v for k, v in defaults.items() if v is not None}, **body}


def answer_of(body: dict[str, Any]) -> Answer:
    """Bedrock's reply, read defensively: whichever shape it answers in (older imports
    answer ``outputs[0].text``)."""

    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    choices = body.get("choices") if isinstance(body.get("choices"), list) else []
    first = choices[0] if choices and isinstance(choices[0], dict) else {}
    text = generation_of(body)
    reason = body.get("stop_reason") or first.get("finish_reason")
    return Answer(
        text=text,
        prompt_tokens=int(body.get("prompt_token_count") or usage.get("prompt_tokens") or 0),
        generated_tokens=int(
            body.get("generation_token_count") or usage.get("completion_tokens") or 0
        ),
        stop_reason="length" if reason == "length" else "stop",
    )
