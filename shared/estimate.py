"""Estimate before spending: training time and cost on a g5 instance, and Bedrock's cost.

Inputs are a job spec and its prepared dataset's token counts (the data-prep manifest).
Training compute follows the usual transformer count — forward 2·N FLOPs per token,
backward 2·N more for activations (LoRA computes no gradients for the frozen weights) plus
the recomputed forward under gradient checkpointing — over the peak bf16 throughput of the
instance's GPUs at an assumed model FLOPs utilisation. Every figure says what it rests on;
prices and the utilisation are configuration, not facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared.errors import SpecError
from shared.jobspec import JobSpec

#: g5 family (NVIDIA A10G): GPUs per instance and on-demand USD/hour (us-east-1, 2026).
G5_INSTANCES: dict[str, tuple[int, float]] = {
    "g5.xlarge": (1, 1.006),
    "g5.2xlarge": (1, 1.212),
    "g5.4xlarge": (1, 1.624),
    "g5.8xlarge": (1, 2.448),
    "g5.12xlarge": (4, 5.672),
    "g5.16xlarge": (1, 4.096),
    "g5.24xlarge": (4, 8.144),
    "g5.48xlarge": (8, 16.288),
}
A10G_BF16_TFLOPS = 125.0  # dense tensor-core peak (NVIDIA's A10 datasheet)
DEFAULT_MFU = {"4bit": 0.15, "8bit": 0.12, "none": 0.30}  # assumptions until measured
CMU_PARAMS = 3_000_000_000  # assumed parameters per Custom Model Unit (Bedrock assigns it)


@dataclass(frozen=True)
class Prices:
    """The configurable part: instance prices, CMU price, utilisation."""

    instances: dict[str, tuple[int, float]]
    cmu_price_per_minute: float = 0.057
    mfu: dict[str, float] | None = None


def count_parameters(base_model: str) -> int:
    """Parameters of a model from its config alone (no weights: built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(base_model)
    with init_empty_weights():
        model = AutoModelForSeq2SeqLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate(
    spec: JobSpec,
    dataset: dict[str, Any],
    *,
    instance_type: str,
    parameters: int,
    prices: Prices,
) -> dict[str, Any]:
    """Training steps, tokens, time and cost; Bedrock's cost per active hour."""
    if instance_type not in prices.instances:
        raise SpecError(
            f"instance_type {instance_type!r}: choose one of {', '.join(sorted(prices.instances))}"
        )
    gpus, hourly = prices.instances[instance_type]
    t = spec.training
    rows = int(dataset.get("counts", {}).get("train", 0))
    if rows == 0:
        raise SpecError("the prepared dataset has no train rows to estimate from")
    stats = dataset.get("tokens", {}).get("train", {})
    tokens_per_row = sum(stats.get(side, {}).get("mean", 0.0) for side in ("source", "target"))
    processes = gpus if t.data_parallel == "auto" else min(t.data_parallel, gpus)
    per_step = t.batch_size * t.gradient_accumulation_steps * processes
    steps_per_epoch = math.ceil(rows / per_step)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    tokens = steps * per_step * tokens_per_row
    quantization = "4bit" if t.quantization == "auto" else t.quantization
    flops_per_token = (6 if t.gradient_checkpointing else 4) * parameters
    mfu = (prices.mfu or DEFAULT_MFU)[quantization]
    throughput = processes * A10G_BF16_TFLOPS * 1e12 * mfu / flops_per_token
    seconds = tokens / throughput
    hours = seconds / 3600
    units = max(1, math.ceil(parameters / CMU_PARAMS))
    return {
        "instance_type": instance_type,
        "gpus": gpus,
        "processes": processes,
        "dataset": {"train_rows": rows, "tokens_per_row": round(tokens_per_row, 1)},
        "training": {
            "optimizer_steps": steps,
            "examples_per_step": per_step,
            "tokens": round(tokens),
            "tokens_per_s": round(throughput),
            "hours": round(hours, 3),
            "cost_usd": round(hours * hourly, 2),
            "price_per_hour_usd": hourly,
            "basis": (
                f"{flops_per_token // parameters}·N FLOPs/token, N={parameters:,} parameters, "
                f"{processes}x A10G at {A10G_BF16_TFLOPS:g} bf16 TFLOPS and an assumed "
                f"{mfu:.0%} utilisation for {quantization} LoRA; excludes model download, "
                "evaluation and publishing"
            ),
        },
        "bedrock": {
            "custom_model_units": units,
            "cost_per_active_hour_usd": round(units * prices.cmu_price_per_minute * 60, 2),
            "weights_gb_bf16": round(parameters * 2 / 1e9, 2),
            "basis": (
                f"assumed {CMU_PARAMS / 1e9:g}B parameters per Custom Model Unit (Bedrock "
                "assigns the count at import; the publisher records the real one) at "
                f"${prices.cmu_price_per_minute}/CMU-minute"
            ),
        },
    }
