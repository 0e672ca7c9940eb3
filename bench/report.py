"""``make bench``: every benchmark, each in its own process with a time limit, its output
streamed as it runs, then ``docs/benchmarks.md`` written from what they printed, with the
machine described. Nothing in it is typed by hand: rerun it to refresh the page.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

#: (module, arguments, time limit in seconds, title, what it measures)
BENCHES = [
    ("bench.training", [], 1800, "Training: our recipe vs the notebook's",
     "Same tiny model, data and machine; each recipe in a fresh process; medians of 3."),
    ("bench.dataprep", [], 1200, "Data-prep vs bare tokenization",
     "A generated wiki-sized dataset; medians of 3; peak memory on 1x and 4x the data."),
    ("bench.pipeline", [], 1800, "End to end on the embedded defaults",
     "Stage wall times and the hops between stages from the jobs' recorded events."),
    ("bench.export", [], 900, "Export and upload",
     "Merge and save of the tiny model; upload to an S3-compatible server on loopback "
     "(moto's, a Python server: a floor, not S3's speed) vs a plain copy."),
    ("bench.inference", [], 900, "Local inference (the Bedrock twin)",
     "The control plane's LocalModels answering one request at a time, then concurrently."),
]  # fmt: skip
GPU = (
    "bench.gpu_qlora",
    [],
    900,
    "GPU: flan-t5-large-shaped QLoRA and bf16 LoRA",
    "Randomly initialised model with flan-t5-large's shape; tokens/s, peak memory, MFU.",
)


def machine() -> list[str]:
    """What the figures were measured on."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kb / 2**20:.0f} GiB memory"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no torch"
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "peft", "kombu")
    )
    return [
        f"- Machine: {cpu}, {os.cpu_count()} cores{memory}, {gpu}",
        f"- System: {platform.platform()}, Python {platform.python_version()}; {versions}",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    ]


def run(module: str, args: list[str], limit: int) -> tuple[str, float, bool]:
    """Run one benchmark, echoing its output; (output, seconds, finished in time)."""
    start = time.monotonic()
    lines: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"  {line}", end="", flush=True)
        lines.append(line.rstrip())
        if time.monotonic() - start > limit:
            proc.kill()
            return "\n".join(lines), time.monotonic() - start, False
    proc.wait()
    return "\n".join(lines), time.monotonic() - start, proc.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = parser.parse_args()
    benches = list(BENCHES)
    try:
        import torch

        if torch.cuda.is_available():
            benches.append(GPU)
    except ImportError:
        pass
    if args.only:
        benches = [b for b in benches if b[0] in args.only]
    page = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`bench/report.py`) from what it measured.",
        "",
    ]
    page += machine() + [""]
    for module, bench_args, limit, title, what in benches:
        print(f"== {title} ({module}, limit {limit} s)", flush=True)
        output, seconds, ok = run(module, bench_args, limit)
        status = f"{seconds:.0f} s" if ok else f"stopped or failed after {seconds:.0f} s"
        page += [f"## {title}", "", f"{what} `python -m {module}` ({status}):", "", "```"]
        page += [line for line in output.splitlines() if line.strip()] + ["```", ""]
    if GPU not in benches:
        page += [
            f"## {GPU[3]}",
            "",
            "Not run: this machine has no GPU. `python -m bench.gpu_qlora` on a GPU machine "
            "prints the figures; `make bench` there adds them here.",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(page))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
