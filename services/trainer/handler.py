"""Trainer: a prepared dataset → a LoRA adapter and its training log in the store."""

from __future__ import annotations

import dataclasses
from typing import Any

from services.trainer import lora, train
from shared.artifacts import read_split
from shared.messages import ModelTrained, TrainModel
from shared.modeling import load_tokenizer, versions
from shared.worker import StageContext


def handle(command: TrainModel, ctx: StageContext) -> ModelTrained:
    """Train once; a stored manifest makes a redelivery a no-op."""
    done = ctx.jobs.manifest(command.job_id, "train")
    if done is None:
        done = _train(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "train"))
    return ModelTrained(
        job_id=command.job_id, manifest=uri, train_loss=done["train_loss"], steps=done["steps"]
    )


def _train(command: TrainModel, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    plan = lora.resolve_plan(spec.training)
    dataset = ctx.manifest_at(command.dataset_manifest)
    table = read_split(ctx.store, dataset, "train", cache_dir=ctx.settings.cache_dir)
    validation = None
    if dataset["counts"].get("validation"):
        validation = read_split(ctx.store, dataset, "validation", cache_dir=ctx.settings.cache_dir)
    ctx.progress({"phase": "loading model", "plan": dataclasses.asdict(plan)}, force=True)
    tokenizer = load_tokenizer(spec.base_model)
    model = lora.build_model(spec.base_model, spec.training, plan)
    folder = ctx.scratch(command, "train")
    summary = train.train(
        model,
        tokenizer,
        table,
        eval_table=validation,
        spec=spec.training,
        plan=plan,
        output_dir=folder / "trainer",
        progress=ctx.progress,
    )
    model.save_pretrained(folder / "adapter")
    prefix = ctx.jobs.stage_prefix(command.job_id, "train")
    ctx.store.upload_dir(folder / "adapter", f"{prefix}/adapter")
    ctx.store.put_json(f"{prefix}/log.json", summary.pop("log_history"))
    manifest = {
        **summary,
        "adapter": ctx.store.uri(f"{prefix}/adapter"),
        "log": ctx.store.uri(f"{prefix}/log.json"),
        "plan": dataclasses.asdict(plan),
        "base_model": spec.base_model,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": versions(),
    }
    ctx.jobs.write_manifest(command.job_id, "train", manifest)
    return manifest
