"""GPU check: a randomly initialised model of flan-t5-large's shape trained through the
trainer's own code path (``services.trainer.train`` under a ``shared.planner`` plan, the
CUDA probe included); tokens/s, peak memory, MFU, GPU-busy share and kernels a step.

    python -m bench.gpu_qlora [--steps 30] [--source 128] [--target 256]
                              [--family t5|llama] [--out bench/results/gpu_qlora.jsonl]
    python -m bench.gpu_qlora --smoke      # the same code on CPU, small, to check it runs

Needs CUDA (and bitsandbytes' CUDA build for the nf4 modes) unless --smoke. No hub access:
the model is built from flan-t5-large's configuration values (750M parameters). Modes: the
auto plan (termtune's default: batch and precision chosen for this GPU), the notebook's
recipe (nf4, 1 x 2), and the 2026-11-28 record's best row (bf16 LoRA, batch 32) for
comparison. ``--family llama`` trains Llama-3.2-1B's shape (1.24B parameters, decoder-only:
trl's SFTTrainer, every token charged to the whole stack) packed (the default) and padded.
Each runs --steps optimizer steps; the first 5 are warm-up (compilation
included), the last is profiled, the ones between are timed. MFU = 4 x (encoder weights x
source tokens + decoder and LM-head weights x target tokens) x examples/s over the card's
dense bf16 peak (frozen base: no weight gradients; each half charged for its own tokens).
Every line printed is JSON; with --out they are also written to that file, which ``make
bench`` on a machine without a GPU copies into the figures page (the card, versions and
date are in the first line).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

# google/flan-t5-large's configuration (config.json on the hub), written out: no hub here.
FLAN_T5_LARGE = dict(
    vocab_size=32128,
    d_model=1024,
    d_kv=64,
    d_ff=2816,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    dropout_rate=0.1,
)
#: meta-llama/Llama-3.2-1B's configuration (config.json on the hub), written out: the
#: decoder-only shape most teams import (tied embeddings, grouped-query attention, llama3 rope)
LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
)  # fmt: skip
#: weights an encoder token and a decoder token pass (the LM head included), as
#: shared.trainplan.model_shape counts them for the configuration above
FLAN_T5_LARGE_MATMUL = (308_281_344, 441_843_712)
WARMUP = 5
#: the shipped sample the offline tokenizer is trained on
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data" / "medical_terms.jsonl"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A10G": 125.0, "A100": 312.0, "L4": 121.0}


def build(folder: Path, width: int = 1024, family: str = "t5") -> int:
    """Save a random flan-t5-large- (or Llama-3.2-1B-) shaped model (``width`` scales the
    model width only) with an offline tokenizer (it only pads here); its parameter count."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from services.cli.tinymodel import build_tiny_t5

    if family == "llama":
        return _build_llama(folder, width)
    scale = width / 1024
    shape = {**FLAN_T5_LARGE, "d_model": width, "d_ff": round(2816 * scale)}
    shape["d_kv"] = max(1, round(64 * scale))
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**shape))
    model.save_pretrained(folder)
    tiny = build_tiny_t5(folder / "tiny", data_file=SAMPLE_DATA)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _build_llama(folder: Path, width: int) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from services.cli.tinycausal import build_tiny_causal

    scale = width / 2048
    shape = {**LLAMA_3_2_1B, "hidden_size": width, "intermediate_size": round(8192 * scale)}
    if width < 2048:  # the smoke run: two layers of four heads, a smaller vocabulary
        shape.update(
            vocab_size=32000, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=width // 4,
        )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(folder)
    tiny = build_tiny_causal("llama", folder / "tiny", data_file=SAMPLE_DATA, hidden=32)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


#: (label, the job spec's training section)
MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("auto plan (termtune default)", {}),
    ("notebook recipe (nf4, 1x2)", {"recipe": "notebook"}),
    ("bf16 LoRA, batch 32 (the 2026-11-28 best row)",
     {"recipe": "notebook", "quantization": "none", "batch_size": 32,
      "gradient_accumulation_steps": 1}),
    ("auto plan, compile off (what torch.compile gives)", {"compile": "off"}),
    ("auto plan, compile off, peft's LoRA forward (what the fused update gives eagerly)",
     {"compile": "off", "fused_lora": False}),
)  # fmt: skip
#: the decoder-only modes (--family llama): packing is what differs from T5's path
CAUSAL_MODES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("auto plan (termtune default: packed)", {}),
    ("auto plan, padded batches (packing off)", {"packing": "off"}),
)


def run(
    folder: Path, training: dict[str, Any], *, steps: int, source: int, target: int
) -> dict[str, Any]:
    """Train ``steps`` steps on random tokens through the trainer's code path; the figures."""
    import pyarrow as pa
    import torch
    from transformers import AutoTokenizer

    from services.trainer import lora, probe, train
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.trainplan import model_shape

    spec = TrainingSpec.model_validate(
        {**training, "max_steps": steps, "logging_steps": 10**6, "checkpoint_every_steps": 10**6}
    )
    shape = model_shape(str(folder))
    rows = planner.Rows(10**6, source, target)
    plan = planner.resolve(spec, shape, rows)
    torch.manual_seed(0)
    model = lora.build_model(str(folder), spec, plan)
    cuda = plan.device == "cuda"
    if cuda and spec.batch_size == "auto":
        plan = probe.on_device(
            model, plan, rows, effective_batch=plan.effective_batch_size, processes=1
        )
    per_step = plan.batch_size * plan.gradient_accumulation_steps
    gen = torch.Generator().manual_seed(0)
    table = pa.table(
        {
            "input_ids": torch.randint(
                2, 32000, (steps * per_step, source), generator=gen
            ).tolist(),
            "labels": torch.randint(2, 32000, (steps * per_step, target), generator=gen).tolist(),
        }
    )
    timer = step_timer(steps, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        train.train(
            model, AutoTokenizer.from_pretrained(folder), table, spec=spec, plan=plan,
            output_dir=Path(out), callbacks=[timer],
        )  # fmt: skip
    examples_s = (steps - 1 - WARMUP) * per_step / timer.seconds
    return {
        "batch": plan.batch_size,
        "accumulation": plan.gradient_accumulation_steps,
        "quantization": plan.quantization,
        "precision": plan.precision,
        "compile": plan.compile,
        "tokens_per_s": examples_s * (source + target),
        "step_s": timer.seconds / (steps - 1 - WARMUP),
        "examples_per_s": examples_s,
        "flops_per_example": shape.training_flops(source, target),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        **timer.profile,
    }


def step_timer(steps: int, cuda: bool) -> Any:
    """A Trainer callback that times optimizer steps WARMUP+1 .. steps-1 and profiles the
    last one (built here so this module imports without transformers)."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds, self.profile = 0.0, {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == WARMUP:
                _sync(cuda)
                self.start = time.perf_counter()
            if state.global_step == steps - 1:
                _sync(cuda)
                self.seconds = time.perf_counter() - self.start
                self.prof = _profiler(cuda)
                self.prof.__enter__()
                self.prof_start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if state.global_step == steps:
                _sync(cuda)
                wall = time.perf_counter() - self.prof_start
                self.prof.__exit__(None, None, None)
                self.profile = busy(self.prof, wall, cuda)

    return Timer()


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _profiler(cuda: bool) -> Any:
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])


def busy(prof: Any, wall: float, cuda: bool) -> dict[str, float]:
    """The share of a step's wall time the GPU spent in kernels, and how many it launched
    (a low share means launch-bound); on CPU, the top-level operator calls."""
    import torch

    if not cuda:
        from bench.kernels import count_ops

        return {"operator_calls": count_ops(prof.events())["compute"]}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {"gpu_busy": busy_us / 1e6 / wall, "kernels_per_step": len(kernels)}


def mfu(examples_s: float, flops_per_example: float, card: str) -> float | None:
    """Model FLOPs utilisation over the card's dense bf16 peak (None: a card not listed)."""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    return None if peak is None else examples_s * flops_per_example / (peak * 1e12)


def header(card: str, params: int, args: argparse.Namespace) -> dict[str, object]:
    """What the figures were measured on and with."""
    import torch

    versions = {}
    for package in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "card": card,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "parameters": params,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **versions,
        "family": args.family,
        "steps": args.steps,
        "source_tokens": args.source,
        "target_tokens": args.target,
    }


def main() -> None:
    """Build the model, run every mode, print (and record) one JSON line each."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--source", type=int, default=128)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help="CPU, width 64, 8 steps, 1 mode")
    parser.add_argument(
        "--family", choices=("t5", "llama"), default="t5",
        help="flan-t5-large's shape (default) or Llama-3.2-1B's",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.source, args.target = WARMUP + 3, 16, 32
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_qlora needs a CUDA GPU (or --smoke, on CPU)")
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("")

    def emit(record: dict[str, object]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:  # line by line: a run cut short keeps the modes it finished
            with args.out.open("a") as out:
                out.write(line + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        full = 2048 if args.family == "llama" else 1024
        params = build(Path(tmp), width=64 if args.smoke else full, family=args.family)
        emit(header(card, params, args))
        modes = CAUSAL_MODES if args.family == "llama" else MODES
        for label, training in modes[:1] if args.smoke else modes:
            emit({"mode": label, **measure(Path(tmp), training, args, card)})
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def measure(folder: Path, training: dict[str, Any], args: argparse.Namespace, card: str) -> dict:
    """One mode's rounded figures, or the error that stopped it (the other modes still run)."""
    try:
        figures = run(folder, training, steps=args.steps, source=args.source, target=args.target)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports a failed mode and goes on
        if args.smoke:
            raise
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    figures["mfu"] = mfu(figures["examples_per_s"], figures["flops_per_example"], card)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


if __name__ == "__main__":
    main()
