"""Documents generated from the job spec's own model: the README's reference table and the
JSON Schema for editors and CI linters (`make docs` rewrites both; tests keep them equal)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shared.jobspec import JobSpec, reference_table

START = "<!-- spec-reference:start (make docs) -->"
END = "<!-- spec-reference:end -->"
SCHEMA_FILE = Path("docs/job-spec.schema.json")
SCHEMA_ID = "https://termtune.dev/schemas/job-spec.schema.json"


def rendered(readme: str) -> str:
    """The README with its spec-reference block regenerated."""
    block = "\n".join([START, *reference_table(), END])
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


def json_schema() -> dict[str, Any]:
    """The job spec's JSON Schema (draft 2020-12, what pydantic writes), every field with its
    description, default and bounds; the API validates the same model."""
    schema = JobSpec.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "termtune job spec",
    }


def schema_text() -> str:
    """The schema as `termtune schema` prints it and docs/ keeps it."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def update_readme(path: Path = Path("README.md")) -> None:
    """Rewrite the README's spec-reference block in place."""
    path.write_text(rendered(path.read_text()))


def update_docs() -> None:
    """The README's table and docs/job-spec.schema.json, from the spec's model."""
    update_readme()
    SCHEMA_FILE.write_text(schema_text(), encoding="utf-8")
