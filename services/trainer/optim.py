"""The optimizer: the Trainer's own, or LoRA+ (peft) where the spec sets a ratio."""

from __future__ import annotations

from typing import Any


def use_loraplus(trainer: Any, ratio: float) -> None:
    """Give ``trainer`` a LoRA+ optimizer: the B matrices at ``ratio`` times the learning rate.

    The optimizer class and its arguments (fused AdamW, 8-bit, betas) are the ones the
    Trainer would pick for ``args.optim``; only the parameter groups differ. The Trainer's
    scheduler then scales every group alike, and its checkpoints store and restore them.
    Ratio 1 leaves the Trainer to build its own.
    """
    if ratio == 1:
        return
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    trainer.optimizer = create_loraplus_optimizer(
        trainer.model,
        optimizer_cls,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=trainer.args.weight_decay,
        **kwargs,
    )
