"""LoRA's update as one autograd node: fewer kernels and calls than peft's chain of modules.

peft's ``lora.Linear`` adds ``lora_B(lora_A(dropout(x))) * scaling`` to the base layer's
output through separate modules: it casts the input to the adapter's dtype (a copy of the
whole activation, bf16 to fp32, where the base model is bf16 and the adapter fp32), runs two
linears, multiplies by the scale, adds and casts back, each op with its own autograd node.
``LoraUpdate`` computes the same sum in the base output's dtype with two matrix products
(the scale and the add folded into the second, ``addmm``), and its backward by hand in four
(the scale folded into each), saving what peft's path saves: the input and the rank-r
activation. The base layer is still called as peft calls it.

Only plain LoRA takes this path: one active adapter, no dropout, no DoRA or other variant,
no LoRA bias, not merged, not disabled, no per-example adapters; anything else runs peft's
own forward. The weights, their names and the saved adapter are peft's, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.autograd.function import once_differentiable


class LoraUpdate(torch.autograd.Function):
    """``result + scaling * (x @ A.T) @ B.T`` in ``result``'s dtype; backward by hand."""

    @staticmethod
    def forward(
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        dtype = result.dtype
        x2 = _as(x, dtype).reshape(-1, x.shape[-1])
        a, b = _as(weight_a, dtype), _as(weight_b, dtype)
        out = result.new_empty(result.shape)  # not a view: callers may change it in place
        rows = result.reshape(-1, result.shape[-1])
        # every product in result's dtype: autocast would recast linear but not addmm(out=)
        with torch.autocast(result.device.type, enabled=False):
            h = nn.functional.linear(x2, a)
            torch.addmm(rows, h, b.t(), alpha=scaling, out=out.view(rows.shape))
        ctx.save_for_backward(x2, h, a, b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        g_h = torch.mm(g, b)  # the gradient at h, before the scale
        needs = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if needs[1]:
            grad_x = torch.addmm(x2, g_h, a, beta=0, alpha=scaling).view(ctx.x_shape)
        if needs[2]:
            grad_a = torch.addmm(a, g_h.t(), x2, beta=0, alpha=scaling)
        if needs[3]:
            grad_b = torch.addmm(b, g.t(), h, beta=0, alpha=scaling)
        # autograd casts grad_a and grad_b to the adapter's dtype where it differs
        return grad, grad_x, grad_a, grad_b, None


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class FusedLoraLinear(LoraLinear):
    """peft's ``lora.Linear`` whose plain-LoRA forward is one :class:`LoraUpdate`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter(args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        return LoraUpdate.apply(
            result,
            x,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
        )

    def _plain_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter, where its forward is plain LoRA; else None."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        plain = (
            name not in self.lora_variant
            and isinstance(self.lora_dropout[name], nn.Identity)
            and self.lora_A[name].bias is None
            and self.lora_B[name].bias is None
        )
        return name if plain else None


def fuse_lora(model: nn.Module) -> tuple[int, int]:
    """Give every peft ``lora.Linear`` in ``model`` the fused forward; how many it gave it, of
    how many adapted layers (bitsandbytes' quantized layers keep peft's own classes)."""
    fused = adapted = 0
    for module in model.modules():
        adapted += isinstance(module, LoraLayer)
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused, adapted
