"""The README's make targets that CI does not run itself, as the README gives them.

`TERMTUNE_BENCH_SIZE=smoke make bench`: every benchmark runs through the code it measures and
prints its summary. The figures are not read (a smoke run's mean nothing); what fails here is
a benchmark that no longer runs. `make docs`: the generated documents rewritten from the spec.
`make test-unit`, `make test-e2e`, `make reliability`: each collects its folder's every test
(``PYTEST_ADDOPTS=--collect-only``: running them is `make test`'s job, and the full-size
scenarios take an hour). `make format`: a messy file comes back fixed and formatted. And
every make target the README names is run as written by one of these, by CI's script or
by a test that names it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from bench.report import BENCHES, GPU, SMOKE
from tests.factories import ROOT, linked_checkout

pytestmark = pytest.mark.e2e
LINKED = (".venv", "Makefile", "pyproject.toml", "deploy", "bench", "data", "examples",
          "services", "shared", "tests")  # fmt: skip
#: the environments `make test-unit` and `make test-e2e` check are installed (`make compat`,
#: `make tracking-server`)
VENVS = (".venv-cmi", ".venv-cmi-gpt-oss", ".venv-mlflow")
#: each benchmark's last summary line, or the line its figures end on
SUMMARIES = {
    "bench.training": "x the notebook's examples/s (goal >= 6x)",
    "bench.packing": "x the examples/s of padded, length-grouped (goal >= ",
    "bench.kernels": "% with gradient checkpointing)",
    "bench.validation": "| auto (the default) |",
    "bench.dataprep": "peak RSS, 4x dataset",
    "bench.pipeline": "examples/s for the trainer alone",
    "bench.export": "x the copy's rate)",
    "bench.inference": "with batching:",
    "bench.ledger": "slowest read p95",
}


def _sections(page: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in page.split("\n## ")[1:]}


def _digest(folder: Path) -> str:
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())
    ).hexdigest()


@pytest.mark.timeout(1800)
def test_make_bench_runs_every_benchmark_at_the_smoke_size(tmp_path):
    command = "TERMTUNE_BENCH_SIZE=smoke make bench"
    assert f"`{command}`" in (ROOT / "README.md").read_text(encoding="utf-8")
    work = linked_checkout(tmp_path / "termtune", LINKED, copied=("docs",))
    docs = _digest(work / "docs")
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=work,
        env={k: v for k, v in os.environ.items() if k != "TERMTUNE_BENCH_SIZE"},
        capture_output=True,
        text=True,
        timeout=1700,
    )
    print(done.stdout[-20000:], done.stderr[-5000:])
    assert done.returncode == 0, done.stderr[-3000:]
    page = (work / "var" / "bench-smoke.md").read_text()
    assert "No figure here means anything" in page.split("\n## ", 1)[0]
    sections = _sections(page)
    assert [title for title in sections] == [b[3] for b in (*BENCHES, GPU)]
    for module, _, _, title, _ in BENCHES:
        body = sections[title]
        status = re.search(rf"`python -m {re.escape(module)} (.*?)` \((\d+) s\):", body)
        assert status, f"{module} did not finish:\n{body[-2000:]}"
        assert status.group(1) == " ".join(SMOKE[module])
        assert SUMMARIES[module] in body, f"{module} printed no summary:\n{body[-2000:]}"
    assert "Not measured on this machine: recorded by" in sections[GPU[3]]  # the record
    assert "| mode | batch | tokens/s |" in sections[GPU[3]]
    assert _digest(work / "docs") == docs, "a smoke run wrote to docs/"


def test_every_benchmark_has_a_smoke_size():
    assert set(SMOKE) == {b[0] for b in BENCHES} == set(SUMMARIES)


def test_make_docs_regenerates_the_spec_reference_and_the_schema(tmp_path):
    assert "`make docs`" in (ROOT / "README.md").read_text(encoding="utf-8")
    work = linked_checkout(tmp_path / "termtune", LINKED, copied=("docs",))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- spec-reference:start (make docs) -->", "<!-- spec-reference:end -->"
    before, rest = readme.split(start)
    stale = before + start + "\n| `name` | stale |\n" + end + rest.split(end, 1)[1]
    (work / "README.md").write_text(stale, encoding="utf-8")
    (work / "docs" / "job-spec.schema.json").write_text("{}\n")
    done = subprocess.run(["bash", "-c", "make docs"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "README.md").read_text(encoding="utf-8") == readme
    schema = (work / "docs" / "job-spec.schema.json").read_text()
    assert schema == (ROOT / "docs" / "job-spec.schema.json").read_text()


@pytest.mark.parametrize(
    ("command", "folder"),
    [
        ("make test-unit", "tests/unit"),
        ("make test-e2e", "tests/e2e"),
        ("make reliability", "tests/reliability"),
    ],
)
def test_a_test_target_collects_every_test_of_its_folder(tmp_path, command, folder):
    assert f"`{command}`" in (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [v for v in VENVS if not (ROOT / v / ".installed").exists()]
    assert not missing, f"{missing} not installed: run `make compat tracking-server`"
    # README.md: tests read it (test_settings.py at import), as in a fresh checkout
    work = linked_checkout(tmp_path / "termtune", LINKED + VENVS, copied=("docs", "README.md"))
    docs = _digest(work / "docs")
    environment = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=work,
        env={**environment, "PYTEST_ADDOPTS": "--collect-only -q"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # node ids, or "path: count" lines under the target's own -q
    collected = re.findall(r"^(tests/\S+?\.py)(?:::|: \d+$)", done.stdout, re.MULTILINE)
    files = {str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("test_*.py")}
    assert set(collected) == files
    assert _digest(work / "docs") == docs, f"{command} wrote to docs/ without running a test"


def test_make_format_fixes_and_formats_a_messy_file(tmp_path):
    assert "`make format`" in (ROOT / "README.md").read_text(encoding="utf-8")
    work = linked_checkout(tmp_path / "termtune", (".venv", "Makefile", "pyproject.toml", "deploy"))
    messy = work / "scratch" / "messy.py"
    messy.parent.mkdir()
    messy.write_text("import sys, os\nfrom pathlib import Path\ndef f( x ):\n"
                     "    return Path(x) if x else  None\n")  # fmt: skip
    done = subprocess.run(["bash", "-c", "make format"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        messy.read_text()
        == "from pathlib import Path\n\n\ndef f(x):\n    return Path(x) if x else None\n"
    )


def test_every_make_target_the_readme_names_is_run_as_written():
    """By CI's script (a line of its own) or by a test that gives the command as a string
    (`make bench` at full size, an hour of benchmarks, only as its smoke size)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(?:[A-Z_]+=\S+ )?make ([a-z][a-z0-9-]*)", readme))
    ci = (ROOT / ".ci" / "run").read_text()
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    by_ci = {t for t in named if re.search(rf"^\s*(?:if )?make {t}(?:;|$)", ci, re.MULTILINE)}
    by_tests = {t for t in named if re.search(rf"[\"'](?:[A-Z_]+=\S+ )?make {t}[\"']", tests)}
    assert named - by_ci - by_tests == set()
