"""From rows to tokenized train/test splits: templates, cleaning, a grouped split."""

from __future__ import annotations

import random
import statistics
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from shared.errors import DatasetError
from shared.jobspec import DatasetSpec, template_fields


@dataclass
class Examples:
    """Prompt/target pairs and what cleaning did to get them."""

    prompts: list[str]
    targets: list[str]
    dropped: dict[str, int] = field(default_factory=dict)


def _clean(text: Any) -> str:
    return " ".join(unicodedata.normalize("NFC", str(text)).split()) if text is not None else ""


def render(table: pa.Table, spec: DatasetSpec, *, shown: str) -> Examples:
    """Apply the prompt and target templates; drop empty rows and exact duplicates."""
    needed = template_fields(spec.prompt_template) + template_fields(spec.target_template)
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise DatasetError(
            f"dataset.prompt_template/target_template: {shown} has no column "
            f"{', '.join(repr(m) for m in missing)}; columns found: {', '.join(table.column_names)}"
        )
    columns = {name: table.column(name).to_pylist() for name in set(needed)}
    rows = table.num_rows if spec.max_rows is None else min(spec.max_rows, table.num_rows)
    out = Examples([], [], {"empty_field": 0, "duplicate": 0})
    seen: set[tuple[str, str]] = set()
    for i in range(rows):
        values = {name: _clean(columns[name][i]) for name in columns}
        if not all(values.values()):
            out.dropped["empty_field"] += 1
            continue
        pair = (spec.prompt_template.format(**values), spec.target_template.format(**values))
        if pair in seen:
            out.dropped["duplicate"] += 1
            continue
        seen.add(pair)
        out.prompts.append(pair[0])
        out.targets.append(pair[1])
    if len(out.prompts) < 2:
        raise DatasetError(
            f"dataset.source: {shown} has {len(out.prompts)} usable rows after "
            f"cleaning (dropped: {out.dropped}); at least 2 are needed"
        )
    return out


def split(
    examples: Examples, *, test_size: float, seed: int, validation_size: float = 0.0
) -> dict[str, list[int]]:
    """Row indices of train, test (and validation), grouped by prompt: no prompt in two."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(examples.prompts):
        groups.setdefault(prompt.casefold(), []).append(i)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(len(keys) * test_size))
    n_val = round(len(keys) * validation_size) if validation_size else 0
    if validation_size and n_val == 0:
        n_val = 1
    if n_test + n_val >= len(keys):
        raise DatasetError(
            f"dataset: {len(keys)} distinct prompts cannot fill test ({n_test}), validation "
            f"({n_val}) and a train split; add rows or lower test_size/validation_size"
        )
    parts = {
        "test": keys[:n_test],
        "validation": keys[n_test : n_test + n_val],
        "train": keys[n_test + n_val :],
    }
    out = {name: sorted(i for k in part for i in groups[k]) for name, part in parts.items()}
    return out if n_val else {"train": out["train"], "test": out["test"]}


def tokenize(
    tokenizer: Any, prompts: list[str], targets: list[str], *, spec: DatasetSpec
) -> dict[str, list[list[int]]]:
    """Token ids of prompts and targets, truncated, not padded."""
    sources = tokenizer(prompts, max_length=spec.max_source_length, truncation=True)
    labels = tokenizer(text_target=targets, max_length=spec.max_target_length, truncation=True)
    return {"input_ids": sources["input_ids"], "labels": labels["input_ids"]}


def length_stats(lengths: list[int], limit: int) -> dict[str, float]:
    """Percentiles of token lengths and the share of rows cut at the limit."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "min": ordered[0],
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 2),
        "truncated_share": round(sum(n >= limit for n in ordered) / len(ordered), 4),
        "total": sum(ordered),
    }
