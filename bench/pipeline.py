"""End-to-end benchmark on the embedded defaults: where a job's wall time goes.

``python -m bench.pipeline [--jobs 3] [--steps N]``: starts the control plane and the four
workers as processes (``filesystem://`` broker, local store), runs the embedded example job
(``examples/medical-terms.yaml`` on the offline tiny model, as ``make run`` does; ``--steps``
caps training for a quick look) ``--jobs`` times one after another, and reads each job's
recorded events: each stage's wall time (its start to its result) and each
hop between stages (a result recorded → the next stage started: bus message, worker pickup,
reading the spec and manifests from the store). Orchestration overhead = the hops' share of
the job's wall time (goal: under 5%). Then the training stage's throughput as a job sees it
(train rows x epochs over the stage's wall time: model load, checkpoints, progress events
and the lease included) against the trainer alone on the same prepared splits, spec and
plan in this process (``services.trainer.train`` only, with the validation passes the spec
asks for, as the job's stage has them; goal: the job within 15%). Prints figures; nothing
here is a test.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench import percentile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "medical-terms.yaml"
SAMPLE_DATA = ROOT / "data" / "medical_terms.jsonl"

DONE = {"prepare": "DatasetPrepared", "train": "ModelTrained", "evaluate": "ModelEvaluated"}
DONE["publish"] = "ModelPublished"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["created_at"]).timestamp()


def timings(events: list[dict[str, Any]]) -> tuple[dict[str, float], list[float], float]:
    """(stage → seconds, hop seconds, total seconds) of one finished job's events."""
    submitted = next(_at(e) for e in events if e["type"] == "JobSubmitted")
    started = {e["stage"]: _at(e) for e in events if e["type"] == "StageStarted"}
    done = {s: _at(e) for s in DONE for e in events if e["type"] == DONE[s]}
    stages = {s: done[s] - started[s] for s in DONE}
    order = list(DONE)
    hops = [started["prepare"] - submitted]
    hops += [started[order[i + 1]] - done[order[i]] for i in range(len(order) - 1)]
    return stages, hops, done["publish"] - submitted


def example_spec(model: Path, name: str, steps: int | None) -> dict[str, Any]:
    """The embedded example job on ``model``, its data path made absolute."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["name"] = name
    spec["base_model"] = str(model)
    spec["dataset"]["source"] = str(ROOT / spec["dataset"]["source"])
    if steps:
        spec["training"]["max_steps"] = steps
    return spec


def wait(client: Any, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends, printing each stage as it finishes."""
    from services.cli.display import TERMINAL

    deadline = time.monotonic() + timeout
    shown: set[str] = set()
    while True:
        job = client.job(job_id)
        for stage in DONE:
            if job["stages"][stage]["status"] == "succeeded" and stage not in shown:
                shown.add(stage)
                print(f"    {stage} done", flush=True)
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, help="cap training steps (default: the example's)")
    args = parser.parse_args()
    from services.cli.client import Client
    from services.cli.launcher import Launcher
    from services.cli.tinymodel import build_tiny_t5

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        model = build_tiny_t5(work / "model", data_file=SAMPLE_DATA)
        print(f"embedded example job {EXAMPLE.name}, {args.jobs} runs", flush=True)
        launcher = Launcher(var_dir=work / "var", port=_free_port(), env={})
        launcher.start()
        try:
            launcher.wait_ready(timeout=120)
            client = Client(launcher.url, api_key=(launcher.run_dir / "api_key").read_text())
            per_stage: dict[str, list[float]] = {s: [] for s in DONE}
            hops: list[float] = []
            shares: list[float] = []
            totals: list[float] = []
            job_rates: list[float] = []
            for n in range(args.jobs):
                spec = example_spec(model, f"bench-{n}", args.steps)
                job = wait(client, client.submit(spec)["id"], timeout=900)
                if job["status"] != "succeeded":
                    raise SystemExit(f"job {job['id']} {job['status']}: {job.get('error')}")
                stages, job_hops, total = timings(client.events(job["id"]))
                for stage, seconds in stages.items():
                    per_stage[stage].append(seconds)
                hops += job_hops
                shares.append(sum(job_hops) / total)
                totals.append(total)
                job_rates.append(trained_examples(launcher, job["id"], spec) / stages["train"])
                print(f"  job {n + 1}: {total:.1f} s, hops {sum(job_hops):.2f} s", flush=True)
        finally:
            launcher.stop()
        alone = [trainer_alone(launcher, job["id"], spec) for _ in range(args.jobs)]
    steps = f"training capped at {args.steps} steps" if args.steps else "the example's training"
    print(f"{args.jobs} jobs ({steps}), medians:")
    for stage, values in per_stage.items():
        print(f"  {stage:>9}: {statistics.median(values):6.2f} s")
    print(
        f"job wall {statistics.median(totals):.1f} s; hop between stages p50 "
        f"{percentile(hops, 0.5) * 1000:.0f} ms, p95 {percentile(hops, 0.95) * 1000:.0f} ms; "
        f"orchestration overhead {statistics.median(shares):.1%} of the job (goal < 5%)"
    )
    job_rate, alone_rate = statistics.median(job_rates), statistics.median(alone)
    print(
        f"training: {job_rate:.1f} examples/s as the job's stage, {alone_rate:.1f} examples/s "
        f"for the trainer alone; the job at {job_rate / alone_rate:.0%} of it (goal >= 85%)"
    )


def trained_examples(launcher: Any, job_id: str, spec: dict[str, Any]) -> float:
    """Examples the job's training stage went through (its plan's steps x batch)."""
    from tests.factories import launcher_jobs

    manifest = launcher_jobs(launcher).manifest(job_id, "train")
    plan = manifest["plan"]
    return manifest["steps"] * plan["batch_size"] * plan["gradient_accumulation_steps"]


def trainer_alone(launcher: Any, job_id: str, spec: dict[str, Any]) -> float:
    """examples/s of services.trainer.train on the job's prepared splits (train, and the
    validation split its passes use), spec and plan."""
    import torch

    from services.trainer import lora, train
    from shared.artifacts import read_split
    from shared.jobspec import parse_spec
    from shared.modeling import load_tokenizer
    from shared.planner import Plan
    from tests.factories import launcher_jobs

    jobs = launcher_jobs(launcher)
    dataset = jobs.manifest(job_id, "prepare")
    manifest = jobs.manifest(job_id, "train")
    plan = Plan(**{**manifest["plan"], "notes": tuple(manifest["plan"]["notes"])})
    training = parse_spec(spec).training
    cache = launcher.var_dir / "bench-cache"
    table = read_split(jobs.store, dataset, "train", cache_dir=cache)
    # The same work as the job's stage: its validation passes too, where the spec has them.
    validation = None
    if dataset["counts"].get("validation"):
        validation = read_split(jobs.store, dataset, "validation", cache_dir=cache)
    torch.manual_seed(training.seed)
    model = lora.build_model(spec["base_model"], training, plan)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = train.train(
            model, load_tokenizer(spec["base_model"]), table, eval_table=validation,
            spec=training, plan=plan, output_dir=Path(out), callbacks=[],
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return summary["steps"] * plan.batch_size * plan.gradient_accumulation_steps / seconds


if __name__ == "__main__":
    main()
