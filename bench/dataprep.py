"""Data-prep throughput on a generated wiki-sized dataset, beside bare tokenization.

    python -m bench.dataprep [--rows 7000] [--repeats 3]

Generates rows shaped like gamino/wiki_medical_terms (a title, an article of a few thousand
characters with citation markers and a trailing "See also" section), then times, on the
same rows and tokenizer, (a) bare batched tokenization of prompts and targets and (b) the
whole data-prep handler (read, clean, template, dedupe, tokenize, grouped split, Parquet
shards, digests, manifest). Prints rows/s, MB/s and the overhead ratio (target: < 1.5x),
then the peak memory (RSS) of the stage, in a fresh process, on the dataset and on one four
times larger: bounded memory means the second does not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.cli.tinymodel import build_tiny_t5
from services.dataprep.handler import handle
from shared.messages import PrepareDataset
from tests.factories import SAMPLE_DATA, make_ctx, make_spec


def generate(path: Path, rows: int, seed: int = 0) -> int:
    """Write a wiki-like JSONL file from the sample definitions; its size in bytes."""
    rng = random.Random(seed)
    samples = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]
    with path.open("w") as fh:
        for i in range(rows):
            row = samples[i % len(samples)]
            paragraphs = [
                rng.choice(samples)["page_text"] + f"[{rng.randint(1, 40)}]"
                for _ in range(rng.randint(8, 20))
            ]
            text = "\n\n".join(paragraphs) + "\n\nSee also\n" + rng.choice(samples)["page_title"]
            fh.write(
                json.dumps({"page_title": f"{row['page_title']} {i}", "page_text": text}) + "\n"
            )
    return path.stat().st_size


def bare_tokenization(model_dir: Path, data: Path) -> float:
    """Seconds to tokenize every prompt and target, batched, as the pipeline's limits."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    start = time.perf_counter()
    for i in range(0, len(rows), 2048):
        chunk = rows[i : i + 2048]
        tokenizer([f"What is {r['page_title']}" for r in chunk], max_length=128, truncation=True)
        tokenizer(text_target=[r["page_text"] for r in chunk], max_length=512, truncation=True)
    return time.perf_counter() - start


def pipeline(model_dir: Path, data: Path, work: Path, n: int) -> float:
    """Seconds for the data-prep handler on the file, from a fresh store."""
    ctx = make_ctx(work / f"run{n}")
    spec = make_spec(
        model_dir,
        dataset={"source": str(data), "max_target_length": 512, "strip_wiki_artifacts": True},
    )
    command = PrepareDataset(job_id="bench", spec_uri=ctx.jobs.create("bench", spec))
    start = time.perf_counter()
    handle(command, ctx)
    return time.perf_counter() - start


def peak_memory(model_dir: Path, data: Path, work: Path) -> float:
    """Peak RSS in MB of one data-prep run in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.dataprep", "--child", str(model_dir), str(data), str(work)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def child(model_dir: str, data: str, work: str) -> None:
    """One pipeline run; prints its peak RSS in MB."""
    pipeline(Path(model_dir), Path(data), Path(work), 0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    """Run and print the figures."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=7000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_t5(work / "model", data_file=SAMPLE_DATA)
        data = work / "wiki.jsonl"
        size = generate(data, args.rows)
        print(f"dataset: {args.rows} rows, {size / 1e6:.1f} MB; tokenizer: tiny T5 (offline)")
        bare, full = [], []
        for n in range(args.repeats):
            bare.append(bare_tokenization(model, data))
            full.append(pipeline(model, data, work, n))
            print(f"  run {n + 1}: bare {bare[-1]:.2f}s, pipeline {full[-1]:.2f}s", flush=True)
        b, f = statistics.median(bare), statistics.median(full)
        print(f"bare tokenization: {args.rows / b:,.0f} rows/s, {size / 1e6 / b:.1f} MB/s")
        print(f"data-prep handler: {args.rows / f:,.0f} rows/s, {size / 1e6 / f:.1f} MB/s")
        print(
            f"overhead: {f / b:.2f}x bare tokenization (medians of {args.repeats}; target < 1.5x)"
        )
        big = work / "wiki-x4.jsonl"
        big_size = generate(big, args.rows * 4, seed=1)
        for name, path, nbytes in (("1x", data, size), ("4x", big, big_size)):
            rss = peak_memory(model, path, work / f"mem-{name}")
            print(f"peak RSS, {name} dataset ({nbytes / 1e6:.0f} MB): {rss:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
