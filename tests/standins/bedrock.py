"""A local HTTP stand-in for Amazon Bedrock's control plane and runtime (rest-json).

It speaks the wire protocol boto3 speaks for the operations termtune calls, validates every
request against botocore's service model (required members, lengths, patterns — which
botocore's client itself does not check), and behaves like the service where users get hurt:
one concurrent import per account, idempotent ``clientRequestToken``, imports that take a
while and can fail, cold models answering 429 ``ModelNotReadyException``, injected errors
(access denied, throttling, a role not yet usable). Imports read the model folder from the
S3-compatible server; invoke loads it with transformers and really generates.
"""

from __future__ import annotations

import json
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import botocore.session
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

ACCOUNT, REGION = "123456789012", "us-east-1"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def settings_for(standin: BedrockStandIn, s3_uri: str, role_arn: str) -> dict[str, str]:
    """The TERMTUNE_BEDROCK_* settings that point termtune at a stand-in (its S3 server,
    ``s3_uri`` for imports), polling and waiting at test speed."""
    values = {
        "REGION": REGION,
        "ROLE_ARN": role_arn,
        "S3_URI": s3_uri,
        "ENDPOINT_URL": standin.url,
        "RUNTIME_ENDPOINT_URL": standin.url,
        "S3_ENDPOINT_URL": standin.s3_endpoint,
        "POLL_SECONDS": "0.05",
        "POLL_MAX_SECONDS": "0.2",
        "NOT_READY_WAIT_SECONDS": "0.01",
        "ROLE_RETRY_MINUTES": "0.05",
        "QUOTA_WAIT_MINUTES": "0.5",
    }
    return {f"TERMTUNE_BEDROCK_{k}": v for k, v in values.items()}


def _model(service: str) -> Any:
    return botocore.session.get_session().get_service_model(service)


CONTROL, RUNTIME = _model("bedrock"), _model("bedrock-runtime")


class ApiError(Exception):
    def __init__(self, code: str, message: str, service: Any = CONTROL) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.status = service.shape_for(code).metadata.get("error", {}).get("httpStatusCode", 400)


def validate(shape: Any, value: Any, path: str = "") -> None:
    """Check a value against a botocore shape, as the real service would."""
    if shape.type_name == "structure":
        if not isinstance(value, dict):
            raise ApiError("ValidationException", f"{path or 'body'} must be an object")
        for name in shape.required_members:
            if name not in value:
                raise ApiError("ValidationException", f"{path}{name} is required")
        for name, item in value.items():
            if name not in shape.members:
                raise ApiError("ValidationException", f"unknown member {path}{name}")
            validate(shape.members[name], item, f"{path}{name}.")
    elif shape.type_name == "list":
        _length(shape, value, path)
        for item in value:
            validate(shape.member, item, path)
    elif shape.type_name == "string":
        if not isinstance(value, str):
            raise ApiError("ValidationException", f"{path.rstrip('.')} must be a string")
        _length(shape, value, path)
        pattern = shape.metadata.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            raise ApiError(
                "ValidationException", f"{path.rstrip('.')} {value!r} fails pattern {pattern}"
            )
        if shape.enum and value not in shape.enum:
            raise ApiError("ValidationException", f"{path.rstrip('.')} not in {shape.enum}")


def _length(shape: Any, value: Any, path: str) -> None:
    low, high = shape.metadata.get("min", 0), shape.metadata.get("max", 10**12)
    if not low <= len(value) <= high:
        raise ApiError("ValidationException", f"{path.rstrip('.')} length not in [{low},{high}]")


@dataclass
class ImportJob:
    arn: str
    request: dict[str, Any]
    created: float
    finishes: float
    failure: str | None
    model_arn: str = ""


@dataclass
class BedrockStandIn:
    """State and behaviour; ``faults[operation]`` holds errors to answer, first in first out."""

    s3_endpoint: str
    import_seconds: float = 0.3
    not_ready_invokes: int = 0
    fail_imports_with: str | None = None
    #: imported models the account may hold (Bedrock's default quota); the refusal's text
    #: is this stand-in's: termtune tells the two quotas apart by asking, not by reading it
    model_quota: int = 3
    jobs: dict[str, ImportJob] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _loaded: dict[str, Any] = field(default_factory=dict)
    url: str = ""

    def calls_to(self, operation: str) -> list[dict[str, Any]]:
        """Parameters of each call made to an operation."""
        return [params for op, params in self.calls if op == operation]

    def fail(self, operation: str, code: str, message: str, times: int = 1) -> None:
        """Answer the next ``times`` calls of an operation with an error."""
        self.faults.setdefault(operation, []).extend([(code, message)] * times)

    # -- behaviour ------------------------------------------------------------------------

    def _enter(self, operation: str, params: dict[str, Any], service: Any = CONTROL) -> None:
        self.calls.append((operation, params))
        queued = self.faults.get(operation)
        if queued:
            code, message = queued.pop(0)
            raise ApiError(code, message, service)
        shape = service.operation_model(operation).input_shape
        validate(shape, {k: v for k, v in params.items() if k in shape.members})

    def _refresh(self) -> None:
        now = time.monotonic()
        for job in self.jobs.values():
            if now >= job.finishes and job.failure is None and not job.model_arn:
                job.model_arn = (
                    f"arn:aws:bedrock:{REGION}:{ACCOUNT}:imported-model/{uuid.uuid4().hex[:12]}"
                )
                self.models[job.model_arn] = {
                    "modelArn": job.model_arn,
                    "modelName": job.request["importedModelName"],
                    "jobArn": job.arn,
                    "jobName": job.request["jobName"],
                    "modelDataSource": job.request["modelDataSource"],
                    "creationTime": time.time(),
                    "modelArchitecture": "T5",
                    "instructSupported": False,
                    "customModelUnits": {
                        "customModelUnitsPerModelCopy": 1,
                        "customModelUnitsVersion": "1.0",
                    },
                }

    def _status(self, job: ImportJob) -> str:
        if time.monotonic() < job.finishes:
            return "InProgress"
        return "Failed" if job.failure else "Completed"

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self._enter("CreateModelImportJob", body)
        self._refresh()
        token = body.get("clientRequestToken")
        if token and token in self.tokens:
            return {"jobArn": self.tokens[token]}
        if any(self._status(j) == "InProgress" for j in self.jobs.values()):
            raise ApiError(
                "ServiceQuotaExceededException",
                "You have reached the maximum number of concurrent model import jobs (1)",
            )
        if len(self.models) >= self.model_quota:
            raise ApiError(
                "ServiceQuotaExceededException",
                f"You have reached the maximum number of imported models ({self.model_quota})",
            )
        if any(j.request["jobName"] == body["jobName"] for j in self.jobs.values()):
            raise ApiError("ConflictException", f"job name {body['jobName']} already exists")
        arn = f"arn:aws:bedrock:{REGION}:{ACCOUNT}:model-import-job/{uuid.uuid4().hex[:12]}"
        failure = self.fail_imports_with or self._check_files(
            body["modelDataSource"]["s3DataSource"]["s3Uri"]
        )
        now = time.monotonic()
        self.jobs[arn] = ImportJob(arn, body, now, now + self.import_seconds, failure)
        if token:
            self.tokens[token] = arn
        return {"jobArn": arn}

    def _s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=REGION)

    def _check_files(self, s3_uri: str) -> str | None:
        from botocore.exceptions import ClientError

        parsed = urlparse(s3_uri)
        try:
            listing = self._s3().list_objects_v2(
                Bucket=parsed.netloc, Prefix=parsed.path.lstrip("/")
            )
        except ClientError as exc:
            return f"Amazon Bedrock could not read {s3_uri}: {exc}"
        names = {o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", [])}
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing or not any(n.endswith(".safetensors") for n in names):
            return f"Amazon Bedrock could not find {missing or '*.safetensors'} in {s3_uri}"
        return None

    def get_job(self, ident: str) -> dict[str, Any]:
        self._enter("GetModelImportJob", {"jobIdentifier": ident})
        self._refresh()
        job = self.jobs.get(ident) or next(
            (j for j in self.jobs.values() if j.request["jobName"] == ident), None
        )
        if job is None:
            raise ApiError("ResourceNotFoundException", f"no import job {ident}")
        out = {
            "jobArn": job.arn,
            "jobName": job.request["jobName"],
            "importedModelName": job.request["importedModelName"],
            "roleArn": job.request["roleArn"],
            "modelDataSource": job.request["modelDataSource"],
            "status": self._status(job),
            "creationTime": time.time(),
        }
        if out["status"] == "Failed":
            out["failureMessage"] = job.failure
        if out["status"] == "Completed":
            out["importedModelArn"] = job.model_arn
        return out

    def list_jobs(self, query: dict[str, str]) -> dict[str, Any]:
        """ListModelImportJobs: by status and name fragment, newest first (one page)."""
        params = {k: int(v) if k == "maxResults" else v for k, v in query.items()}
        self._enter("ListModelImportJobs", params)
        self._refresh()
        jobs = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
        summaries = [
            {
                "jobArn": j.arn,
                "jobName": j.request["jobName"],
                "status": self._status(j),
                "creationTime": time.time(),
            }
            for j in jobs
            if query.get("nameContains", "") in j.request["jobName"]
            and query.get("statusEquals", self._status(j)) == self._status(j)
        ]
        return {"modelImportJobSummaries": summaries[: params.get("maxResults", 1000)]}

    def _find_model(self, ident: str) -> dict[str, Any]:
        self._refresh()
        for model in self.models.values():
            if ident in (model["modelArn"], model["modelName"]):
                return model
        raise ApiError("ResourceNotFoundException", f"no imported model {ident}")

    def invoke(self, model_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._enter("InvokeModel", {"modelId": model_id}, RUNTIME)
        try:
            model = self._find_model(model_id)
        except ApiError as exc:
            raise ApiError(exc.code, exc.message, RUNTIME) from exc
        if self.not_ready_invokes > 0:
            self.not_ready_invokes -= 1
            raise ApiError("ModelNotReadyException", "Model is not ready for inference", RUNTIME)
        return self._generate(model, body)

    def _generate(self, model: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """Answer in the body's shape, as Bedrock does for imported models: Bedrock
        completion (prompt, max_gen_len), OpenAI completion (prompt, max_tokens) or OpenAI
        chat completions (messages, rendered by the model's chat template)."""
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        arn = model["modelArn"]
        if arn not in self._loaded:
            parsed = urlparse(model["modelDataSource"]["s3DataSource"]["s3Uri"])
            folder = Path(tempfile.mkdtemp(prefix="standin-model-"))
            s3 = self._s3()
            listing = s3.list_objects_v2(Bucket=parsed.netloc, Prefix=parsed.path.lstrip("/"))
            for obj in listing.get("Contents", []):
                s3.download_file(parsed.netloc, obj["Key"], str(folder / Path(obj["Key"]).name))
            seq2seq = AutoConfig.from_pretrained(folder).is_encoder_decoder
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            self._loaded[arn] = (
                AutoTokenizer.from_pretrained(folder),
                auto.from_pretrained(folder),
            )
        tokenizer, lm = self._loaded[arn]
        harmony = lm.config.model_type == "gpt_oss"
        if harmony and "max_gen_len" in body:  # AWS: GPT-OSS imports take OpenAI's shapes
            raise ApiError(
                "ValidationException", "GPT-OSS models take OpenAI-compatible requests", RUNTIME
            )
        if "messages" in body:
            if not tokenizer.chat_template:
                raise ApiError("ValidationException", "the model has no chat template", RUNTIME)
            text = tokenizer.apply_chat_template(
                body["messages"], add_generation_prompt=True, tokenize=False
            )
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        else:
            inputs = tokenizer(body["prompt"], return_tensors="pt")
        limit = int(body.get("max_gen_len", body.get("max_tokens", 64)))
        with torch.no_grad():
            output = lm.generate(**inputs, max_new_tokens=limit, do_sample=False)[0]
        start = 1 if lm.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        if harmony:  # what an OpenAI-compatible server returns: the final channel's text
            raw = tokenizer.decode(output[start:], skip_special_tokens=False)
            final = raw.split("<|channel|>final<|message|>")[1:]
            answer = re.split(r"<\|(?:return|end|call)\|>", final[-1])[0].strip() if final else ""
        else:
            answer = tokenizer.decode(output[start:], skip_special_tokens=True).strip()
        counts = {"prompt": int(inputs["input_ids"].shape[1]), "answer": len(output) - start}
        if "max_gen_len" in body or ("prompt" in body and "max_tokens" not in body):
            return {
                "generation": answer,
                "prompt_token_count": counts["prompt"],
                "generation_token_count": counts["answer"],
                "stop_reason": "stop",
            }
        usage = {
            "prompt_tokens": counts["prompt"],
            "completion_tokens": counts["answer"],
            "total_tokens": counts["prompt"] + counts["answer"],
        }
        if "messages" in body:
            message = {"role": "assistant", "content": answer}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {"object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": answer, "finish_reason": "stop"}
        return {"object": "text_completion", "choices": [choice], "usage": usage}

    # -- HTTP -----------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.exception_handler(ApiError)
        async def _error(request: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse(
                {"message": exc.message}, exc.status, headers={"x-amzn-ErrorType": exc.code}
            )

        @app.post("/model-import-jobs", status_code=201)
        async def create(request: Request) -> dict[str, Any]:
            return self.create(json.loads(await request.body()))

        @app.get("/model-import-jobs")
        def list_jobs(request: Request) -> dict[str, Any]:
            return self.list_jobs(dict(request.query_params))

        @app.get("/model-import-jobs/{ident:path}")
        def get_job(ident: str) -> dict[str, Any]:
            return self.get_job(unquote(ident))

        @app.get("/imported-models")
        def list_models() -> dict[str, Any]:
            self._enter("ListImportedModels", {})
            self._refresh()
            keys = ("modelArn", "modelName", "creationTime", "modelArchitecture")
            return {"modelSummaries": [{k: m[k] for k in keys} for m in self.models.values()]}

        @app.get("/imported-models/{ident:path}")
        def get_model(ident: str) -> dict[str, Any]:
            self._enter("GetImportedModel", {"modelIdentifier": unquote(ident)})
            return self._find_model(unquote(ident))

        @app.delete("/imported-models/{ident:path}")
        def delete_model(ident: str) -> dict[str, Any]:
            self._enter("DeleteImportedModel", {"modelIdentifier": unquote(ident)})
            del self.models[self._find_model(unquote(ident))["modelArn"]]
            return {}

        @app.post("/model/{model_id:path}/invoke")
        async def invoke(model_id: str, request: Request) -> Response:
            answer = self.invoke(unquote(model_id), json.loads(await request.body()))
            return Response(json.dumps(answer), media_type="application/json")

        return app

    def start(self) -> uvicorn.Server:
        """Serve on a free loopback port in a thread; sets ``url``."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = uvicorn.Server(
            uvicorn.Config(self.app(), host="127.0.0.1", port=port, log_level="warning")
        )
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        return server
