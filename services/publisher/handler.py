"""Publisher: merge, export, preflight, store and register the tuned model.

The ``local`` target stops there (the control plane serves it); ``bedrock`` also uploads the
folder and drives a Custom Model Import job to completion (``target``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.publisher import card, cmi, export, target, upload
from shared import bedrock, tracking
from shared.artifacts import adapter_dir, read_split
from shared.basemodel import resolve_base_model
from shared.errors import NotFound, SpecError
from shared.messages import ModelPublished, PublishModel
from shared.modeling import load_tokenizer, versions
from shared.settings import BedrockSettings
from shared.stage import StageContext
from shared.uploads import folder_digest

PROBE_ROWS = 4


def handle(command: PublishModel, ctx: StageContext) -> ModelPublished:
    """Publish once; a stored manifest makes a redelivery a no-op."""
    manifest = ctx.jobs.manifest(command.job_id, "publish")
    if manifest is None:
        manifest = _publish(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "publish"))
    return ModelPublished(
        job_id=command.job_id,
        manifest=uri,
        model_name=manifest["model_name"],
        target=manifest["target"],
        location=manifest["location"],
        registered_model=manifest.get("registered_model"),
    )


def _publish(command: PublishModel, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    evaluation = ctx.manifest_at(command.evaluation_manifest)
    if not evaluation["gate"]["publish"]:
        raise SpecError(
            "the evaluation gate rejected this model; set "
            "evaluation.gate.force_publish to publish anyway"
        )
    # Before any work: the name is held for this job (refused if another job's model holds
    # it and overwrite is not set, or another job is publishing under it now).
    ctx.jobs.claim_model_name(
        spec.model_name, job_id=command.job_id, overwrite=spec.publish.overwrite
    )
    settings = BedrockSettings() if spec.publish.target == "bedrock" else None
    dataset = ctx.manifest_at(command.dataset_manifest)
    training = ctx.manifest_at(command.training_manifest)
    probes = read_split(
        ctx.store, dataset, "test", cache_dir=ctx.settings.cache_dir, max_rows=PROBE_ROWS
    )
    adapter = adapter_dir(ctx.store, training, cache_dir=ctx.settings.cache_dir)
    base_model = resolve_base_model(
        spec.base_model, store=ctx.store, cache_dir=ctx.settings.cache_dir
    )
    plan = export.merge_plan(base_model, spec.publish.dtype)
    ctx.progress({"phase": "merging", "device": plan.device, "dtype": plan.dtype}, force=True)
    merged, check = export.merge(
        base_model, adapter, probes.column("input_ids").to_pylist(), plan=plan
    )
    export.apply_decoding(merged, spec.decoding, load_tokenizer(base_model))
    folder = ctx.scratch(command, "publish") / "model"
    tokenizer_files = export.save(merged, base_model, folder, dtype=spec.publish.dtype)
    (folder / "README.md").write_text(
        card.model_card(
            spec,
            dataset,
            training,
            evaluation,
            merge_check=check.describe(),
            model_type=merged.config.model_type,
        )  # fmt: skip
    )
    region = settings.region if settings else None
    checks = cmi.preflight(folder, tokenizer_files=tokenizer_files, region=region)
    files = upload.digests(folder)
    digest = folder_digest(files)
    if settings:  # the import's names and S3 keys, before anything is uploaded
        target.plan(
            command.job_id, list(files), digest, model_name=spec.model_name, settings=settings
        )
    prefix = f"{ctx.jobs.stage_prefix(command.job_id, 'publish')}/model"
    ctx.progress({"phase": "storing", "bytes": checks["bytes"]}, force=True)
    ctx.store.upload_dir(folder, prefix)
    location = ctx.store.uri(prefix)
    manifest: dict[str, Any] = {
        "model_name": spec.model_name,
        "target": spec.publish.target,
        "location": location,
        "digest": digest,
        "files": files,
        "merge": {**plan.record(), "check": check.record()},
        "preflight": checks,
        "versions": versions(),
    }
    entry = {
        "name": spec.model_name,
        "target": spec.publish.target,
        "location": location,
        "digest": digest,
        "job_id": command.job_id,
        "base_model": spec.base_model,
        "dtype": spec.publish.dtype,
        "published_at": datetime.now(UTC).isoformat(),
        "gate_forced": evaluation["gate"]["forced"],
        "decoding": spec.decoding.model_dump(),
        # trained on chat-templated prompts: served through chat completions
        "chat": bool(dataset.get("prompting", {}).get("chat_template")),
        "family": checks["model_type"],  # which shapes Bedrock serves it in
    }
    if spec.publish.target == "bedrock":
        imported = target.to_bedrock(
            command.job_id,
            ctx,
            folder,
            files,
            digest,
            model_name=spec.model_name,
            smoke_request=_smoke_request(
                probes.column("prompt")[0].as_py(), spec, dataset.get("prompting", {})
            ),
            settings=settings,
        )
        manifest["bedrock"] = entry["bedrock"] = imported
    run = ctx.tracked_run(command, training, "publish")
    if run is not None:
        registered = _track(run, spec, manifest, folder, command.job_id)
        manifest["registered_model"] = entry["registered_model"] = registered
    if spec.publish.overwrite:
        entry["replaced"] = _replaced(ctx, spec.model_name, command.job_id)
    ctx.jobs.register_model(spec.model_name, entry, overwrite=spec.publish.overwrite)
    ctx.jobs.write_manifest(command.job_id, "publish", manifest)  # last: the stage is done
    return manifest


def _smoke_request(prompt: str, spec: Any, prompting: dict[str, Any]) -> dict[str, Any]:
    """The first test prompt as the model was trained and is served: a chat message to a
    model trained in its chat template, else the prompt as it is."""
    if prompting.get("chat_template"):
        return bedrock.chat_request_body(prompt, spec.decoding.model_dump())
    return bedrock.request_body(prompt, spec.decoding.model_dump())


def _track(
    run: tracking.TrackedRun, spec: Any, manifest: dict[str, Any], folder: Any, job_id: str
) -> dict[str, Any] | None:
    """A registry version of the export (tagged with the job, the digest and the Bedrock
    ARN), the run tagged with where the model went, and the run ended: the job is done."""
    registered = None
    arn = manifest.get("bedrock", {}).get("imported_model_arn")
    if spec.tracking.register_model:
        tags = {tracking.JOB_TAG: job_id, "termtune.digest": manifest["digest"]}
        registered = run.register(spec.model_name, manifest["location"], folder, tags)
        if arn:
            run.tag_version(registered, {"bedrock.model_arn": arn})
    run.set_tags(
        {"termtune.model_name": spec.model_name, "termtune.location": manifest["location"]}
        | ({"bedrock.model_arn": arn} if arn else {})
    )
    run.end("FINISHED")
    return registered


def _replaced(ctx: StageContext, name: str, job_id: str) -> dict[str, Any] | None:
    """What an overwrite replaces: another job's model of the same name, if any."""
    try:
        old = ctx.jobs.model(name)
    except NotFound:
        return None
    if old.get("job_id") == job_id:
        return old.get("replaced")
    keep = ("job_id", "location", "digest", "published_at")
    return {k: old.get(k) for k in keep} | {
        "imported_model_arn": old.get("bedrock", {}).get("imported_model_arn")
    }
