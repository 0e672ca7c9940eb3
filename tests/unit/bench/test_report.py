"""``make bench --only``'s page: the sections run replaced, the others kept and dated, all in
the benchmarks' order."""

from __future__ import annotations

from bench.report import BENCHES, merge


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
