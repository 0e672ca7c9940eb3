"""One training run, as plain data in and a summary out: the same in one process or in each
data-parallel rank."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import set_seed

from services.trainer import callbacks, lora, probe, ranks, train
from services.trainer.checkpoints import CheckpointStore
from shared import planner
from shared.jobspec import TrainingSpec
from shared.modeling import load_tokenizer
from shared.store import Store


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything a training process needs; plain data, so it can cross process lines."""

    base_model: str
    training: dict[str, Any]
    plan: dict[str, Any]
    output_dir: str
    checkpoints_prefix: str
    tokens_per_example: float
    processes: int = 1
    resume_from: str | None = None
    rows: dict[str, int] | None = None  # planner.Rows of the train split, for the probe

    @property
    def spec(self) -> TrainingSpec:
        """The training section of the job spec."""
        return TrainingSpec.model_validate(self.training)

    @property
    def resolved(self) -> lora.Plan:
        """The plan resolved for the machine."""
        return lora.Plan(**{**self.plan, "notes": tuple(self.plan.get("notes", ()))})


def fit(
    job: TrainJob,
    train_table: pa.Table,
    eval_table: pa.Table | None,
    *,
    store: Store,
    report: Callable[..., None],
    should_stop: Callable[[], str | None],
    immediate_stop: Callable[[], str | None] = lambda: None,
) -> dict[str, Any]:
    """Train (resuming if asked); the first rank saves the adapter under output_dir/adapter.

    ``should_stop`` is asked every STOP_POLL_SECONDS off the training thread,
    ``immediate_stop`` (cheap) at every step. The summary's ``stop_reason`` says why
    training ended early (None: it finished).
    """
    spec, plan = job.spec, job.resolved
    tokenizer = load_tokenizer(job.base_model)
    # The adapter's initial weights come from the global generator: seeded, the same job
    # trains the same model in any process (a worker that trained another job before too).
    set_seed(spec.seed)
    ranks.join(plan.device)
    model = lora.build_model(job.base_model, spec, plan)
    plan = _probed(job, model, plan)
    with callbacks.PolledStop(should_stop, immediate=immediate_stop) as polled:
        return _fit(job, model, tokenizer, plan, train_table, eval_table, store, report, polled)


def _probed(job: TrainJob, model: Any, plan: lora.Plan) -> lora.Plan:
    """On CUDA with batch_size auto: the planned batch checked by a probe step."""
    if plan.device != "cuda" or job.spec.batch_size != "auto" or not job.rows:
        return plan
    return probe.on_device(
        model,
        plan,
        planner.Rows(**job.rows),
        effective_batch=plan.effective_batch_size
        or plan.batch_size * plan.gradient_accumulation_steps * job.processes,
        processes=job.processes,
        keep_accumulation=job.spec.gradient_accumulation_steps != "auto",
    )


def _fit(
    job: TrainJob,
    model: Any,
    tokenizer: Any,
    plan: lora.Plan,
    train_table: pa.Table,
    eval_table: pa.Table | None,
    store: Store,
    report: Callable[..., None],
    should_stop: Callable[[], str | None],
) -> dict[str, Any]:
    spec = job.spec
    stop = callbacks.StopOnRequest(should_stop)
    progress = callbacks.Progress(
        report,
        examples_per_step=plan.batch_size * plan.gradient_accumulation_steps * job.processes,
        tokens_per_example=job.tokens_per_example,
    )
    output = Path(job.output_dir)
    summary = train.train(
        model,
        tokenizer,
        train_table,
        eval_table=eval_table,
        spec=spec,
        plan=plan,
        output_dir=output / "trainer",
        resume_from=Path(job.resume_from) if job.resume_from else None,
        callbacks=[
            progress,
            callbacks.StoreCheckpoints(
                CheckpointStore(store, job.checkpoints_prefix),
                stored=progress.checkpoint_stored,
                every_minutes=spec.checkpoint_every_minutes,
                plan=dataclasses.asdict(plan),
            ),
            stop,
        ],
    )
    is_main = summary.pop("is_main")
    if stop.reason is None and is_main:
        model.save_pretrained(output / "adapter")
    summary["stop_reason"] = stop.reason
    summary["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary["plan"] = dataclasses.asdict(summary["plan"])  # as trained (compile may have failed)
    return summary
