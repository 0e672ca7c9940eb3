"""Trainer: a prepared dataset → a LoRA adapter and its training log in the store.

Training resumes from the job's latest stored checkpoint. A cancel request stops it within
one optimizer step; SIGTERM stores a checkpoint and hands the job back to the queue.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from services.trainer import callbacks, lora, train
from services.trainer.checkpoints import CheckpointStore
from shared.artifacts import read_split
from shared.errors import Cancelled, Interrupted
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
    prefix = ctx.jobs.stage_prefix(command.job_id, "train")
    checkpoints = CheckpointStore(ctx.store, f"{prefix}/checkpoints")
    resume = checkpoints.download_latest(folder / "trainer")
    stop = callbacks.StopOnRequest(lambda: ctx.should_stop(command))
    summary = train.train(
        model,
        tokenizer,
        table,
        eval_table=validation,
        spec=spec.training,
        plan=plan,
        output_dir=folder / "trainer",
        resume_from=resume,
        callbacks=[
            callbacks.Progress(
                ctx.progress,
                examples_per_step=spec.training.batch_size
                * spec.training.gradient_accumulation_steps,
                tokens_per_example=_tokens_per_example(dataset),
            ),
            callbacks.StoreCheckpoints(
                checkpoints,
                report=ctx.progress,
                every_minutes=spec.training.checkpoint_every_minutes,
            ),
            stop,
        ],
    )
    if stop.reason == "cancel":
        raise Cancelled(f"job {command.job_id} cancelled at step {summary['steps']}")
    if stop.reason == "shutdown":
        raise Interrupted(f"worker stopping; checkpoint stored at step {summary['steps']}")
    if stop.reason == "lost":
        raise Interrupted(f"lease lost at step {summary['steps']}; another worker owns the job")
    model.save_pretrained(folder / "adapter")
    ctx.store.upload_dir(folder / "adapter", f"{prefix}/adapter")
    ctx.store.put_json(f"{prefix}/log.json", summary.pop("log_history"))
    manifest = {
        **summary,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "adapter": ctx.store.uri(f"{prefix}/adapter"),
        "log": ctx.store.uri(f"{prefix}/log.json"),
        "plan": dataclasses.asdict(plan),
        "base_model": spec.base_model,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": versions(),
    }
    ctx.jobs.write_manifest(command.job_id, "train", manifest)
    return manifest


def _tokens_per_example(dataset: dict[str, Any]) -> float:
    """Mean source + target tokens of a train example, from the data-prep manifest."""
    stats = dataset.get("tokens", {}).get("train", {})
    return sum(stats.get(side, {}).get("mean", 0.0) for side in ("source", "target"))
