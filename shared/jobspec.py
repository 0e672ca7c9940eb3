"""The job specification users write (YAML), its defaults and its validation.

Defaults are the original notebook's recipe: flan-t5-large, ``"What is {page_title}"`` →
``page_text``, a 70/30 split, LoRA r=64 / alpha=16 / dropout 0.1 on all linear layers,
nf4 4-bit with double quantization and bf16 compute (on CUDA), batch 1 with gradient
accumulation 2, one epoch.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import SpecError

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def template_fields(template: str) -> list[str]:
    """Names of the ``{field}`` placeholders in a template, in order."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise SpecError(f"template {template!r} is not a valid format string: {exc}") from exc


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
        "What is {page_title}", description="Template of the model input; {column} placeholders."
    )
    target_template: str = Field(
        "{page_text}", description="Template of the expected output; {column} placeholders."
    )
    test_size: float = Field(
        0.3, gt=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    validation_size: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of prompts for validation loss during training."
    )
    seed: int = Field(42, description="Seed of the train/test split.")
    max_source_length: int = Field(128, ge=8, le=8192, description="Input tokens kept.")
    max_target_length: int = Field(512, ge=8, le=8192, description="Target tokens kept.")
    max_rows: int | None = Field(None, ge=2, description="Use only the first N rows (quick runs).")
    skip_bad_rows: bool = Field(
        False, description="Skip malformed JSONL lines (counted) instead of failing the job."
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
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description='"all-linear" or a list of module names (e.g. ["q", "v"]).'
    )


class TrainingSpec(_Section):
    """How the adapter is trained (transformers ``Seq2SeqTrainer``)."""

    quantization: Literal["auto", "none", "4bit", "8bit"] = Field(
        "auto", description='"auto": nf4 4-bit (QLoRA) on CUDA, none on CPU.'
    )
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto",
        description='"auto": bf16 on GPUs that support it, else fp32. fp16 is refused '
        "for T5 (its activations overflow).",
    )
    optimizer: str = Field(
        "adamw_torch", description='transformers optimizer name (e.g. "paged_adamw_8bit").'
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps to warm up.")
    epochs: float = Field(1.0, gt=0.0, le=1000.0, description="Passes over the train split.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 means use epochs.")
    batch_size: int = Field(1, ge=1, le=4096, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(2, ge=1, le=1024, description="Steps per update.")
    group_by_length: bool = Field(True, description="Batch examples of similar length.")
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
    seed: int = Field(42, description="Seed of initialisation and data order.")
    data_parallel: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = Field(
        "auto",
        description='Training processes, one per GPU. "auto": every visible GPU (1 on CPU). '
        "A number above 1 on CPU runs gloo processes (for testing the multi-GPU path).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter settings.")


class GateSpec(_Section):
    """What the tuned model must show before it is published."""

    min_rouge_l_gain: float = Field(
        0.0, ge=-1.0, le=1.0, description="Tuned ROUGE-L must be at least base + this."
    )
    require_lower_loss: bool = Field(True, description="Tuned test loss must be below base.")
    force_publish: bool = Field(False, description="Publish even if the gate fails (recorded).")


class EvaluationSpec(_Section):
    """How the base and tuned models are compared on the held-out split."""

    max_rows: int | None = Field(
        200, ge=1, description="Cap on test rows for quick runs (None: all); reported."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length cap.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam search width (1: greedy).")
    no_repeat_ngram_size: StrictInt = Field(
        0,
        ge=0,
        le=32,
        description="Block repeated n-grams of this size (0: off). An integer: "
        "the notebook passed True, which means 1 and forbids any repeated token.",
    )
    sampling: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int = Field(0, description="Seed of sampling and of the bootstrap.")
    bootstrap_samples: int = Field(
        1000, ge=100, le=100_000, description="Resamples for the 95% confidence intervals."
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Rows per forward pass.")
    gate: GateSpec = Field(default_factory=GateSpec, description="The quality gate.")


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

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(NAME_PATTERN, value):
            raise ValueError(f"must match {NAME_PATTERN}")
        return value


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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(NAME_PATTERN, value):
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SpecError(f"job spec file not found: {path}") from exc
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
