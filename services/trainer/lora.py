"""The model to train: precision and quantization for the device, and the LoRA adapter."""

from __future__ import annotations

import logging
from typing import Any

import torch

from services.trainer import fused_lora, kernels
from services.trainer.ranks import local_rank
from shared import families
from shared.jobspec import TrainingSpec
from shared.modeling import load_causal, load_seq2seq
from shared.planner import Plan

log = logging.getLogger(__name__)


def quantization_config(plan: Plan) -> Any:
    """bitsandbytes settings: nf4 with double quantization (the notebook's), or 8-bit."""
    if plan.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if plan.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.precision, torch.float32)
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
    load = load_causal if plan.kind == "causal" else load_seq2seq
    model = load(
        base_model,
        dtype=plan.dtype,
        attention=plan.attention,
        quantization_config=qconfig,
        device_map=_device_map(plan, quantized=qconfig is not None),
    )
    if spec.fused_layers:
        kernels.fuse(model)
    if qconfig is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.gradient_checkpointing
        )
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if plan.kind == "causal" else TaskType.SEQ_2_SEQ_LM,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        target_parameters=_target_parameters(model, spec.lora.target_modules),
    )
    model = get_peft_model(model, lora)
    if spec.fused_lora:
        fused, adapted = fused_lora.fuse_lora(model)
        log.info("fused LoRA update in %d of %d adapted layers", fused, adapted)
    return model


def _device_map(plan: Plan, *, quantized: bool) -> Any:
    """On CUDA, straight onto this rank's GPU, shard by shard, quantized or not: the host
    never holds the weights whole (a 7B model's bf16 weights are 12.6 GiB; a g5.xlarge
    trainer task has 14 GiB, each of a g5.12xlarge's ranks would load its own copy).
    bitsandbytes on the CPU wants its map too."""
    if plan.device == "cuda":
        return {"": local_rank()}
    return {"": "cpu"} if quantized else None


def _target_parameters(model: Any, target_modules: Any) -> list[str] | None:
    """What ``all-linear`` also adapts in this family (fused experts peft does not map)."""
    family = families.FAMILIES.get(str(getattr(model.config, "model_type", "")))
    if target_modules != "all-linear" or family is None or not family.lora_parameters:
        return None
    return list(family.lora_parameters)
