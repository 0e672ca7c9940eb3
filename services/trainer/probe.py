"""A probe step on CUDA: the planned batch of the longest rows, halved on out-of-memory.

The memory model plans the batch; this checks it on the device before training starts,
so a wrong estimate costs seconds here rather than a crash at the longest batch an hour in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from services.trainer import ranks
from services.trainer.lora import Plan
from shared import trainplan
from shared.errors import OutOfMemory
from shared.planner import Rows, backed_off

log = logging.getLogger(__name__)


def step(model: Any, rows: Rows, batch: int) -> int:
    """One forward and backward pass on random ids of the longest rows, in training mode as
    the run's steps are (gradient checkpointing works, dropout keeps its masks: a model
    loaded for training is in eval mode but for its adapter); peak bytes."""
    vocab = model.config.vocab_size
    dev = next(p.device for p in model.parameters())
    torch.cuda.reset_peak_memory_stats()
    if model.config.is_encoder_decoder:
        ids = torch.randint(2, vocab, (batch, rows.source_tokens), device=dev)
        labels = torch.randint(2, vocab, (batch, rows.target_tokens), device=dev)
    else:  # one sequence, the loss on the answer's part (as trl's trainer labels it)
        ids = torch.randint(2, vocab, (batch, rows.longest), device=dev)
        labels = ids.clone()
        labels[:, : rows.source_tokens] = -100
    mode = model.training
    model.train()
    try:
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(mode)
    return torch.cuda.max_memory_allocated()


def on_device(
    model: Any,
    plan: Plan,
    rows: Rows,
    *,
    effective_batch: int,
    processes: int,
    keep_accumulation: bool = False,
) -> Plan:
    """The plan checked on the CUDA device the model is on (its batch halved as needed)."""
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return fit_batch(
        plan,
        run=lambda batch: step(model, rows, batch),
        effective_batch=effective_batch,
        processes=processes,
        total_bytes=torch.cuda.mem_get_info()[1],
        optimizer_bytes=adapter * 8,  # AdamW's two fp32 moments
        clear=torch.cuda.empty_cache,
        keep_accumulation=keep_accumulation,
    )


def fit_batch(
    plan: Plan,
    *,
    run: Callable[[int], int],
    effective_batch: int,
    processes: int,
    total_bytes: int,
    optimizer_bytes: int,
    clear: Callable[[], None] = lambda: None,
    keep_accumulation: bool = False,
) -> Plan:
    """The plan with the largest batch, at most the planned one, whose probe step fits
    (its peak and the optimizer's moments within the device's usable share); the
    accumulation then keeps ``effective_batch``, or stays as it is where the spec set it
    (``keep_accumulation``: recomputed, a spec's accumulation of 1 became 11)."""
    batch = plan.batch_size
    limit = int(total_bytes * trainplan.MEMORY_FRACTION)
    while True:
        try:
            peak = run(batch)
            if peak + optimizer_bytes <= limit:
                break
            why = f"peak {peak / trainplan.GIB:.1f} GiB + optimizer over the usable share"
        except torch.OutOfMemoryError as exc:
            why = f"out of memory ({str(exc).splitlines()[0][:120]})"
        finally:
            clear()
        if batch == 1:
            raise OutOfMemory(
                f"one example of the longest rows does not fit on the GPU ({why}): lower "
                "dataset.max_source_length / max_target_length, turn on "
                "training.gradient_checkpointing or use training.quantization 4bit"
            )
        log.warning("probe at batch %d: %s; halving", batch, why)
        batch //= 2
    batch = -ranks.agree_max(-batch)  # every rank takes the smallest
    if batch == plan.batch_size:
        return plan
    note = f"probe on the longest rows: batch {plan.batch_size} did not fit, {batch} does"
    if keep_accumulation:
        effective_batch = batch * plan.gradient_accumulation_steps * processes
    return backed_off(plan, batch, effective_batch, processes, note)
