"""Trainer: a prepared dataset → a LoRA adapter and its training log in the store.

Training resumes from the job's latest stored checkpoint, under the plan it was taken with.
A cancel request stops it within a second and one optimizer step; SIGTERM stores a
checkpoint and hands the job back to the queue. With several GPUs the ranks run under
torchrun (``distributed``) and this process relays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from services.trainer import compiling, distributed, lora
from services.trainer.callbacks import PLAN_FILE
from services.trainer.checkpoints import CheckpointStore
from services.trainer.fit import TrainJob, fit
from shared import planner, tracking
from shared.artifacts import file_digests, read_split
from shared.basemodel import resolve_base_model
from shared.errors import Cancelled, CompileFailed, Interrupted, ModelError
from shared.messages import ModelTrained, TrainModel
from shared.modeling import device, versions
from shared.stage import StageContext
from shared.trainplan import model_shape

log = logging.getLogger(__name__)


def handle(command: TrainModel, ctx: StageContext) -> ModelTrained:
    """Train once; a stored manifest makes a redelivery a no-op."""
    done = ctx.jobs.manifest(command.job_id, "train")
    if done is None:
        done = _train(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "train"))
    return ModelTrained(
        job_id=command.job_id,
        manifest=uri,
        train_loss=done["train_loss"],
        steps=done["steps"],
        tracking=done.get("tracking"),
    )


def _train(command: TrainModel, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    dataset = ctx.manifest_at(command.dataset_manifest)
    table = read_split(ctx.store, dataset, "train", cache_dir=ctx.settings.cache_dir)
    validation = None
    if dataset["counts"].get("validation"):
        validation = read_split(ctx.store, dataset, "validation", cache_dir=ctx.settings.cache_dir)
    folder = ctx.scratch(command, "train")
    prefix = ctx.jobs.stage_prefix(command.job_id, "train")
    checkpoints = CheckpointStore(ctx.store, f"{prefix}/checkpoints")
    resume = checkpoints.download_latest(folder / "trainer")
    base_model = resolve_base_model(
        spec.base_model, store=ctx.store, cache_dir=ctx.settings.cache_dir
    )
    run = tracking.start(  # before hours of training: a wrong server fails now
        command.job_id, spec, ctx.settings, store=ctx.store, folder=folder / "tracking"
    )
    processes = distributed.processes(spec.training, device())
    rows = planner.Rows.from_manifest(dataset)
    plan = _resumed_plan(resume) or planner.resolve(
        spec.training, model_shape(base_model), rows, processes=processes
    )
    prepared = dataset.get("prompting", {}).get("kind", "seq2seq")
    if prepared != plan.kind:
        raise ModelError(
            f"the dataset was prepared for a {prepared} model but base_model "
            f"{spec.base_model!r} is {plan.kind}: prepare the data again for this model"
        )
    job = TrainJob(
        base_model=base_model,
        training=spec.training.model_dump(mode="json"),
        plan=dataclasses.asdict(plan),
        output_dir=str(folder),
        checkpoints_prefix=checkpoints.prefix,
        tokens_per_example=_tokens_per_example(dataset),
        processes=processes,
        resume_from=str(resume) if resume else None,
        rows=None if resume else dataclasses.asdict(rows),
    )
    ctx.progress(
        {"phase": "loading model", "plan": job.plan, "processes": job.processes}, force=True
    )
    live = run and tracking.LiveCurves(run, ctx.settings.tracking_live_seconds)
    report = live.tap(ctx.progress) if live else ctx.progress  # the curves, as they come
    with live or contextlib.nullcontext():
        summary = _fit(job, table, validation, command, ctx, report, folder)
    _raise_if_stopped(command, summary)
    ctx.store.upload_dir(folder / "adapter", f"{prefix}/adapter")
    log_history = summary.pop("log_history")
    ctx.store.put_json(f"{prefix}/log.json", log_history)
    summary.pop("stop_reason")
    job_plan = summary.pop("plan", job.plan)  # after the probe (CUDA)
    resumed_from = summary.pop("resumed_from")  # a relaunch's, when compile failed in a rank
    manifest = {
        **summary,
        "resumed_from_step": int(Path(resumed_from).name.split("-")[1]) if resumed_from else None,
        "processes": job.processes,
        "adapter": ctx.store.uri(f"{prefix}/adapter"),
        "adapter_sha256": file_digests(folder / "adapter"),  # what its readers check
        "log": ctx.store.uri(f"{prefix}/log.json"),
        "plan": job_plan,
        "base_model": spec.base_model,
        "versions": versions(),
    }
    if live:
        _track(live, spec, manifest, log_history)
        run.finish_stage()
        manifest["tracking"] = run.ref()
    ctx.jobs.write_manifest(command.job_id, "train", manifest)
    return manifest


def _fit(
    job: TrainJob,
    table: Any,
    validation: Any,
    command: TrainModel,
    ctx: StageContext,
    report: Any,
    folder: Path,
) -> dict[str, Any]:
    """Train here, or under torchrun when the plan has several processes."""
    should_stop = functools.partial(ctx.should_stop, command)
    if job.processes > 1:
        launch = functools.partial(
            distributed.launch,
            train_table=table,
            eval_table=validation,
            store_url=ctx.settings.store_url,
            s3_endpoint_url=ctx.settings.s3_endpoint_url,
            report=report,
            should_stop=should_stop,
        )
        try:
            return {**launch(job, folder=folder / "ranks"), "resumed_from": job.resume_from}
        except CompileFailed as exc:
            _raise_if_asked_to_stop(command, should_stop(), str(exc))
            log.warning("%s; the %d ranks start again", exc, job.processes)
            again = _without_compile(job, str(exc), ctx)
            summary = launch(again, folder=folder / "ranks-eager")
            return {**summary, "resumed_from": again.resume_from}
    summary = fit(
        job,
        table,
        validation,
        store=ctx.store,
        report=report,
        should_stop=should_stop,
        immediate_stop=ctx.local_stop,
    )
    return {**summary, "resumed_from": job.resume_from}


def _track(
    live: tracking.LiveCurves,
    spec: Any,
    manifest: dict[str, Any],
    log_history: list[dict[str, Any]],
) -> None:
    """The spec and the resolved plan as parameters; the curve points the run does not hold
    yet (most were sent while training) and the totals as metrics."""
    run = live.run
    run.log_params(
        {
            "base_model": spec.base_model,
            "dataset": spec.dataset.model_dump(mode="json"),
            "training": spec.training.model_dump(mode="json"),
            "decoding": spec.decoding.model_dump(mode="json"),
            "plan": {k: v for k, v in manifest["plan"].items() if k != "notes"},
        }
    )
    run.log_metrics(live.unsent(tracking.history_rows(log_history, "train/")))
    names = {
        "train_loss": "mean_loss",
        "runtime_s": "runtime_s",
        "trainable_parameters": "trainable_parameters",
    }
    steps = int(manifest["steps"])
    run.log_metrics(
        [
            (f"train/{name}", manifest[key], steps)
            for key, name in names.items()
            if manifest.get(key) is not None
        ]
    )


def _raise_if_stopped(command: TrainModel, summary: dict[str, Any]) -> None:
    """Training that ended early: cancelled, or handed back to the queue."""
    reason, steps = summary["stop_reason"], summary["steps"]
    if reason == "cancel":
        raise Cancelled(f"job {command.job_id} cancelled at step {steps}")
    if reason == "shutdown":
        raise Interrupted(f"worker stopping; checkpoint stored at step {steps}")
    if reason == "lost":
        raise Interrupted(f"lease lost at step {steps}; another worker owns the job")


def _raise_if_asked_to_stop(command: TrainModel, reason: str | None, failure: str) -> None:
    """Before the ranks start again without compile: a stop already asked for is obeyed
    (the job resumes from its stored checkpoint when it comes back)."""
    if reason == "cancel":
        raise Cancelled(f"job {command.job_id} cancelled ({failure}; not started again)")
    if reason is not None:
        raise Interrupted(f"{reason}: not starting the ranks again after {failure}")


def _without_compile(job: TrainJob, why: str, ctx: StageContext) -> TrainJob:
    """The job again after torch.compile failed in a rank: from its newest stored checkpoint
    (under that checkpoint's plan), else from the start, without compile."""
    trainer = Path(job.output_dir) / "trainer"
    shutil.rmtree(trainer, ignore_errors=True)  # what the ranks left: a save may be cut short
    resume = CheckpointStore(ctx.store, job.checkpoints_prefix).download_latest(trainer)
    plan = compiling.without(_resumed_plan(resume) or job.resolved, why)
    return dataclasses.replace(
        job,
        plan=dataclasses.asdict(plan),
        resume_from=str(resume) if resume else None,
        rows=None if resume else job.rows,
    )


RESUMED = "resumed: the checkpoint's plan"


def _resumed_plan(checkpoint: Path | None) -> lora.Plan | None:
    """The plan a checkpoint was taken under: a resumed run keeps its batch and data order
    (said once in its notes, however often the job was resumed)."""
    saved = checkpoint / PLAN_FILE if checkpoint else None
    if saved is None or not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    notes = tuple(note for note in data.get("notes", ()) if note != RESUMED)
    return lora.Plan(**{**data, "notes": (*notes, RESUMED)})


def _tokens_per_example(dataset: dict[str, Any]) -> float:
    """Mean source + target tokens of a train example, from the data-prep manifest."""
    stats = dataset.get("tokens", {}).get("train", {})
    return sum(stats.get(side, {}).get("mean", 0.0) for side in ("source", "target"))
