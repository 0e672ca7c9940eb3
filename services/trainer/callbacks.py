"""Trainer callbacks: progress events, checkpoints to the store, stopping on request."""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from services.trainer import ranks
from services.trainer.checkpoints import CheckpointStore
from shared.errors import RetryableError
from shared.periodic import Periodic

log = logging.getLogger(__name__)

# Stop reasons by precedence: when ranks see different ones, the strongest wins.
STOP_REASONS = (None, "cancel", "shutdown", "lost")
#: the training plan a checkpoint was taken under, beside it
PLAN_FILE = "termtune-plan.json"
#: seconds between stop checks (a database query for cancel) off the training thread
STOP_POLL_SECONDS = 1.0


def peak_memory_mb() -> float:
    """Peak device memory (CUDA) or peak process memory (CPU), in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress(TrainerCallback):
    """Reports step, epoch, loss, learning rate, throughput, ETA and peak memory."""

    def __init__(
        self, report: Callable[..., None], *, examples_per_step: int, tokens_per_example: float
    ) -> None:
        self.report, self.examples_per_step = report, examples_per_step
        self.tokens_per_example = tokens_per_example
        self.start, self.first_step = 0.0, 0
        self.last: dict[str, Any] = {}  # the figures last reported

    def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.start, self.first_step = time.monotonic(), state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        """One record a step: the training figures, with the validation loss when the step
        also validated (the Trainer logs them apart; the first waits for the second)."""
        if not state.is_world_process_zero:
            return
        logs = logs or {}
        if "eval_loss" in logs:
            step = state.global_step
            self.last.update(eval_loss=logs["eval_loss"], eval_step=step, step=step)
        elif "loss" not in logs:
            return  # the run's closing totals: the last step was reported already
        else:
            self.last = self._figures(state, logs)
            if control.should_evaluate:
                return  # reported with the validation loss, in a moment
        self.report(dict(self.last), force=state.global_step >= state.max_steps)

    def _figures(self, state: Any, logs: dict[str, Any]) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = state.global_step - self.first_step
        examples_s = done * self.examples_per_step / elapsed
        return {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 3),
            "loss": logs.get("loss"),
            "eval_loss": self.last.get("eval_loss"),  # the latest validation, until the next
            "eval_step": self.last.get("eval_step"),  # ... and the step it was measured at
            "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"),
            "examples_per_s": round(examples_s, 2),
            "tokens_per_s": round(examples_s * self.tokens_per_example, 1),
            "elapsed_s": round(elapsed, 1),
            "eta_s": round(elapsed / max(done, 1) * max(state.max_steps - state.global_step, 0), 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }

    def checkpoint_stored(self, step: int) -> None:
        """Report a stored checkpoint with the latest figures (progress stays whole)."""
        self.report({**self.last, "phase": "checkpoint stored", "step": step}, force=True)


class StoreCheckpoints(TrainerCallback):
    """Uploads every checkpoint the Trainer saves; also asks for one every few minutes.

    With several ranks, every rank waits until all have written their part (RNG states)
    and the first one uploads.
    """

    def __init__(
        self,
        checkpoints: CheckpointStore,
        *,
        every_minutes: float,
        stored: Callable[[int], None],
        plan: dict[str, Any] | None = None,
    ) -> None:
        self.checkpoints, self.every_s, self.stored = checkpoints, every_minutes * 60, stored
        self.plan = plan  # stored with each checkpoint: a resumed run keeps its batch
        self.last = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if ranks.agree_max(int(time.monotonic() - self.last >= self.every_s)):
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        ranks.barrier()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if self.plan is not None:
                (folder / PLAN_FILE).write_text(json.dumps(self.plan))
            self.checkpoints.upload(folder, state.global_step)
            self.stored(state.global_step)
        ranks.barrier()
        self.last = time.monotonic()


class StopOnRequest(TrainerCallback):
    """Ends training after the step during which a stop was asked (``PolledStop`` asks off
    the training thread); on shutdown, saves a checkpoint first.

    A lost lease stops without saving: another worker owns the job and its checkpoints now.
    """

    def __init__(self, should_stop: Callable[[], str | None]) -> None:
        self.should_stop, self.reason = should_stop, None

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.reason = STOP_REASONS[ranks.agree_max(STOP_REASONS.index(self.should_stop()))]
        if self.reason is not None:
            control.should_training_stop = True
            control.should_save = self.reason == "shutdown"


class PolledStop:
    """``should_stop`` asked on a timer in a background thread, not on every step: the
    training loop reads the latest answer (a reason, once seen, stays), and asks
    ``immediate`` (in-memory flags: shutdown, a lost lease) every time."""

    def __init__(
        self,
        should_stop: Callable[[], str | None],
        every: float | None = None,
        immediate: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.ask, self.immediate, self.latest = should_stop, immediate, None
        self.timer = Periodic("stop-poll", every or STOP_POLL_SECONDS, self.poll)

    def poll(self) -> None:
        """Ask now."""
        self._keep(self.ask())

    def _keep(self, reason: str | None) -> None:
        """Keep the strongest reason seen."""
        if STOP_REASONS.index(reason) > STOP_REASONS.index(self.latest):
            self.latest = reason

    def __call__(self) -> str | None:
        self._keep(self.immediate())
        return self.latest

    def __enter__(self) -> PolledStop:
        try:  # at once, so a stop asked before the first step is seen there
            self.poll()
        except RetryableError as exc:  # a database hiccup: the timer asks again
            log.error("%s failed: %s", self.timer.name, exc)
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.stop()
