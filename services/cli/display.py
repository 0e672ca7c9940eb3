"""What the CLI prints: stage progress while a job runs, and the job's summary."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote, urlparse

from rich.console import Console
from rich.table import Table

from services.cli.client import Client
from shared.messages import STAGES

TERMINAL = ("succeeded", "failed", "rejected", "cancelled")
console = Console(highlight=False)


def _progress_line(stage: str, progress: dict[str, Any]) -> str:
    if "step" in progress:
        loss = progress.get("loss")
        loss_text = f" loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
        return (
            f"  [{stage}] step {progress['step']}/{progress.get('total_steps', '?')}"
            f"{loss_text} eta {progress.get('eta_s', '?')}s"
        )
    return f"  [{stage}] " + ", ".join(f"{k} {v}" for k, v in progress.items() if k != "plan")


def follow(
    client: Client, job_id: str, *, timeout: float = 3600.0, poll: float = 1.0
) -> dict[str, Any]:
    """Print each stage's transitions and progress until the job ends; its last summary."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while True:
        job = client.job(job_id)
        for stage in STAGES:
            view = job["stages"][stage]
            state = (view["status"], view.get("progress"))
            if seen.get(stage) != state:
                if seen.get(stage, (None,))[0] != view["status"]:
                    console.print(
                        f"[bold]{stage:>9}[/bold] {view['status']}"
                        + (f": {view['error']}" if view.get("error") else "")
                    )
                if view.get("progress") and state[1] != (seen.get(stage) or (None, None))[1]:
                    console.print(_progress_line(stage, view["progress"]))
                seen[stage] = state
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        time.sleep(poll)


def evaluation_table(report: dict[str, Any]) -> Table:
    """Base vs tuned metrics with deltas and their 95% intervals."""
    capped = f", capped at {report['capped_at']}" if report.get("capped_at") else ""
    table = Table(title=f"Held-out evaluation ({report['rows']} test rows{capped})")
    for column in ("metric", "base", "tuned", "delta", "95% CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in report.get("metric_order", report["metrics"]):
        m = report["metrics"][name]
        low, high = m["ci95"]
        table.add_row(
            name,
            f"{m['base']:.4f}",
            f"{m['tuned']:.4f}",
            f"{m['delta']:+.4f}",
            f"[{low:+.4f}, {high:+.4f}]",
        )
    return table


def summary(client: Client, job: dict[str, Any]) -> None:
    """Counts, training loss, evaluation, export folder of a finished job."""
    result = job["result"]
    console.rule(f"job {job['id']}: {job['status']}")
    if job.get("error"):
        console.print(f"[red]failed in {job['error']['stage']}:[/red] {job['error']['reason']}")
    if "prepare" in result:
        counts = result["prepare"]["counts"]
        console.print("dataset: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()))
    if "train" in result:
        console.print(
            f"training: {result['train']['steps']} optimizer steps, "
            f"mean train loss {result['train']['train_loss']:.4f}"
        )
    if "evaluate" in result:
        print_report(client.report(job["id"]))
    if "publish" in result:
        location = result["publish"]["location"]
        shown = unquote(urlparse(location).path) if location.startswith("file://") else location
        console.print(f"exported model folder: {shown}")


def print_report(report: dict[str, Any]) -> None:
    """The evaluation table and the gate's verdict."""
    console.print(evaluation_table(report))
    gate = report["gate"]
    verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate["reasons"])
    forced = " (publishing forced)" if gate.get("forced") else ""
    console.print(f"quality gate: {verdict}{forced}")
