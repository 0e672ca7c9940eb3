"""Keeping the README's job-spec reference equal to the spec's own descriptions."""

from __future__ import annotations

import re
from pathlib import Path

from shared.jobspec import reference_table

START = "<!-- spec-reference:start (make docs) -->"
END = "<!-- spec-reference:end -->"


def rendered(readme: str) -> str:
    """The README with its spec-reference block regenerated."""
    block = "\n".join([START, *reference_table(), END])
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


def update_readme(path: Path = Path("README.md")) -> None:
    """Rewrite the README's spec-reference block in place."""
    path.write_text(rendered(path.read_text()))
