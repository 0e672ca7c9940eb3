"""Running the trainer on a prepared split: transformers' Seq2SeqTrainer for T5, trl's
SFTTrainer for a decoder-only model (services.trainer.causal)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from services.trainer import causal, compiling, optim, ranks
from services.trainer.batches import CountingCollator, GroupedTrainer, side_lengths
from services.trainer.lora import Plan
from shared.errors import CompileFailed, OutOfMemory
from shared.jobspec import TrainingSpec

log = logging.getLogger(__name__)


def to_dataset(table: pa.Table) -> Any:
    """A datasets.Dataset of the token columns the collator pads."""
    import datasets

    return datasets.Dataset(table.select(["input_ids", "labels"]))


#: validation passes a run when ``validation_every_steps`` is "auto"
VALIDATION_PASSES = 10


def planned_steps(spec: TrainingSpec, plan: Plan, train_rows: int) -> int:
    """Optimizer steps the run will take (max_steps, or the epochs over every process)."""
    if spec.max_steps > 0:
        return spec.max_steps
    batches = math.ceil(train_rows / (plan.batch_size * ranks.world_size()))
    return math.ceil(math.ceil(batches / plan.gradient_accumulation_steps) * spec.epochs)


def validation_every(spec: TrainingSpec, plan: Plan, train_rows: int) -> int:
    """Steps between validation passes: the spec's number, or about 10 passes a run."""
    if spec.validation_every_steps != "auto":
        return spec.validation_every_steps
    return max(1, math.ceil(planned_steps(spec, plan, train_rows) / VALIDATION_PASSES))


def training_arguments(
    spec: TrainingSpec,
    plan: Plan,
    output_dir: Path,
    *,
    evaluate: bool = False,
    eval_steps: int | None = None,
) -> dict[str, Any]:
    """The Trainer's arguments from the spec and the resolved plan (keyword arguments of
    Seq2SeqTrainingArguments, and of trl's SFTConfig, which takes them too)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps if spec.max_steps > 0 else -1,  # 0: epochs, as planned
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,
        gradient_checkpointing=spec.gradient_checkpointing,
        logging_steps=spec.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=eval_steps if evaluate else None,
        per_device_eval_batch_size=plan.batch_size,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=spec.checkpoint_every_steps,
        save_total_limit=1,
        optim=plan.optimizer,
        torch_compile=plan.compile,
        report_to="none",
        seed=spec.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",  # mixed: fp32 weights, fp16 autocast, loss scaling
        use_cpu=plan.device == "cpu",
        dataloader_num_workers=0,
        ddp_backend=("nccl" if plan.device == "cuda" else "gloo")
        if ranks.world_size() > 1
        else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
    )


def train(
    model: Any,
    tokenizer: Any,
    train_table: pa.Table,
    *,
    eval_table: pa.Table | None = None,
    spec: TrainingSpec,
    plan: Plan,
    output_dir: Path,
    callbacks: list[Any],
    resume_from: Path | None = None,
) -> dict[str, Any]:
    """Train the adapter in place (resuming from a checkpoint); a summary and the log.

    torch.compile failing (at the first step, or at a recompile later) falls back to training
    without it, logged and noted in the plan the summary and the checkpoints carry. The run
    starts again where nothing compiled touched it: its newest local checkpoint, else the
    checkpoint it resumed from, else the adapter's weights as they were before the first step.
    One of several data-parallel ranks raises CompileFailed instead: the ranks that compiled
    wait for it in this step's collectives, so all start again (``distributed.launch``).
    """

    def build(plan: Plan) -> Any:
        data = (train_table, eval_table)
        return _trainer(model, tokenizer, *data, spec, plan, output_dir, callbacks)

    trainer = build(plan)
    finished = finished_state(resume_from)
    if finished is not None:
        return _restore_finished(trainer, finished, resume_from, plan)
    checkpoint = str(resume_from) if resume_from else None
    before = compiling.adapter_weights(model) if plan.compile and checkpoint is None else None
    try:
        try:
            with compiling.backward_with_forward(plan.compile):
                result = trainer.train(resume_from_checkpoint=checkpoint)
        except Exception as exc:
            if not (plan.compile and compiling.failed(exc)):
                raise
            if ranks.distributed():  # the other ranks wait in this step's collectives
                raise CompileFailed(compiling.note(exc)) from exc
            plan = compiling.without(plan, compiling.note(exc))
            log.warning("%s", plan.notes[-1])
            compiling.replan(callbacks, plan)
            checkpoint = compiling.restart_point(output_dir, checkpoint, model, before)
            trainer = build(plan)
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(out_of_memory_message(spec, plan, exc)) from exc
    runtime = result.metrics.get("train_runtime", 0.0)
    return {
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "train_loss": result.training_loss,
        "runtime_s": round(runtime, 2),
        "examples_per_s": result.metrics.get("train_samples_per_second"),
        "padding_waste": trainer.data_collator.waste(),
        "validation": validation_summary(trainer.state.log_history, runtime),
        "log_history": trainer.state.log_history,
        "is_main": trainer.is_world_process_zero(),
        "plan": plan,  # as trained: without compile after a fallback
    }


def _trainer(
    model: Any,
    tokenizer: Any,
    train_table: pa.Table,
    eval_table: pa.Table | None,
    spec: TrainingSpec,
    plan: Plan,
    output_dir: Path,
    callbacks: list[Any],
) -> Any:
    from transformers import PrinterCallback

    arguments = training_arguments(
        spec,
        plan,
        output_dir,
        evaluate=eval_table is not None,
        eval_steps=validation_every(spec, plan, train_table.num_rows),
    )
    make = causal.sft_trainer if plan.kind == "causal" else _seq2seq_trainer
    trainer = make(
        model, tokenizer, (train_table, eval_table),
        plan=plan, arguments=arguments, callbacks=callbacks,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # progress goes to events, not stdout
    optim.use_loraplus(trainer, spec.lora.loraplus_lr_ratio)
    return trainer


def _seq2seq_trainer(
    model: Any, tokenizer: Any, splits: Any, *, plan: Plan, arguments: dict, callbacks: list
) -> Any:
    """transformers' Seq2SeqTrainer (grouped by both sides' lengths) over the token columns
    of the train (and validation) split, as ``causal.sft_trainer`` for trl's."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainingArguments

    from services.trainer.loss import token_loss

    collator = DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        label_pad_token_id=-100,
        pad_to_multiple_of=8 if plan.device == "cuda" else None,
    )
    train_table, eval_table = splits
    return GroupedTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            **arguments,
            train_sampling_strategy="group_by_length" if plan.group_by_length else "random",
        ),
        train_dataset=to_dataset(train_table),
        eval_dataset=to_dataset(eval_table) if eval_table is not None else None,
        data_collator=CountingCollator(collator),
        processing_class=tokenizer,
        callbacks=callbacks,
        compute_loss_func=token_loss,
        lengths=side_lengths(train_table) if plan.group_by_length else None,
    )


def validation_summary(log_history: list[dict[str, Any]], runtime_s: float) -> dict[str, Any]:
    """Validation passes of a run, their time and its share of the training time."""
    passes = [e for e in log_history if "eval_loss" in e]
    seconds = sum(e.get("eval_runtime", 0.0) for e in passes)
    return {
        "passes": len(passes),
        "every_steps": passes[1]["step"] - passes[0]["step"] if len(passes) > 1 else None,
        "seconds": round(seconds, 2),
        "share_of_training_time": round(seconds / runtime_s, 4) if runtime_s else None,
    }


def finished_state(checkpoint: Path | None) -> Any:
    """The TrainerState of a checkpoint taken at the last step, else None.

    The Trainer resumed from such a checkpoint trains one step more than asked (it starts
    another epoch before it checks the step count), so a worker killed between storing
    the last checkpoint and recording the stage takes the checkpoint as the result.
    """
    from transformers import TrainerState

    state_file = checkpoint / "trainer_state.json" if checkpoint else None
    if state_file is None or not state_file.is_file():
        return None
    state = TrainerState.load_from_json(str(state_file))
    return state if state.max_steps > 0 and state.global_step >= state.max_steps else None


def _restore_finished(trainer: Any, state: Any, checkpoint: Path, plan: Plan) -> dict[str, Any]:
    """The adapter weights of a finished checkpoint loaded in place; the run's summary."""
    from peft import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(trainer.model, load_peft_weights(str(checkpoint)))
    trainer.state = state
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    return {
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "runtime_s": 0.0,
        "examples_per_s": None,
        "padding_waste": None,
        "validation": validation_summary(state.log_history, 0.0),
        "log_history": state.log_history,
        "is_main": trainer.is_world_process_zero(),
        "plan": plan,
    }


def out_of_memory_message(spec: TrainingSpec, plan: Plan, exc: Exception) -> str:
    """What ran out, with which sizes, and what to lower."""
    return (
        f"out of {plan.device} memory with batch_size={plan.batch_size}, "
        f"gradient_accumulation_steps={plan.gradient_accumulation_steps}, "
        f"quantization={plan.quantization}, precision={plan.precision}, "
        f"gradient_checkpointing={spec.gradient_checkpointing}, LoRA r={spec.lora.r}: lower "
        "training.batch_size (raise gradient_accumulation_steps to keep the effective batch), "
        "turn on training.gradient_checkpointing, lower dataset.max_target_length or "
        f"training.lora.r, or use quantization 4bit ({str(exc).splitlines()[0][:200]})"
    )
