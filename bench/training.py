"""Training: the notebook's recipe as written beside termtune's, each at its own best
learning rate, on the same model and data.

    python -m bench.training [--repeats 3] [--epochs 3] [--grid N]

Three recipes train LoRA (r=64, alpha=16, all linear layers) on the tiny offline T5 over the
shipped sample data's train split (prepared with targets up to 512 tokens, the notebook's
max_length), each run in a fresh process:

- notebook as written: every example padded to 512 tokens inside the batched map, labels
  padded with the pad id and not masked, batch 1 x accumulation 2, random order, LoRA
  dropout 0.1, eager attention, AdamW for-loop (``training.recipe: notebook``);
- termtune at the notebook's batch (1 x 2), through the trainer's own code path
  (``services.trainer.train``: dynamic padding, -100 labels, two-sided length grouping,
  fused layers and AdamW, SDPA, no LoRA dropout);
- termtune's default: the same code path under the plan ``batch_size: auto`` and
  ``effective_batch_size: auto`` make here (176 rows x 3 epochs: 2 examples an update, so
  the run makes at least 250 updates, in one step each: batch 1's updates, twice the
  examples a step).

Each recipe first tries each learning rate of its grid once (seed 0) and keeps the one with
the lowest held-out loss (grids in steps of 1.4-2x, the two termtune recipes on the same
one); then the recipes take turns at their rates, ``--repeats`` rounds, round k at seed
k - 1 (the LoRA init, the data order, dropout). Prints examples/s, real
(non-padding) tokens/s, peak RSS and the held-out loss (masked, on the test split, the same
code for all), medians over the rounds: the loss's over seeds, not one seed's draw.

Then the same at equal training time: termtune's default trained for as many epochs as fit
in the time batch 1 took for its epochs (each rate of ``MATCHED_LRS`` once, the best then
over as many seeds as the rounds, its median), its held-out loss beside batch 1's: what the
default's speed buys when a team spends the time it would have spent at batch 1.

Last, the default's plan at set effective batches (``SWEEP``; 32 was the default before
``auto``, 1 makes twice batch 1's updates), each at the best rate of ``MATCHED_LRS`` for the
same epochs: how the held-out loss at equal epochs follows the number of optimizer updates,
and what each batch costs in examples/s (one run each, seed 0).

And LoRA+ (``training.lora.loraplus_lr_ratio``, off by default): batch 1 and the default
with the B matrices at ``LORAPLUS_RATIO`` times the rate, each at the best rate of its own
grid (seed 0), then over as many seeds as the rounds, beside the same recipe's plain LoRA.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import best_rate, child_run, in_turns

RECIPES: dict[str, dict[str, Any]] = {
    "notebook as written (pad to 512, pad-id labels, 1x2)": {
        "path": "notebook", "training": {"recipe": "notebook"},
        "lrs": [1e-3, 2e-3, 3e-3, 5e-3, 1e-2],
    },
    "termtune at batch 1 (1x2)": {
        "path": "termtune", "training": {"batch_size": 1, "gradient_accumulation_steps": 2},
        "lrs": [2e-3, 3e-3, 5e-3, 7e-3, 1e-2],
    },
    "termtune default (auto plan)": {
        "path": "termtune", "training": {}, "lrs": [2e-3, 3e-3, 5e-3, 7e-3, 1e-2],
    },
}  # fmt: skip
MAX_SOURCE, MAX_TARGET = 128, 512
BATCH_1, DEFAULT = list(RECIPES)[1:3]
#: the sweep's and the equal-time run's rates: larger batches, fewer updates, higher rates
MATCHED_LRS = (3e-3, 5e-3, 7e-3, 1e-2, 2e-2, 3e-2)
#: the default's plan (batch auto) at these effective batches: loss against updates
SWEEP = {
    f"termtune default at effective batch {n}": {
        "path": "termtune", "training": {"effective_batch_size": n}, "lrs": list(MATCHED_LRS),
    }
    for n in (1, 4, 8, 16, 32)
}  # fmt: skip
#: LoRA+ (peft's create_loraplus_optimizer, ``training.lora.loraplus_lr_ratio``): batch 1 and
#: the default with the B matrices at 16x the rate, each over a grid 2-10x lower than plain's
LORAPLUS_RATIO = 16.0
LORAPLUS = {
    f"{name}, LoRA+ {LORAPLUS_RATIO:g}": {
        "path": "termtune",
        "training": {**RECIPES[name]["training"], "lora": {"loraplus_lr_ratio": LORAPLUS_RATIO}},
        "lrs": lrs,
    }
    for name, lrs in ((BATCH_1, [3e-4, 1e-3, 3e-3]), (DEFAULT, [3e-4, 1e-3, 3e-3]))
}  # fmt: skip


def _prepared(work: Path) -> tuple[Path, dict[str, Any]]:
    """The tiny model and the sample data prepared by the data-prep stage (unpadded)."""
    from services.cli.tinymodel import build_tiny_t5
    from services.dataprep.handler import handle
    from shared.messages import PrepareDataset
    from tests.factories import SAMPLE_DATA, make_ctx, make_spec

    model = build_tiny_t5(work / "model", data_file=SAMPLE_DATA)
    ctx = make_ctx(work / "var")
    spec = make_spec(
        model, dataset={"max_target_length": MAX_TARGET, "max_source_length": MAX_SOURCE}
    )
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
    model_dir: str, prepared: str, name: str, lr: float, epochs: float, seed: int = 0
) -> dict[str, float]:
    """Train one recipe at one learning rate and seed in this process; its figures."""
    import torch
    from transformers import AutoTokenizer

    from services.evaluator.metrics import row_losses
    from services.trainer import lora
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.trainplan import model_shape

    recipe = {**RECIPES, **SWEEP, **LORAPLUS}[name]
    info = json.loads(prepared)
    train_table, test_table = _splits(info["var"], info["manifest"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = TrainingSpec.model_validate(
        {**recipe["training"], "learning_rate": lr, "epochs": epochs, "seed": seed,
         "checkpoint_every_steps": 10**6, "logging_steps": 10**6}
    )  # fmt: skip
    rows = planner.Rows.from_manifest(info["manifest"])
    plan = planner.resolve(spec, model_shape(model_dir), rows)
    torch.manual_seed(seed)
    model = lora.build_model(model_dir, spec, plan)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        if recipe["path"] == "notebook":
            _train_as_the_notebook(model, tokenizer, train_table, spec, Path(out))
        else:
            from services.trainer.train import train

            train(model, tokenizer, train_table, spec=spec, plan=plan, output_dir=Path(out),
                  callbacks=[])  # fmt: skip
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
        "batch": f"{plan.batch_size}x{plan.gradient_accumulation_steps}",
        "updates": math.ceil(
            math.ceil(train_table.num_rows / plan.batch_size) / plan.gradient_accumulation_steps
        )
        * epochs,
    }


def _train_as_the_notebook(model: Any, tokenizer: Any, table: Any, spec: Any, out: Path) -> None:
    """The notebook's loop: its padded dataset, default collator, random order."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

    args = Seq2SeqTrainingArguments(
        output_dir=str(out), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        num_train_epochs=spec.epochs, learning_rate=spec.learning_rate, optim=spec.optimizer,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=spec.seed,
    )  # fmt: skip
    Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=_notebook_dataset(table, tokenizer),
        data_collator=default_data_collator,
    ).train()


def _child(
    model: Path, prepared: dict[str, Any], name: str, lr: float, epochs: float, seed: int = 0
) -> dict:
    return child_run("bench.training", model, prepared, name, lr, epochs, seed)


def main() -> None:
    """Tune each recipe's learning rate, time them in turns at the best, print the medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--grid", type=int, help="only each grid's first N rates (smoke: 1)")
    parser.add_argument(
        "--sweep", default="1,4,8,16,32", help="the effective batches swept (smoke: 1,32)"
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, prepared, name, lr, epochs, seed = args.child
        print(json.dumps(run_one(model, prepared, name, float(lr), float(epochs), int(seed))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, prepared = _prepared(Path(tmp))
        counts = prepared["manifest"]["counts"]
        print(
            f"tiny T5, {counts['train']} train / {counts['test']} test rows, "
            f"{args.epochs:g} epoch(s), {args.repeats} timed round(s) at each recipe's best "
            "rate (round k at seed k - 1), CPU"
        )
        best = {}
        for name, recipe in RECIPES.items():
            run = lambda lr, name=name: _child(model, prepared, name, lr, args.epochs)  # noqa: E731
            best[name] = best_rate(run, recipe["lrs"], name, args.grid)[0]
        results = in_turns(
            lambda name, lr, seed: _child(model, prepared, name, lr, args.epochs, seed),
            best,
            args.repeats,
        )
        matched = _time_matched(model, prepared, results, args.epochs, args.repeats, args.grid)
        swept = {f"termtune default at effective batch {n}" for n in args.sweep.split(",")}
        chosen = {name: recipe for name, recipe in SWEEP.items() if name in swept}
        sweep = _best_each(model, prepared, chosen, args.epochs, args.grid)
        tuned = _best_each(model, prepared, LORAPLUS, args.epochs, args.grid)
        plus = {
            name: (lr, _over_seeds(model, prepared, name, lr, args.epochs, args.repeats, run))
            for name, (lr, run) in tuned.items()
        }
        _print(results)
        _print_matched(results, matched, args.epochs)
        _print_sweep(results, sweep, args.epochs)
        _print_loraplus(results, plus)


def _best_each(
    model: Path,
    prepared: dict[str, Any],
    recipes: dict[str, dict[str, Any]],
    epochs: float,
    grid: int | None = None,
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Each recipe at each rate of its grid once: its best rate and that run."""
    return {
        name: best_rate(
            lambda lr, name=name: _child(model, prepared, name, lr, epochs),
            recipe["lrs"],
            name,
            grid,
        )
        for name, recipe in recipes.items()
    }


def _time_matched(
    model: Path,
    prepared: dict[str, Any],
    results: dict[str, list[dict[str, Any]]],
    epochs: float,
    seeds: int,
    grid: int | None = None,
) -> dict[str, Any]:
    """The default trained for as many epochs as fit in batch 1's time: the best rate at
    seed 0, then the median over ``seeds`` seeds at that rate."""
    seconds = {n: statistics.median(r["seconds"] for r in results[n]) for n in (BATCH_1, DEFAULT)}
    matched = max(epochs, float(math.floor(epochs * seconds[BATCH_1] / seconds[DEFAULT])))
    run = lambda lr: _child(model, prepared, DEFAULT, lr, matched)  # noqa: E731
    best, first = best_rate(run, MATCHED_LRS, f"{DEFAULT}, {matched:g} epochs,", grid)
    return {
        **_over_seeds(model, prepared, DEFAULT, best, matched, seeds, first),
        "lr": best, "epochs": matched,
    }  # fmt: skip


def _over_seeds(
    model: Path,
    prepared: dict[str, Any],
    name: str,
    lr: float,
    epochs: float,
    seeds: int,
    first: dict[str, Any],
) -> dict[str, Any]:
    """Seed 0's run (``first``) and seeds 1 to ``seeds`` - 1 at the same rate: medians."""
    done = [first] + [_child(model, prepared, name, lr, epochs, s) for s in range(1, seeds)]
    return {
        **{k: statistics.median(r[k] for r in done)
           for k in ("seconds", "heldout_loss", "examples_per_s")},
        "batch": first["batch"], "seeds": len(done),
    }  # fmt: skip


def _print_matched(
    results: dict[str, list[dict[str, Any]]], matched: dict[str, Any], epochs: float
) -> None:
    batch_1 = {k: statistics.median(r[k] for r in results[BATCH_1]) for k in ("seconds",
               "heldout_loss")}  # fmt: skip
    verdict = "lower" if matched["heldout_loss"] < batch_1["heldout_loss"] else "not lower"
    print(
        f"at equal training time: termtune default, {matched['epochs']:g} epochs in "
        f"{matched['seconds']:.1f}s ({matched['batch']}, lr {matched['lr']:g}, median of "
        f"{matched['seeds']} seeds): held-out loss "
        f"{matched['heldout_loss']:.4f} vs {batch_1['heldout_loss']:.4f} at batch 1, "
        f"{epochs:g} epochs in {batch_1['seconds']:.1f}s ({verdict})"
    )


def _print_sweep(
    results: dict[str, list[dict[str, Any]]],
    sweep: dict[str, tuple[float, dict[str, Any]]],
    epochs: float,
) -> None:
    """The default's plan by effective batch, at equal epochs, beside the medians above."""
    notebook = statistics.median(r["examples_per_s"] for r in results[next(iter(RECIPES))])
    rows = [
        (name, runs[0]["lr"], {**runs[0], "examples_per_s": statistics.median(
            r["examples_per_s"] for r in runs)})
        for name, runs in ((n, results[n]) for n in (BATCH_1, DEFAULT))
    ]  # fmt: skip
    rows += [(name, lr, run) for name, (lr, run) in sweep.items()]
    print(
        f"at equal epochs ({epochs:g}), by effective batch (the loss at seed 0; examples/s: the "
        "rounds' median above, the sweep's one run):"
    )
    for name, lr, run in sorted(rows, key=lambda row: -row[2]["updates"]):
        print(
            f"  {name:48} {run['batch']:>5} {run['updates']:5.0f} updates, lr {lr:g}: held-out "
            f"loss {run['heldout_loss']:.4f}, {run['examples_per_s']:.1f} examples/s "
            f"({run['examples_per_s'] / notebook:.2f}x the notebook)"
        )


def _print_loraplus(
    results: dict[str, list[dict[str, Any]]], plus: dict[str, tuple[float, dict[str, Any]]]
) -> None:
    """LoRA+ at its best rate beside the same recipe's plain LoRA, medians over seeds."""
    print(
        f"LoRA+ (B matrices at {LORAPLUS_RATIO:g}x the rate), at equal epochs, medians over "
        "the same seeds:"
    )
    for (name, (lr, run)), plain in zip(plus.items(), (BATCH_1, DEFAULT), strict=True):
        loss = statistics.median(r["heldout_loss"] for r in results[plain])
        print(
            f"  {name:48} lr {lr:g}: held-out loss {run['heldout_loss']:.4f} vs {loss:.4f} "
            f"plain (lr {results[plain][0]['lr']:g}), {run['examples_per_s']:.1f} examples/s"
        )


def _print(results: dict[str, list[dict[str, Any]]]) -> None:
    med = {
        name: {
            **{k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("batch",)},
            "batch": runs[0]["batch"],
        }
        for name, runs in results.items()
    }
    base = med[next(iter(med))]["examples_per_s"]
    print(
        f"{'recipe':52} {'batch':>6} {'lr':>7} {'examples/s':>10} {'vs nb':>6} {'tokens/s':>9} "
        f"{'peak MB':>8} {'held-out loss':>13}"
    )
    for name, m in med.items():
        print(
            f"{name:52} {m['batch']:>6} {m['lr']:7.0e} {m['examples_per_s']:10.1f} "
            f"{m['examples_per_s'] / base:5.2f}x {m['tokens_per_s']:9.0f} {m['peak_rss_mb']:8.0f} "
            f"{m['heldout_loss']:13.4f}"
        )
    names = list(med)
    print(
        f"termtune default: {med[names[2]]['examples_per_s'] / base:.2f}x the notebook's "
        f"examples/s (goal >= 6x), held-out loss {med[names[2]]['heldout_loss']:.4f} vs "
        f"{med[names[1]]['heldout_loss']:.4f} at batch 1 (goal: lower)"
    )


if __name__ == "__main__":
    main()
