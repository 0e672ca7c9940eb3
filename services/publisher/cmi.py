"""Preflight of an exported folder against Bedrock Custom Model Import's requirements.

Each failure raises PreflightError naming the rule, before anything is uploaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from shared.errors import PreflightError

SUPPORTED_ARCHITECTURES = {
    "t5": "T5ForConditionalGeneration",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
ALLOWED_DTYPES = {"F32", "F16", "BF16"}
MAX_BYTES = 200 * 1024**3
MAX_CONTEXT = 128 * 1024


def safetensors_dtypes(path: Path) -> set[str]:
    """The tensor dtypes recorded in a safetensors file's header."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def preflight(folder: Path) -> dict[str, Any]:
    """Check every CMI rule on a model folder; a summary of what was checked."""
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise PreflightError("required-files", f"{name} is missing from {folder}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise PreflightError("safetensors-weights", f"no *.safetensors at the top of {folder}")
    adapters = [p.name for p in folder.iterdir() if p.name.startswith("adapter_")]
    if adapters:
        raise PreflightError("merged-weights", f"LoRA adapter files {adapters}: merge them first")
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    expected = SUPPORTED_ARCHITECTURES.get(model_type or "")
    if expected is None:
        raise PreflightError(
            "supported-architecture",
            f"model_type {model_type!r} is not one Bedrock imports "
            f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))})",
        )
    if expected not in config.get("architectures", []):
        raise PreflightError(
            "supported-architecture", f"architectures {config.get('architectures')} lack {expected}"
        )
    dtypes = set().union(*(safetensors_dtypes(p) for p in weights))
    if not dtypes <= ALLOWED_DTYPES:
        raise PreflightError(
            "weight-dtype",
            f"tensors of {sorted(dtypes - ALLOWED_DTYPES)}; "
            "only fp32, fp16 or bf16 weights import (no quantized tensors)",
        )
    if model_type == "t5" and "F16" in dtypes:
        raise PreflightError("weight-dtype", "fp16 T5 weights overflow; export bf16 or fp32")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if size >= MAX_BYTES:
        raise PreflightError("model-size", f"{size} bytes; the limit is under 200 GB")
    context = config.get("max_position_embeddings") or config.get("n_positions") or 0
    if context > MAX_CONTEXT:
        raise PreflightError("context-length", f"{context} tokens; the limit is under 128K")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    if isinstance(tok_config.get("extra_special_tokens"), list):
        raise PreflightError(
            "tokenizer-config",
            "extra_special_tokens is a list; transformers 4.51.3 (Bedrock's) needs a mapping",
        )
    return {
        "model_type": model_type,
        "dtypes": sorted(dtypes),
        "bytes": size,
        "weight_files": [p.name for p in weights],
        "rules": "passed",
    }


FORBIDDEN_KEY_CHARS = set("#=+ ")


def _input_shape(operation: str) -> Any:
    import botocore.session

    model = botocore.session.get_session().get_service_model("bedrock")
    return model.operation_model(operation).input_shape


def check_import(
    job_name: str, imported_model_name: str, client_token: str, s3_uri: str, files: list[str]
) -> None:
    """Names and token against CreateModelImportJob's patterns (from botocore's service
    model), and the S3 keys against the characters the import refuses."""
    import re

    members = _input_shape("CreateModelImportJob").members
    for field, value in (
        ("jobName", job_name),
        ("importedModelName", imported_model_name),
        ("clientRequestToken", client_token),
    ):
        meta = members[field].metadata
        if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
            raise PreflightError(
                "import-names", f"{field} {value!r} must be {meta['min']}-{meta['max']} chars"
            )
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            raise PreflightError(
                "import-names", f"{field} {value!r} does not match {meta['pattern']}"
            )
    if not s3_uri.startswith("s3://"):
        raise PreflightError("s3-key-characters", f"{s3_uri!r} is not an s3:// URI")
    for key in [s3_uri[5:]] + [s3_uri[5:] + name for name in files]:
        bad = sorted(FORBIDDEN_KEY_CHARS & set(key))
        if bad or not key.isascii():
            raise PreflightError(
                "s3-key-characters",
                f"S3 key {key!r} holds characters the import refuses ({bad or 'non-ASCII'}); "
                "no '#', '=', '+' or spaces",
            )
