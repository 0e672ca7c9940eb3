"""From row batches to tokenized splits: templates, cleaning rules, a grouped seeded split.

Rows are cleaned, templated and tokenized in full batch by batch and staged in a temporary
Parquet file with a key per prompt; the split is then decided over the distinct prompt keys
(so a prompt, with all its answers, lands in one split), the kept lengths are resolved from
the full ones (``auto``: their p99) and the staged rows are cut and routed to the split
shards. Memory holds one batch plus 24 bytes per row for the keys and lengths (and a random
``max_rows`` sample's rows).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from services.dataprep.sources import Batch
from shared.errors import DatasetError
from shared.jobspec import DatasetSpec, template_fields
from shared.prompting import Prompting

STAGED_SCHEMA = pa.schema(
    [
        ("key", pa.binary(16)),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
    ]
)
SHARD_SCHEMA = pa.schema([f for f in STAGED_SCHEMA if f.name != "key"])
CITATION = re.compile(r"\[(?:\d+(?:[,–-]\s*\d+)*|citation needed|note \d+|[a-z])\]")
# A heading line "See also", "References", ... (optionally "== x ==") and all that follows it.
TRAILING_SECTIONS = re.compile(
    r"(?:^|\n)[ \t]*(?:=+[ \t]*)?(?:See also|References|External links|Further reading|Notes)"
    r"[ \t]*(?:=+)?[ \t]*(?:\n.*)?$",
    re.S,
)


@dataclass
class Cleaner:
    """Normalises text and counts, per rule, the rows each rule touched or dropped."""

    spec: DatasetSpec
    counts: Counter = field(default_factory=Counter)

    def text(self, value: Any) -> tuple[str, set[str]]:
        """A field's cleaned text and the rules that changed it."""
        raw = "" if value is None else str(value)
        touched = set()
        text = unicodedata.normalize("NFC", raw)
        if text != raw:
            touched.add("unicode_nfc")
        if self.spec.strip_wiki_artifacts:
            stripped = TRAILING_SECTIONS.sub("", CITATION.sub("", text))
            if stripped != text:
                touched.add("wiki_artifacts")
            text = stripped
        collapsed = " ".join(text.split())
        if collapsed != text:
            touched.add("whitespace")
        return collapsed, touched

    def row(self, values: dict[str, Any]) -> tuple[str, str] | None:
        """The (prompt, target) of a row, or None when a rule drops it."""
        cleaned, touched = {}, set()
        for name, value in values.items():
            cleaned[name], rules = self.text(value)
            touched |= rules
        self.counts.update(touched)
        if not all(cleaned.values()):
            self.counts["dropped_empty_field"] += 1
            return None
        prompt = self.spec.prompt_template.format(**cleaned)
        target = self.spec.target_template.format(**cleaned)
        if len(prompt) < self.spec.min_prompt_chars or len(target) < self.spec.min_target_chars:
            self.counts["dropped_too_short"] += 1
            return None
        return prompt, target


def prompt_key(prompt: str) -> bytes:
    """The grouping key of a prompt: the same question in any case is one group."""
    return hashlib.blake2b(prompt.casefold().encode(), digest_size=16).digest()


def check_columns(columns: list[str], spec: DatasetSpec, *, shown: str) -> list[str]:
    """The template fields; DatasetError listing the columns found if one is missing."""
    needed = list(
        dict.fromkeys(template_fields(spec.prompt_template) + template_fields(spec.target_template))
    )
    missing = [name for name in needed if name not in columns]
    if missing:
        raise DatasetError(
            f"dataset.prompt_template/target_template: {shown} has no column "
            f"{', '.join(repr(m) for m in missing)}; columns found: {', '.join(columns)}"
        )
    return needed


def checked(batches: Iterator[Batch], spec: DatasetSpec, *, shown: str) -> Iterator[Batch]:
    """The batches, once the first has shown that the template columns exist."""
    needed = None
    for batch in batches:
        needed = needed or check_columns(list(batch), spec, shown=shown)
        yield batch


@dataclass
class Staged:
    """What staging wrote: the staged file, row counts, the cleaning report and every
    row's full token lengths."""

    path: Path
    rows_read: int = 0
    rows_kept: int = 0
    cleaning: Counter = field(default_factory=Counter)
    lengths: dict[str, array] = field(
        default_factory=lambda: {"source": array("I"), "target": array("I")}
    )


def stage(
    batches: Iterator[Batch],
    spec: DatasetSpec,
    tokenizer: Any,
    prompting: Prompting,
    *,
    path: Path,
    shown: str,
    progress: Any,
) -> Staged:
    """Clean, template, dedupe and tokenize (in full) every batch into one staged file."""
    cleaner, seen = Cleaner(spec), set()
    staged = Staged(path=path, cleaning=cleaner.counts)
    needed = spec.template_columns
    with pq.ParquetWriter(path, STAGED_SCHEMA) as writer:
        for batch in batches:
            n = len(next(iter(batch.values()), []))
            pairs = []
            for i in range(n):
                pair = cleaner.row({name: batch.get(name, [None] * n)[i] for name in needed})
                if pair is not None:
                    digest = hashlib.blake2b("\0".join(pair).encode(), digest_size=16).digest()
                    if digest in seen:
                        cleaner.counts["dropped_duplicate"] += 1
                        continue
                    seen.add(digest)
                    pairs.append(pair)
            staged.rows_read += n
            if pairs:
                table = _tokenized(pairs, tokenizer, prompting)
                for side, column in (("source", "input_ids"), ("target", "labels")):
                    staged.lengths[side].extend(pc.list_value_length(table[column]).to_pylist())
                writer.write_table(table)
                staged.rows_kept += len(pairs)
            progress({"phase": "reading", "rows_read": staged.rows_read})
    if staged.rows_kept < 2:
        raise DatasetError(
            f"dataset.source: {shown} has {staged.rows_kept} usable rows after "
            f"cleaning (of {staged.rows_read} read; {dict(cleaner.counts)}); "
            "at least 2 are needed"
        )
    return staged


def _tokenized(pairs: list[tuple[str, str]], tokenizer: Any, prompting: Prompting) -> pa.Table:
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    # in full (verbose=False: no warning for rows longer than the model's maximum)
    return pa.table(
        {
            "key": [prompt_key(p) for p in prompts],
            "prompt": prompts,
            "target": targets,
            "input_ids": prompting.prompts(tokenizer, prompts),
            "labels": prompting.targets(tokenizer, targets),
        },
        schema=STAGED_SCHEMA,
    )


def assign_splits(
    keys: list[bytes], *, test_size: float, validation_size: float, seed: int
) -> dict[bytes, str]:
    """Split name of each distinct prompt key: a seeded permutation cut at exact sizes."""
    distinct = sorted(
        set(keys),
        key=lambda k: hashlib.blake2b(k, key=str(seed).encode()[:64], digest_size=16).digest(),
    )
    n_test = max(1, round(len(distinct) * test_size))
    n_val = max(1, round(len(distinct) * validation_size)) if validation_size else 0
    if n_test + n_val >= len(distinct):
        raise DatasetError(
            f"dataset: {len(distinct)} distinct prompts cannot fill test ({n_test}), validation "
            f"({n_val}) and a train split; add rows or lower test_size/validation_size"
        )
    names = ["test"] * n_test + ["validation"] * n_val
    names += ["train"] * (len(distinct) - len(names))
    return dict(zip(distinct, names, strict=True))
