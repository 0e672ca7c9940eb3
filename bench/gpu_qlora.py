"""GPU check: a randomly initialised model of flan-t5-large's shape, trained with termtune's
trainer code, QLoRA (nf4, double quantization, bf16) and bf16 LoRA; tokens/s, peak memory, MFU.

    python -m bench.gpu_qlora [--steps 30] [--batch 8] [--source 128] [--target 256]
                              [--out bench/results/gpu_qlora.jsonl]

Needs CUDA and bitsandbytes' CUDA build; refuses to run without a GPU. No hub access: the
model is built from flan-t5-large's configuration values (780M parameters). Modes: QLoRA
(nf4, double quantization, bf16 compute) and bf16 LoRA at --batch, and QLoRA at the
notebook's batch of 1. Each stops after --steps optimizer steps (the first 5 are warm-up,
not timed). Every line printed is JSON; with --out they are also written to that file,
which ``make bench`` on a machine without a GPU copies into the figures page (the card,
versions and date are in the first line).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

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
WARMUP = 5
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A10G": 125.0, "A100": 312.0, "L4": 121.0}


def build(folder: Path) -> int:
    """Save a random flan-t5-large-shaped model; its parameter count."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**FLAN_T5_LARGE))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


#: (label, quantization, batch size; None = --batch)
MODES = (
    ("QLoRA nf4", "4bit", None),
    ("bf16 LoRA", "none", None),
    ("QLoRA nf4, notebook batch 1", "4bit", 1),
    ("QLoRA nf4, batch 32", "4bit", 32),
    ("bf16 LoRA, batch 32", "none", 32),
)


def run(
    folder: Path, *, quantization: str, steps: int, batch: int, source: int, target: int
) -> dict[str, float]:
    """Train `steps` steps on random tokens with termtune's LoRA model; the figures."""
    import torch

    from services.trainer import lora
    from shared.jobspec import TrainingSpec

    spec = TrainingSpec(quantization=quantization, precision="bf16", batch_size=batch)
    plan = lora.resolve_plan(spec)
    model = lora.build_model(str(folder), spec, plan)
    if quantization == "none":
        model.to("cuda")  # quantized loads are placed by device_map already
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def step() -> float:
        ids = torch.randint(2, 32000, (batch, source), device="cuda", generator=gen)
        labels = torch.randint(2, 32000, (batch, target), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    torch.cuda.reset_peak_memory_stats()
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - WARMUP):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    timed = steps - WARMUP
    tokens_s = timed * batch * (source + target) / seconds
    return {
        "tokens_per_s": tokens_s,
        "step_s": seconds / timed,
        "trainable": trainable,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss,
        **gpu_busy(step),
    }


def gpu_busy(step: Callable[[], float]) -> dict[str, float]:
    """One more step under the profiler: the share of its wall time the GPU spent in
    kernels, and how many kernels it launched (a low share means launch-bound)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    except Exception as exc:  # noqa: BLE001 - the profile is extra; the timings stand alone
        print(f"profile failed: {exc!r}", file=sys.stderr)
        return {}
    return {"gpu_busy": busy_us / 1e6 / wall, "kernels_per_step": len(kernels)}


def mfu(tokens_s: float, params: int, card: str) -> float | None:
    """Model FLOPs utilisation: 6 x parameters x tokens/s over the card's bf16 dense peak.

    With frozen base weights the backward skips weight gradients (about 4N, not 6N, FLOPs a
    token), so this overstates work a little; it is the convention peers report.
    """
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in card), None)
    return None if peak is None else 6 * params * tokens_s / (peak * 1e12)


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
        "steps": args.steps,
        "source_tokens": args.source,
        "target_tokens": args.target,
    }


def main() -> None:
    """Build the model, run every mode, print (and record) one JSON line each."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source", type=int, default=128)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the JSON lines to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_qlora needs a CUDA GPU")
    card = torch.cuda.get_device_name(0)
    lines = []

    def emit(record: dict[str, object]) -> None:
        lines.append(json.dumps(record))
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        params = build(Path(tmp))
        emit(header(card, params, args))
        for label, quantization, batch in MODES:
            batch = batch or args.batch
            figures = run(
                Path(tmp),
                quantization=quantization,
                steps=args.steps,
                batch=batch,
                source=args.source,
                target=args.target,
            )
            figures["mfu"] = mfu(figures["tokens_per_s"], params, card)
            rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
            emit({"mode": label, "batch": batch, **rounded})
            gc.collect()
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
