"""The model card (README.md, Hugging Face convention) shipped beside the weights.

Written only from the job's manifests, with no timestamps, so the same job exports the same
bytes (the artifact digest, and with it the import's idempotency token, stays stable).
"""

from __future__ import annotations

from typing import Any

import yaml

from shared.jobspec import JobSpec


def model_card(
    spec: JobSpec,
    dataset: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    merge_gap: float,
    tolerance: float,
) -> str:
    """Markdown with YAML front matter: what the model is, how it was made, how it scored."""
    front = {
        "base_model": spec.base_model,
        "library_name": "transformers",
        "pipeline_tag": "text2text-generation",
        "tags": ["termtune", "lora-merged", "t5"],
        "language": ["en"],
    }
    t = spec.training
    counts = dataset.get("counts", {})
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=True).strip(),
        "---",
        "",
        f"# {spec.model_name}",
        "",
        f"`{spec.base_model}` taught the terms of a domain by termtune: LoRA trained on "
        f"question/definition pairs, then merged into the base weights "
        f"({spec.publish.dtype}).",
        "",
        "## Intended use and limits",
        "",
        f'Answers questions of the form "{spec.dataset.prompt_template.strip()}" with a short, '
        "plain-language definition, to help people read domain text. It can be wrong, "
        "incomplete or out of date, and it states errors as confidently as facts.",
        "",
        "**Not medical advice.** Do not use it to diagnose, treat or make decisions about "
        "anyone's health; ask a qualified professional.",
        "",
        "## Data",
        "",
        f"- Source: `{spec.dataset.source}`",
        f"- Rows: train {counts.get('train', 0)}, validation {counts.get('validation', 0)}, "
        f"test {counts.get('test', 0)} (split by distinct term, seed {spec.dataset.seed})",
        f"- Target tokens (train): {_tokens(dataset)}",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(
            f"| {k} | {v} |"
            for k, v in {
                "LoRA r / alpha / dropout": f"{t.lora.r} / {t.lora.alpha} / {t.lora.dropout}",
                "LoRA targets": t.lora.target_modules,
                "quantization / precision": f"{training['plan']['quantization']} / "
                f"{training['plan']['precision']}",
                "learning rate / schedule": f"{t.learning_rate} / {t.lr_scheduler}",
                "batch size x accumulation x processes": f"{t.batch_size} x "
                f"{t.gradient_accumulation_steps} x {training.get('processes', 1)}",
                "optimizer steps": training["steps"],
                "final training loss": f"{training['train_loss']:.4f}",
            }.items()
        ),
        "",
        "## Evaluation (held-out test split, base vs tuned)",
        "",
        *_evaluation(evaluation),
        "",
        f"Merge check: the merged weights match base+adapter within {merge_gap:.2e} in logits "
        f"(tolerance {tolerance:.0e}).",
        "",
    ]
    return "\n".join(lines)


def _tokens(dataset: dict[str, Any]) -> str:
    stats = dataset.get("tokens", {}).get("train", {}).get("target", {})
    if not stats:
        return "n/a"
    return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int | float))


def _evaluation(report: dict[str, Any]) -> list[str]:
    rows = ["| metric | base | tuned | delta | 95% CI |", "|---|---|---|---|---|"]
    for name in report.get("metric_order", report.get("metrics", {})):
        m = report["metrics"][name]
        low, high = m["ci95"]
        rows.append(
            f"| {name} | {m['base']:.4f} | {m['tuned']:.4f} | {m['delta']:+.4f} | "
            f"[{low:+.4f}, {high:+.4f}] |"
        )
    gate = report.get("gate", {})
    verdict = "passed" if gate.get("passed") else "failed: " + "; ".join(gate.get("reasons", []))
    forced = " Publishing was forced (evaluation.gate.force_publish)." if gate.get("forced") else ""
    rows += ["", f"{report.get('rows', '?')} test rows; quality gate {verdict}.{forced}"]
    rows += [f"- {'pass' if r['passed'] else 'FAIL'}: {r['detail']}" for r in gate.get("rules", [])]
    if report.get("decoding"):
        settings = ", ".join(f"{k} {v}" for k, v in report["decoding"].items())
        rows += [
            "",
            f"Answers were generated as the model is served (generation_config.json): {settings}.",
        ]
    return rows
