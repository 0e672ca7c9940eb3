"""Serving published models locally, in Bedrock's invoke request and response shape."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from shared import bedrock
from shared.jobs import JobRecords
from shared.settings import BedrockSettings, Settings


class InvokeRequest(BaseModel):
    """Bedrock's request body for imported models."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=20_000, description="The input text.")
    max_gen_len: int = Field(256, ge=1, le=4096, description="Most tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")


class InvokeResponse(BaseModel):
    """Bedrock's response body for imported models."""

    generation: str
    prompt_token_count: int
    generation_token_count: int
    stop_reason: Literal["stop", "length"]


class LocalModels:
    """Loads each published model once and answers invoke requests with it."""

    def __init__(self, jobs: JobRecords, settings: Settings) -> None:
        self.jobs, self.settings = jobs, settings
        self._loaded: dict[str, tuple[str, Any, Any]] = {}
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

    @torch.no_grad()
    def invoke(self, name: str, request: InvokeRequest) -> InvokeResponse:
        """Generate an answer to one prompt."""
        model, tokenizer = self._load(name)
        inputs = tokenizer(request.prompt, return_tensors="pt", truncation=True)
        sample = request.temperature > 0
        output = model.generate(
            **inputs,
            max_new_tokens=request.max_gen_len,
            do_sample=sample,
            temperature=request.temperature if sample else None,
            top_p=request.top_p if sample else None,
        )[0]
        generated = [t for t in output.tolist() if t != model.config.decoder_start_token_id]
        finished = bool(generated) and generated[-1] == tokenizer.eos_token_id
        return InvokeResponse(
            generation=tokenizer.decode(generated, skip_special_tokens=True).strip(),
            prompt_token_count=int(inputs["input_ids"].shape[1]),
            generation_token_count=len(generated),
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
        """Ask the imported model; a cold copy is retried for minutes, as Bedrock needs."""
        body = bedrock.invoke(
            self._client("runtime"),
            entry["bedrock"]["imported_model_arn"],
            request.model_dump(),
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
