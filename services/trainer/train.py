"""Running transformers' Seq2SeqTrainer on a prepared split."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from services.trainer.lora import Plan
from shared.jobspec import TrainingSpec

Progress = Callable[[dict[str, Any]], None]


def to_dataset(table: pa.Table) -> Any:
    """A datasets.Dataset of the token columns the collator pads."""
    import datasets

    return datasets.Dataset(table.select(["input_ids", "labels"]))


def training_arguments(
    spec: TrainingSpec, plan: Plan, output_dir: Path, *, evaluate: bool = False
) -> Any:
    """Seq2SeqTrainingArguments from the spec and the resolved plan."""
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        gradient_checkpointing=spec.gradient_checkpointing,
        logging_steps=spec.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=spec.logging_steps if evaluate else None,
        per_device_eval_batch_size=spec.batch_size,
        prediction_loss_only=True,
        save_strategy="no",
        report_to="none",
        seed=spec.seed,
        bf16=plan.precision == "bf16",
        use_cpu=plan.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def progress_callback(progress: Progress) -> Any:
    """A TrainerCallback that reports step, loss, learning rate, speed and ETA."""
    from transformers import TrainerCallback

    class _Report(TrainerCallback):
        start = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.start = time.monotonic()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            elapsed = time.monotonic() - self.start
            done = max(state.global_step, 1)
            progress(
                {
                    "step": state.global_step,
                    "total_steps": state.max_steps,
                    "epoch": round(state.epoch or 0.0, 3),
                    "loss": (logs or {}).get("loss"),
                    "learning_rate": (logs or {}).get("learning_rate"),
                    "eval_loss": (logs or {}).get("eval_loss"),
                    "elapsed_s": round(elapsed, 1),
                    "eta_s": round(elapsed / done * max(state.max_steps - state.global_step, 0), 1),
                }
            )

    return _Report()


def train(
    model: Any,
    tokenizer: Any,
    train_table: pa.Table,
    *,
    eval_table: pa.Table | None = None,
    spec: TrainingSpec,
    plan: Plan,
    output_dir: Path,
    progress: Progress,
) -> dict[str, Any]:
    """Train the adapter in place; the run's summary and log history."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Seq2SeqTrainer

    collator = DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        label_pad_token_id=-100,
        pad_to_multiple_of=8 if plan.device == "cuda" else None,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_arguments(spec, plan, output_dir, evaluate=eval_table is not None),
        train_dataset=to_dataset(train_table),
        eval_dataset=to_dataset(eval_table) if eval_table is not None else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[progress_callback(progress)],
    )
    trainer.remove_callback(PrinterCallback)  # progress goes to events, not stdout
    result = trainer.train()
    tokens = sum(len(x) for x in train_table.column("input_ids").to_pylist())
    return {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "examples_per_s": result.metrics.get("train_samples_per_second"),
        "source_tokens_per_epoch": tokens,
        "log_history": trainer.state.log_history,
    }
