"""The CLI's job summary shows what data-prep found: lengths, drops, bad rows, warnings."""

import json

from services.cli import display
from services.dataprep.handler import handle
from shared.messages import PrepareDataset
from tests.factories import make_spec


def test_summary_shows_token_lengths_drops_and_warnings(ctx, tiny_model, tmp_path, capsys):
    rows = [{"page_title": f"Term {i}", "page_text": f"Definition number {i}."} for i in range(20)]
    rows += [{"page_title": "Dup", "page_text": "Same."}] * 2 + [{"page_title": " "}]
    rows += [{"page_title": f"Odd {i}", "page_text": f"∑ ≈ ∞ ⊕ ⊗ [{i}]"} for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    dataset = {"source": str(path), "skip_bad_rows": True, "max_target_length": 8}
    spec = make_spec(tiny_model, dataset=dataset)
    job_id = "job-1"
    ctx.jobs.record(
        handle(PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec)), ctx)
    )
    job = ctx.jobs.summary(job_id)
    job["id"] = job_id
    tokens = ctx.jobs.manifest(job_id, "prepare")["lengths"]
    display.summary(None, job)
    out = capsys.readouterr().out
    source, target = tokens["source"], tokens["target"]
    assert (
        f"  source tokens: p50 {source['p50']}, p99 {source['p99']}; keeps {source['p99']} "
        f"(auto); {source['truncated_share']:.1%} of rows cut; "
        f"{source['unknown_share']:.2%} unknown"
    ) in out
    assert (
        f"  target tokens: p50 {target['p50']}, p99 {target['p99']}; keeps 8 (from the spec); "
        f"{target['truncated_share']:.1%} of rows cut"
    ) in out
    assert "  cleaning: dropped 1 duplicate, 1 empty field; skipped 1 bad row\n" in out
    warnings = [line for line in out.splitlines() if line.startswith("  warning: ")]
    assert len(warnings) == 2
    assert warnings[0].startswith("  warning: target: ")
    assert warnings[0].endswith(
        f"of rows are cut at 8 tokens (p99 {target['p99']}); raise dataset.max_target_length"
    )
    assert warnings[1].startswith("  warning: unknown tokens: ")
    assert "{'" not in out  # no Python reprs


def test_summary_of_an_older_job_without_the_new_fields(capsys):
    job = {"id": "j", "status": "running", "result": {"prepare": {"counts": {"train": 3}}}}
    display.summary(None, job)
    out = capsys.readouterr().out
    assert "dataset: train 3 rows" in out and "tokens" not in out and "warning" not in out


def test_the_summary_says_where_the_tracked_run_is():
    mlflow = {"backend": "mlflow", "run_id": "abc", "experiment_id": "1", "url": "http://m/#/r"}
    assert display.tracking_line(mlflow) == "mlflow run abc: http://m/#/r"
    assert display.tracking_line({**mlflow, "url": None}) == "mlflow run abc"
    board = {"backend": "tensorboard", "location": "file:///var/store/jobs/j/tracking/tb"}
    assert display.tracking_line(board) == "tensorboard logs: file:///var/store/jobs/j/tracking/tb"
    wandb = {"backend": "wandb", "run_id": "j", "location": "s3://b/jobs/j/tracking/wandb"}
    assert display.tracking_line({**wandb, "url": None}) == (
        "wandb run j (offline): s3://b/jobs/j/tracking/wandb (wandb beta sync uploads it)"
    )
    assert display.tracking_line({**wandb, "url": "https://wandb.ai/t/p/runs/j"}) == (
        "wandb run j: https://wandb.ai/t/p/runs/j"
    )


def test_the_summary_names_the_registered_model_by_version_or_alias():
    assert display.registered_line({"name": "m", "version": "3"}) == "m version 3"
    assert display.registered_line({"name": "m", "version": None, "alias": "j"}) == (
        "m (W&B model artifact, alias j)"
    )
