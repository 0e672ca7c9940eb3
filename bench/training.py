"""Training: the notebook's recipe as written beside termtune's, on the same model and data.

    python -m bench.training [--repeats 3] [--epochs 1]

Both recipes train LoRA (r=64, alpha=16, dropout 0.1, all linear layers) on the tiny
offline T5 over the shipped sample data's train split, with the notebook's learning rate
and one epoch, each run in a fresh process:

- notebook: every example padded to max_length inside the batched map (128 source, 128
  target tokens), labels padded with the pad id and not masked, batch 1, gradient
  accumulation 2, default collator;
- termtune: no padding at tokenization, DataCollatorForSeq2Seq padding per batch with -100
  labels, length-grouped batches; once with the notebook's batch (1 x 2) and once with the
  batch termtune uses on CPU in the sample spec (8 x 1).

Prints examples/s, real (non-padding) tokens/s, peak RSS and the held-out loss (masked, on
the test split, the same code for all), medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPES = {
    "notebook (pad to max, pad-id labels, 1x2)": {"recipe": "notebook", "batch": 1, "accum": 2},
    "termtune (dynamic pad, -100, grouped, 1x2)": {"recipe": "termtune", "batch": 1, "accum": 2},
    "termtune (dynamic pad, -100, grouped, 8x1)": {"recipe": "termtune", "batch": 8, "accum": 1},
}
MAX_SOURCE, MAX_TARGET = 128, 128


def _prepared(work: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny model and the sample data prepared by the data-prep stage (unpadded)."""
    from services.cli.tinymodel import build_tiny_t5
    from services.dataprep.handler import handle
    from shared.messages import PrepareDataset
    from tests.factories import SAMPLE_DATA, make_ctx, make_spec

    model = build_tiny_t5(work / "model", data_file=SAMPLE_DATA)
    ctx = make_ctx(work / "var")
    spec = make_spec(model, dataset={"max_target_length": MAX_TARGET})
    cmd = PrepareDataset(job_id="bench", spec_uri=ctx.jobs.create("bench", spec))
    handle(cmd, ctx)
    return model, {"var": str(work / "var"), "manifest": ctx.jobs.manifest("bench", "prepare")}


def _splits(var: str, manifest: dict[str, Any]) -> tuple[Any, Any]:
    from shared.artifacts import read_split
    from shared.store import LocalStore

    store = LocalStore(Path(var) / "store")
    cache = Path(var) / "cache"
    return (
        read_split(store, manifest, "train", cache_dir=cache),
        read_split(store, manifest, "test", cache_dir=cache),
    )


def _notebook_dataset(table: Any, tokenizer: Any) -> Any:
    """The notebook's preprocessing: pad to max_length in the map, labels = padded ids."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"prompt": table.column("prompt").to_pylist(), "target": table.column("target").to_pylist()}
    )

    def preprocess(batch: dict[str, list[str]]) -> dict[str, Any]:
        inputs = tokenizer(
            batch["prompt"], max_length=MAX_SOURCE, padding="max_length", truncation=True
        )
        labels = tokenizer(
            text_target=batch["target"],
            max_length=MAX_TARGET,
            padding="max_length",
            truncation=True,
        )
        inputs["labels"] = labels["input_ids"]  # pad ids, not -100: the notebook's bug
        return inputs

    return ds.map(preprocess, batched=True, remove_columns=["prompt", "target"])


def run_one(
    model_dir: str, prepared: str, recipe: str, batch: int, accum: int, epochs: float
) -> dict[str, float]:
    """Train one recipe in this process; its figures."""
    import torch
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        default_data_collator,
    )

    from services.evaluator.metrics import row_losses
    from services.trainer import lora
    from services.trainer.train import to_dataset
    from shared.jobspec import TrainingSpec

    info = json.loads(prepared)
    train_table, test_table = _splits(info["var"], info["manifest"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = TrainingSpec(batch_size=batch, gradient_accumulation_steps=accum, epochs=epochs)
    plan = lora.resolve_plan(spec)
    torch.manual_seed(0)
    model = lora.build_model(model_dir, spec, plan)
    notebook = recipe == "notebook"
    dataset = _notebook_dataset(train_table, tokenizer) if notebook else to_dataset(train_table)
    with tempfile.TemporaryDirectory() as out:
        args = Seq2SeqTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            num_train_epochs=epochs,
            learning_rate=spec.learning_rate,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            train_sampling_strategy="random" if notebook else "group_by_length",
        )
        collator = (
            default_data_collator
            if notebook
            else DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
        )
        trainer = Seq2SeqTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    examples = train_table.num_rows * epochs
    real_tokens = (
        sum(len(x) for col in ("input_ids", "labels") for x in train_table.column(col).to_pylist())
        * epochs
    )
    nll, tokens = row_losses(model, tokenizer, test_table, batch_size=16)
    return {
        "examples_per_s": examples / seconds,
        "tokens_per_s": real_tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "heldout_loss": sum(nll) / sum(tokens),
        "seconds": seconds,
    }


def main() -> None:
    """Run every recipe in fresh processes and print the medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, prepared, recipe, batch, accum, epochs = args.child
        print(json.dumps(run_one(model, prepared, recipe, int(batch), int(accum), float(epochs))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, prepared = _prepared(Path(tmp))
        counts = prepared["manifest"]["counts"]
        print(
            f"tiny T5, {counts['train']} train / {counts['test']} test rows, "
            f"{args.epochs:g} epoch(s), {args.repeats} repeats, CPU"
        )
        results: dict[str, list[dict[str, float]]] = {name: [] for name in RECIPES}
        for n in range(args.repeats):
            for name, r in RECIPES.items():
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.training",
                        "--child",
                        str(model),
                        json.dumps(prepared),
                        r["recipe"],
                        str(r["batch"]),
                        str(r["accum"]),
                        str(args.epochs),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                results[name].append(json.loads(out.strip().splitlines()[-1]))
                print(f"  run {n + 1} {name}: {results[name][-1]['seconds']:.1f}s", flush=True)
        _print(results)


def _print(results: dict[str, list[dict[str, float]]]) -> None:
    med = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in results.items()
    }
    base = med[next(iter(med))]["examples_per_s"]
    print(
        f"{'recipe':46} {'examples/s':>10} {'vs nb':>6} {'tokens/s':>9} "
        f"{'peak MB':>8} {'held-out loss':>13}"
    )
    for name, m in med.items():
        print(
            f"{name:46} {m['examples_per_s']:10.1f} {m['examples_per_s'] / base:5.2f}x "
            f"{m['tokens_per_s']:9.0f} {m['peak_rss_mb']:8.0f} {m['heldout_loss']:13.4f}"
        )


if __name__ == "__main__":
    main()
