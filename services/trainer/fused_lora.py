"""An adapted linear layer as one autograd node: fewer calls and kernels than peft's modules.

peft's ``lora.Linear`` adds ``lora_B(lora_A(dropout(x))) * scaling`` to its base layer's
output through separate modules: the base ``nn.Linear``, a cast of the input to the
adapter's dtype (a copy of the whole activation, bf16 to fp32, where the base model is bf16
and the adapter fp32), two linears, a multiply by the scale, an add and a cast back, each
with its own autograd node; in backward the input's two gradients (the base's and the
adapter's) are computed apart and summed. :class:`AdaptedLinear` computes
``x Wᵀ + b + s·(x Aᵀ) Bᵀ`` in one node in the compute dtype (autocast's, where it is on):
three matrix products forward (the scale and the add folded into the last, ``addmm_``) and
five backward (the input's two gradients summed by ``addmm_``), saving what peft's path
saves (the input, the rank-r activation and the weights).

Only plain LoRA over a plain frozen ``nn.Linear`` takes this path: one active adapter, no
dropout, no DoRA or other variant, no LoRA bias, not merged, not disabled, no per-example
adapters, no hooks on the layers it computes (nor global ones), not float64; anything else
runs peft's own forward. The weights,
their names and the saved adapter are peft's, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks


class AdaptedLinear(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T`` in ``dtype`` (W and bias frozen);
    backward by hand."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        x, w, a, b = (_as(t, dtype) for t in (x, weight, weight_a, weight_b))
        x2 = x.reshape(-1, x.shape[-1])
        # in dtype: autocast would recast linear but not the in-place addmm_
        with torch.autocast(x.device.type, enabled=False):
            # without a bias, linear's output is no view (callers may change it in place;
            # a view made inside a custom Function may not be)
            out = nn.functional.linear(x, w)
            h = nn.functional.linear(x2, a)
            out.view(-1, out.shape[-1]).addmm_(h, b.t(), alpha=scaling)
            if bias is not None:
                out.add_(_as(bias, dtype))
        # W serves only the input's gradient (kept where one is asked: under autocast a
        # cast copy of an fp32 weight)
        ctx.save_for_backward(x2, h, w if ctx.needs_input_grad[0] else None, a, b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, w, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        g_h = torch.mm(g, b)  # the gradient at h, before the scale
        needs = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if needs[0]:  # the base's gradient and the adapter's in one addmm
            grad_x = torch.mm(g, w).addmm_(g_h, a, alpha=scaling).view(ctx.x_shape)
        if needs[3]:
            grad_a = torch.addmm(a, g_h.t(), x2, beta=0, alpha=scaling)
        if needs[4]:
            grad_b = torch.addmm(b, g.t(), h, beta=0, alpha=scaling)
        # autograd casts each gradient to its input's dtype where it differs
        return grad_x, None, None, grad_a, grad_b, None, None


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class FusedLoraLinear(PeftLoraLinear):
    """peft's ``lora.Linear`` whose plain-LoRA forward is one :class:`AdaptedLinear`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = self._plain_adapter(args, kwargs)
        dtype = None if adapter is None else self._compute_dtype(x)
        if adapter is None or dtype is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return AdaptedLinear.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
            dtype,
        )

    def _plain_adapter(self, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter, where its forward is plain LoRA over a plain frozen
        ``nn.Linear``; else None."""
        if args or kwargs or self.disable_adapters or self.merged or not _plain(self.base_layer):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        plain = (
            name not in self.lora_variant
            and _unhooked(self.lora_A[name])
            and _unhooked(self.lora_B[name])
            and isinstance(self.lora_dropout[name], nn.Identity)
            and self.lora_A[name].bias is None
            and self.lora_B[name].bias is None
        )
        return name if plain else None

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype the base layer would compute in: autocast's where it is on (autocast
        leaves float64 alone), else the weight's; None where the input's differs (the base
        layer's own error, unfused) or either is float64."""
        weight = self.base_layer.weight
        if torch.float64 in (x.dtype, weight.dtype):
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return weight.dtype if x.dtype == weight.dtype else None


def _plain(base: nn.Module) -> bool:
    """A frozen ``nn.Linear`` (no subclass) that no hook or patched forward wraps."""
    return (
        type(base) is nn.Linear
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and _unhooked(base)
    )


def _unhooked(module: nn.Module) -> bool:
    """No hook of its own or global one, and no patched forward (accelerate's device hooks
    patch it): the fused path computes the module without calling it."""
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
        module_hooks._global_forward_hooks,
        module_hooks._global_forward_pre_hooks,
        module_hooks._global_backward_hooks,
        module_hooks._global_backward_pre_hooks,
    )
    return not any(hooks) and "forward" not in vars(module)


def fuse_lora(model: nn.Module) -> tuple[int, int]:
    """Give every peft ``lora.Linear`` in ``model`` the fused forward; how many it gave it, of
    how many adapted layers (bitsandbytes' quantized layers keep peft's own classes)."""
    fused = adapted = 0
    for module in model.modules():
        adapted += isinstance(module, LoraLayer)
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused, adapted
