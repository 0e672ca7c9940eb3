"""The evaluation report as one self-contained HTML page (inline CSS and SVG, no scripts)."""

from __future__ import annotations

from html import escape
from typing import Any

from shared.api_models import report_cap
from shared.jobspec import DEFAULT_NOTICE

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#1d2330}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #d0d5dd;padding:.3rem .6rem}
th{background:#f2f4f7;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#067647}.worse{color:#b42318}.pass{color:#067647}.fail{color:#b42318}
.samples td{vertical-align:top;max-width:22rem}svg{background:#fcfcfd;border:1px solid #eaecf0}
ul.warnings{background:#fffaeb;border:1px solid #fedf89;padding:.5rem 2rem}.warn{color:#b54708}
"""
WIDTH, HEIGHT, PAD = 640, 260, 40
COLORS = {"train_loss": "#2e90fa", "validation_loss": "#f79009"}


def _num(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _metrics_rows(report: dict[str, Any]) -> str:
    rows = []
    for name, m in report["metrics"].items():
        low, high = m["ci95"]
        significant = (low > 0 or high < 0) and m["lower_is_better"] is not None
        good = (m["delta"] < 0) == m["lower_is_better"]
        css = ("better" if good else "worse") if significant else ""
        rows.append(
            f"<tr><td>{escape(name)}</td><td class=num>{_num(m['base'])}</td>"
            f"<td class=num>{_num(m['tuned'])}</td><td class='num {css}'>{m['delta']:+.4f}</td>"
            f"<td class=num>[{low:+.4f}, {high:+.4f}]</td></tr>"
        )
    return "".join(rows)


def loss_chart(curves: dict[str, list[list[float]]]) -> str:
    """An SVG line chart of the loss curves (step on x, loss on y)."""
    points = [p for series in curves.values() for p in series]
    if not points:
        return "<p>No training log was recorded.</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-9)

    def at(x: float, y: float) -> str:
        px = PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)
        py = HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)
        return f"{px:.1f},{py:.1f}"

    lines, legend = [], []
    for n, (name, series) in enumerate(curves.items()):
        if series:
            path = " ".join(at(x, y) for x, y in series)
            lines.append(
                f"<polyline fill=none stroke='{COLORS[name]}' stroke-width=2 points='{path}'/>"
            )
            legend.append(
                f"<text x={WIDTH - 170} y={20 + 16 * n} fill='{COLORS[name]}'>"
                f"{escape(name.replace('_', ' '))}</text>"
            )
    axes = (
        f"<text x={PAD} y={HEIGHT - 10}>step {x0:g}–{x1:g}</text>"
        f"<text x=4 y={PAD - 10}>loss {y0:.3f}–{y1:.3f}</text>"
    )
    return (
        f"<svg role=img aria-label='loss curves' width={WIDTH} height={HEIGHT} "
        f"viewBox='0 0 {WIDTH} {HEIGHT}'>{''.join(lines)}{''.join(legend)}{axes}</svg>"
    )


CUT_NOTE = "<br><small class=warn>(cut by data-prep: loss on the cut prompt)</small>"


def _samples(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{escape(s['prompt'])}{CUT_NOTE if s.get('prompt_cut') else ''}</td>"
        + "".join(f"<td>{escape(s[k])}</td>" for k in ("reference", "base", "tuned"))
        + "</tr>"
        for s in report["samples"]
    )
    return (
        f"{_cut(report)}<table class=samples><tr><th>prompt</th><th>reference</th><th>base</th>"
        f"<th>tuned</th></tr>{rows}</table>"
    )


def _cut(report: dict[str, Any]) -> str:
    cut = report.get("prompts_cut")
    if not cut:
        return ""  # none, or a report written before it counted them
    return (
        f"<p class=warn>{cut} of the {report['rows']} test prompts were cut by data-prep "
        "(dataset.max_source_length): their reference loss is on the cut prompt, as trained; "
        "answers were generated from the full prompt, as served.</p>"
    )


def _gate(gate: dict[str, Any]) -> str:
    verdict = (
        "<span class=pass>passed</span>" if gate["passed"] else "<span class=fail>failed</span>"
    )
    if gate["forced"]:
        verdict += " — <strong>publishing was forced</strong> (evaluation.gate.force_publish)"
    rules = gate.get("rules") or [
        {"rule": "", "passed": False, "detail": reason} for reason in gate["reasons"]
    ]
    items = "".join(
        f"<li class={'pass' if r['passed'] else 'fail'} data-rule='{escape(r['rule'])}'>"
        f"{'pass' if r['passed'] else 'FAIL'}: {escape(r['detail'])}</li>"
        for r in rules
    )
    return f"<p>Quality gate: {verdict}</p><ul class=gate>{items}</ul>"


def _decoding(report: dict[str, Any]) -> str:
    decoding = report.get("decoding")
    if not decoding:
        return ""
    settings = ", ".join(f"{escape(k)} {escape(str(v))}" for k, v in decoding.items())
    return f"<p>Answers generated with the decoding the model is served with: {settings}.</p>"


def _signatures(report: dict[str, Any]) -> str:
    signatures = report.get("sacrebleu")
    if not signatures:
        return ""  # a report written before it had them
    return (
        f"<p class=signatures><small>BLEU and chrF by sacrebleu; signatures: BLEU "
        f"{escape(signatures['bleu'])}, chrF {escape(signatures['chrf'])}.</small></p>"
    )


def _share(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}%}"


def _token_rows(tokens: dict[str, dict[str, Any]]) -> str:
    rows = []
    for side, t in tokens.items():
        chosen = t.get("reason") or ("auto" if t.get("setting") == "auto" else "from the spec")
        rows.append(
            f"<tr data-side='{escape(side)}'><td>{escape(side)}</td>"
            f"<td class=num>{t['max_length']}</td><td>{escape(chosen)}</td>"
            f"<td class=num>{t['p50']}</td><td class=num>{t['p99']}</td>"
            f"<td class=num>{_share(t.get('truncated_share'), 1)}</td>"
            f"<td class=num>{_share(t.get('unknown_share'), 2)}</td></tr>"
        )
    return "".join(rows)


def _sample(sample: dict[str, Any] | None) -> str:
    if not sample or sample["method"] == "all":
        return "all rows"
    if sample["method"] == "head":
        return f"the first {sample['rows']} rows"
    return f"a random sample of {sample['rows']} of {sample['of']} rows (seed {sample['seed']})"


def _cleaning(data: dict[str, Any]) -> str:
    counts = ", ".join(f"{escape(k)} {v}" for k, v in data["counts"].items())
    rules = [f"{n} {escape(rule.replace('_', ' '))}" for rule, n in data["dropped"].items() if n]
    skipped = data["bad_rows_skipped"]
    return (
        f"<ul class=cleaning><li>rows: {_sample(data.get('sample'))}; kept {counts}</li>"
        f"<li>dropped by cleaning: {', '.join(rules) or 'none'}</li>"
        f"<li>bad rows skipped: {skipped}</li></ul>"
    )


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return "<p class=pass>No warnings.</p>"
    items = "".join(f"<li class=warn>warning: {escape(w)}</li>" for w in warnings)
    return f"<ul class=warnings>{items}</ul>"


def _data(report: dict[str, Any]) -> str:
    """The data section: token lengths per side, cleaning, skipped rows, warnings."""
    data = report.get("data")
    if not data:
        return ""  # a report written before it had one
    head = (
        "<tr><th>side</th><th>kept tokens</th><th>how it was chosen</th><th>p50</th>"
        "<th>p99</th><th>rows cut</th><th>unknown tokens</th></tr>"
    )
    return (
        f"<h2>Data</h2>{_warnings(data['warnings'])}"
        f"<table class=tokens>{head}{_token_rows(data['tokens'])}</table>{_cleaning(data)}"
    )


def capped(report: dict[str, Any]) -> str:
    """The header's " (capped at N of M rows)" where evaluation.max_rows sampled the test
    split."""
    cap = report_cap(report)
    return f" (capped at {cap} rows)" if cap else ""


def _resampled(report: dict[str, Any]) -> str:
    bootstrap = report.get("bootstrap")
    if not bootstrap:
        return ""  # a report written before it said
    return (
        f", resampling the {bootstrap['prompts']} distinct test {escape(bootstrap['unit'])}s "
        "(each with all its rows)"
    )


def render(report: dict[str, Any], *, job_id: str, notice: str = DEFAULT_NOTICE) -> str:
    """The whole page; ``notice`` is the spec's warning to readers (publish.card.notice)."""
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>termtune report: {escape(job_id)}</title>
<style>{STYLE}</style></head><body>
<h1>Evaluation of {escape(job_id)}</h1>
<p>Base model vs tuned model on {report["rows"]} held-out test rows{capped(report)}. Intervals
are paired bootstrap 95% intervals of tuned − base{_resampled(report)}; coloured deltas
exclude zero.</p>
{_gate(report["gate"])}
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th><th>95% CI</th></tr>
{_metrics_rows(report)}</table>{_signatures(report)}
{_data(report)}
<h2>Loss during training</h2>{loss_chart(report.get("curves", {}))}
<h2>Samples</h2>{_decoding(report)}{_samples(report)}
<p><small>Generated by termtune; libraries: {escape(str(report.get("versions", {})))}.
{escape(notice)}</small></p>
</body></html>
"""
