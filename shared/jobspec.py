"""The job specification users write (YAML), its defaults and its validation.

Defaults are the original notebook's task: flan-t5-large, ``"What is {page_title}"`` →
``page_text``, a 70/30 split, LoRA r=64 / alpha=16 on all linear layers, one epoch. Its
training recipe (batch 1 x accumulation 2, nf4 on CUDA, LoRA dropout 0.1, learning rate
2e-4) is ``training.recipe: notebook``; the default recipe sizes batches to the device.
"""

from __future__ import annotations

import re
import string
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.errors import SpecError
from shared.unique_keys import RepeatedKeyError, load_yaml

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"
#: what numpy and torch accept as a seed
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
#: a templated prompt or target is a line or a paragraph, not a document
MAX_TEMPLATE_CHARS = 2000
#: a module name or suffix in the model (peft matches it), or a regex peft takes as is
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*|()\[\]+?^$-]{1,200}$")]
#: transformers optimizers that need no package beyond torch and bitsandbytes
Optimizer = Literal[
    "adamw_torch", "adamw_torch_fused", "adafactor", "adagrad", "sgd", "rmsprop",
    "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
]  # fmt: skip
#: transformers schedulers that need no arguments beyond warmup
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
    "constant_with_warmup", "inverse_sqrt",
]  # fmt: skip


class _Section(BaseModel):
    # a number must be finite: JSON's 1e999 is infinity, which would be stored as null
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def template_fields(template: str) -> list[str]:
    """Names of the ``{field}`` placeholders in a template, in order; SpecError for a
    placeholder that is not a plain column name (``{}``, ``{0}``, ``{term!x}``,
    ``{term.upper}``, ``{term:{w}}``), which would fail only once rows are formatted."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SpecError(f"template {template!r} is not a valid format string: {exc}") from exc
    names = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        whole = (
            "{"
            + name
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
        if not name or name.isdigit() or any(c in name for c in ".["):
            raise SpecError(
                f"template {template!r}: placeholder {whole} must name a column, as {{term}} "
                "does (no position, attribute or index)"
            )
        if conversion or "{" in (spec or ""):
            raise SpecError(
                f"template {template!r}: placeholder {whole} takes no conversion (!) or "
                "nested field; write {" + name + "}"
            )
        names.append(name)
    return names


TokenLength = Annotated[int, Field(ge=8, le=8192)]


class DatasetSpec(_Section):
    """Where the examples come from and how they become (prompt, target) pairs."""

    source: str = Field(
        "gamino/wiki_medical_terms",
        description="A Hugging Face hub dataset id, or a local file (.jsonl/.json/.csv/"
        ".tsv/.parquet) as a path or file:// URI, or an s3:// URI in the object store.",
    )
    subset: str | None = Field(None, description="Configuration (subset) of a hub dataset.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    revision: str | None = Field(None, description="Hub dataset revision (branch, tag, commit).")
    prompt_template: str = Field(
        "What is {page_title}",
        max_length=MAX_TEMPLATE_CHARS,
        description="Template of the model input; {column} placeholders.",
    )
    target_template: str = Field(
        "{page_text}",
        max_length=MAX_TEMPLATE_CHARS,
        description="Template of the expected output; {column} placeholders.",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description='Decoder-only models: "auto" wraps each prompt in the tokenizer\'s chat '
        "template as a user message (when it has one; the model is then served through chat "
        'completions), "none" feeds the prompt as it is (completion). Encoder-decoder '
        "models take the prompt as it is either way.",
    )
    test_size: float = Field(
        0.3, gt=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    validation_size: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of prompts for validation loss during training."
    )
    seed: Seed = Field(42, description="Seed of the train/test split and of the max_rows sample.")
    max_source_length: Literal["auto"] | TokenLength = Field(
        "auto",
        description='Input tokens kept. "auto": the p99 of the prompts\' token lengths, at '
        "most max_source_length_cap; the manifest records the number chosen and why.",
    )
    max_target_length: Literal["auto"] | TokenLength = Field(
        "auto",
        description='Target tokens kept. "auto": the p99 of the targets\' token lengths, at '
        "most max_target_length_cap; the manifest records the number chosen and why.",
    )
    max_source_length_cap: TokenLength = Field(
        128, description='The most input tokens "auto" may choose.'
    )
    max_target_length_cap: TokenLength = Field(
        512, description='The most target tokens "auto" may choose.'
    )
    max_rows: int | None = Field(
        None, ge=2, description="Use only N rows of the source (quick runs); see sample."
    )
    sample: Literal["random", "head"] = Field(
        "random",
        description='How max_rows picks its rows: "random": a uniform sample seeded by seed '
        '(the whole source is read once; memory holds the N sampled rows), "head": the '
        "first N rows (reading stops there).",
    )
    cast_to_string: bool | list[str] = Field(
        False,
        description="Template columns must hold text: a number, boolean or any other type "
        "fails the job naming the file, column and type. true (every template column) or a "
        'list of columns (e.g. ["code"]) writes numbers and booleans as text instead (CSV '
        "cells exactly as written); lists and objects are always refused.",
    )
    skip_bad_rows: bool = Field(
        False,
        description="Skip malformed JSONL/JSON rows and rows whose template values have "
        "the wrong type (counted) instead of failing the job.",
    )
    tsv_quoting: Literal["auto", "csv", "none"] = Field(
        "auto",
        description='How .tsv cells are read: "csv": quoted cells as CSV quotes them, which '
        'may span lines (pandas\' to_csv with sep="\\t"); "none": plain TSV, a quote is text; '
        '"auto": csv quoting, refused when a quoted cell spans lines or holds a tab, which in '
        "a plain TSV means a stray quote merged rows.",
    )
    min_prompt_chars: int = Field(1, ge=1, description="Drop rows whose prompt is shorter.")
    min_target_chars: int = Field(1, ge=1, description="Drop rows whose target is shorter.")
    strip_wiki_artifacts: bool = Field(
        False,
        description='Remove citation markers like "[12]" and trailing "See also", '
        '"References", "External links" sections.',
    )

    @model_validator(mode="after")
    def _splits_fit(self) -> DatasetSpec:
        if self.test_size + self.validation_size >= 1.0:
            raise ValueError("test_size + validation_size must leave rows to train on")
        return self

    @field_validator("max_source_length", "max_target_length", mode="before")
    @classmethod
    def _auto_or_tokens(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and 8 <= value <= 8192):
            return value
        raise ValueError(f'must be "auto" or a number of tokens from 8 to 8192, not {value!r}')

    @field_validator("cast_to_string")
    @classmethod
    def _casts_name_template_columns(cls, value: Any, info: ValidationInfo) -> Any:
        templates = [info.data.get("prompt_template", ""), info.data.get("target_template", "")]
        used = list(dict.fromkeys(f for t in templates for f in template_fields(t)))
        for name in value if isinstance(value, list) else []:
            if name not in used:
                raise ValueError(f"{name!r} is not a column the templates use ({', '.join(used)})")
        return value

    @property
    def template_columns(self) -> list[str]:
        """The columns the prompt and target templates name, in order, once each."""
        fields = template_fields(self.prompt_template) + template_fields(self.target_template)
        return list(dict.fromkeys(fields))

    def casts(self, column: str) -> bool:
        """Whether the spec asks for this column's numbers and booleans as text."""
        if isinstance(self.cast_to_string, bool):
            return self.cast_to_string
        return column in self.cast_to_string

    @field_validator("prompt_template", "target_template")
    @classmethod
    def _has_fields(cls, value: str) -> str:
        if not template_fields(value):
            raise ValueError("must name at least one {column}")
        return value


class LoraSpec(_Section):
    """The LoRA adapter (peft ``LoraConfig``)."""

    r: int = Field(64, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: int = Field(16, ge=1, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the LoRA input (0: no dropout kernels; the notebook's 0.1).",
    )
    target_modules: (
        Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=64)]
    ) = Field("all-linear", description='"all-linear" or a list of module names (e.g. ["q", "v"]).')
    loraplus_lr_ratio: float = Field(
        1.0,
        ge=1.0,
        le=1024.0,
        description="LoRA+ (peft's create_loraplus_optimizer): the B matrices learn at this "
        "multiple of the learning rate, the A matrices at it; 1 is plain LoRA. Retune the "
        'learning rate with it (lower; README, "LoRA+").',
    )


#: recipe "notebook": the original notebook's settings where the spec leaves them out
NOTEBOOK_RECIPE: dict[str, Any] = {
    "batch_size": 1,
    "gradient_accumulation_steps": 2,
    "learning_rate": 2e-4,
    "optimizer": "adamw_torch",
    "attention": "eager",
    "compile": "off",
    "fused_layers": False,
    "fused_lora": False,
}
NOTEBOOK_LORA: dict[str, Any] = {"dropout": 0.1}


class TrainingSpec(_Section):
    """How the adapter is trained (transformers ``Seq2SeqTrainer``)."""

    recipe: Literal["termtune", "notebook"] = Field(
        "termtune",
        description='"termtune": batches sized to the device, bf16 LoRA where it fits, fused '
        'optimizer, SDPA, torch.compile on CUDA. "notebook": the original notebook\'s '
        "settings (batch 1 x accumulation 2, learning rate 2e-4, LoRA dropout 0.1, nf4 on "
        "CUDA, eager attention) wherever the spec does not set them, for comparison.",
    )
    quantization: Literal["auto", "none", "4bit", "8bit"] = Field(
        "auto",
        description='"auto": bf16 LoRA when the weights and the planned batch fit in the '
        "GPU's memory, else nf4 4-bit (QLoRA); none on CPU. Recipe notebook: 4bit on CUDA. "
        "A model stored in MXFP4 (GPT-OSS) trains as plain weights: none (4bit/8bit refused).",
    )
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto",
        description='"auto": bf16 on GPUs that support it, else fp32. fp16 trains in mixed '
        "precision (fp32 weights, fp16 autocast, loss scaling); it is refused for T5 (its "
        "activations overflow).",
    )
    optimizer: Literal["auto"] | Optimizer = Field(
        "auto",
        description='"auto": torch\'s fused AdamW (one kernel for every parameter). Else a '
        "transformers optimizer name: torch's or bitsandbytes' (those need no other "
        'package; e.g. "paged_adamw_8bit").',
    )
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field(
        "linear", description="transformers scheduler name (those that need no extra arguments)."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps to warm up.")
    epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Passes over the train split.")
    max_steps: int = Field(
        -1, ge=-1, le=10_000_000, description="Optimizer steps; -1 (or 0) means use epochs."
    )
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=4096)] = Field(
        "auto",
        description='Examples per device per step. "auto": the effective batch\'s share per '
        "device, as far as the longest rows fit in memory (a memory model of the model, "
        "checked on CUDA by a probe step that backs off on out-of-memory).",
    )
    gradient_accumulation_steps: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        "auto",
        description='Steps per update. "auto": as many as make up effective_batch_size.',
    )
    effective_batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=65536)] = Field(
        "auto",
        description="Examples per optimizer update over every process, kept by the "
        'accumulation when batch_size is auto. "auto": 32, or fewer where the run (train '
        "rows x epochs) would then make fewer than 250 updates: as many as make 250 (at "
        "equal epochs a few hundred rows learn less the fewer the updates).",
    )
    group_by_length: bool = Field(
        True,
        description="Batch examples of similar length (padded batches: packed ones are "
        "drawn at random, as mixed lengths pack with less padding).",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description='Attention kernels: "auto" is torch\'s SDPA, eager where transformers '
        "has no SDPA for the family (GPT-OSS).",
    )
    fused_layers: bool = Field(
        True,
        description="Train with torch's fused gelu(tanh) and rms_norm in place of T5's "
        "written-out gelu_new and RMS norm (the same arithmetic, fewer kernels).",
    )
    fused_lora: bool = Field(
        True,
        description="Compute each adapted linear layer (its frozen base and its LoRA update) "
        "as one autograd node (three matrix products forward, five backward, in the compute "
        "dtype) in place of peft's chain of modules, which also copies the input to the "
        "adapter's fp32 and back on bf16 models. Plain LoRA over a plain nn.Linear only: "
        "dropout, DoRA, LoRA bias, several active adapters, hooked base layers or "
        "bitsandbytes' quantized layers take peft's own forward.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description='torch.compile the model: "auto" on CUDA without bitsandbytes weights '
        "(falls back with a logged reason when compiling fails).",
    )
    packing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Decoder-only models: each batch's examples packed, longest first, into "
        "rows of the width that costs least by the model's shape (the weights' work a "
        "position, attention's a row's width squared), padding only at the rows' ends, "
        "attention kept within each example (by position ids) and costing no more than the "
        'padded batch\'s. "auto": on where the installed transformers keeps packed examples '
        "apart (5.x), off for GPT-OSS (its attention would mix them). Encoder-decoder "
        "models pad their batches either way.",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    logging_steps: int = Field(10, ge=1, description="Optimizer steps between loss records.")
    validation_every_steps: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="Optimizer steps between validation-loss passes (when the dataset has a "
        'validation split). "auto": about 10 passes a run, whatever its length.',
    )
    checkpoint_every_steps: int = Field(
        200, ge=1, description="Store a resumable checkpoint every N optimizer steps."
    )
    checkpoint_every_minutes: float = Field(
        10.0, gt=0.0, description="...and at least every M minutes."
    )
    seed: Seed = Field(42, description="Seed of initialisation and data order.")
    data_parallel: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto",
        description='Training processes, one per GPU. "auto": every visible GPU (1 on CPU). '
        "A number above 1 on CPU runs gloo processes (for testing the multi-GPU path).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        """Recipe notebook: the notebook's settings wherever the spec leaves them out."""
        if not isinstance(data, dict) or data.get("recipe") != "notebook":
            return data
        lora = data.get("lora")
        lora = {**NOTEBOOK_LORA, **lora} if isinstance(lora, dict) else lora or NOTEBOOK_LORA
        return {**NOTEBOOK_RECIPE, **data, "lora": lora}


#: metrics the gate may rank models by (all higher-is-better), with their display names
GATE_METRICS = {
    "rougeL": "ROUGE-L",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "bleu": "BLEU",
    "chrf": "chrF",
    "exact_match": "exact match",
}


class GateSpec(_Section):
    """What the tuned model must show before it is published: that it learned.

    Every rule is reported pass or fail with its numbers; ``None`` turns a rule off.
    """

    primary_metric: Literal["rougeL", "rouge1", "rouge2", "bleu", "chrf", "exact_match"] = Field(
        "rougeL", description="The metric on which the tuned model must beat the base model."
    )
    min_gain: float | None = Field(
        0.0,
        ge=-100.0,
        le=100.0,
        description="The lower bound of the 95% paired-bootstrap interval of tuned − base on "
        "primary_metric must be above this (0: a gain clear of zero). None: off. "
        "Older specs' min_rouge_l_gain is read as this.",
    )
    min_test_prompts: int | None = Field(
        20,
        ge=2,
        description="The fewest distinct test prompts (each with all its answers) the "
        "min_gain rule judges on: with fewer, the interval means nothing and the rule fails, "
        "naming the count. None: no minimum.",
    )
    max_empty_share: float | None = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Tuned share of empty answers: at most this, and not above base's. None: off.",
    )
    max_degenerate_share: float | None = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Tuned share of degenerate answers (repetitive, or giving the question "
        "or its term back): at most this, and not above base's. None: off.",
    )
    require_lower_loss: bool = Field(True, description="Tuned test loss must be below base.")
    force_publish: bool = Field(
        False, description="Publish even if the gate fails (recorded in the report and registry)."
    )

    @model_validator(mode="before")
    @classmethod
    def _older_gain_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "min_rouge_l_gain" in data:
            if "min_gain" in data:
                raise ValueError("give min_gain only (min_rouge_l_gain is its older name)")
            data = {**data, "min_gain": data["min_rouge_l_gain"]}
            del data["min_rouge_l_gain"]
        return data


class EvaluationSpec(_Section):
    """How the base and tuned models are compared on the held-out split."""

    max_rows: int | None = Field(
        200,
        ge=1,
        description="Cap on test rows for quick runs (None: all): a uniform sample of the "
        "test split's prompts, each with all its answers, seeded by seed; reported.",
    )
    seed: Seed = Field(
        0,
        description="Seed of the max_rows sample, of sampling (decoding.temperature > 0) and "
        "of the bootstrap.",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, le=100_000, description="Resamples for the 95% confidence intervals."
    )
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = Field(
        "auto",
        description='Rows per forward pass, taken longest first. "auto": 16 on CPU; on a GPU '
        "the most the memory model fits beside the weights (keys and values of every decoder "
        "layer for the source and the answer), halved again on out-of-memory.",
    )
    gate: GateSpec = Field(default_factory=GateSpec, description="The quality gate.")


#: what Bedrock's invoke takes in its request body (besides the prompt)
BEDROCK_DECODING = ("max_new_tokens", "temperature", "top_p")
#: decoding fields older specs wrote under ``evaluation``
_OLDER_DECODING = ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "temperature", "top_p")


class DecodingSpec(_Section):
    """How the model writes answers: the evaluator generates with these settings, the export
    writes them to generation_config.json, and invoke (local, Bedrock smoke test) uses them."""

    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Most tokens an answer gets (Bedrock's max_gen_len)."
    )
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0: greedy (or beam) decoding; above 0: sampling."
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when temperature > 0)."
    )
    num_beams: int = Field(
        1, ge=1, le=16, description="Beam search width (1: greedy). Target local only."
    )
    no_repeat_ngram_size: StrictInt = Field(
        0,
        ge=0,
        le=32,
        description="Block repeated n-grams of this size (0: off; an integer: the notebook's "
        "True means 1, which forbids any repeated token). Target local only.",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="Penalty on repeated tokens (1: off). Target local only."
    )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of transformers' ``generate`` for exactly this decoding."""
        sample = self.temperature > 0
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sample,
            "temperature": self.temperature if sample else None,
            "top_p": self.top_p if sample else None,
            "num_beams": self.num_beams,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "repetition_penalty": self.repetition_penalty,
        }

    def generation_config(self) -> dict[str, Any]:
        """The fields of the export's generation_config.json."""
        return {k: v for k, v in self.generate_kwargs().items() if v is not None}

    def not_applied_by_bedrock(self) -> list[str]:
        """Fields set away from their default that Bedrock's invoke does not apply."""
        return [
            name
            for name, field in DecodingSpec.model_fields.items()
            if name not in BEDROCK_DECODING and getattr(self, name) != field.default
        ]


DEFAULT_NOTICE = (
    "It can be wrong, incomplete or out of date, and it states errors as confidently as "
    "facts: check what it says against an authoritative source before acting on it. Not "
    "professional advice."
)


class CardSpec(_Section):
    """The model card (README.md beside the weights, Hugging Face's convention)."""

    notice: str = Field(
        DEFAULT_NOTICE,
        min_length=1,
        max_length=2000,
        description="The warning the card (and the evaluation page) gives its readers; name "
        "the field's own risk (the medical example: not medical advice).",
    )
    license: str | None = Field(
        None,
        max_length=100,
        pattern=r"^[a-z0-9][a-z0-9.+-]*$",
        description="The card's `license:` (a Hugging Face license id, e.g. apache-2.0 for "
        "Flan-T5); left out by default: the base model's and the data's licenses govern.",
    )
    language: list[Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$")]] = Field(
        ["en"], max_length=20, description="Languages of the prompts and answers (ISO 639)."
    )
    tags: list[Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,49}$")]] = Field(
        [], max_length=20, description="Tags added to termtune's own (termtune, lora-merged, t5)."
    )

    @field_validator("notice")
    @classmethod
    def _notice(cls, value: str) -> str:
        if any(unicodedata.category(c) == "Cc" and c not in "\n" for c in value):
            raise ValueError("control characters other than newlines are not allowed")
        return value.strip()


class PublishSpec(_Section):
    """Where and how the merged model is shipped."""

    target: Literal["local", "bedrock"] = Field(
        "local",
        description='"local": exported, checked against Bedrock CMI\'s rules and served by the '
        'control plane in Bedrock\'s invoke shape. "bedrock": also uploaded to '
        "TERMTUNE_BEDROCK_S3_URI and imported with Custom Model Import.",
    )
    model_name: str | None = Field(None, description="Published model name (default: job name).")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="Weight dtype of the merged export (never fp16 for T5)."
    )
    card: CardSpec = Field(default_factory=CardSpec, description="The model card.")
    overwrite: bool = Field(
        False,
        description="Replace a model already published under this name. Without it, a taken "
        "name is refused at submission and again before publishing, and so, at submission, "
        "is a name another job not ended yet is to publish under. The replaced model's "
        "files stay with its job, and its Bedrock import (if any) stays until deleted there. "
        "A name another job is publishing under when this one reaches its publish is "
        "refused either way (retry it once that job has ended).",
    )

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(f"must match {NAME_PATTERN}")
        return value


class TrackingSpec(_Section):
    """Experiment tracking: one run a job, from training to the registered model."""

    backend: Literal["none", "mlflow", "tensorboard", "wandb"] | None = Field(
        None,
        description='"mlflow": the job\'s parameters, training curves, evaluation (metrics '
        "with intervals, samples, the HTML page) and a registered model version per export "
        "go to the deployment's MLflow server (TERMTUNE_MLFLOW_TRACKING_URI). "
        '"tensorboard": the parameters, curves and evaluation scalars as TensorBoard event '
        'files in the store (jobs/<id>/tracking/tensorboard/). "wandb": the same as '
        "MLflow in a Weights & Biases run (the job id), written by W&B's client: its files in "
        "the store (jobs/<id>/tracking/wandb/, for wandb beta sync) and, with "
        "TERMTUNE_WANDB_MODE=online, on the W&B server; the export a model artifact. "
        '"none": '
        "termtune's own record only. Unset: the deployment's TERMTUNE_TRACKING, fixed when "
        "the job is submitted.",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._/-]*$",
        description="MLflow experiment of the run (default: termtune/<job name>); W&B: the "
        "run's group (default: the job name).",
    )
    register_model: bool = Field(
        True,
        description="Register the exported model in MLflow's model registry (a version under "
        "the published model name, tagged with the job id, digest and Bedrock ARN); W&B: a "
        "model artifact of that name with the same metadata (online: linked into the "
        "registry). TensorBoard has no registry: nothing is registered there.",
    )


class JobSpec(_Section):
    """A termtune job: teach a base model a domain's terms, check it, publish it."""

    name: str = Field(..., description="Job name: lowercase letters, digits and dashes.")
    base_model: str = Field(
        "google/flan-t5-large", description="Hub id or local folder of a seq2seq (T5) model."
    )
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="The examples.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The training.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="The check.")
    publish: PublishSpec = Field(default_factory=PublishSpec, description="The shipping.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Experiment tracking (MLflow)."
    )
    decoding: DecodingSpec = Field(
        default_factory=DecodingSpec,
        description="One decoding: evaluated, exported and served (after publish: checked "
        "against publish.target).",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_decoding(cls, data: Any) -> Any:
        """Read the decoding fields older specs wrote under ``evaluation``."""
        evaluation = data.get("evaluation") if isinstance(data, dict) else None
        older = {"sampling", *_OLDER_DECODING} & set(evaluation or {})
        if not isinstance(evaluation, dict) or not older:
            return data
        decoding = data.get("decoding") or {}
        if not isinstance(decoding, dict):
            return data
        moved = {k: evaluation[k] for k in _OLDER_DECODING if k in evaluation}
        if evaluation.get("sampling") is True:
            moved.setdefault("temperature", 1.0)  # the older default when sampling
        else:  # greedy or beam search: the older temperature and top_p were ignored
            moved.pop("temperature", None)
            moved.pop("top_p", None)
        for name, value in moved.items():
            if name in decoding and decoding[name] != value:
                raise ValueError(
                    f"evaluation.{name} (the older place of decoding.{name}) is {value!r} "
                    f"but decoding.{name} is {decoding[name]!r}; give decoding.{name} only"
                )
        rest = {k: v for k, v in evaluation.items() if k not in older}
        return {**data, "evaluation": rest, "decoding": {**moved, **decoding}}

    @field_validator("decoding")
    @classmethod
    def _decoding_fits_target(cls, value: DecodingSpec, info: ValidationInfo) -> DecodingSpec:
        publish = info.data.get("publish")
        if publish is not None and publish.target == "bedrock":
            for name in value.not_applied_by_bedrock():
                raise ValueError(
                    f"decoding.{name} = {getattr(value, name)!r} is not applied by Bedrock's "
                    "invoke (it takes max_gen_len, temperature and top_p), so the evaluation "
                    "would score a decoding the imported model is never served with; remove "
                    "it, or publish with target local"
                )
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):  # "$" alone lets a final newline through
            raise ValueError(f"must match {NAME_PATTERN} (e.g. 'medical-terms')")
        return value

    @property
    def model_name(self) -> str:
        """The name the published model gets."""
        return self.publish.model_name or self.name


def describe_validation_error(exc: ValidationError, *, source: str = "job spec") -> str:
    """One line per problem, each naming the dotted field path."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(root)"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: field '{field}': {message}")
    return "; ".join(lines)


def parse_spec(data: Any, *, source: str = "job spec") -> JobSpec:
    """Validate a mapping as a JobSpec, raising SpecError that names each bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(exc, source=source)) from exc


def load_spec(path: str | Path) -> JobSpec:
    """Load and validate a YAML job spec file."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"job spec file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise SpecError(f"{path} is a folder: name the job spec file (.yaml) in it") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {exc.start}): save the job spec as UTF-8"
        ) from exc
    except RepeatedKeyError as exc:
        raise SpecError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(data, source=str(path))


def reference_table(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """Markdown rows (field, default, meaning) of every spec field, for the README."""
    rows = ["| field | default | meaning |", "|---|---|---|"] if not prefix else []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += reference_table(annotation, f"{prefix}{name}.")
            continue
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        rows.append(f"| `{prefix}{name}` | `{default}` | {field.description} |")
    return rows
