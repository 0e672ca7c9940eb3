"""Evaluator: base vs tuned on the held-out split, a report, and the quality gate."""

from __future__ import annotations

from typing import Any

import torch

from services.evaluator import metrics
from shared.artifacts import adapter_dir, read_split
from shared.errors import ModelError
from shared.messages import EvaluateModel, ModelEvaluated
from shared.modeling import device, load_seq2seq, load_tokenizer, versions
from shared.worker import StageContext

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
    )


def _evaluate(command: EvaluateModel, ctx: StageContext) -> dict[str, Any]:
    from peft import PeftModel

    spec = ctx.spec(command)
    evaluation = spec.evaluation
    table = read_split(
        ctx.store,
        ctx.manifest_at(command.dataset_manifest),
        "test",
        cache_dir=ctx.settings.cache_dir,
        max_rows=evaluation.max_rows,
    )
    adapter = adapter_dir(
        ctx.store, ctx.manifest_at(command.training_manifest), cache_dir=ctx.settings.cache_dir
    )
    tokenizer = load_tokenizer(spec.base_model)
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    model = load_seq2seq(spec.base_model, dtype=dtype).to(device())
    ctx.progress({"phase": "evaluating base model", "rows": table.num_rows}, force=True)
    base = metrics.evaluate(model, tokenizer, table, spec=evaluation)
    try:
        tuned_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"the adapter at {adapter} does not fit {spec.base_model}: {exc}") from exc
    ctx.progress({"phase": "evaluating tuned model", "rows": table.num_rows}, force=True)
    tuned = metrics.evaluate(tuned_model, tokenizer, table, spec=evaluation)
    passed, reasons = metrics.gate(
        base,
        tuned,
        min_rouge_l_gain=evaluation.gate.min_rouge_l_gain,
        require_lower_loss=evaluation.gate.require_lower_loss,
    )
    report = _report(table, base, tuned, passed=passed, reasons=reasons, spec=spec)
    ctx.jobs.write_manifest(command.job_id, "evaluate", report)
    return report


def _report(
    table: Any,
    base: dict[str, Any],
    tuned: dict[str, Any],
    *,
    passed: bool,
    reasons: list[str],
    spec: Any,
) -> dict[str, Any]:
    prompts, refs = table.column("prompt").to_pylist(), table.column("target").to_pylist()
    samples = [
        {
            "prompt": prompts[i],
            "reference": refs[i],
            "base": base["predictions"][i],
            "tuned": tuned["predictions"][i],
        }
        for i in range(min(SAMPLE_ROWS, len(prompts)))
    ]
    strip = lambda m: {k: v for k, v in m.items() if k != "predictions"}  # noqa: E731
    base_m, tuned_m = strip(base), strip(tuned)
    force = spec.evaluation.gate.force_publish
    return {
        "rows": table.num_rows,
        "capped_at": spec.evaluation.max_rows,
        "base": base_m,
        "tuned": tuned_m,
        "delta": {k: round(tuned_m[k] - base_m[k], 5) for k in base_m},
        "gate": {
            "passed": passed,
            "reasons": reasons,
            "forced": force and not passed,
            "publish": passed or force,
            "rule": spec.evaluation.gate.model_dump(),
        },
        "generation": spec.evaluation.model_dump(exclude={"gate"}),
        "samples": samples,
        "versions": versions(),
    }
