"""Amazon Bedrock through boto3: clients, errors users meet, and invoking imported models.

Used by the publisher (import, smoke test) and the control plane (invoke, list, delete).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import tenacity
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as NetworkError

from shared.errors import BedrockError, RetryableError
from shared.settings import BedrockSettings

log = logging.getLogger(__name__)

# Regions where Custom Model Import is offered (../shared/REFERENCE.md).
IMPORT_REGIONS = ("us-east-1", "us-east-2", "us-west-2", "eu-central-1")


def check_region(region: str) -> None:
    """Refuse a region without Custom Model Import before any call."""
    if region not in IMPORT_REGIONS:
        raise BedrockError(
            f"TERMTUNE_BEDROCK_REGION: Custom Model Import is not offered in {region!r}; "
            f"use one of {', '.join(IMPORT_REGIONS)}"
        )


def aws_client(settings: BedrockSettings, service: str, **kwargs: Any) -> Any:
    """A boto3 client with the Bedrock profile (if set) in the Bedrock region."""
    import boto3

    session = boto3.Session(profile_name=settings.aws_profile, region_name=settings.region)
    return session.client(service, **kwargs)


def control_client(settings: BedrockSettings) -> Any:
    """The ``bedrock`` client (imports, imported models)."""
    return aws_client(
        settings,
        "bedrock",
        endpoint_url=settings.endpoint_url,
        config=Config(retries={"max_attempts": 4, "mode": "standard"}),
    )


def runtime_client(settings: BedrockSettings) -> Any:
    """The ``bedrock-runtime`` client, with the long read timeout cold models need."""
    return aws_client(
        settings,
        "bedrock-runtime",
        endpoint_url=settings.runtime_endpoint_url,
        config=Config(
            read_timeout=settings.read_timeout_seconds,
            retries={"max_attempts": 2, "mode": "standard"},
        ),
    )


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ('' for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def explain(exc: ClientError | BotoCoreError, operation: str) -> Exception:
    """A termtune error for what Bedrock answered, naming what the user must fix."""
    if isinstance(exc, NoCredentialsError):
        return BedrockError(
            f"{operation}: no AWS credentials (a task role, AWS_* variables, or a profile "
            "named by TERMTUNE_BEDROCK_AWS_PROFILE)"
        )
    if isinstance(exc, (NetworkError, HTTPClientError)):  # a later attempt may get through
        if isinstance(exc, EndpointConnectionError):
            return RetryableError(
                f"{operation}: cannot reach Bedrock ({exc}); check TERMTUNE_BEDROCK_REGION "
                f"(imports run in {', '.join(IMPORT_REGIONS)}) and the network"
            )
        return RetryableError(
            f"{operation}: the connection to Bedrock failed ({exc}); check "
            "TERMTUNE_BEDROCK_REGION and the network"
        )
    if not isinstance(exc, ClientError):
        return BedrockError(f"{operation}: {exc}")
    code, message = error_code(exc), exc.response.get("Error", {}).get("Message", "")
    if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException"):
        needed = f"bedrock:{operation}"
        if operation == "CreateModelImportJob":
            needed += " and iam:PassRole on TERMTUNE_BEDROCK_ROLE_ARN (to bedrock.amazonaws.com)"
        return BedrockError(f"access denied to {operation}: the caller needs {needed} ({message})")
    if code in ("ThrottlingException", "InternalServerException", "ServiceUnavailableException"):
        return RetryableError(f"{operation}: {code}: {message}")
    return BedrockError(f"{operation}: {code}: {message}")


def generation_of(body: dict[str, Any]) -> str:
    """The generated text, whichever response shape the imported model answers in."""
    if isinstance(body.get("generation"), str):
        return body["generation"]
    for key in ("choices", "outputs"):
        items = body.get(key)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            text = items[0].get("text")
            if isinstance(text, str):
                return text
            message = items[0].get("message")  # chat completions
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                return message["content"]
    raise BedrockError(f"unrecognised invoke response shape (keys {sorted(body)})")


def request_body(prompt: str, decoding: dict[str, Any], **given: Any) -> dict[str, Any]:
    """Bedrock's invoke body for imported models: what ``given`` sets (not None), else the
    spec's decoding (a ``DecodingSpec`` dump) — the decoding the evaluator scored."""
    defaults = {
        "max_gen_len": decoding.get("max_new_tokens"),
        "temperature": decoding.get("temperature"),
        "top_p": decoding.get("top_p"),
    }
    chosen = {k: given.get(k) if given.get(k) is not None else v for k, v in defaults.items()}
    return {"prompt": prompt, **{k: v for k, v in chosen.items() if v is not None}}


def chat_request_body(prompt: str, decoding: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat completions body Bedrock takes for an imported model with a chat
    template: the prompt as the user's message, the spec's decoding under OpenAI's names."""
    body = request_body(prompt, decoding)
    body.pop("prompt")
    limit = body.pop("max_gen_len", None)
    return {
        "messages": [{"role": "user", "content": prompt}],
        **({"max_tokens": limit} if limit is not None else {}),
        **body,
    }


def invoke(
    runtime: Any,
    model_arn: str,
    request: dict[str, Any],
    *,
    retries: int,
    wait_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Invoke an imported model; retries ModelNotReadyException (a cold copy) in between.

    botocore's own retries give up in under a second; a cold model needs minutes.
    """

    def not_ready(exc: BaseException) -> bool:
        return error_code(exc) == "ModelNotReadyException"

    def call() -> Any:
        return runtime.invoke_model(
            modelId=model_arn,
            body=json.dumps(request),
            contentType="application/json",
            accept="application/json",
        )

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(not_ready),
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_fixed(wait_seconds),
        sleep=sleep,
        before_sleep=lambda state: log.info(
            "model %s not ready (try %d/%d)", model_arn, state.attempt_number, retries
        ),
        reraise=True,
    )
    try:
        response = retrying(call)
    except (ClientError, BotoCoreError) as exc:
        raise explain(exc, "InvokeModel") from exc
    body = json.loads(response["body"].read())
    return {**body, "generation": generation_of(body)}


def imported_models(client: Any) -> list[dict[str, Any]]:
    """Every imported model of the account and region."""
    try:
        pages = client.get_paginator("list_imported_models").paginate()
        return [m for page in pages for m in page.get("modelSummaries", [])]
    except (ClientError, BotoCoreError) as exc:
        raise explain(exc, "ListImportedModels") from exc


def delete_imported_model(client: Any, model_arn: str) -> None:
    """Delete an imported model (it stops costing storage)."""
    try:
        client.delete_imported_model(modelIdentifier=model_arn)
    except (ClientError, BotoCoreError) as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return  # already gone: deleting is idempotent
        raise explain(exc, "DeleteImportedModel") from exc
