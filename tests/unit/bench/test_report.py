"""``make bench --only``'s page: the sections run replaced, the others kept and dated, all in
the benchmarks' order."""

from __future__ import annotations

import pytest

from bench import report
from bench.report import BENCHES, merge, run


def test_a_partial_run_keeps_the_other_sections_dated_and_in_order():
    first, second = (f"## {b[3]}" for b in BENCHES[:2])
    old = "\n".join([
        "# Benchmarks", "- Machine: AMD EPYC, 2 cores, no GPU", "- Date: 2026-12-01 10:00 UTC", "",
        first, "", "old 1", "```",
    ])  # fmt: skip
    new = ["# Benchmarks", "- Machine: Intel Xeon, 2 cores, no GPU",
           "- Date: 2026-12-04 17:00 UTC", "", second, "", "new 2", ""]  # fmt: skip
    page = merge(old, new)
    assert page == [
        "# Benchmarks", "- Machine: Intel Xeon, 2 cores, no GPU", "- Date: 2026-12-04 17:00 UTC",
        "", first, "",
        "(from an earlier run: 2026-12-01 10:00 UTC, on AMD EPYC, 2 cores, no GPU)",
        "", "old 1", "```", "",
        second, "", "new 2", "",
    ]  # fmt: skip
    assert merge("\n".join(page), ["# Benchmarks", "", first, "", "new 1", ""])[2:5] == [
        first, "", "new 1",
    ]  # fmt: skip


def test_a_benchmark_that_fails_or_outlives_its_limit_is_reported_with_its_error(
    tmp_path, monkeypatch
):
    (tmp_path / "failing.py").write_text("print('half a figure')\nraise ValueError('bad row 7')\n")
    (tmp_path / "hanging.py").write_text("import time\nprint('started', flush=True)\n"
                                         "time.sleep(600)\n")  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    output, _, ok = run("failing", [], limit=60)
    assert not ok
    assert output.splitlines()[:2] == ["half a figure", "FAILED (exit 1):"]
    assert output.splitlines()[-1] == "ValueError: bad row 7"
    output, seconds, ok = run("hanging", [], limit=2)
    assert not ok and seconds < 30  # killed by the timer, though it printed nothing more
    assert output.splitlines()[:2] == ["started", "FAILED (killed at its limit of 2 s):"]


def test_make_bench_exits_1_naming_what_failed_and_still_writes_the_page(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("TERMTUNE_BENCH_SIZE", raising=False)
    outcomes = {"bench.training": ("fine", 1.0, True), "bench.packing": ("FAILED", 2.0, False)}
    monkeypatch.setattr(report, "run", lambda module, args, limit: outcomes[module])
    monkeypatch.setattr(report, "recorded_gpu", lambda path: [])
    page = tmp_path / "page.md"
    argv = ["report", "--out", str(page), "--only", "bench.training", "bench.packing"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match=r"failed or stopped at their limit: bench.packing \("):
        report.main()
    text = page.read_text()
    assert "`python -m bench.training` (1 s):" in text
    assert "`python -m bench.packing` (stopped or failed after 2 s):" in text


def test_the_smoke_size_runs_every_benchmark_small_and_writes_under_var(monkeypatch):
    monkeypatch.setenv("TERMTUNE_BENCH_SIZE", "smoke")
    planned = report.planned(report.bench_size(), None)
    assert [b[0] for b in planned] == [b[0] for b in BENCHES]  # GPU: the recorded figures
    assert all(args == report.SMOKE[module] for module, args, *_ in planned)
    monkeypatch.setenv("TERMTUNE_BENCH_SIZE", "huge")
    with pytest.raises(SystemExit, match="TERMTUNE_BENCH_SIZE='huge': expected one of full, smoke"):
        report.bench_size()


def test_only_with_a_name_no_benchmark_has_stops_before_the_page_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("TERMTUNE_BENCH_SIZE", raising=False)
    monkeypatch.setattr(report, "run", lambda *a: pytest.fail("nothing may run"))
    page = tmp_path / "page.md"
    # one comma-joined name, as a shell user may type it: no benchmark is called that
    argv = ["report", "--out", str(page), "--only", "bench.export,bench.ledger"]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(
        SystemExit,
        match=r"--only bench.export,bench.ledger: no such benchmark \(known: bench.training, ",
    ):
        report.main()
    assert not page.exists()
    assert [b[0] for b in report.planned("full", ["bench.ledger"])] == ["bench.ledger"]
