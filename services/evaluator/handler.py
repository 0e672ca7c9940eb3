"""Evaluator: base vs tuned on the held-out split, a report, and the quality gate."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import torch

from services.evaluator import html_report, metrics, scoring
from shared import families, tracking
from shared.artifacts import adapter_dir, dropped_rows, read_split
from shared.basemodel import resolve_base_model
from shared.errors import ModelError, NotFound
from shared.jobspec import JobSpec
from shared.messages import EvaluateModel, ModelEvaluated
from shared.modeling import device, load_adapter, load_model, load_tokenizer, versions
from shared.planner import Placement, advice, evaluation_options, place_weights
from shared.prompting import Prompting
from shared.stage import StageContext
from shared.trainplan import model_shape

SAMPLE_ROWS = 12


def handle(command: EvaluateModel, ctx: StageContext) -> ModelEvaluated:
    """Evaluate once; a stored manifest makes a redelivery a no-op."""
    report = ctx.jobs.manifest(command.job_id, "evaluate")
    if report is None:
        report = _evaluate(command, ctx)
    uri = ctx.store.uri(ctx.jobs.manifest_key(command.job_id, "evaluate"))
    gate = report["gate"]
    return ModelEvaluated(
        job_id=command.job_id,
        manifest=uri,
        passed=gate["passed"],
        publish=gate["publish"],
        reasons=gate["reasons"],
        timing=report.get("timing"),
    )


def check_tokenizer(tokenizer: Any, dataset: dict[str, Any], spec: JobSpec) -> None:
    """Refuse a dataset tokenized with another tokenizer than the model's."""
    recorded = dataset.get("tokenizer", {})
    if recorded.get("name") != spec.base_model or recorded.get("vocab_size") != len(tokenizer):
        raise ModelError(
            f"the dataset was tokenized with {recorded.get('name')!r} (vocabulary "
            f"{recorded.get('vocab_size')}) but the model's tokenizer is {spec.base_model!r} "
            f"(vocabulary {len(tokenizer)}); prepare the dataset again for this model"
        )


def served_prompts(
    table: pa.Table,
    dataset: dict[str, Any],
    tokenizer: Any,
    *,
    limit: int | None = None,
    encoder: bool = True,
) -> pa.Table:
    """The test rows with ``served_ids``, the ids answers are generated from: each prompt as
    the served model is given it, where data-prep cut it to max_source_length (the reference
    loss stays on the cut ids, as trained), else the ids as stored; and ``prompt_cut``.
    ``limit`` (``served_limit``): past it an encoder's prompt is cut as the API cuts it, and
    a decoder's keeps its stored ids (served, it would not fit its context). A manifest
    without its prompting record: the stored ids, none known cut."""
    stored = table.column("input_ids").to_pylist()
    prompts = table.column("prompt").to_pylist()
    record = dataset.get("prompting")
    full = Prompting.from_record(record).prompts(tokenizer, prompts) if record else stored
    served = [
        _served(f, s, p, tokenizer, limit=limit, encoder=encoder)
        for f, s, p in zip(full, stored, prompts, strict=True)
    ]
    cut = [len(f) > len(s) for f, s in zip(full, stored, strict=True)]
    table = table.append_column("served_ids", pa.array(served, type=pa.list_(pa.int32())))
    return table.append_column("prompt_cut", pa.array(cut, type=pa.bool_()))


def _served(
    full: list[int],
    stored: list[int],
    prompt: str,
    tokenizer: Any,
    *,
    limit: int | None,
    encoder: bool,
) -> list[int]:
    if len(full) <= len(stored):
        return stored
    if limit is None or len(full) <= limit:
        return full
    if encoder:  # the API's own cut (services.api.inference)
        return tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
    return stored


def served_limit(config: Any, tokenizer: Any, max_new_tokens: int) -> int | None:
    """The most prompt tokens the served model reads: an encoder model's tokenizer length
    (the API cuts a prompt there), a decoder's context less the answer's tokens; None where
    neither is known."""
    if config.is_encoder_decoder:
        length = tokenizer.model_max_length
        return length if length and length < 10**6 else None
    context = families.context_length(config.to_dict())
    return max(context - max_new_tokens, 1) if context else None


def base_on_device(base_model: str) -> tuple[Any, Placement]:
    """The base model in bf16 on the GPU, loaded straight there shard by shard (the host's
    memory never holds it whole), else in fp32 on the CPU, else in bf16 there: the first
    whose weights fit; ModelError, before loading, when none does."""
    gpu = device() == "cuda"
    placement = place_weights(
        model_shape(base_model).parameters,
        evaluation_options(gpu),
        what=f"the evaluation of {base_model}",
        advice=advice("evaluator", gpu),
    )
    dtype = torch.bfloat16 if placement.dtype == "bfloat16" else torch.float32
    if placement.device == "cuda":
        return load_model(base_model, dtype=dtype, device_map="cuda"), placement
    return load_model(base_model, dtype=dtype), placement


def _evaluate(command: EvaluateModel, ctx: StageContext) -> dict[str, Any]:
    spec = ctx.spec(command)
    evaluation = spec.evaluation
    dataset = ctx.manifest_at(command.dataset_manifest)
    training = ctx.manifest_at(command.training_manifest)
    table = read_split(
        ctx.store,
        dataset,
        "test",
        cache_dir=ctx.settings.cache_dir,
        max_rows=evaluation.max_rows,
        seed=evaluation.seed,
    )
    adapter = adapter_dir(ctx.store, training, cache_dir=ctx.settings.cache_dir)
    base_model = resolve_base_model(
        spec.base_model, store=ctx.store, cache_dir=ctx.settings.cache_dir
    )
    tokenizer = load_tokenizer(base_model)
    check_tokenizer(tokenizer, dataset, spec)
    model, placement = base_on_device(base_model)
    limit = served_limit(model.config, tokenizer, spec.decoding.max_new_tokens)
    encoder = model.config.is_encoder_decoder
    table = served_prompts(table, dataset, tokenizer, limit=limit, encoder=encoder)
    run = dict(
        tokenizer=tokenizer,
        table=table,
        spec=evaluation,
        decoding=spec.decoding,
        progress=ctx.progress,
    )
    started = time.perf_counter()
    base_rows, base_out, base_batches = metrics.run_model(model, label="base", **run)
    base_s = time.perf_counter() - started
    tuned_model = load_adapter(model, adapter, spec.base_model)
    tuned_rows, tuned_out, tuned_batches = metrics.run_model(tuned_model, label="tuned", **run)
    timing = {
        "device": placement.device,
        "dtype": placement.dtype,
        "placement": placement.reason,
        **batch_sizes(base_batches, tuned_batches),
        "base_s": round(base_s, 2),
        "tuned_s": round(time.perf_counter() - started - base_s, 2),
        "training_s": training.get("runtime_s"),
    }
    ctx.progress({"phase": "bootstrap", "samples": evaluation.bootstrap_samples}, force=True)
    report = build_report(
        table,
        (base_rows, base_out),
        (tuned_rows, tuned_out),
        spec=spec,
        training_log=_training_log(ctx, training),
        dataset=dataset,
    )
    report["timing"] = timing
    prefix = ctx.jobs.stage_prefix(command.job_id, "evaluate")
    ctx.store.put_json(f"{prefix}/report.json", report)
    page = html_report.render(report, job_id=command.job_id, notice=spec.publish.card.notice)
    ctx.store.put_bytes(f"{prefix}/report.html", page.encode())
    run = ctx.tracked_run(command, training, "evaluate")
    if run is not None:
        _track(run, report, page)
    ctx.jobs.write_manifest(command.job_id, "evaluate", report)
    return report


def batch_sizes(base: metrics.Batches, tuned: metrics.Batches) -> dict[str, Any]:
    """The batch sizes the runs used: ``batch_size`` the largest batch generated (the pass
    that needs the most memory); per model the size planned (auto or the spec's) and the
    sizes each pass ran at, smaller where an out-of-memory split a batch."""
    return {
        "batch_size": max(base.generation | tuned.generation, default=0),
        "batches": {"base": base.report(), "tuned": tuned.report()},
    }


def _track(run: tracking.TrackedRun, report: dict[str, Any], page: str) -> None:
    """Both models' metrics with the tuned one's change and its 95% interval, the gate's
    verdict, and the report itself; a model the gate keeps back ends the job (and run)."""
    rows = []
    for name, m in report["metrics"].items():
        rows += [(f"eval/{name}/{side}", m[side], 0) for side in ("base", "tuned", "delta")]
        rows += [(f"eval/{name}/delta_ci95_low", m["ci95"][0], 0)]
        rows += [(f"eval/{name}/delta_ci95_high", m["ci95"][1], 0)]
    gate = report["gate"]
    rows += [("eval/rows", report["rows"], 0), ("gate/passed", float(gate["passed"]), 0)]
    run.log_metrics([(k, v, step) for k, v, step in rows if v is not None])
    run.set_tags({"termtune.gate": "passed" if gate["passed"] else "refused"})
    run.log_dict("evaluation/report.json", report)
    run.log_dict("evaluation/samples.json", report["samples"])
    run.log_text("evaluation/report.html", page)
    if not gate["publish"]:
        run.end("FINISHED")
    else:
        run.finish_stage()


def _training_log(ctx: StageContext, training: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return ctx.store.get_json(ctx.store.key_of(training["log"]))
    except (KeyError, NotFound):
        return []


def build_report(
    table: Any,
    base: tuple[scoring.RowScores, list[str]],
    tuned: tuple[scoring.RowScores, list[str]],
    *,
    spec: JobSpec,
    training_log: list[dict[str, Any]],
    dataset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report: metrics, deltas with intervals, the gate, samples, curves, and
    what the data said about itself (``dataset``: the data-prep manifest)."""
    evaluation, rule = spec.evaluation, spec.evaluation.gate
    prompts, refs = table.column("prompt").to_pylist(), table.column("target").to_pylist()
    clusters = [scoring.prompt_key(p) for p in prompts]
    base_m, tuned_m = scoring.aggregate(base[0]), scoring.aggregate(tuned[0])
    intervals = scoring.paired_bootstrap(
        base[0],
        tuned[0],
        clusters=clusters,
        samples=evaluation.bootstrap_samples,
        seed=evaluation.seed,
    )
    distinct = len(set(clusters))
    rules = scoring.gate(base_m, tuned_m, intervals, rule=rule, prompts=distinct)
    passed = all(r["passed"] for r in rules)
    metrics_table = {
        name: {
            "base": base_m[name],
            "tuned": tuned_m[name],
            "delta": tuned_m[name] - base_m[name],
            "ci95": list(intervals[name]),
            "lower_is_better": lower,
        }
        for name, lower in scoring.METRICS.items()
    }
    split_rows = (dataset or {}).get("counts", {}).get("test", table.num_rows)
    cut = (
        table.column("prompt_cut").to_pylist()
        if "prompt_cut" in table.column_names
        else [False] * table.num_rows
    )
    return {
        "rows": table.num_rows,
        "capped_at": evaluation.max_rows,
        "split_rows": split_rows,
        "bootstrap": {
            "unit": scoring.BOOTSTRAP_UNIT,
            "prompts": distinct,
            "samples": evaluation.bootstrap_samples,
        },
        "prompts_cut": sum(cut),
        "metrics": metrics_table,
        "metric_order": list(scoring.METRICS),
        "base": base_m,
        "tuned": tuned_m,
        "delta": {k: v["delta"] for k, v in metrics_table.items()},
        "gate": {
            "passed": passed,
            "reasons": [r["detail"] for r in rules if not r["passed"]],
            "rules": rules,
            "forced": rule.force_publish and not passed,
            "publish": passed or rule.force_publish,
            "rule": rule.model_dump(),
        },
        "sacrebleu": scoring.sacrebleu_signatures(base[0]),
        "decoding": spec.decoding.model_dump(),
        "sampling": sampling(spec),
        "samples": [
            {
                "prompt": prompts[i],
                "reference": refs[i],
                "base": base[1][i],
                "tuned": tuned[1][i],
                "prompt_cut": cut[i],
            }
            for i in range(min(SAMPLE_ROWS, len(prompts)))
        ],
        "curves": {
            "train_loss": [[e["step"], e["loss"]] for e in training_log if "loss" in e],
            "validation_loss": [
                [e["step"], e["eval_loss"]] for e in training_log if "eval_loss" in e
            ],
        },
        "data": data_section(dataset or {}),
        "versions": versions(),
    }


def sampling(spec: JobSpec) -> dict[str, Any] | None:
    """How sampled answers were seeded (None: greedy or beam decoding): each row from
    evaluation.seed and its place in the table, whatever the batches; beam sampling, each
    batch from its first row."""
    if spec.decoding.temperature == 0:
        return None
    return {"seed": spec.evaluation.seed, "per": "row" if spec.decoding.num_beams == 1 else "batch"}


def data_section(dataset: dict[str, Any]) -> dict[str, Any]:
    """The data-prep manifest's account of the data: per side (``tokens``) the kept length and
    how it was chosen, p50/p99 before the cut, shares of rows cut and of unknown tokens; rows
    dropped by each cleaning rule, bad rows skipped, the sample and the warnings."""
    return {
        "counts": dataset.get("counts", {}),
        "rows_read": dataset.get("rows_read"),
        "sample": dataset.get("sample"),
        "tokens": dataset.get("lengths", {}),
        "unknown_tokens": dataset.get("unknown_tokens"),
        "dropped": dropped_rows(dataset.get("cleaning", {})),
        "bad_rows_skipped": dataset.get("bad_rows_skipped", 0),
        "cast_to_string": dataset.get("cast_to_string", []),
        "warnings": dataset.get("warnings", []),
    }
