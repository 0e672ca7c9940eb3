"""The fused LoRA update: peft's arithmetic, its gradients, and peft's forward where not plain."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from services.trainer import lora
from services.trainer.fused_lora import AdaptedLinear, FusedLoraLinear, fuse_lora
from shared import planner
from shared.jobspec import TrainingSpec
from shared.trainplan import model_shape

IDS = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
LABELS = torch.tensor([[4, 5, 1], [6, 1, -100]])


def test_the_hand_written_backward_is_the_gradient():
    torch.manual_seed(0)
    for rows, bias in (((2, 3), None), ((6,), torch.randn(5, dtype=torch.double))):
        weight = torch.randn(5, 4, dtype=torch.double)  # frozen, as every fused base is
        args = [
            torch.randn(*rows, 4, dtype=torch.double, requires_grad=True),  # the input
            torch.randn(2, 4, dtype=torch.double, requires_grad=True),  # A
            torch.randn(5, 2, dtype=torch.double, requires_grad=True),  # B
        ]

        def fused(x, a, b, weight=weight, bias=bias):
            return AdaptedLinear.apply(x, weight, bias, a, b, 0.7, torch.double)

        assert torch.autograd.gradcheck(fused, args)
        x, a, b = args
        want = torch.nn.functional.linear(x, weight, bias) + 0.7 * (x @ a.T) @ b.T
        torch.testing.assert_close(fused(*args), want)


@pytest.mark.parametrize("bias", [False, True])
def test_the_output_may_be_changed_in_place(bias):
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight, b0 = torch.randn(5, 4), torch.randn(5) if bias else None
    a, b = torch.randn(2, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    out = AdaptedLinear.apply(x, weight, b0, a, b, 0.5, torch.float32)
    assert out._base is None  # a view made inside a custom Function refuses in-place changes
    out.mul_(2).sum().backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) > 0


def _peft(model, **config):
    """``model`` under a fresh LoRA adapter whose B matrices are not zero (at peft's zero
    init, A's gradient is zero and a wrong one would pass)."""
    torch.manual_seed(0)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **kw))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return peft_model


def _loss_and_grads(model):
    model.zero_grad()
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fused_layers_train_peft_s_arithmetic(tiny_model):
    from transformers import AutoModelForSeq2SeqLM

    plain = _peft(AutoModelForSeq2SeqLM.from_pretrained(tiny_model))
    fused = copy.deepcopy(plain)
    count, adapted = fuse_lora(fused)
    assert count == adapted == sum(isinstance(m, LoraLinear) for m in plain.modules()) > 0
    assert all(type(m) is FusedLoraLinear for m in fused.modules() if isinstance(m, LoraLinear))
    loss, grads = _loss_and_grads(plain)
    fused_loss, fused_grads = _loss_and_grads(fused)
    assert fused_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * count
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the adapter's weights, names and export are peft's own
    assert fused.state_dict().keys() == plain.state_dict().keys()
    merged = fused.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())


def test_a_bf16_model_computes_in_bf16_and_keeps_fp32_adapter_gradients(tiny_model):
    from transformers import AutoModelForSeq2SeqLM

    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    plain = _peft(base)  # peft keeps a bf16 model's adapter weights in fp32
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer trains bf16
        loss, grads = _loss_and_grads(plain)
        fused_loss, fused_grads = _loss_and_grads(fused)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=2e-2)
    for name, grad in fused_grads.items():
        assert grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grads[name].flatten(), 0)
        assert cosine > 0.99, name
        assert grad.norm() / grads[name].norm() == pytest.approx(1, abs=0.03), name


NOT_PLAIN = {
    "dropout": {"lora_dropout": 0.5},
    "DoRA": {"use_dora": True},
    "LoRA bias": {"lora_bias": True},
}


@pytest.mark.parametrize(
    "case", [*NOT_PLAIN, "merged", "disabled", "two adapters", "per-example adapters"]
)
def test_what_is_not_plain_lora_takes_peft_s_forward(tiny_model, case, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    plain = _peft(AutoModelForSeq2SeqLM.from_pretrained(tiny_model), **NOT_PLAIN.get(case, {}))
    if case in ("two adapters", "per-example adapters"):
        plain.add_adapter("other", LoraConfig(r=2, target_modules="all-linear"))
        for name, param in plain.named_parameters():
            if "lora_B.other" in name:
                torch.nn.init.normal_(param, std=0.02)
        plain.base_model.set_adapter(["default", "other"])
    plain.eval()
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    if case == "merged":
        plain.merge_adapter(), fused.merge_adapter()
    kwargs = {"adapter_names": ["default", "other"]} if case == "per-example adapters" else {}
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        if case == "disabled":
            with plain.disable_adapter():
                want = plain(input_ids=IDS, labels=LABELS, **kwargs).logits
            with fused.disable_adapter():
                got = fused(input_ids=IDS, labels=LABELS, **kwargs).logits
        else:
            want = plain(input_ids=IDS, labels=LABELS, **kwargs).logits
            got = fused(input_ids=IDS, labels=LABELS, **kwargs).logits
    assert calls == []
    torch.testing.assert_close(got, want)


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _two_layers():
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"])
    model = get_peft_model(TwoLayers(), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def _count_fused(monkeypatch) -> list:
    calls: list = []
    real = AdaptedLinear.apply
    monkeypatch.setattr(AdaptedLinear, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _out_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_base_layers_with_a_bias_are_fused(monkeypatch):
    plain = _two_layers()
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == (2, 2)
    calls = _count_fused(monkeypatch)
    x = torch.randn(3, 5, 4)
    want, grads = _out_and_grads(plain, x)
    got, fused_grads = _out_and_grads(fused, x)
    assert len(calls) == 2 and len(grads) == 4
    torch.testing.assert_close(got, want)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


UNUSUAL_LAYERS = {
    "a hook on the base layer": lambda layer: layer.base_layer.register_forward_hook(
        lambda m, i, o: o * 2
    ),
    "a backward hook on the base layer": lambda layer: layer.base_layer.register_full_backward_hook(
        lambda m, gi, go: (gi[0] * 3,)
    ),
    "a hook on lora_A": lambda layer: layer.lora_A["default"].register_forward_hook(
        lambda m, i, o: o * 2
    ),
    "a trainable base layer": lambda layer: layer.base_layer.weight.requires_grad_(True),
    "a trainable bias": lambda layer: layer.base_layer.bias.requires_grad_(True),
    "a patched forward (accelerate's hooks)": lambda layer: setattr(
        layer.base_layer, "forward", functools.partial(torch.nn.Linear.forward, layer.base_layer)
    ),
}


@pytest.mark.parametrize("case", UNUSUAL_LAYERS)
def test_an_unusual_layer_takes_peft_s_forward(monkeypatch, case):
    plain = _two_layers()
    fused = copy.deepcopy(plain)
    fuse_lora(fused)
    for model in (plain, fused):
        UNUSUAL_LAYERS[case](model.base_model.model.up)
    calls = _count_fused(monkeypatch)
    x = torch.randn(3, 5, 4, requires_grad=True)
    want, grads = _out_and_grads(plain, x)
    got, fused_grads = _out_and_grads(fused, x)
    assert len(calls) == 1  # the other layer, untouched, is fused
    torch.testing.assert_close(got, want)
    assert fused_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=name)


def test_a_global_module_hook_stops_the_fusion(monkeypatch):
    fused = _two_layers()
    fuse_lora(fused)
    calls = _count_fused(monkeypatch)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        fused(torch.randn(3, 4))
    finally:
        handle.remove()
    assert calls == [] and "Linear" in seen  # the hook saw the base layers run


def test_an_input_in_another_dtype_fails_as_peft_s_forward_does(monkeypatch):
    fused = _two_layers()
    fuse_lora(fused)
    calls = _count_fused(monkeypatch)
    with pytest.raises(RuntimeError, match="dtype"):
        fused(torch.randn(3, 4, dtype=torch.double))
    assert calls == []
    fused.double()  # autocast leaves float64 alone, and so does the fusion
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(torch.randn(3, 4, dtype=torch.double)).dtype == torch.float64
    assert calls == []


def test_the_spec_chooses_the_forward(tiny_model):
    shape = model_shape(str(tiny_model))
    rows = planner.Rows(8, 16, 16)
    cases = (({}, True), ({"fused_lora": False}, False), ({"recipe": "notebook"}, False))
    for settings, fused in cases:
        spec = TrainingSpec.model_validate(settings)
        plan = planner.resolve(spec, shape, rows, dev="cpu")
        model = lora.build_model(str(tiny_model), spec, plan)
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        assert layers and all((type(m) is FusedLoraLinear) == fused for m in layers), settings
        note = [n for n in plan.notes if n.startswith("fused LoRA")]
        on = "fused LoRA: each adapted layer, base and update, in one autograd node"
        assert note == ([on] if fused else [])


def test_the_plan_says_where_the_fusion_applies(tiny_model):
    shape, rows = model_shape(str(tiny_model)), planner.Rows(8, 16, 16)
    spec = TrainingSpec.model_validate({"lora": {"dropout": 0.1}})
    plan = planner.resolve(spec, shape, rows, dev="cpu")
    assert "fused LoRA: off, peft's forward (LoRA dropout is not plain LoRA)" in plan.notes
    nf4 = TrainingSpec.model_validate({"quantization": "4bit"})
    plan = planner.resolve(nf4, shape, rows, dev="cuda", memory_bytes=24 << 30, bf16=True)
    assert plan.quantization == "4bit"
    assert (
        "fused LoRA: only in the layers left unquantized (the quantized ones take peft's "
        "bitsandbytes forward)"
    ) in plan.notes


def test_torch_compile_traces_the_fused_layers_whole(tiny_model):
    """What the trainer compiles on CUDA: the fused model as one graph (aot_eager: dynamo's
    and autograd's tracing without code generation), the same loss and gradients."""
    from transformers import AutoModelForSeq2SeqLM

    model = _peft(AutoModelForSeq2SeqLM.from_pretrained(tiny_model))
    loss, grads = _loss_and_grads(model)
    assert fuse_lora(model)[0] > 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_loss, compiled_grads = _loss_and_grads(compiled)
    assert compiled_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    for name, grad in grads.items():
        got = compiled_grads[f"_orig_mod.{name}"]
        torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_traces_them_under_autocast_too(tiny_model):
    """As the CUDA plan trains: a bf16 model under autocast, compiled whole, the eager loss."""
    from transformers import AutoModelForSeq2SeqLM

    model = _peft(AutoModelForSeq2SeqLM.from_pretrained(tiny_model, dtype=torch.bfloat16))
    fuse_lora(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model)
        compiled_loss, compiled_grads = _loss_and_grads(compiled)
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-2)
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(
            compiled_grads[f"_orig_mod.{name}"].flatten(), grad.flatten(), 0
        )
        assert cosine > 0.99, name
