"""The model card (README.md, Hugging Face convention) shipped beside the weights.

Written only from the job's manifests, with no timestamps, so the same job exports the same
bytes (the artifact digest, and with it the import's idempotency token, stays stable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shared.jobspec import JobSpec
from shared.locations import is_hub_id

BASE_TAGS = ("termtune", "lora-merged")  # then the model family (t5, llama, ...)


def model_card(
    spec: JobSpec,
    dataset: dict[str, Any],
    training: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    merge_check: str,
    model_type: str = "t5",
) -> str:
    """Markdown with YAML front matter: what the model is, how it was made, how it scored."""
    t, plan = spec.training, training["plan"]
    counts = dataset.get("counts", {})
    lines = [
        "---",
        yaml.safe_dump(front_matter(spec, evaluation, model_type), sort_keys=True).strip(),
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
        "plain-language definition, to help people read domain text.",
        "",
        f"**Notice.** {spec.publish.card.notice}",
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
                "quantization / precision": f"{plan['quantization']} / {plan['precision']}",
                "learning rate / schedule": f"{t.learning_rate} / {t.lr_scheduler}"
                + _loraplus(t.lora.loraplus_lr_ratio),
                "batch size x accumulation x processes": f"{plan.get('batch_size', '?')} x "
                f"{plan.get('gradient_accumulation_steps', '?')} x {training.get('processes', 1)}",
                "recipe / optimizer / attention": f"{t.recipe} / {plan.get('optimizer')} / "
                f"{plan.get('attention')}",
                "optimizer steps": training["steps"],
                "final training loss": f"{training['train_loss']:.4f}",
            }.items()
        ),
        "",
        "## Evaluation (held-out test split, base vs tuned)",
        "",
        *_evaluation(evaluation),
        "",
        f"Merge check: {merge_check}.",
        "",
    ]
    return "\n".join(lines)


def front_matter(
    spec: JobSpec, evaluation: dict[str, Any], model_type: str = "t5"
) -> dict[str, Any]:
    """Hugging Face's model card metadata: the base model, the dataset when it is a hub id,
    the card's license, languages and tags, and the tuned model's held-out scores as a
    ``model-index`` (self-reported: ``verified: false``)."""
    card = spec.publish.card
    source = spec.dataset.source
    hub_dataset = is_hub_id(source)
    front: dict[str, Any] = {
        "base_model": spec.base_model,
        "library_name": "transformers",
        "pipeline_tag": "text2text-generation" if model_type == "t5" else "text-generation",
        "tags": [
            "termtune",
            "lora-merged",
            model_type,
            *(t for t in card.tags if t not in (*BASE_TAGS, model_type)),
        ],
        "language": list(card.language),
    }
    if hub_dataset:
        front["datasets"] = [source]
    if card.license:
        front["license"] = card.license
    metrics = [
        {
            "type": name,
            "name": f"{name} (tuned; base {m['base']:.4f})",
            "value": round(float(m["tuned"]), 4),
            "verified": False,
        }
        for name in evaluation.get("metric_order", evaluation.get("metrics", {}))
        if (m := evaluation["metrics"][name]) and m.get("tuned") is not None
    ]
    if metrics:
        data = {"type": source if hub_dataset else "custom", "name": Path(source).name or source}
        front["model-index"] = [
            {
                "name": spec.model_name,
                "results": [
                    {
                        "task": {"type": "text2text-generation", "name": "Term definition"},
                        "dataset": {**data, "split": "test"},
                        "metrics": metrics,
                    }
                ],
            }
        ]
    return front


def _loraplus(ratio: float) -> str:
    return "" if ratio == 1 else f" (LoRA+: the B matrices at {ratio:g}x)"


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
