"""The model families Bedrock Custom Model Import takes, read from a model's config.

A base model's ``model_type`` (config.json) names its family; the family decides what
Bedrock imports (the one architecture class it accepts), which kind of model it is
(encoder-decoder or decoder-only), the shapes Bedrock serves its imports in and the
transformers release an export must load in. termtune trains, evaluates and exports every
family in the table; its tests build a tiny model of each. The table is the one source for
the submission check, the loaders, the publisher's preflight and the served shapes.
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
    regions: tuple[str, ...] | None = None  # None: every region CMI runs in
    #: (the name transformers 4.51.3 reads, the one transformers 5 writes) for each config
    #: setting 5 renamed: an export writes both, or Bedrock's 4.51.3 reads its default
    renamed: tuple[tuple[str, str], ...] = ()
    #: Bedrock serves its own completion shape (prompt, max_gen_len -> generation) for the
    #: family's imports; GPT-OSS imports answer only OpenAI's completion and chat shapes
    bedrock_completion: bool = True
    #: the family answers in a chat format only its chat template writes (GPT-OSS's harmony
    #: channels): its jobs train in the template, and what it serves is the final channel
    chat_only: bool = False
    #: the transformers release its exports are loaded in before upload: 4.51.3, the one AWS
    #: documents for imports, where it has the family; else the first release that has it
    load_check: str = "4.51.3"
    #: transformers runs its attention through torch's SDPA (GPT-OSS's attention sinks: no)
    sdpa: bool = True
    #: transformers keeps examples packed in one row apart (by restarting position ids) in
    #: this family's attention; in GPT-OSS's eager attention with sinks they mix
    packs: bool = True
    #: parameters an ``all-linear`` adapter also adapts, where peft does not find them (its
    #: Mixtral and Qwen MoE mappings do; GPT-OSS's fused experts and routers are no Linear)
    lora_parameters: tuple[str, ...] = ()


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
            "gpt_oss", "GPT-OSS", "causal", "GptOssForCausalLM", regions=("us-east-1",),
            bedrock_completion=False, chat_only=True, load_check="4.55.0", sdpa=False,
            packs=False,
            lora_parameters=(
                "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight",
            ),
        ),
    )
}  # fmt: skip


#: the config keys that give a model's context length, across families
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(config: dict[str, Any]) -> int:
    """A model's context length in tokens, from its config as a dict (0: it gives none)."""
    return max((config.get(k) or 0 for k in CONTEXT_KEYS), default=0)


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


def check_prompting(family: Family, chat_template: str, *, where: str) -> None:
    """ModelError when a job would train ``family`` outside the chat format it answers in
    (``chat_template`` is the spec's dataset.chat_template)."""
    if family.chat_only and chat_template != "auto":
        raise ModelError(
            f"{where} is a {family.label} model, which answers only in the format its chat "
            f"template writes, and dataset.chat_template is {chat_template}: set it to auto"
        )


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
