"""Operator calls per optimizer step: the notebook's recipe against termtune's, by variant.

    python -m bench.kernels [--width 1024] [--source 32] [--target 64] [--layers 24]

A randomly initialised model of flan-t5-large's shape (24 + 24 layers, 16 heads, d_model
1024, gated-GELU d_ff 2816, vocabulary 32128), LoRA r=64 on every linear layer, batch 1 and
no accumulation, trained through the trainer's own code path (``services.trainer.train``)
on CPU; one optimizer step (the third) profiled with torch's profiler. Counted: the aten
operators called from Python, the autograd engine and the optimizer (top level: the calls
that each launch kernels on a GPU), and of those the ones that compute (views, allocations
and metadata ops such as ``t``, ``reshape``, ``empty`` or ``detach`` launch nothing). Every
row clips the gradients as the trainer does (``services.trainer.clipping``: torch's
``clip_grad_norm_`` makes a call per gradient, 864 here). Then termtune's recipe without
and with the fused adapted layers on the same model in bf16 with fp32 adapters under
autocast, as the CUDA plan trains (CPU autocast here), where peft's forward also copies each
layer's input to fp32 and back. The counts do not depend on the
width or the lengths (``--width`` only makes the run quicker); the time a step takes does.
``--layers`` (each stack's) changes the counts: fewer only to show the script runs.
Prints figures; nothing here is a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

#: aten ops that only make views or read metadata (no kernel on a GPU), unless they copy
VIEW_OPS = {
    "aten::t", "aten::reshape", "aten::view", "aten::transpose", "aten::detach",
    "aten::expand", "aten::as_strided", "aten::narrow", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::alias", "aten::lift_fresh",
    "aten::detach_", "aten::_unsafe_view", "aten::unflatten", "aten::flatten",
    "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::to",
    "aten::view_as", "aten::split", "aten::chunk", "aten::unbind", "aten::_reshape_alias",
    "aten::empty", "aten::new_empty", "aten::empty_like", "aten::empty_strided",
}  # fmt: skip
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("notebook recipe (eager attention, LoRA dropout 0.1, AdamW for-loop)", {"recipe": "notebook"}),
    ("+ SDPA attention", {"recipe": "notebook", "attention": "sdpa"}),
    ("+ no LoRA dropout", {"recipe": "notebook", "attention": "sdpa", "lora": {"dropout": 0.0}}),
    ("+ fused AdamW", {"recipe": "notebook", "attention": "sdpa", "lora": {"dropout": 0.0},
                       "optimizer": "adamw_torch_fused"}),
    ("+ torch's gelu(tanh) and rms_norm", {"recipe": "termtune", "fused_lora": False}),
    ("termtune default (+ each adapted layer in one autograd node)", {"recipe": "termtune"}),
]  # fmt: skip
#: the same model in bf16 (adapters in fp32, as peft keeps them), trained under autocast as
#: the CUDA plan trains it (CPU autocast here): peft's LoRA forward against the fused one
BF16_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("termtune, peft's LoRA forward", {"recipe": "termtune", "fused_lora": False}),
    ("termtune default (each adapted layer in one autograd node)", {"recipe": "termtune"}),
]


def build_model(folder: Path, width: int, layers: int = 24) -> Path:
    """flan-t5-large's shape (scaled in width only) with random weights and a tokenizer."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from services.cli.tinymodel import build_tiny_t5
    from tests.factories import SAMPLE_DATA

    tiny = build_tiny_t5(folder / "tiny", data_file=SAMPLE_DATA)
    scale = width / 1024
    config = T5Config(
        vocab_size=32128, d_model=width, d_kv=max(1, round(64 * scale)), d_ff=round(2816 * scale),
        num_layers=layers, num_decoder_layers=layers, num_heads=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder / "model")
    return folder / "model"


def counter() -> Any:
    """A Trainer callback that profiles the third optimizer step and counts its operators."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Count(TrainerCallback):
        counts: dict[str, int] = {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == 2:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == 3:
                seconds = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                self.counts = {**count_ops(self.prof.events()), "seconds": seconds}

    return Count()


def count_ops(events: Any) -> dict[str, int]:
    """Top-level aten calls, and those that compute."""
    top = [
        e
        for e in events
        if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "autograd::")))
    ]
    return {"calls": len(top), "compute": sum(map(computes, top))}


def computes(event: Any) -> bool:
    """Whether an op runs a kernel: not a view op, or one that copied (``to`` a new dtype,
    ``reshape`` or ``contiguous`` of a strided tensor)."""
    children = [c for c in event.cpu_children if c.name.startswith("aten::")]
    return event.name not in VIEW_OPS or any(map(computes, children))


def run_variant(
    model_dir: Path, overrides: dict[str, Any], source: int, target: int, bf16: bool = False
) -> dict:
    """One variant through services.trainer.train; its counts and the profiled step's time.
    ``bf16``: the weights in bf16 under autocast, as on CUDA."""
    import dataclasses

    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer

    from services.trainer import lora, train
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.trainplan import model_shape

    spec = TrainingSpec.model_validate(
        {"batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": 3,
         "checkpoint_every_steps": 1000, "logging_steps": 1000, **overrides}
    )  # fmt: skip
    rows = planner.Rows(4, source, target)
    plan = planner.resolve(spec, model_shape(str(model_dir)), rows, dev="cpu")
    if bf16:
        plan = dataclasses.replace(plan, precision="bf16")
    torch.manual_seed(0)
    model = lora.build_model(str(model_dir), spec, plan)
    gen = torch.Generator().manual_seed(0)
    table = pa.table(
        {
            "input_ids": [torch.randint(2, 32000, (source,), generator=gen).tolist()] * 4,
            "labels": [torch.randint(2, 32000, (target,), generator=gen).tolist()] * 4,
        }
    )
    count = counter()
    with tempfile.TemporaryDirectory() as out:
        train.train(
            model,
            AutoTokenizer.from_pretrained(model_dir),
            table,
            spec=spec,
            plan=plan,
            output_dir=Path(out),
            callbacks=[count],
        )
    return {**count.counts, "plan": plan}


def measure(model_dir: Path, variants: list, args: Any, bf16: bool = False) -> list:
    """Each variant's counts, printed as they come."""
    rows = []
    for label, overrides in variants:
        result = run_variant(model_dir, overrides, args.source, args.target, bf16=bf16)
        plan = result["plan"]
        print(
            f"  {label}: {result['calls']:,} calls, {result['compute']:,} computing, "
            f"step {result['seconds']:.2f} s ({plan.attention}, {plan.optimizer}, "
            f"{plan.precision})",
            flush=True,
        )
        rows.append((label, result))
    return rows


def table(title: str, rows: list) -> None:
    """Each row against the first."""
    base = rows[0][1]
    print(title)
    print(f"{'variant':<70} {'calls':>7} {'vs 1st':>6} {'compute':>8} {'vs 1st':>6} {'step s':>7}")
    for label, r in rows:
        print(
            f"{label:<70} {r['calls']:>7,} {base['calls'] / r['calls']:>5.2f}x "
            f"{r['compute']:>8,} {base['compute'] / r['compute']:>5.2f}x {r['seconds']:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024, help="d_model (1024: flan-t5-large)")
    parser.add_argument("--source", type=int, default=32)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--layers", type=int, default=24, help="each stack's (smoke: 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-kernels-") as tmp:
        print(
            f"building flan-t5-large's shape at width {args.width}, {args.layers} + "
            f"{args.layers} layers...",
            flush=True,
        )
        model_dir = build_model(Path(tmp), args.width, args.layers)
        rows = measure(model_dir, VARIANTS, args)
        half = measure(model_dir, BF16_VARIANTS, args, bf16=True)
    shape = f"batch 1, {args.source} + {args.target} tokens, one optimizer step, CPU"
    table(f"{shape}, fp32 (the CPU plan)", rows)
    table(f"{shape}, bf16 weights and fp32 adapters under autocast (the CUDA plan)", half)
    print(logits_share())


def logits_share() -> str:
    """What a fused linear cross-entropy (liger-kernel's) would save: the logits' share of
    what an example keeps for the backward pass, by the planner's memory model, in bf16."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from shared.trainplan import shape_from

    t5 = T5Config(
        vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    llama = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    parts = []
    for name, config, cls, tokens in (
        ("flan-t5-large", t5, T5ForConditionalGeneration, (128, 256)),
        ("Llama-3-8B", llama, LlamaForCausalLM, (64, 256)),
    ):
        with init_empty_weights():
            shape = shape_from(cls(config), config)
        plain, checkpointed = (_logits_share(shape, tokens, c) for c in (False, True))
        parts.append(
            f"{name}'s shape, {tokens[0]} + {tokens[1]} tokens: {plain:.0%} "
            f"({checkpointed:.0%} with gradient checkpointing)"
        )
    return (
        "the logits' share of what an example keeps for the backward pass (memory model, "
        "bf16): " + "; ".join(parts)
    )


def _logits_share(shape: Any, tokens: tuple[int, int], checkpointing: bool) -> float:
    import dataclasses

    from shared.trainplan import example_bytes

    kept = [
        example_bytes(s, *tokens, dtype_bytes=2, gradient_checkpointing=checkpointing)
        for s in (shape, dataclasses.replace(shape, vocab=0))
    ]
    return 1 - kept[1] / kept[0]


if __name__ == "__main__":
    main()
