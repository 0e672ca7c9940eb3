"""An optimizer update's loss is the mean over all its label tokens, however it is split
into micro-batches: the same logged loss and gradient norm at 1 x 4, 2 x 2 and 4 x 1."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from services.trainer.loss import token_loss

#: four rows whose answers differ in length, so weighing each micro-batch alike would show
ROWS = pa.table(
    {
        "input_ids": [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]],
        "labels": [[20, 21], [22, 23, 24, 25, 26, 27, 28, 29, 30], [31], [32, 33, 34, 35, 36]],
    }
)


def _first_update(model_dir, tmp_path, batch: int, accumulation: int) -> dict:
    """The loss and gradient norm the Trainer logs for one update over ``ROWS``."""
    from transformers import AutoTokenizer, TrainerCallback

    from services.trainer import lora, train
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.trainplan import model_shape

    class Logged(TrainerCallback):
        logs: dict = {}

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "grad_norm" in logs:
                self.logs = logs

    spec = TrainingSpec.model_validate(
        {"batch_size": batch, "gradient_accumulation_steps": accumulation, "max_steps": 1,
         "logging_steps": 1, "learning_rate": 0.01, "packing": "off"}
    )  # fmt: skip
    plan = planner.resolve(spec, model_shape(str(model_dir)), planner.Rows(4, 5, 9), dev="cpu")
    torch.manual_seed(0)
    model = lora.build_model(str(model_dir), spec, plan)
    for module in model.modules():  # the tiny models' dropout would draw differently per split
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # T5's attention dropout
            module.dropout = 0.0
    logged = Logged()
    train.train(
        model, AutoTokenizer.from_pretrained(model_dir), ROWS, spec=spec, plan=plan,
        output_dir=tmp_path / f"{batch}x{accumulation}", callbacks=[logged],
    )  # fmt: skip
    return logged.logs


@pytest.mark.parametrize("family", ["t5", "qwen"])
def test_an_updates_loss_and_gradient_do_not_depend_on_its_micro_batches(
    family, tiny_model, tiny_qwen, tmp_path
):
    model_dir = tiny_model if family == "t5" else tiny_qwen
    splits = [_first_update(model_dir, tmp_path, b, a) for b, a in ((4, 1), (2, 2), (1, 4))]
    whole = splits[0]
    for split in splits[1:]:
        assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4)
        assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


def test_the_seq2seq_loss_is_the_mean_over_the_updates_tokens(tiny_model, tmp_path):
    """Before any update the adapter adds nothing (B = 0): the logged loss is the base
    model's mean cross-entropy over the 17 label tokens of the four rows."""
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in ROWS.to_pylist():
            out = base(
                input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])
            )
            nll += out.loss.item() * len(row["labels"])
            tokens += len(row["labels"])
    assert _first_update(tiny_model, tmp_path, 1, 4)["loss"] == pytest.approx(
        nll / tokens, rel=1e-4
    )


def test_the_loss_counts_the_updates_tokens_or_the_batchs_own():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    summed = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    assert token_loss({"logits": logits}, labels, torch.tensor(6)) == pytest.approx(summed / 6)
    assert token_loss((logits,), labels) == pytest.approx(summed / 3)
    assert token_loss({"logits": logits.bfloat16()}, labels).dtype == torch.float32
