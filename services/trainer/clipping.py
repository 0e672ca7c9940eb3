"""Gradient clipping without a call per gradient.

torch's ``clip_grad_norm_`` takes every gradient's norm in one foreach call, then moves
each norm to the first gradient's device one ``to`` at a time (a no-op call per gradient,
864 a step for flan-t5-large's adapter) before it stacks them. Where all the gradients are
plain tensors on one device in one dtype (one GPU, or DDP, where each rank holds the whole
gradient) there is nothing to move: the norms are stacked as they come. The clip itself is
torch's (``clip_grads_with_norm_``); the total norm is the same number.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType

#: where the Trainer's gradients are whole, plain tensors (one device, or DDP on GPUs or
#: CPUs; not FSDP's, DeepSpeed's or XLA's)
WHOLE = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` (one device, one dtype) so their total 2-norm is at
    most ``max_norm``; the norm before clipping."""
    grads = [p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def one_group(params: list[torch.nn.Parameter]) -> bool:
    """Whether the gradients are plain tensors on one device in one dtype."""
    kinds = {(type(p.grad), p.grad.device, p.grad.dtype) for p in params}
    return len(kinds) == 1 and next(iter(kinds))[0] is torch.Tensor


class OneDeviceClipping:
    """A Trainer mixin: :func:`clip_grad_norm` where the gradients are one group, the
    Trainer's own clipping anywhere else."""

    def _clip_grad_norm(self, model: Any) -> Any:
        params = [p for p in model.parameters() if p.grad is not None]
        accelerator = self.accelerator  # type: ignore[attr-defined]
        if accelerator.distributed_type not in WHOLE or not params or not one_group(params):
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        accelerator.unscale_gradients()  # fp16's loss scale, as accelerate's clipping does
        return clip_grad_norm(params, self.args.max_grad_norm)  # type: ignore[attr-defined]
