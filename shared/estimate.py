"""Estimate before spending: training time and cost on a g5 instance, and Bedrock's cost.

Inputs are a job spec and its prepared dataset's token counts (the data-prep manifest).
Training compute follows the usual transformer count, each half of the encoder-decoder
charged for its own tokens — forward 2 FLOPs per weight a token passes (the encoder's for a
source token, the decoder's and the LM head's for a target token), backward 2 more for
activations (LoRA computes no gradients for the frozen weights), plus the recomputed forward
under gradient checkpointing — over the peak bf16 throughput of the instance's GPUs at an
assumed model FLOPs utilisation. The batch, accumulation and quantization are the plan the
trainer would make on the instance's GPU (``shared.planner``). Every figure says what it rests on;
prices and the utilisation are configuration, not facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared import planner
from shared.errors import OutOfMemory, SpecError
from shared.jobspec import JobSpec
from shared.trainplan import GIB, ModelShape

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
LORA_KIND = {"none": "bf16", "4bit": "nf4 (QLoRA)", "8bit": "8-bit"}
A10G_FREE_BYTES = 22 * GIB  # of its 24 GB, what a process finds free (22.5 GiB usable)
#: assumed utilisation, from the H200 record's launch-bound steps scaled to an A10G's peak
#: (about 7% at batch 32 in bf16); not measured on an A10G
DEFAULT_MFU = {"4bit": 0.07, "8bit": 0.05, "none": 0.10}
CMU_PARAMS = 3_000_000_000  # assumed parameters per Custom Model Unit (Bedrock assigns it)
#: the ECS stack's evaluator and publisher tasks (deploy/aws/termtune.yaml), MiB: on Fargate
#: the StageMemory choices; with EvaluatorPublisherCapacity=Gpu one A10G each and this much
#: host memory
STAGE_MEMORY_MIB = (16384, 20480, 24576, 28672, 30720)
GPU_TASK_MIB = 14336
RUNTIME_BYTES = int(1.5 * GIB)  # assumed: what Python, torch and the worker take of a task


@dataclass(frozen=True)
class Prices:
    """The configurable part: instance prices, CMU price, utilisation."""

    instances: dict[str, tuple[int, float]]
    cmu_price_per_minute: float = 0.057
    mfu: dict[str, float] | None = None


def estimate(
    spec: JobSpec,
    dataset: dict[str, Any],
    *,
    instance_type: str,
    shape: ModelShape,
    prices: Prices,
) -> dict[str, Any]:
    """Training steps, tokens, time and cost under the plan the trainer would make on the
    instance's GPUs; Bedrock's cost per active hour."""
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
    try:
        plan = planner.resolve(
            t,
            shape,
            planner.Rows.from_manifest(dataset),
            processes=processes,
            dev="cuda",
            memory_bytes=A10G_FREE_BYTES,
            bf16=True,
        )
    except OutOfMemory as exc:  # every g5 GPU is an A10G: no g5 instance trains it
        raise SpecError(f"instance_type {instance_type!r} (A10G GPUs, 24 GB each): {exc}") from exc
    parameters = shape.parameters
    per_step = plan.batch_size * plan.gradient_accumulation_steps * processes
    steps_per_epoch = math.ceil(rows / per_step)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    tokens = steps * per_step * tokens_per_row
    quantization = plan.quantization
    sides = [stats.get(side, {}).get("mean", 0.0) for side in ("source", "target")]
    flops = shape.training_flops(*sides) * (1.5 if t.gradient_checkpointing else 1.0)
    mfu = (prices.mfu or DEFAULT_MFU)[quantization]
    examples_per_s = processes * A10G_BF16_TFLOPS * 1e12 * mfu / max(flops, 1.0)
    throughput = examples_per_s * tokens_per_row
    seconds = steps * per_step / examples_per_s
    hours = seconds / 3600
    units = max(1, math.ceil(parameters / CMU_PARAMS))
    return {
        "instance_type": instance_type,
        "gpus": gpus,
        "processes": processes,
        "dataset": {"train_rows": rows, "tokens_per_row": round(tokens_per_row, 1)},
        "plan": {
            "quantization": plan.quantization,
            "precision": plan.precision,
            "batch_size": plan.batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "token_budget": plan.token_budget,
            "gpu_memory_gib": plan.memory_gib,
            "notes": list(plan.notes),
        },
        "training": {
            "optimizer_steps": steps,
            "examples_per_step": per_step,
            "tokens": round(tokens),
            "tokens_per_s": round(throughput),
            "hours": round(hours, 3),
            "cost_usd": round(hours * hourly, 2),
            "price_per_hour_usd": hourly,
            "basis": (
                f"{flops / 1e9:,.1f} GFLOPs an example ({4 if not t.gradient_checkpointing else 6}"
                f" x {_charged(shape, sides)}), "
                f"{processes}x A10G at {A10G_BF16_TFLOPS:g} bf16 TFLOPS and an assumed "
                f"{mfu:.0%} utilisation for {LORA_KIND[quantization]} LoRA; excludes model "
                "download, "
                "evaluation and publishing"
            ),
        },
        "stages": stages(spec, shape),
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


def stages(spec: JobSpec, shape: ModelShape) -> dict[str, Any]:
    """Where the evaluator and the publisher would load the base model on each of the
    stack's capacities (EvaluatorPublisherCapacity), by the rules the stages apply."""
    gpu = {"cuda": A10G_FREE_BYTES, "cpu": _task(GPU_TASK_MIB)}
    dtype = spec.publish.dtype
    evaluation = planner.evaluation_options
    on_gpu = {
        "evaluate": _fit(shape, evaluation(True), gpu),
        "publish": _fit(shape, planner.merge_options(True, dtype), gpu),
    }
    hints = {stage: _hint(fits.startswith("does not fit")) for stage, fits in on_gpu.items()}
    if dtype != "bfloat16":
        hints["publish"] += planner.HALVE_WITH_BF16
    return {
        "evaluate": {
            "Fargate": _on_fargate(shape, evaluation(False), hints["evaluate"]),
            "Gpu": on_gpu["evaluate"],
        },
        "publish": {
            "Fargate": _on_fargate(shape, planner.merge_options(False, dtype), hints["publish"]),
            "Gpu": on_gpu["publish"],
        },
        "basis": (
            f"the stack's tasks: on Fargate StageMemory MiB (the smallest value that holds "
            f"the stage); on Gpu one A10G ({A10G_FREE_BYTES / GIB:g} GiB free) and a "
            f"{GPU_TASK_MIB} MiB task; each task less an assumed "
            f"{RUNTIME_BYTES / GIB:g} GiB for the runtime; the weights must fit in "
            f"{planner.WEIGHTS_SHARE:.0%} of the free memory; the publisher merges in "
            f"publish.dtype ({dtype})"
        ),
    }


def _task(mib: int) -> int:
    return mib * 2**20 - RUNTIME_BYTES


def _fit(shape: ModelShape, options: list[tuple[str, str]], free: dict[str, int]) -> str:
    placement, passed_over = planner.first_fit(shape.parameters, options, free)
    if placement is None:
        return f"does not fit: {'; '.join(passed_over)}"
    return placement.reason


def _on_fargate(shape: ModelShape, options: list[tuple[str, str]], hint: str) -> str:
    """The smallest StageMemory whose Fargate task holds the stage, or why the largest
    does not and what to change."""
    for mib in STAGE_MEMORY_MIB:
        placement, _ = planner.first_fit(shape.parameters, options, {"cpu": _task(mib)})
        if placement is not None:
            return f"StageMemory {mib}: {placement.reason}"
    largest = _fit(shape, options, {"cpu": _task(STAGE_MEMORY_MIB[-1])})
    return f"StageMemory {STAGE_MEMORY_MIB[-1]} {largest}; {hint}"


def _hint(gpu_too_small: bool) -> str:
    """What holds a stage that the largest Fargate task does not."""
    if gpu_too_small:  # every g5 GPU is an A10G
        return "a smaller model (the Gpu capacity's A10G does not hold it either)"
    return "the Gpu capacity or a smaller model"


def _charged(shape: ModelShape, sides: list[float]) -> str:
    """Which weights each token passes, in words, for the estimate's basis."""
    if shape.kind == "causal":
        return (
            f"the model's {shape.decoder_matmul_parameters:,} weights x "
            f"{sides[0] + sides[1]:.0f} prompt and answer tokens"
        )
    return (
        f"the encoder's {shape.encoder_matmul_parameters:,} weights x {sides[0]:.0f} source "
        f"tokens + the decoder's {shape.decoder_matmul_parameters:,} x {sides[1]:.0f} target "
        "tokens"
    )
