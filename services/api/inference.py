"""Serving published models locally, in the request and response shapes Bedrock serves
imported models in (services.api.shapes)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from services.api.batching import MicroBatcher
from services.api.shapes import (
    Answer,
    AnyRequest,
    AnyResponse,
    Ask,
    answer_of,
    ask_of,
    body_of,
    respond,
)
from shared import bedrock
from shared.errors import ModelError
from shared.harmony import reply_text
from shared.jobs import JobRecords
from shared.prompting import pad_id, padded, stop_ids
from shared.settings import BedrockSettings, Settings

#: the length cap of models whose generation_config.json carries none (older exports)
DEFAULT_MAX_GEN_LEN = 256


def served(ask: Ask, config: Any) -> Ask:
    """The request with what it leaves out taken from the model's generation config (its
    generation_config.json: the spec's decoding, written at export)."""
    sampling = bool(config.do_sample)
    temperature = (config.temperature or 1.0) if sampling else 0.0
    top_p = (config.top_p or 1.0) if sampling else 1.0
    return replace(
        ask,
        max_new_tokens=ask.max_new_tokens or config.max_new_tokens or DEFAULT_MAX_GEN_LEN,
        temperature=temperature if ask.temperature is None else ask.temperature,
        top_p=top_p if ask.top_p is None else ask.top_p,
    )


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
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        entry = self.jobs.model(name)
        with self._lock:
            cached = self._loaded.get(name)
            if cached is None or cached[0] != entry["location"]:
                store = self.jobs.store
                folder: Path = store.local_dir(
                    store.key_of(entry["location"]), self.settings.cache_dir / "models"
                )
                seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
                auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
                model = auto.from_pretrained(folder, dtype=torch.float32).eval()
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

    def invoke(self, name: str, request: AnyRequest) -> AnyResponse:
        """Answer one request in its shape (batched with concurrent ones); ModelError for
        chat messages to a model without a chat template."""
        model, tokenizer = self._load(name)  # a missing model is the caller's 404
        ask = served(ask_of(request), model.generation_config)
        if ask.messages is not None:
            _check_chat(name, tokenizer, ask)
        if self.max_batch <= 1:
            return respond(request, self.answer(name, [ask])[0], name)
        with self._lock:
            batcher = self._batchers.get(name)
            if batcher is None:
                batcher = self._batchers[name] = MicroBatcher(
                    lambda asks: self.answer(name, asks),
                    key=_batch_key(model.generation_config),
                    max_batch=self.max_batch,
                    wait_s=self.wait_s,
                    name=f"batch-{name}",
                )
        return respond(request, batcher.submit(ask), name)

    @torch.no_grad()
    def answer(self, name: str, asks: list[Ask]) -> list[Answer]:
        """Answers to requests sharing temperature and top_p, in one ``generate`` call; the
        model's generation config (num_beams, no_repeat_ngram_size, ...) applies to all."""
        model, tokenizer = self._load(name)
        asks = [served(a, model.generation_config) for a in asks]
        causal = not model.config.is_encoder_decoder
        prompts = [_prompt_ids(tokenizer, a, causal=causal) for a in asks]
        inputs = padded(prompts, pad_id(tokenizer), left=causal)
        first = asks[0]
        sample = (first.temperature or 0.0) > 0
        output = model.generate(
            **inputs,
            pad_token_id=pad_id(tokenizer),
            max_new_tokens=max(a.max_new_tokens or DEFAULT_MAX_GEN_LEN for a in asks),
            do_sample=sample,
            temperature=first.temperature if sample else None,
            top_p=first.top_p if sample else None,
            max_time=self.max_seconds,  # a long answer is cut there: stop_reason "length"
        )
        start = inputs["input_ids"].shape[1] if causal else 1  # the prompt / decoder start
        stops = set(stop_ids(model.generation_config.eos_token_id, tokenizer))
        return [
            _answer(tokenizer, row[start:].tolist(), ask.max_new_tokens, len(ids), stops)
            for row, ask, ids in zip(output, asks, prompts, strict=True)
        ]


def _check_chat(name: str, tokenizer: Any, ask: Ask) -> None:
    """ModelError when the model cannot render these messages: it has no chat template, or
    its template refuses them (some allow no system message, or demand turns alternate)."""
    if not tokenizer.chat_template:
        raise ModelError(
            f"model {name!r} has no chat template, so it cannot take chat messages: ask it "
            "with a prompt (Bedrock applies none either)"
        )
    try:
        messages = list(ask.messages or ())
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template raises what its author wrote
        raise ModelError(f"model {name!r}'s chat template refused these messages: {exc}") from exc


def _prompt_ids(tokenizer: Any, ask: Ask, *, causal: bool) -> list[int]:
    """The ids the model reads: chat messages rendered by its chat template (the assistant's
    turn opened), or the prompt as it is (cut to an encoder's length)."""
    if ask.messages is not None:
        text = tokenizer.apply_chat_template(
            list(ask.messages), add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(ask.prompt, truncation=not causal)["input_ids"]


def _batch_key(config: Any) -> Any:
    """Requests answered together: same sampling settings; under beam search also the same
    length cap (a beam search cut shorter is not the start of a longer one)."""
    if (config.num_beams or 1) > 1:
        return lambda a: (a.temperature, a.top_p, a.max_new_tokens)
    return lambda a: (a.temperature, a.top_p)


def _answer(
    tokenizer: Any, tokens: list[int], max_new: int | None, prompt_tokens: int, stops: set[int]
) -> Answer:
    """One row of a batch: cut at its end of sequence, or at its own ``max_new`` when the
    batch generated longer for another row."""
    end = next((i for i, t in enumerate(tokens) if t in stops), None)
    if end is not None:
        tokens = tokens[: end + 1]
    tokens = tokens[: max_new or len(tokens)]
    finished = bool(tokens) and tokens[-1] in stops
    return Answer(
        text=reply_text(tokenizer, tokens),
        prompt_tokens=prompt_tokens,
        generated_tokens=len(tokens),
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

    def invoke(self, entry: dict[str, Any], request: AnyRequest) -> AnyResponse:
        """Ask the imported model in the request's shape (what it leaves out: the spec's
        decoding); a cold copy is retried for minutes, as Bedrock needs."""
        body = bedrock.invoke(
            self._client("runtime"),
            entry["bedrock"]["imported_model_arn"],
            body_of(request, entry.get("decoding", {})),
            retries=self.settings.not_ready_retries,
            wait_seconds=self.settings.not_ready_wait_seconds,
        )
        return respond(request, answer_of(body), str(entry["name"]))

    def delete(self, entry: dict[str, Any]) -> str:
        """Delete the imported model in Bedrock; its ARN."""
        arn = str(entry["bedrock"]["imported_model_arn"])
        bedrock.delete_imported_model(self._client("control"), arn)
        return arn

    def imported(self) -> list[dict[str, Any]]:
        """Every model imported in the account and region."""
        return bedrock.imported_models(self._client("control"))
