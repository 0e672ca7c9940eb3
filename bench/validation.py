"""Validation by its own clock: how much of a training stage the validation passes take.

``python -m bench.validation``: the embedded example job's training stage (the offline tiny
model, the shipped data, ``examples/medical-terms.yaml`` with its validation split), run
in-process through the trainer's own handler twice: validating at every logging step (what
termtune did before ``training.validation_every_steps`` existed) and with the default,
``auto`` (about 10 passes a run); ``--epochs`` overrides the example's (a smoke run's
fraction). Prints passes, validation seconds and their share of the training time, from the
train manifest. Goal: under 10% with ``auto``. No test reads these figures.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import yaml

from services.cli.stages import run_local
from services.cli.tinymodel import ensure_tiny_t5
from shared.jobs import open_records
from shared.jobspec import parse_spec
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "medical-terms.yaml"
SAMPLE_DATA = ROOT / "data" / "medical_terms.jsonl"


def train_once(
    work: Path, model: Path, every: int | str, epochs: float | None = None
) -> dict[str, Any]:
    """The example's training stage with validation every ``every`` steps (for ``epochs``,
    default the example's); its manifest."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["base_model"] = str(model)
    raw["dataset"]["source"] = str(SAMPLE_DATA)
    raw["training"]["validation_every_steps"] = every
    if epochs is not None:
        raw["training"]["epochs"] = epochs
    spec = parse_spec(raw, source=str(EXAMPLE))
    var = work / f"var-{every}"
    # each run a ledger of its own, whatever TERMTUNE_DATABASE_URL the shell exports: both
    # runs are the same job, and a shared ledger refuses the second's different spec
    settings = Settings(var_dir=var, database_url=f"sqlite:///{var / 'termtune.db'}")
    job_id, _ = run_local("prepare", spec, settings=settings)
    run_local("train", spec, job_id=job_id, settings=settings)
    return open_records(settings).manifest(job_id, "train") or {}


def main() -> None:
    """Print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=float, help="default: the example's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        work = Path(tmp)
        model = ensure_tiny_t5(work / "tiny-flan-t5", data_file=SAMPLE_DATA)
        logging_steps = yaml.safe_load(EXAMPLE.read_text())["training"]["logging_steps"]
        print("| validation | passes | validation s | training s | share of training |")
        print("|---|---:|---:|---:|---:|")
        for label, every in (
            (f"every logging step ({logging_steps}), as before", logging_steps),
            ("auto (the default)", "auto"),
        ):
            manifest = train_once(work, model, every, args.epochs)
            v = manifest["validation"]
            print(
                f"| {label} | {v['passes']} | {v['seconds']:.1f} | {manifest['runtime_s']:.1f} "
                f"| {v['share_of_training_time']:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
