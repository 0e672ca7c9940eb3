"""What the CLI prints: stage progress while a job runs, and the job's summary."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote, urlparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli.client import ApiUnavailable, Backoff, Client
from shared.api_models import report_cap
from shared.messages import ENDED, STAGES

TERMINAL = ENDED
#: results: a finished job's summary, a report, a model's answer
console = Console(highlight=False)
#: progress while a job runs: on stderr, so stdout holds only the results (for scripts)
progress_console = Console(stderr=True, highlight=False)


def _losses(progress: dict[str, Any]) -> str:
    """ " loss 1.234 val loss 1.456" from the figures that are there."""
    return "".join(
        f" {label} {progress[key]:.3f}"
        for key, label in (("loss", "loss"), ("eval_loss", "val loss"))
        if isinstance(progress.get(key), (int, float))
    )


def _progress_line(stage: str, progress: dict[str, Any]) -> str:
    if progress.get("phase") == "checkpoint stored":
        return f"  [{stage}] checkpoint stored at step {progress['step']}"
    if "total_steps" in progress:
        eta = progress.get("eta_s")
        return (
            f"  [{stage}] step {progress['step']}/{progress['total_steps']}{_losses(progress)}"
            + (f" eta {eta:.0f}s" if isinstance(eta, (int, float)) else "")
        )
    return f"  [{stage}] " + ", ".join(f"{k} {v}" for k, v in progress.items() if k != "plan")


def follow(
    client: Client,
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    bars: bool | None = None,
) -> dict[str, Any]:
    """Show each stage's progress on stderr until the job ends (live bars on a terminal,
    lines in a log), or ``timeout`` seconds have passed (``TimeoutError``); the job's last
    summary. The control plane restarting or its database down is waited out (see
    ``Backoff``)."""
    bars = progress_console.is_terminal if bars is None else bars
    watch = _follow_bars if bars else _follow_lines
    return watch(_Poll(client, job_id, timeout=timeout), poll=poll)


class _Poll:
    """Asks for a job's summary, again after transient failures, until it ends."""

    def __init__(self, client: Client, job_id: str, *, timeout: float | None) -> None:
        self.client, self.job_id, self.timeout = client, job_id, timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.backoff = Backoff()

    def job(self) -> dict[str, Any]:
        """The job's summary, once the control plane answers."""
        while True:
            try:
                job = self.client.job(self.job_id)
            except ApiUnavailable as exc:
                if self.backoff.since is None:
                    progress_console.print(f"{exc}; asking again", style="yellow", markup=False)
                self.backoff.failed(exc, f"waiting for job {self.job_id}")
                continue
            self.backoff.reset()
            return job

    def ended(self, job: dict[str, Any]) -> bool:
        """Whether the job has ended; ``TimeoutError`` past the deadline."""
        if job["status"] in TERMINAL:
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise TimeoutError(
                f"job {self.job_id} still {job['status']} after --timeout {self.timeout:g} s"
            )
        return False


def _follow_lines(polled: _Poll, *, poll: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    while True:
        job = polled.job()
        for stage in STAGES:
            view = job["stages"][stage]
            state = (view["status"], view.get("progress"))
            before = seen.get(stage, (None, None))
            if before == state:
                continue
            ended = view["status"] not in ("pending", "running")
            if ended and view.get("progress") and state[1] != before[1]:
                progress_console.print(_progress_line(stage, view["progress"]), markup=False)
            if before[0] != view["status"]:
                progress_console.print(
                    f"[bold]{stage:>9}[/bold] {escape(view['status'])}"
                    + (f": {escape(view['error'])}" if view.get("error") else "")
                )
            if not ended and view.get("progress") and state[1] != before[1]:
                progress_console.print(_progress_line(stage, view["progress"]), markup=False)
            seen[stage] = state
        if polled.ended(job):
            return job
        time.sleep(poll)


def _bar_state(view: dict[str, Any]) -> tuple[float | None, float, str]:
    """(total, completed, info) of one stage's bar."""
    progress = view.get("progress") or {}
    info, total, completed = view["status"], None, 0.0
    if "total_steps" in progress:
        total, completed = progress["total_steps"], progress.get("step", 0)
        for key, label in (("loss", "loss"), ("eval_loss", "val loss")):
            if isinstance(progress.get(key), (int, float)):
                info += f" · {label} {progress[key]:.3f}"
        if progress.get("eta_s") is not None:
            info += f" · ETA {progress['eta_s']:.0f}s"
        if progress.get("examples_per_s"):
            info += f" · {progress['examples_per_s']} ex/s"
    elif progress.get("phase"):
        info += f" · {progress['phase']}"
    if view["status"] in ("succeeded", "skipped"):
        total = total or 1
        completed = total
    if view.get("error"):
        info += f": {view['error']}"
    return total, completed, info


def _follow_bars(polled: _Poll, *, poll: float) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn("[bold]{task.fields[stage]:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}", markup=False),  # the server's text, as it is
    )
    with Progress(*columns, console=progress_console, redirect_stdout=False) as bars:
        tasks = {s: bars.add_task("", total=None, stage=s, info="pending") for s in STAGES}
        while True:
            job = polled.job()
            for stage in STAGES:
                total, completed, info = _bar_state(job["stages"][stage])
                bars.update(tasks[stage], total=total, completed=completed, info=info)
            bars.refresh()  # once per poll: each state the control plane reported is drawn
            if polled.ended(job):
                return job
            time.sleep(poll)


def evaluation_table(report: dict[str, Any]) -> Table:
    """Base vs tuned metrics with deltas and their 95% intervals."""
    table = Table(title=f"Held-out evaluation ({report['rows']} test rows{_capped(report)})")
    for column in ("metric", "base", "tuned", "delta", "95% CI"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in report.get("metric_order", report["metrics"]):
        m = report["metrics"][name]
        low, high = m["ci95"]
        table.add_row(
            escape(name),
            f"{m['base']:.4f}",
            f"{m['tuned']:.4f}",
            f"{m['delta']:+.4f}",
            f"[{low:+.4f}, {high:+.4f}]",
        )
    return table


def _capped(report: dict[str, Any]) -> str:
    """The title's ", capped at N of M" where evaluation.max_rows sampled the test split."""
    cap = report_cap(report)
    return f", capped at {cap}" if cap else ""


def dataset_lines(prepared: dict[str, Any]) -> list[str]:
    """Token lengths, cleaning drops, skipped rows and warnings of a DatasetPrepared result."""
    lines = []
    for side, t in (prepared.get("tokens") or {}).items():
        chosen = "auto" if t["setting"] == "auto" else "from the spec"
        lines.append(
            f"  {side} tokens: p50 {t['p50']}, p99 {t['p99']}; keeps {t['max_length']} "
            f"({chosen}); {t['truncated_share']:.1%} of rows cut; "
            f"{t['unknown_share']:.2%} unknown"
        )
    dropped = prepared.get("dropped") or {}
    cleaning = [f"{n} {rule.replace('_', ' ')}" for rule, n in dropped.items() if n]
    skipped = prepared.get("bad_rows_skipped") or 0
    if cleaning or skipped:
        parts = (["dropped " + ", ".join(cleaning)] if cleaning else []) + (
            [f"skipped {skipped} bad row{'s' if skipped != 1 else ''}"] if skipped else []
        )
        lines.append("  cleaning: " + "; ".join(parts))
    lines += [f"  warning: {w}" for w in prepared.get("warnings") or []]
    return lines


def evaluation_line(timing: dict[str, Any]) -> str:
    """The evaluation's time, device and batches (the dtype where the report records it:
    reports from before 2026-12-06 do not)."""
    dtype = f" ({timing['dtype']})" if timing.get("dtype") else ""
    return (
        f"evaluation: base {timing['base_s']:.1f} s + tuned {timing['tuned_s']:.1f} s on "
        f"{timing['device']}{dtype}, batches of {timing['batch_size']} by length"
    )


def summary(client: Client, job: dict[str, Any]) -> None:
    """Counts, training loss, evaluation, export folder of a finished job."""
    result = job["result"]
    console.rule(escape(f"job {job['id']}: {job['status']}"))
    if job.get("error"):
        error = job["error"]
        console.print(f"[red]failed in {escape(error['stage'])}:[/red] {escape(error['reason'])}")
    if "prepare" in result:
        counts = result["prepare"]["counts"]
        console.print(
            "dataset: " + ", ".join(f"{k} {v} rows" for k, v in counts.items()), markup=False
        )
        for line in dataset_lines(result["prepare"]):
            style = "yellow" if line.startswith("  warning:") else None
            console.print(line, style=style, markup=False, soft_wrap=True)
    if "train" in result:
        train = result["train"]
        waste = (train.get("padding_waste") or {}).get("all")
        console.print(
            f"training: {train['steps']} optimizer steps, mean train loss "
            f"{train['train_loss']:.4f}"
            + (f", {train['runtime_s']:.1f} s" if train.get("runtime_s") else "")
            + (f", {waste:.0%} of batch positions padding" if waste is not None else ""),
            markup=False,
        )
    run = result.get("train", {}).get("tracking")
    if run:
        console.print(tracking_line(run), markup=False, soft_wrap=True)
    if "evaluate" in result and result["evaluate"].get("timing"):
        console.print(evaluation_line(result["evaluate"]["timing"]), markup=False)
    if "evaluate" in result:
        print_report(client.report(job["id"]))
    if "publish" in result:
        location = result["publish"]["location"]
        shown = unquote(urlparse(location).path) if location.startswith("file://") else location
        console.print(f"exported model folder: {shown}", markup=False)
        registered = result["publish"].get("registered_model")
        if registered:
            console.print(f"registered model: {registered_line(registered)}", markup=False)


def registered_line(registered: dict[str, Any]) -> str:
    """The export's registry entry: an MLflow version, or a W&B artifact by its alias."""
    if registered.get("version") is None:
        return f"{registered['name']} (W&B model artifact, alias {registered['alias']})"
    return f"{registered['name']} version {registered['version']}"


def tracking_line(run: dict[str, Any]) -> str:
    """Where the job's tracked run is: an MLflow or W&B run and its link, or the files of
    one (TensorBoard's, W&B's offline run)."""
    if run.get("backend") == "tensorboard":
        return f"tensorboard logs: {run['location']}"
    if run.get("backend") == "wandb" and not run.get("url"):
        return (
            f"wandb run {run['run_id']} (offline): {run['location']} (wandb beta sync uploads it)"
        )
    return f"{run['backend']} run {run['run_id']}" + (f": {run['url']}" if run.get("url") else "")


def print_report(report: dict[str, Any]) -> None:
    """The evaluation table and the gate's verdict, rule by rule with its numbers."""
    console.print(evaluation_table(report))
    console.print(gate_lines(report["gate"]), markup=False)


def gate_lines(gate: dict[str, Any]) -> str:
    """The gate's verdict and one line per rule (pass/FAIL and its numbers)."""
    forced = " (publishing forced by evaluation.gate.force_publish)" if gate.get("forced") else ""
    lines = [f"quality gate: {'passed' if gate['passed'] else 'failed'}{forced}"]
    if "rules" in gate:
        lines += [f"  {'pass' if r['passed'] else 'FAIL'}  {r['detail']}" for r in gate["rules"]]
    else:  # a report written before the gate listed its rules
        lines += [f"  FAIL  {reason}" for reason in gate["reasons"]]
    return "\n".join(lines)


def invoked(client: Any, model: str, prompt: str) -> None:
    """Ask a published model as it was evaluated (a chat-tuned one with a chat message) and
    print its answer."""
    if client.model(model).get("chat"):
        body = {"messages": [{"role": "user", "content": prompt}]}
        reply = client.invoke_body(model, body)
        (choice,) = reply["choices"]
        text, tokens = choice["message"]["content"], reply["usage"]["completion_tokens"]
        reason = choice["finish_reason"]
    else:
        reply = client.invoke(model, prompt)
        text, tokens = reply["generation"], reply["generation_token_count"]
        reason = reply["stop_reason"]
    console.print(
        f"invoke {model!r}: {prompt!r}\n  -> {text!r} ({tokens} tokens, {reason})", markup=False
    )
