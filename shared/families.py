"""The model families Bedrock Custom Model Import takes, read from a model's config.

A base model's ``model_type`` (config.json) names its family; the family decides what
Bedrock imports (the one architecture class it accepts), which kind of model it is
(encoder-decoder or decoder-only) and what termtune can do with it today. The table is the
one source for the submission check, the loaders and the publisher's preflight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.errors import ModelError

Kind = Literal["seq2seq", "causal"]


@dataclass(frozen=True)
class Family:
    """One model family Bedrock imports."""

    model_type: str  # config.json's model_type
    label: str  # how people name it
    kind: Kind
    architecture: str  # the one architectures entry Bedrock imports for it
    regions: tuple[str, ...] | None = None  # None: every region CMI runs in


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("t5", "Flan-T5", "seq2seq", "T5ForConditionalGeneration"),
        Family("llama", "Llama 2/3.x", "causal", "LlamaForCausalLM"),
        Family("mistral", "Mistral", "causal", "MistralForCausalLM"),
        Family("mixtral", "Mixtral", "causal", "MixtralForCausalLM"),
        Family("qwen2", "Qwen2/2.5", "causal", "Qwen2ForCausalLM"),
        Family("qwen3", "Qwen3", "causal", "Qwen3ForCausalLM"),
        Family("qwen3_moe", "Qwen3 MoE", "causal", "Qwen3MoeForCausalLM"),
        Family("gpt_bigcode", "GPTBigCode", "causal", "GPTBigCodeForCausalLM"),
        Family("gpt_oss", "GPT-OSS", "causal", "GptOssForCausalLM", regions=("us-east-1",)),
    )
}
#: the kinds termtune's pipeline trains end to end today
TRAINED_KINDS: tuple[Kind, ...] = ("seq2seq",)


def names() -> str:
    """Every family Bedrock imports, as a refusal lists them."""
    return ", ".join(f"{f.label} ({f.model_type})" for f in FAMILIES.values())


def family_of(config: Any, *, where: str) -> Family:
    """The family of a config (a transformers config or config.json's mapping); ModelError
    naming ``where`` and every family Bedrock imports when it is none of them."""
    if isinstance(config, dict):
        model_type = config.get("model_type")
    else:
        model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise ModelError(
            f"{where} is a {model_type!r} model, a family Bedrock Custom Model Import does "
            f"not take; name a model of one it does: {names()}"
        )
    return family


def check_trainable(family: Family, *, where: str) -> Family:
    """The family, when termtune's pipeline trains its kind; ModelError saying what it
    trains otherwise."""
    if family.kind not in TRAINED_KINDS:
        trained = [f.label for f in FAMILIES.values() if f.kind in TRAINED_KINDS]
        raise ModelError(
            f"{where} is a {family.label} model ({family.kind}): Bedrock imports it, but "
            f"termtune trains only {', '.join(trained)} models so far; name a "
            "T5ForConditionalGeneration model such as google/flan-t5-large"
        )
    return family


def folder_family(folder: Path, *, where: str) -> Family:
    """The family of the model saved in ``folder`` (its config.json)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: {path} is not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{where}: {path} is not a JSON object")
    return family_of(config, where=where)
