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

Kind = Literal["seq2seq", "causal"]  # encoder-decoder, or decoder-only


@dataclass(frozen=True)
class Family:
    """One model family Bedrock imports."""

    model_type: str  # config.json's model_type
    label: str  # how people name it
    kind: Kind
    architecture: str  # the one architectures entry Bedrock imports for it
    trained: bool = True  # termtune trains it (its tests build, train and export one)
    regions: tuple[str, ...] | None = None  # None: every region CMI runs in
    untrained_why: str = ""  # what stands in the way, for a family termtune does not train
    #: (the name transformers 4.51.3 reads, the one transformers 5 writes) for each config
    #: setting 5 renamed: an export writes both, or Bedrock's 4.51.3 reads its default
    renamed: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("t5", "Flan-T5", "seq2seq", "T5ForConditionalGeneration"),
        Family("llama", "Llama 2/3.x", "causal", "LlamaForCausalLM"),
        Family("mistral", "Mistral", "causal", "MistralForCausalLM"),
        Family("mixtral", "Mixtral", "causal", "MixtralForCausalLM"),
        Family("qwen2", "Qwen2/2.5", "causal", "Qwen2ForCausalLM"),
        Family("qwen3", "Qwen3", "causal", "Qwen3ForCausalLM"),
        Family(
            "qwen3_moe", "Qwen3 MoE", "causal", "Qwen3MoeForCausalLM",
            renamed=(("num_experts", "num_local_experts"),),  # 4.51.3: 128 by default
        ),
        Family("gpt_bigcode", "GPTBigCode", "causal", "GPTBigCodeForCausalLM"),
        Family(
            "gpt_oss", "GPT-OSS", "causal", "GptOssForCausalLM", trained=False,
            regions=("us-east-1",),
            untrained_why=(
                "its released weights keep the experts in MXFP4, and transformers 4.51.3 "
                "(the version AWS documents for imports, which every export is tested "
                "against) has no GPT-OSS class, so an export could not be checked before "
                "upload"
            ),
        ),
    )
}  # fmt: skip


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
    """The family, when termtune trains it; ModelError saying why not and naming those it
    trains otherwise."""
    if not family.trained:
        trained = [f.label for f in FAMILIES.values() if f.trained]
        raise ModelError(
            f"{where} is a {family.label} model: Bedrock imports it, but termtune does not "
            f"train that family yet ({family.untrained_why}); name a model of one it "
            f"trains: {', '.join(trained)}"
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
