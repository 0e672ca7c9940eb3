"""Local inference benchmark: the control plane's twin of Bedrock's invoke.

``python -m bench.inference``: a published tiny model served by ``LocalModels`` answers one
request at a time (latency p50/p95 over ``--requests``), then ``--concurrency`` requests at
once from threads (throughput), without batching (each its own ``generate`` call) and with
the micro-batcher (concurrent requests share one call; ``--max-batch``). The gain is
against the strongest unbatched baseline, answering one request at a time (unbatched
concurrent calls contend for the same cores and are slower still). Prints figures;
nothing here is a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import percentile

PROMPTS = ["What is Asthma?", "What is Acromegaly?", "What is Anticoagulant?", "What is Gout?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-gen-len", type=int, default=32)
    args = parser.parse_args()
    from services.api.inference import LocalModels
    from services.api.shapes import InvokeRequest
    from services.cli.tinymodel import build_tiny_t5
    from shared.jobs import JobRecords
    from shared.ledger import Ledger
    from shared.settings import Settings
    from shared.store import LocalStore
    from tests.factories import SAMPLE_DATA

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        model = build_tiny_t5(work / "model", data_file=SAMPLE_DATA)
        store = LocalStore(work / "store")
        store.upload_dir(model, "models-data/tiny")
        jobs = JobRecords(store, Ledger(f"sqlite:///{work / 'termtune.db'}"))
        jobs.register_model(
            "tiny", {"name": "tiny", "target": "local", "location": store.uri("models-data/tiny")}
        )
        settings = Settings(var_dir=work)
        unbatched = LocalModels(jobs, settings, max_batch=1)
        batched = LocalModels(jobs, settings, max_batch=args.max_batch)

        def ask(models: LocalModels, n: int) -> float:
            request = InvokeRequest(
                prompt=PROMPTS[n % len(PROMPTS)], max_gen_len=args.max_gen_len, temperature=0.0
            )
            start = time.perf_counter()
            models.invoke("tiny", request)
            return time.perf_counter() - start

        ask(unbatched, 0)  # load once
        ask(batched, 0)
        print(f"{args.requests} sequential requests, max_gen_len {args.max_gen_len}...", flush=True)
        start = time.perf_counter()
        latencies = [ask(batched, n) for n in range(args.requests)]
        sequential = args.requests / (time.perf_counter() - start)
        print(
            f"one at a time: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
            f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
            f"{sequential:.1f} requests/s"
        )
        rates = {}
        before = len(batched._batchers["tiny"].batch_sizes)
        for label, models in (("without batching", unbatched), ("with batching", batched)):
            print(f"{args.requests} requests, {args.concurrency} at once, {label}...", flush=True)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                concurrent = list(pool.map(lambda n, m=models: ask(m, n), range(args.requests)))
            rates[label] = args.requests / (time.perf_counter() - start)
            print(
                f"{args.concurrency} at once, {label}: {rates[label]:.1f} requests/s, "
                f"p50 {percentile(concurrent, 0.5) * 1000:.0f} ms, "
                f"p95 {percentile(concurrent, 0.95) * 1000:.0f} ms per request",
                flush=True,
            )
        sizes = batched._batchers["tiny"].batch_sizes[before:]
        best = max(sequential, rates["without batching"])
        baseline = "one at a time" if best == sequential else "unbatched concurrent calls"
        print(
            f"batching: {rates['with batching'] / best:.2f}x the throughput of {baseline} "
            f"(the faster unbatched way, {best:.1f} requests/s); mean batch "
            f"{statistics.fmean(sizes):.1f} (max {args.max_batch})"
        )


if __name__ == "__main__":
    main()
