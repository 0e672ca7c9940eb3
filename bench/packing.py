"""Training a decoder-only model: batches packed into rows vs padded ones.

    python -m bench.packing [--repeats 3] [--epochs 3] [--families llama,mixtral]

On a tiny offline model of each family (``termtune build-tiny-model --family``) over a real
glossary (``../shared/data/symptom_ontology.jsonl``: 424 terms, definitions from a few
tokens to 263, the long tail of such data; the shipped ``data/medical_terms.jsonl`` where
that is absent), prepared by the data-prep stage in the model's chat template with answers
up to 256 tokens, three ways to batch the same examples, each through the trainer's own
code path (trl's SFTTrainer, the auto plan's micro-batch for an effective batch of 32) in a
fresh process:

- padded, random order: every batch padded to its longest row, as a plain SFT loop does;
- padded, length-grouped (``training.packing: off`` with the default ``group_by_length``):
  the strongest padded alternative, as little padding as batching by length gives;
- packed (``training.packing: auto``, on here): batches drawn in random order (mixed
  lengths pack tighter), each one's examples packed into rows of the width that costs
  least by the model's shape, attention kept within each example by its restarting
  position ids (``services.trainer.causal.bins``).

The effective batch is 32, as the auto plan takes for a dataset of a few thousand rows or
more (``wiki_medical_terms``), not the auto plan's for this glossary: 297 training rows over
3 epochs keep at least 250 updates at 3 rows each, where a batch has too few rows for the way
it is drawn to matter for speed (on 2026-12-06, at 3 rows: packed 1.11x the examples/s of
padded in random order and 0.97x of length-grouped, 1.9% of length-grouped positions
padding against packed's 12-13%). It still matters for the loss: on 2026-12-07, tiny Llama
at 3 rows, seeds 0-2 at each of 1e-3, 3e-3 and 1e-2, packed rows ended at a lower held-out
loss than length-grouped batches in all 9 runs (medians 6.2157/6.0536/6.1157 against
6.2192/6.0561/6.6731: at 1e-2 two of the grouped runs diverged), in the same time (5.5 s
a run); so ``packing: auto`` packs at small batches too, though grouping pads less there.

Each way first tries each learning rate of the grid once and keeps the one with the lowest
held-out loss (the answer's tokens on the test split, the evaluator's code); then the three
ways take turns at their rates, ``--repeats`` rounds. Prints examples/s, real tokens/s, the
padded share of the positions computed and the held-out loss, medians over the rounds
(rates by the training loop's own clock, the trainer's set-up left out); goal: packed at
least 1.5x the padded examples/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import best_rate, child_run, in_turns
from bench.training import _splits

MODES: dict[str, dict[str, Any]] = {
    "padded, random order": {"packing": "off", "group_by_length": False},
    "padded, length-grouped": {"packing": "off", "group_by_length": True},
    "packed rows": {"packing": "auto"},
}
LRS = (1e-3, 3e-3, 1e-2)
BATCH = 32  # the effective batch (see above)
MAX_TARGET = 256
GOAL = 1.5
GLOSSARY = Path(__file__).parents[2] / "shared" / "data" / "symptom_ontology.jsonl"


def _prepared(work: Path, family: str) -> tuple[Path, dict[str, Any]]:
    """A tiny model of ``family`` and the sample data prepared for it by data-prep."""
    from services.cli.tinycausal import build_tiny_causal
    from services.dataprep.handler import handle
    from shared.messages import PrepareDataset
    from tests.factories import SAMPLE_DATA, make_ctx, make_spec

    model = build_tiny_causal(family, work / "model", data_file=SAMPLE_DATA)
    ctx = make_ctx(work / "var")
    dataset: dict[str, Any] = {"max_target_length": MAX_TARGET}
    if GLOSSARY.exists():
        dataset |= {"source": str(GLOSSARY), "prompt_template": "What is {term}",
                    "target_template": "{definition}"}  # fmt: skip
    spec = make_spec(model, dataset=dataset)
    handle(PrepareDataset(job_id="bench", spec_uri=ctx.jobs.create("bench", spec)), ctx)
    return model, {"var": str(work / "var"), "manifest": ctx.jobs.manifest("bench", "prepare")}


def run_one(model_dir: str, prepared: str, mode: str, lr: float, epochs: float) -> dict[str, Any]:
    """Train one way at one learning rate in this process; its figures."""
    import torch

    from services.evaluator.metrics import row_losses
    from services.trainer import lora
    from services.trainer.train import train
    from shared import planner
    from shared.jobspec import TrainingSpec
    from shared.modeling import load_tokenizer
    from shared.trainplan import model_shape

    info = json.loads(prepared)
    train_table, test_table = _splits(info["var"], info["manifest"])
    tokenizer = load_tokenizer(model_dir)
    spec = TrainingSpec.model_validate(
        {**MODES[mode], "learning_rate": lr, "epochs": epochs, "seed": 0,
         "effective_batch_size": BATCH, "checkpoint_every_steps": 10**6,
         "logging_steps": 10**6}
    )  # fmt: skip
    plan = planner.resolve(
        spec, model_shape(model_dir), planner.Rows.from_manifest(info["manifest"])
    )
    torch.manual_seed(0)
    model = lora.build_model(model_dir, spec, plan)
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, tokenizer, train_table, spec=spec, plan=plan,
                        output_dir=Path(out), callbacks=[])  # fmt: skip
    seconds = summary["runtime_s"]  # the training loop's own clock, not the trainer's set-up
    lengths = [
        len(p) + len(a)
        for p, a in zip(
            train_table.column("input_ids").to_pylist(),
            train_table.column("labels").to_pylist(),
            strict=True,
        )
    ]
    nll, tokens = row_losses(model.eval(), tokenizer, test_table, batch_size=16)
    return {
        "examples_per_s": train_table.num_rows * epochs / seconds,
        "tokens_per_s": sum(lengths) * epochs / seconds,
        "padding_waste": summary["padding_waste"]["all"],
        "heldout_loss": sum(nll) / sum(tokens),
        "seconds": seconds,
        "batch": f"{plan.batch_size}x{plan.gradient_accumulation_steps}",
        "packing": plan.packing,
    }


def _child(model: Path, prepared: dict[str, Any], name: str, lr: float, epochs: float) -> dict:
    return child_run("bench.packing", model, prepared, name, lr, epochs)


def bench_family(
    family: str, repeats: int, epochs: float, grid: int | None = None
) -> dict[str, dict[str, Any]]:
    """Each way's medians at its best rate, for a tiny model of ``family``."""
    with tempfile.TemporaryDirectory() as tmp:
        model, prepared = _prepared(Path(tmp), family)
        counts = prepared["manifest"]["counts"]
        data = GLOSSARY.name if GLOSSARY.exists() else "the sample data"
        print(f"tiny {family} on {data}: {counts['train']} train / {counts['test']} test "
              f"rows, {epochs:g} epoch(s), {repeats} timed round(s) at each way's best rate, "
              "CPU", flush=True)  # fmt: skip
        best = {}
        for mode in MODES:
            run = lambda lr, mode=mode: _child(model, prepared, mode, lr, epochs)  # noqa: E731
            best[mode] = best_rate(run, LRS, mode, grid)[0]
        runs = in_turns(
            lambda mode, lr, _round: _child(model, prepared, mode, lr, epochs), best, repeats
        )
    return {
        mode: {
            **{
                k: statistics.median(r[k] for r in done)
                for k in ("examples_per_s", "tokens_per_s", "padding_waste", "heldout_loss")
            },
            "batch": done[0]["batch"],
            "packing": done[0]["packing"],
            "lr": best[mode],
        }
        for mode, done in runs.items()
    }


def _print(family: str, medians: dict[str, dict[str, Any]]) -> None:
    print(
        f"{family:12} {'batching':24} {'batch':>6} {'lr':>7} {'examples/s':>10} {'tokens/s':>9} "
        f"{'padded':>7} {'held-out loss':>13}"
    )
    for mode, m in medians.items():
        print(
            f"{family:12} {mode:24} {m['batch']:>6} {m['lr']:7.0e} {m['examples_per_s']:10.1f} "
            f"{m['tokens_per_s']:9.0f} {m['padding_waste']:7.1%} {m['heldout_loss']:13.4f}"
        )
    packed = medians["packed rows"]
    for mode in ("padded, random order", "padded, length-grouped"):
        ratio = packed["examples_per_s"] / medians[mode]["examples_per_s"]
        print(f"{family}: packed {ratio:.2f}x the examples/s of {mode} (goal >= {GOAL}x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--families", default="llama,mixtral")
    parser.add_argument("--grid", type=int, help="only the grid's first N rates (smoke: 1)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, prepared, mode, lr, epochs = args.child
        print(json.dumps(run_one(model, prepared, mode, float(lr), float(epochs))))
        return
    results = {
        f: bench_family(f, args.repeats, args.epochs, args.grid) for f in args.families.split(",")
    }
    for family, medians in results.items():
        _print(family, medians)


if __name__ == "__main__":
    main()
