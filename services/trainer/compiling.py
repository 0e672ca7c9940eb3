"""torch.compile in the trainer: what counts as its failure, and where a run it failed
starts again without it (nothing compiled may have touched the weights it starts from)."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from services.trainer.lora import Plan

log = logging.getLogger(__name__)


def note(exc: BaseException) -> str:
    """The plan's note on a compile failure: what failed, one line."""
    return f"compile on -> off: torch.compile failed, training without it ({_cause(exc)})"


def without(plan: Plan, why: str) -> Plan:
    """The plan without torch.compile, its notes saying why (``note``)."""
    return replace(plan, compile=False, notes=(*plan.notes, why))


def _cause(exc: BaseException) -> str:
    """The innermost error (dynamo wraps its backend's as ``inner_exception``), one line."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def adapter_weights(model: Any) -> dict[str, Any]:
    """A copy of the adapter's weights (what a restart from the first step loads back)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def restart_point(
    output_dir: Path, resumed: str | None, model: Any, before: dict[str, Any] | None
) -> str | None:
    """Where a run that torch.compile failed starts again: the newest checkpoint it wrote,
    else the one it resumed from; with neither, the adapter's first weights loaded back."""
    from peft import set_peft_model_state_dict
    from transformers.trainer_utils import get_last_checkpoint

    written = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if written is not None and (resumed is None or _step(written) > _step(resumed)):
        return written
    if resumed is None and before is not None:
        set_peft_model_state_dict(model, before)
    return resumed


def _step(checkpoint: str) -> int:
    """A checkpoint folder's step (checkpoint-N), -1 for another name."""
    tail = Path(checkpoint).name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def replan(callbacks: list[Any], plan: Plan) -> None:
    """The callbacks that store the plan with each checkpoint take the new one."""
    from services.trainer.callbacks import StoreCheckpoints

    for callback in callbacks:
        if isinstance(callback, StoreCheckpoints) and callback.plan is not None:
            callback.plan = asdict(plan)


def backward_with_forward(on: bool) -> AbstractContextManager[Any]:
    """With compile on, each graph's backward compiled with its forward, not at its first
    ``backward()``. AOTAutograd compiles a backward lazily, outside dynamo's backend call, so
    a failure there surfaces as the backend's bare error (a plain ``RuntimeError`` says
    nothing of compile) after a forward already ran; compiled with the forward, it is
    dynamo's ``BackendCompilerFailed``, before the step, as ``failed`` knows it."""
    if not on:
        return nullcontext()
    import torch._functorch.config as functorch

    if not hasattr(functorch, "force_non_lazy_backward_lowering"):  # an internal setting
        log.warning(
            "this torch compiles each backward graph at its first backward(): a failure "
            "compiling one fails the run instead of falling back to training without compile"
        )
        return nullcontext()
    return functorch.patch(force_non_lazy_backward_lowering=True)


def failed(exc: BaseException) -> bool:
    """Whether an error came from torch.compile (dynamo or inductor), not from training."""
    while exc is not None:
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
