"""Serving published models locally, in Bedrock's invoke request and response shape."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.api.batching import MicroBatcher
from shared import bedrock
from shared.jobs import JobRecords
from shared.settings import BedrockSettings, Settings

#: the length cap of models whose generation_config.json carries none (older exports)
DEFAULT_MAX_GEN_LEN = 256


class InvokeRequest(BaseModel):
    """Bedrock's request body for imported models; what it leaves out is the model's decoding
    (the job spec's ``decoding``, which the evaluator scored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=20_000, description="The input text.")
    max_gen_len: int | None = Field(
        None, ge=1, le=4096, description="Most tokens to generate (default: decoding's)."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="0: greedy decoding (default: decoding's)."
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="Nucleus sampling mass (default: decoding's)."
    )


def served(request: InvokeRequest, config: Any) -> InvokeRequest:
    """The request with what it leaves out taken from the model's generation config (its
    generation_config.json: the spec's decoding, written at export)."""
    sampling = bool(config.do_sample)
    temperature = (config.temperature or 1.0) if sampling else 0.0
    top_p = (config.top_p or 1.0) if sampling else 1.0
    return request.model_copy(
        update={
            "max_gen_len": request.max_gen_len or config.max_new_tokens or DEFAULT_MAX_GEN_LEN,
            "temperature": temperature if request.temperature is None else request.temperature,
            "top_p": top_p if request.top_p is None else request.top_p,
        }
    )


class InvokeResponse(BaseModel):
    """Bedrock's response body for imported models."""

    generation: str
    prompt_token_count: int
    generation_token_count: int
    stop_reason: Literal["stop", "length"]


class LocalModels:
    """Loads each published model once and answers invoke requests with it.

    Concurrent requests for one model are batched into one ``generate`` call (up to
    ``max_batch``; 1 turns batching off): greedy answers are the same as one at a time,
    since each row's prompt is masked from the others' padding and a longer greedy run
    begins with the shorter one.
    """

    def __init__(
        self,
        jobs: JobRecords,
        settings: Settings,
        *,
        max_batch: int = 8,
        wait_s: float = 0.0,
        max_seconds: float = 60.0,
    ) -> None:
        self.jobs, self.settings = jobs, settings
        self.max_batch, self.wait_s, self.max_seconds = max_batch, wait_s, max_seconds
        self._loaded: dict[str, tuple[str, Any, Any]] = {}
        self._batchers: dict[str, MicroBatcher] = {}
        self._lock = threading.Lock()

    def _load(self, name: str) -> tuple[Any, Any]:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        entry = self.jobs.model(name)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is None or cached[0] != entry["location"]:
                store = self.jobs.store
                folder: Path = store.local_dir(
                    store.key_of(entry["location"]), self.settings.cache_dir / "models"
                )
                model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
                cached = (entry["location"], model, AutoTokenizer.from_pretrained(folder))
                self._loaded[name] = cached
        return cached[1], cached[2]

    def forget(self, name: str) -> None:
        """Drop a model from memory."""
        with self._lock:
            self._loaded.pop(name, None)
            batcher = self._batchers.pop(name, None)
        if batcher is not None:
            batcher.close()

    def invoke(self, name: str, request: InvokeRequest) -> InvokeResponse:
        """Generate an answer to one prompt (batched with concurrent ones)."""
        model, _ = self._load(name)  # a missing model is the caller's 404, not the batch's
        request = served(request, model.generation_config)
        if self.max_batch <= 1:
            return self.generate(name, [request])[0]
        with self._lock:
            batcher = self._batchers.get(name)
            if batcher is None:
                batcher = self._batchers[name] = MicroBatcher(
                    lambda requests: self.generate(name, requests),
                    key=_batch_key(model.generation_config),
                    max_batch=self.max_batch,
                    wait_s=self.wait_s,
                    name=f"batch-{name}",
                )
        return batcher.submit(request)

    @torch.no_grad()
    def generate(self, name: str, requests: list[InvokeRequest]) -> list[InvokeResponse]:
        """Answers to prompts sharing temperature and top_p, in one ``generate`` call; the
        model's generation config (num_beams, no_repeat_ngram_size, ...) applies to all."""
        model, tokenizer = self._load(name)
        requests = [served(r, model.generation_config) for r in requests]
        inputs = tokenizer(
            [r.prompt for r in requests], return_tensors="pt", padding=True, truncation=True
        )
        first = requests[0]
        sample = first.temperature > 0
        output = model.generate(
            **inputs,
            max_new_tokens=max(r.max_gen_len for r in requests),
            do_sample=sample,
            temperature=first.temperature if sample else None,
            top_p=first.top_p if sample else None,
            max_time=self.max_seconds,  # a long answer is cut there: stop_reason "length"
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [
            _answer(tokenizer, row.tolist()[1:], request.max_gen_len, int(count))
            for row, request, count in zip(output, requests, prompt_tokens, strict=True)
        ]


def _batch_key(config: Any) -> Any:
    """Requests answered together: same sampling settings; under beam search also the same
    length cap (a beam search cut shorter is not the start of a longer one)."""
    if (config.num_beams or 1) > 1:
        return lambda r: (r.temperature, r.top_p, r.max_gen_len)
    return lambda r: (r.temperature, r.top_p)


def _answer(
    tokenizer: Any, tokens: list[int], max_gen_len: int, prompt_tokens: int
) -> InvokeResponse:
    """One row of a batch (decoder start dropped): cut at its end-of-sequence, or at its
    own ``max_gen_len`` when the batch generated longer for another row."""
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    tokens = tokens[:max_gen_len]
    finished = bool(tokens) and tokens[-1] == tokenizer.eos_token_id
    return InvokeResponse(
        generation=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        prompt_token_count=prompt_tokens,
        generation_token_count=len(tokens),
        stop_reason="stop" if finished else "length",
    )


class BedrockModels:
    """Models imported into Amazon Bedrock: invoked through bedrock-runtime, deleted there."""

    def __init__(self, settings: BedrockSettings | None = None) -> None:
        self.settings = settings or BedrockSettings()
        self._clients: dict[str, Any] = {}

    def _client(self, kind: str) -> Any:
        if kind not in self._clients:
            make = bedrock.runtime_client if kind == "runtime" else bedrock.control_client
            self._clients[kind] = make(self.settings)
        return self._clients[kind]

    def invoke(self, entry: dict[str, Any], request: InvokeRequest) -> InvokeResponse:
        """Ask the imported model (what the request leaves out: the spec's decoding); a cold
        copy is retried for minutes, as Bedrock needs."""
        given = request.model_dump(exclude={"prompt"})
        body = bedrock.invoke(
            self._client("runtime"),
            entry["bedrock"]["imported_model_arn"],
            bedrock.request_body(request.prompt, entry.get("decoding", {}), **given),
            retries=self.settings.not_ready_retries,
            wait_seconds=self.settings.not_ready_wait_seconds,
        )
        return InvokeResponse(
            generation=body["generation"],
            prompt_token_count=int(body.get("prompt_token_count") or 0),
            generation_token_count=int(body.get("generation_token_count") or 0),
            stop_reason="length" if body.get("stop_reason") == "length" else "stop",
        )

    def delete(self, entry: dict[str, Any]) -> str:
        """Delete the imported model in Bedrock; its ARN."""
        arn = str(entry["bedrock"]["imported_model_arn"])
        bedrock.delete_imported_model(self._client("control"), arn)
        return arn

    def imported(self) -> list[dict[str, Any]]:
        """Every model imported in the account and region."""
        return bedrock.imported_models(self._client("control"))
