"""The model to train: precision and quantization for the device, and the LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.trainer.ranks import local_rank
from shared.errors import SpecError
from shared.jobspec import TrainingSpec
from shared.modeling import device, load_seq2seq


@dataclass(frozen=True)
class Plan:
    """What the trainer resolved from the spec for this machine."""

    device: str
    precision: str
    quantization: str
    notes: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        """Storage and compute dtype of the non-quantized weights."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def resolve_plan(spec: TrainingSpec, model_type: str = "t5") -> Plan:
    """Resolve "auto" settings for the device; refuse what cannot work."""
    dev = device()
    notes = []
    if spec.precision == "fp16" and model_type in ("t5", "mt5", "umt5"):
        raise SpecError(
            "training.precision: fp16 is refused for T5 models: their activations "
            "overflow fp16's range and the loss becomes NaN; use bf16 or fp32"
        )
    precision = spec.precision
    if precision == "auto":
        bf16_ok = dev == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"
        notes.append(f"precision auto -> {precision} on {dev}")
    quantization = spec.quantization
    if quantization == "auto":
        quantization = "4bit" if dev == "cuda" else "none"
        notes.append(f"quantization auto -> {quantization} on {dev}")
    return Plan(device=dev, precision=precision, quantization=quantization, notes=tuple(notes))


def quantization_config(plan: Plan) -> Any:
    """bitsandbytes settings: nf4 with double quantization (the notebook's), or 8-bit."""
    if plan.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if plan.precision == "bf16" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def build_model(base_model: str, spec: TrainingSpec, plan: Plan) -> Any:
    """The base model (quantized if planned) wrapped with a fresh LoRA adapter."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    qconfig = quantization_config(plan)
    model = load_seq2seq(
        base_model,
        dtype=plan.dtype,
        quantization_config=qconfig,
        device_map={"": local_rank()}
        if qconfig is not None and plan.device == "cuda"
        else ({"": "cpu"} if qconfig is not None else None),
    )
    if qconfig is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing
        )
    lora = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
    )
    return get_peft_model(model, lora)
