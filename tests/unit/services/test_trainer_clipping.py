"""Gradient clipping without a call per gradient: torch's numbers, the Trainer's own
clipping where the gradients are not one group, and both trainers using it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from services.trainer import clipping
from services.trainer.clipping import OneDeviceClipping, clip_grad_norm
from tests.factories import token_rows


def _params(dtypes=(torch.float32,) * 3, scale=1.0):
    torch.manual_seed(0)
    params = []
    for i, dtype in enumerate(dtypes):
        p = torch.nn.Parameter(torch.randn(4, i + 2, dtype=dtype))
        p.grad = torch.randn_like(p) * scale
        params.append(p)
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and not
def test_the_norm_and_the_clipped_gradients_are_torch_s(max_norm):
    ours, theirs = _params(scale=3.0), _params(scale=3.0)
    total = clip_grad_norm(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(total, want)
    for mine, torch_s in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, torch_s.grad)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ours]))
    assert clipped.item() == pytest.approx(min(max_norm, want.item()), rel=1e-4)


class TrainerOwn:
    def _clip_grad_norm(self, model):
        return "the Trainer's own"


class Clipping(OneDeviceClipping, TrainerOwn):
    def __init__(self, kind=DistributedType.NO):
        self.unscaled, self.params = 0, []
        self.accelerator = SimpleNamespace(distributed_type=kind, unscale_gradients=self._unscale)
        self.args = SimpleNamespace(max_grad_norm=1.0)

    def _unscale(self):  # as fp16's grad scaler: the gradients divided by the loss scale
        self.unscaled += 1
        for p in self.params:
            p.grad /= 4


def _model(params):
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    return model


@pytest.mark.parametrize("kind", clipping.WHOLE)  # one device, DDP on GPUs or on CPUs
def test_one_group_is_clipped_here_after_the_loss_scale_is_undone(kind):
    trainer = Clipping(kind)
    trainer.params = _params(scale=3.0)
    scaled = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params]))
    norm = trainer._clip_grad_norm(_model(trainer.params))
    assert trainer.unscaled == 1
    torch.testing.assert_close(norm, scaled / 4)  # the norm of the unscaled gradients
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params]))
    assert norm.item() > 1.0 and clipped.item() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("case", ["two dtypes", "FSDP", "DeepSpeed", "no gradients"])
def test_anything_else_takes_the_trainer_s_own_clipping(case):
    kind = {"FSDP": DistributedType.FSDP, "DeepSpeed": DistributedType.DEEPSPEED}.get(
        case, DistributedType.NO
    )
    dtypes = (torch.float32, torch.bfloat16) if case == "two dtypes" else (torch.float32,)
    params = _params(dtypes)
    if case == "no gradients":
        for p in params:
            p.grad = None
    trainer = Clipping(kind)
    assert trainer._clip_grad_norm(_model(params)) == "the Trainer's own"
    assert trainer.unscaled == 0


def test_both_trainers_clip_here(tiny_model, tmp_path, monkeypatch):
    """A T5 run through the trainer: every optimizer step's clipping is this one, and its
    norm is the one the Trainer logs; trl's trainer takes the same mixin."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from services.trainer import causal, lora, train
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.trainplan import model_shape

    norms = []
    real = clipping.clip_grad_norm
    monkeypatch.setattr(clipping, "clip_grad_norm", lambda *a: norms.append(real(*a)) or norms[-1])

    class Logged(TrainerCallback):
        logged: list = []

        def on_log(self, args, state, control, logs=None, **_):
            if logs and "grad_norm" in logs:
                self.logged.append(logs["grad_norm"])

    spec = TrainingSpec.model_validate(
        {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2,
         "logging_steps": 1, "learning_rate": 0.01}
    )  # fmt: skip
    plan = planner.resolve(spec, model_shape(str(tiny_model)), planner.Rows(4, 6, 5), dev="cpu")
    model = lora.build_model(str(tiny_model), spec, plan)
    table = token_rows(4, 6, 5)
    logged = Logged()
    train.train(
        model, AutoTokenizer.from_pretrained(tiny_model), table, spec=spec, plan=plan,
        output_dir=tmp_path, callbacks=[logged],
    )  # fmt: skip
    assert len(norms) == 2 and len(logged.logged) == 2
    assert logged.logged == pytest.approx([n.item() for n in norms])
    assert OneDeviceClipping in causal._grouped(SFTTrainer).__mro__
