"""torch.compile in the trainer (``training.compile: on``, the CUDA plan's default): a real
compile on this machine (inductor generating C++), and the fallback when compiling fails at
the first step or at a recompile later: the run ends as one trained without compile would,
and its plan says why."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

import pytest
import torch
from transformers import TrainerCallback

from services.trainer import compiling, lora, train
from services.trainer.callbacks import PLAN_FILE, StoreCheckpoints
from services.trainer.checkpoints import CheckpointStore
from shared import planner
from shared.jobspec import TrainingSpec
from shared.store import LocalStore

STEPS = 4


class FlakyCompiler:
    """inductor's compile_fx stand-in: AOTAutograd's forward and backward graphs run as
    traced (no code generated), until ``failing`` is set; then compiling ``part``'s graph
    fails, as inductor's own errors are raised. AOTAutograd compiles a backward at its first
    ``backward()`` unless the trainer asks for it with the forward."""

    def __init__(self, failing: bool = False, part: str = "forward") -> None:
        self.failing, self.part, self.calls = failing, part, 0

    def __call__(self, graph, example_inputs, **_):
        from torch._dynamo.backends.common import aot_autograd

        self.calls += 1
        compilers = {"fw_compiler": self._compiler("forward")}
        compilers["bw_compiler"] = self._compiler("backward")
        return aot_autograd(**compilers)(graph, example_inputs)

    def _compiler(self, part: str):
        from functorch.compile import make_boxed_func

        def compile(graph, example_inputs):
            if self.failing and part == self.part:
                raise RuntimeError("inductor could not lower aten.fake_op")
            return make_boxed_func(graph.forward)

        return compile


def _run(tiny_model, tmp_path, name, *, compile_on, checkpoint_every=1000, extra=()):
    """A fresh adapter (seed 0) trained STEPS steps; the summary, its final weights and its
    first."""
    from transformers import AutoTokenizer

    from shared.trainplan import model_shape
    from tests.factories import token_rows

    spec = TrainingSpec.model_validate(
        {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS,
         "learning_rate": 0.01, "lr_scheduler": "constant", "logging_steps": 1,
         "checkpoint_every_steps": checkpoint_every, "compile": "on" if compile_on else "off"}
    )  # fmt: skip
    plan = planner.resolve(spec, model_shape(str(tiny_model)), planner.Rows(8, 6, 5), dev="cpu")
    assert plan.compile is compile_on
    torch.manual_seed(0)
    model = lora.build_model(str(tiny_model), spec, plan)
    stored = StoreCheckpoints(
        CheckpointStore(LocalStore(tmp_path / f"{name}-store"), "ck"),
        every_minutes=1e9, stored=lambda step: None, plan=asdict(plan),
    )  # fmt: skip
    first = compiling.adapter_weights(model)
    torch._dynamo.reset()
    summary = train.train(
        model, AutoTokenizer.from_pretrained(tiny_model), token_rows(8, 6, 5), spec=spec,
        plan=plan, output_dir=tmp_path / name, callbacks=[stored, *extra],
    )  # fmt: skip
    return summary, compiling.adapter_weights(model), first


def _assert_same(weights, expected, **tolerance):
    assert weights.keys() == expected.keys()
    for key, value in weights.items():
        torch.testing.assert_close(
            value, expected[key], msg=lambda m, k=key: f"{k}: {m}", **tolerance
        )


def test_a_compiled_run_trains_as_the_eager_one_does(tiny_model, tmp_path):
    """inductor's real code generation (C++ on this machine, Triton on a GPU), through the
    trainer's path: fused adapted layers, fused AdamW, the token-count loss. Its dropout
    masks are drawn as eager draws them here (``fallback_random``): with inductor's own
    generator they differ, and so does the loss, by dropout's noise (7.51 against 7.81)."""
    import torch._inductor.config as inductor

    eager, expected, first = _run(tiny_model, tmp_path, "eager", compile_on=False)
    with inductor.patch(fallback_random=True):
        compiled, weights, _ = _run(tiny_model, tmp_path, "compiled", compile_on=True)
    assert compiled["plan"].compile, compiled["plan"].notes  # no fallback
    assert compiled["steps"] == eager["steps"] == STEPS
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    # Adam's steps are the rate's size wherever a gradient is not ~0, so a rounding
    # difference can flip a weight's step: the updates are compared whole
    moved = torch.cat([(expected[k] - first[k]).flatten() for k in first])
    apart = torch.cat([(weights[k] - expected[k]).flatten() for k in first])
    assert apart.norm() < 1e-3 * moved.norm()


class Recompile(TrainerCallback):
    """After step ``at``, a recompile (as new shapes or a failed guard bring), which fails;
    the steps begun, in order."""

    def __init__(self, compiler: FlakyCompiler, at: int | None) -> None:
        self.compiler, self.at, self.begun = compiler, at, []

    def on_step_begin(self, args, state, control, **_):
        self.begun.append(state.global_step)

    def on_step_end(self, args, state, control, **_):
        if state.global_step == self.at:
            self.compiler.failing = True
            torch._dynamo.reset()


@pytest.mark.parametrize(
    ("part", "fail_at", "checkpoint_every", "restart"),
    [
        ("forward", None, 1000, 0),
        ("forward", 2, 1000, 0),
        ("forward", 2, 2, 2),
        ("backward", None, 1000, 0),  # a recompile compiles its backward as the first step does
    ],
)
def test_a_compile_failure_falls_back_to_the_run_without_compile(
    tiny_model, tmp_path, monkeypatch, caplog, part, fail_at, checkpoint_every, restart
):
    """Compiling the forward or the backward graph failing, at the first step (``fail_at``
    None) or at a recompile after step ``fail_at``: the run starts again from its newest
    checkpoint (``restart``), else from the adapter's first weights, and ends with the
    weights of a run that never compiled; the plan it reports and the checkpoints it stores
    after the fallback say compile is off, and why."""
    import torch._inductor.compile_fx as compile_fx

    flaky = FlakyCompiler(failing=fail_at is None, part=part)
    monkeypatch.setattr(compile_fx, "compile_fx", flaky)
    recompile = Recompile(flaky, fail_at)
    every = {"checkpoint_every": checkpoint_every}
    _, expected, _ = _run(tiny_model, tmp_path, "eager", compile_on=False, **every)
    with caplog.at_level(logging.WARNING, logger="services.trainer.train"):
        summary, weights, _ = _run(
            tiny_model, tmp_path, "flaky", compile_on=True, extra=(recompile,), **every
        )
    assert recompile.begun == [*range((fail_at or 0) + 1), *range(restart, STEPS)]
    assert flaky.calls >= 1 + (fail_at is not None)
    note = "compile on -> off: torch.compile failed, training without it (RuntimeError: "
    reason = "inductor could not lower aten.fake_op)"
    assert not summary["plan"].compile
    assert summary["plan"].notes[-1] == note + reason
    logged = [r.getMessage() for r in caplog.records if r.name == "services.trainer.train"]
    assert logged == [note + reason]
    assert summary["steps"] == STEPS
    _assert_same(weights, expected, rtol=1e-5, atol=1e-7)
    if checkpoint_every <= STEPS:  # stored after the fallback: the plan it trained under
        plan = json.loads((tmp_path / "flaky" / f"checkpoint-{STEPS}" / PLAN_FILE).read_text())
        assert (plan["compile"], plan["notes"][-1]) == (False, note + reason)


def test_a_torch_without_the_eager_backward_setting_compiles_lazily_and_says_so(
    monkeypatch, caplog
):
    """``force_non_lazy_backward_lowering`` is functorch's internal setting: a torch that
    drops it still trains compiled (its backward failures then fail the run), and says so."""
    import torch._functorch

    class Settings:  # a functorch config without the setting
        def patch(self, **changes):
            raise AssertionError(f"patched {changes}")

    with compiling.backward_with_forward(True):  # this torch has it
        import torch._functorch.config as functorch

        assert functorch.force_non_lazy_backward_lowering is True
    monkeypatch.setattr(torch._functorch, "config", Settings())
    logged = caplog.at_level(logging.WARNING, logger="services.trainer.compiling")
    with logged, compiling.backward_with_forward(True):
        pass
    assert "compiles each backward graph at its first backward()" in caplog.text


SITECUSTOMIZE = """
import os
from pathlib import Path

import torch
import torch._inductor.compile_fx as compile_fx

FAILING = os.environ.get("RANK") in {FAILING}
STORED = os.environ.get("FAIL_ONCE_STORED")  # fail only once this stored file exists
state = {"failing": FAILING and not STORED}


def _compile(graph, example_inputs, **_):  # compiled as traced (no code generated), or not
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    if state["failing"]:
        raise RuntimeError("inductor could not lower aten.fake_op")

    def boxed(graph, _):
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=boxed, bw_compiler=boxed)(graph, example_inputs)


compile_fx.compile_fx = _compile

if FAILING and STORED:
    from transformers import trainer_callback

    step_end = trainer_callback.CallbackHandler.on_step_end

    def _recompile_once_stored(self, args, trainer_state, control):
        if not state["failing"] and Path(STORED).exists():
            state["failing"] = True
            torch._dynamo.reset()  # a recompile, as a shape only this rank's batches has
        return step_end(self, args, trainer_state, control)

    trainer_callback.CallbackHandler.on_step_end = _recompile_once_stored
"""


@pytest.mark.parametrize(
    ("failing", "later"),
    [(("0", "1"), False), (("1",), True)],
    ids=["every-rank-first-step", "one-rank-later"],
)
def test_ranks_that_compile_fails_start_again_without_it_and_train_as_the_eager_pair_does(
    ctx, tiny_model, tmp_path, monkeypatch, failing, later
):
    """Under torchrun compiling may fail on every rank (the same graph) or on one (a shape
    only its batches have), at the first step or after a checkpoint was stored (``later``).
    The rank it fails ends the run, as the others wait for it in the step's collectives
    (until the process group's timeout, 30 minutes, were it to start again alone); the
    worker starts every rank again without compile, from the newest stored checkpoint under
    its plan, else from the start. The pair ends with the steps and the weights of a pair
    that never compiled, its plan saying why."""
    from safetensors.torch import load_file

    from tests.unit.services.test_trainer import _run, _two_ranks

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("{FAILING}", repr(set(failing))))
    eager = _run(ctx, _two_ranks(ctx, tiny_model, epochs=1), lambda data, *, force=False: None)
    expected = ctx.jobs.manifest("job-2", "train")
    cmd = _two_ranks(ctx, tiny_model, epochs=1, job_id="job-3", compile="on")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    if later:
        stored = ctx.store.path("jobs/job-3/train/checkpoints/latest.json")
        monkeypatch.setenv("FAIL_ONCE_STORED", str(stored))
    event = _run(ctx, cmd, lambda data, *, force=False: None)
    manifest = ctx.jobs.manifest("job-3", "train")
    assert manifest["processes"] == 2 and event.steps == eager.steps
    note = "compile on -> off: torch.compile failed, training without it (RuntimeError: "
    assert not manifest["plan"]["compile"]
    assert manifest["plan"]["notes"][-1] == note + "inductor could not lower aten.fake_op)"
    assert manifest["plan"]["notes"].count("resumed: the checkpoint's plan") == int(later)
    if later:  # the checkpoint the relaunch resumed from, not the first launch's (none)
        assert 0 < manifest["resumed_from_step"] < event.steps
    else:
        assert manifest["resumed_from_step"] is None
    if not later:  # a resumed run's loss is its own steps' (the Trainer's)
        assert manifest["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    adapters = [ctx.store.path(ctx.store.key_of(m["adapter"])) for m in (manifest, expected)]
    weights, expected = (load_file(a / "adapter_model.safetensors") for a in adapters)
    _assert_same(weights, expected, rtol=1e-4, atol=1e-6)
