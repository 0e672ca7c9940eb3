"""Preflight of an exported folder against Bedrock Custom Model Import's requirements.

``preflight`` checks the folder (every rule in ``RULES``) and ``check_import`` the import's
names and S3 keys; each failure raises PreflightError naming the rule, before anything is
uploaded.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared import families
from shared.errors import PreflightError

#: model_type -> the one architecture Bedrock imports for it (Qwen3: dense or MoE causal LM)
SUPPORTED_ARCHITECTURES = {t: f.architecture for t, f in families.FAMILIES.items()}
TOKENIZER_CLASSES = frozenset(
    f"{name}{suffix}"
    for name in ("T5", "Llama", "CodeLlama", "GPT2", "GPTNeoX", "Qwen2", "PreTrained")
    for suffix in ("Tokenizer", "TokenizerFast")
)
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
ALLOWED_DTYPES = {"F32", "F16", "BF16"}
ADAPTER_TENSOR_MARKS = ("lora_A", "lora_B", "lora_embedding", "base_layer")
MAX_BYTES = 200 * 1024**3
MAX_CONTEXT = 128 * 1024
T5_HEAD_MULTIPLE = 4  # Bedrock shards a T5 model's attention heads across GPUs
#: tensors holding the vocabulary's rows: input embeddings of each family, and the LM head
EMBEDDING_TENSORS = ("embed_tokens.weight", "wte.weight", "shared.weight", "lm_head.weight")

#: every rule preflight() checks, by the name a PreflightError carries
RULES = (
    "required-files",
    "supported-architecture",
    "unquantized-weights",
    "context-length",
    "t5-attention-heads",
    "attention-heads",
    "config-portable",
    "region",
    "safetensors-weights",
    "merged-weights",
    "weight-dtype",
    "vocabulary-size",
    "tokenizer-class",
    "tokenizer-config",
    "model-size",
)


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: tensor name -> dtype, shape and offsets."""
    with path.open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def safetensors_dtypes(path: Path) -> set[str]:
    """The tensor dtypes recorded in a safetensors file's header."""
    return {v["dtype"] for v in safetensors_header(path).values()}


def preflight(
    folder: Path, *, tokenizer_files: Iterable[str] = (), region: str | None = None
) -> dict[str, Any]:
    """Check every CMI rule (``RULES``) on a model folder; a summary of what was checked.

    ``tokenizer_files`` are the tokenizer model files the base tokenizer has (``spiece.model``,
    ``tokenizer.model``); ``region`` is the import's region, when known.
    """
    _check_files(folder, tokenizer_files)
    config = _read_json(folder / "config.json")
    model_type = _check_config(config, region)
    weights, dtypes = _check_weights(folder, model_type)
    _check_vocabulary(config, weights, folder / "tokenizer.json")
    _check_tokenizer(_read_json(folder / "tokenizer_config.json"))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if size >= MAX_BYTES:
        raise PreflightError("model-size", f"{size} bytes; the limit is under 200 GB")
    return {
        "model_type": model_type,
        "dtypes": sorted(dtypes),
        "bytes": size,
        "weight_files": [p.name for p in weights],
        "region": region,
        "chat_template": _has_chat_template(folder),
        "notes": _notes(config),
        "rules": list(RULES),
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PreflightError("required-files", f"{path.name} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PreflightError("required-files", f"{path.name} is not a JSON object")
    return data


def _check_files(folder: Path, tokenizer_files: Iterable[str]) -> None:
    for name in (*REQUIRED_FILES, *tokenizer_files):
        if not (folder / name).is_file():
            raise PreflightError("required-files", f"{name} is missing from {folder}")


def _check_config(config: dict[str, Any], region: str | None) -> str:
    """Architecture, quantization, context, head and region rules; the model_type."""
    model_type = config.get("model_type")
    expected = SUPPORTED_ARCHITECTURES.get(model_type or "")
    if expected is None:
        raise PreflightError(
            "supported-architecture",
            f"model_type {model_type!r} is not one Bedrock imports "
            f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))})",
        )
    architectures = config.get("architectures") or []
    if architectures != [expected]:
        raise PreflightError(
            "supported-architecture",
            f"architectures {architectures} of model_type {model_type!r}: "
            f"Bedrock imports only {expected}",
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise PreflightError(
            "unquantized-weights",
            f"config.json has a {method} quantization_config; export the merged model "
            "unquantized (fp32, fp16 or bf16)",
        )
    context = families.context_length(config)
    if context > MAX_CONTEXT:
        raise PreflightError(
            "context-length", f"{context} tokens; Bedrock imports at most 128K ({MAX_CONTEXT})"
        )
    heads = config.get("num_heads")
    if model_type == "t5" and (not isinstance(heads, int) or heads % T5_HEAD_MULTIPLE):
        raise PreflightError(
            "t5-attention-heads",
            f"num_heads {heads} is not a multiple of {T5_HEAD_MULTIPLE}: Bedrock shards a T5 "
            "model's attention heads across GPUs (flan-t5-small's 6 heads do not import; "
            "flan-t5-base has 12, flan-t5-large 16)",
        )
    family = families.FAMILIES[str(model_type)]
    if family.kind == "causal":
        _check_heads(config)
    _check_rope(config)
    _check_names(config, family)
    if family.regions and region is not None and region not in family.regions:
        raise PreflightError(
            "region",
            f"{family.label} models import only in {', '.join(family.regions)}, not {region}",
        )
    return str(model_type)


def _check_heads(config: dict[str, Any]) -> None:
    """A decoder-only model's attention shape: key/value heads that divide the query heads
    (grouped-query attention) and a hidden size the heads split evenly, unless the config
    names its head_dim."""
    heads = _first(config, "num_attention_heads", "n_head")  # GPTBigCode: n_head, n_embd
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is None:  # GPTBigCode's multi-query attention: one key/value head
        kv_heads = 1 if config.get("multi_query") else heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads < 1 or kv_heads < 1:
        raise PreflightError(
            "attention-heads", f"num_attention_heads {heads!r} / num_key_value_heads "
            f"{kv_heads!r}: config.json needs positive head counts"
        )  # fmt: skip
    if heads % kv_heads:
        raise PreflightError(
            "attention-heads",
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: "
            "each key/value head serves a whole group of query heads",
        )
    hidden = _first(config, "hidden_size", "n_embd")
    if config.get("head_dim") is None and isinstance(hidden, int) and hidden % heads:
        raise PreflightError(
            "attention-heads",
            f"hidden_size {hidden} does not split into {heads} heads and config.json names "
            "no head_dim",
        )


def _first(config: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` config.json has (families name some differently)."""
    return next((config[n] for n in names if config.get(n) is not None), None)


def _check_rope(config: dict[str, Any]) -> None:
    """Rope settings transformers 4.51.3 reads as transformers 5 does: 4.51.3 knows only
    ``rope_theta`` and ``rope_scaling``, not 5's ``rope_parameters``."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    theta, scaling = rope.get("rope_theta"), config.get("rope_scaling") or {}
    kind = rope.get("rope_type", "default")
    if (theta is not None and config.get("rope_theta") != theta) or (
        kind != "default" and scaling.get("rope_type", scaling.get("type")) != kind
    ):
        raise PreflightError(
            "config-portable",
            f"config.json keeps rope_theta {theta} / rope_type {kind!r} only in "
            "rope_parameters, which transformers 4.51.3 (Bedrock's) does not read: write "
            "them as rope_theta and rope_scaling too (the publisher's export does)",
        )


def _check_names(config: dict[str, Any], family: families.Family) -> None:
    """Settings under the names transformers 4.51.3 reads: a null ``head_dim`` (how 5
    writes an unset one) and a setting only under 5's new name would leave 4.51.3 with
    no width or its own default (Qwen3 MoE: 128 experts)."""
    if "head_dim" in config and config["head_dim"] is None:
        raise PreflightError(
            "config-portable",
            "config.json's head_dim is null, which transformers 4.51.3 (Bedrock's) takes "
            "for the heads' width: drop it (the publisher's export does)",
        )
    for old, new in family.renamed:
        if new in config and config.get(old) != config[new]:
            raise PreflightError(
                "config-portable",
                f"config.json names {new} {config[new]!r} but not {old}, the name "
                f"transformers 4.51.3 (Bedrock's) reads for a {family.label} model: write "
                "both (the publisher's export does)",
            )


def _check_vocabulary(config: dict[str, Any], weights: list[Path], tokenizer: Path) -> None:
    """Embedding rows equal to config.json's vocab_size, and every token id the tokenizer
    can produce inside them (an id past the last row fails at the first request)."""
    size = config.get("vocab_size")
    if not isinstance(size, int) or size < 1:
        raise PreflightError("vocabulary-size", f"config.json's vocab_size is {size!r}")
    for path in weights:
        for name, tensor in safetensors_header(path).items():
            rows = (tensor.get("shape") or [None])[0]
            if name.endswith(EMBEDDING_TENSORS) and rows != size:
                raise PreflightError(
                    "vocabulary-size",
                    f"{name} has {rows} rows but config.json's vocab_size is {size}: the "
                    "embeddings were resized without the config (or the reverse)",
                )
    largest = _largest_token_id(_read_json(tokenizer))
    if largest is not None and largest >= size:
        raise PreflightError(
            "vocabulary-size",
            f"tokenizer.json produces token id {largest} but the model has {size} embedding "
            "rows: resize the embeddings to the tokenizer (resize_token_embeddings) first",
        )


def _largest_token_id(tokenizer: dict[str, Any]) -> int | None:
    """The largest id in tokenizer.json's vocabulary and added tokens (None: none found)."""
    vocab = (tokenizer.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t["id"] for t in tokenizer.get("added_tokens") or [] if isinstance(t.get("id"), int)]
    return max(ids, default=None)


def _notes(config: dict[str, Any]) -> list[str]:
    """What imports but behaves differently on Bedrock than here."""
    notes = []
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if config.get("model_type") == "llama" and rope.get("rope_type", "default") != "default":
        notes.append(
            f"rope_scaling {rope.get('rope_type') or rope.get('type')!r}: Bedrock overrides a "
            "Llama model's rope_scaling with its own"
        )
    return notes


def _check_weights(folder: Path, model_type: str) -> tuple[list[Path], set[str]]:
    """Full, merged safetensors weights at the top level in an importable dtype."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        elsewhere = [str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")]
        elsewhere += [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        raise PreflightError(
            "safetensors-weights",
            f"no *.safetensors at the top of {folder}"
            + (f" (found {sorted(elsewhere)})" if elsewhere else ""),
        )
    _check_shards(folder)
    adapters = sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_"))
    if adapters:
        raise PreflightError("merged-weights", f"LoRA adapter files {adapters}: merge them first")
    headers = [safetensors_header(p) for p in weights]
    lora = sorted(k for h in headers for k in h if any(m in k for m in ADAPTER_TENSOR_MARKS))
    if lora:
        raise PreflightError(
            "merged-weights",
            f"{len(lora)} unmerged LoRA tensors (e.g. {lora[0]}): merge_and_unload() first",
        )
    dtypes = {v["dtype"] for h in headers for v in h.values()}
    if not dtypes <= ALLOWED_DTYPES:
        raise PreflightError(
            "weight-dtype",
            f"tensors of {sorted(dtypes - ALLOWED_DTYPES)}; "
            "only fp32, fp16 or bf16 weights import (no quantized tensors)",
        )
    if model_type == "t5" and "F16" in dtypes:
        raise PreflightError("weight-dtype", "fp16 T5 weights overflow; export bf16 or fp32")
    return weights, dtypes


def _check_shards(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    shards = set(_read_json(index).get("weight_map", {}).values())
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise PreflightError(
            "safetensors-weights", f"{index.name} lists shards missing from the folder: {missing}"
        )


def _check_tokenizer(tok_config: dict[str, Any]) -> None:
    tokenizer_class = tok_config.get("tokenizer_class")
    if tokenizer_class not in TOKENIZER_CLASSES:
        raise PreflightError(
            "tokenizer-class",
            f"tokenizer_class {tokenizer_class!r} in tokenizer_config.json is not one Bedrock "
            f"accepts ({', '.join(sorted(TOKENIZER_CLASSES))})",
        )
    extra = tok_config.get("extra_special_tokens")
    if extra is not None and not isinstance(extra, dict):
        raise PreflightError(
            "tokenizer-config",
            f"extra_special_tokens is a {type(extra).__name__}; transformers 4.51.3 "
            "(Bedrock's) needs a mapping",
        )


def _has_chat_template(folder: Path) -> bool:
    """Whether a chat template ships (Bedrock applies none by default)."""
    if any((folder / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        return True
    return bool(_read_json(folder / "tokenizer_config.json").get("chat_template"))


FORBIDDEN_KEY_CHARS = set("#=+ ")


def _input_shape(operation: str) -> Any:
    import botocore.session

    model = botocore.session.get_session().get_service_model("bedrock")
    return model.operation_model(operation).input_shape


def check_import(
    job_name: str, imported_model_name: str, client_token: str, s3_uri: str, files: list[str]
) -> None:
    """Names, token and S3 URI against CreateModelImportJob's patterns and lengths (from
    botocore's service model), and the S3 keys against the characters the import refuses."""
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
    _check_s3_uri(s3_uri)


def _check_s3_uri(s3_uri: str) -> None:
    """The import's S3 URI against the S3Uri shape of botocore's service model (the
    bucket's characters, no empty path segment, its length)."""
    meta = _input_shape("CreateModelImportJob").members["modelDataSource"]
    meta = meta.members["s3DataSource"].members["s3Uri"].metadata
    low, high = meta.get("min", 0), meta.get("max", 10**9)
    if not low <= len(s3_uri) <= high:
        raise PreflightError(
            "s3-key-characters", f"S3 URI {s3_uri!r} must be {low}-{high} characters"
        )
    if "pattern" in meta and not re.fullmatch(meta["pattern"], s3_uri):
        raise PreflightError(
            "s3-key-characters",
            f"S3 URI {s3_uri!r} does not match {meta['pattern']} (the import's S3Uri pattern)",
        )
