"""``make bench``: every benchmark, each in its own process with a time limit, its output
streamed as it runs, then ``docs/benchmarks.md`` written from what they printed, with the
machine described. Nothing in it is typed by hand: rerun it to refresh the page. It exits 1
when a benchmark failed or ran past its limit (the page says which, with its error).

``TERMTUNE_BENCH_SIZE=smoke make bench`` runs every CPU benchmark at a size that shows only
that it runs (a test does, on every CI run), renders the recorded GPU section, and writes
``var/bench-smoke.md``: its figures mean nothing and never reach ``docs/benchmarks.md``. (The
GPU script's own small run on CPU, ``python -m bench.gpu_qlora --smoke``, has its own tests.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

#: (module, arguments, time limit in seconds, title, what it measures)
BENCHES = [
    ("bench.training", [], 2700, "Training: our recipe vs the notebook's",
     "Same tiny model, data and machine; each recipe in a fresh process at the best rate of "
     "its grid; medians of 3 rounds in which the recipes take turns, round k at seed k - 1 "
     "(the held-out loss's median is over seeds); then termtune's default for as many epochs "
     "as batch 1's time allows (median of 3 seeds); then the default's plan at set effective "
     "batches (32: the default before effective_batch_size auto), at equal epochs."),
    ("bench.packing", [], 1800, "Training a decoder-only model: packed vs padded batches",
     "Tiny Llama- and Mixtral-shaped models on a real long-tail glossary, through the "
     "trainer's code path, at an effective batch of 32 (the auto plan's for a dataset of "
     "thousands of rows; for this glossary's 297 it takes 3, where how a batch is drawn "
     "hardly matters: see bench/packing.py); each way at its own best learning rate; "
     "medians of 3 rounds in which the ways take turns. Length grouping sorts 50 batches "
     "at a time (transformers' sampler, four megabatches at least, padded 44% here)."),
    ("bench.kernels", [], 1200, "Operator calls per optimizer step",
     "flan-t5-large's shape at batch 1, LoRA r=64 on every linear layer, one optimizer step "
     "through the trainer's code path, counted by torch's profiler; the notebook's recipe, "
     "then each change termtune's default makes (every row clips as the trainer does: no "
     "call per gradient); then the fused adapted layers on the model in bf16 under autocast, "
     "as the CUDA plan trains it. Not among the rows: liger-kernel. Its kernels are Triton's, "
     "so they run on CUDA only and cannot be counted here, and it patches no T5. What it "
     "would fuse in T5's layers (the RMS norm, the gated gelu) is one torch op each here "
     "already and fused further by torch.compile in the CUDA plan. Its fused linear "
     "cross-entropy, which never holds the logits, is a question of memory, not launches: "
     "the last line gives the logits' share of an example's activations by the planner's "
     "memory model, what it would free for a larger batch. That is for a GPU session to "
     "measure."),
    ("bench.validation", [], 900, "Validation by its own clock",
     "The example job's training stage, validating at every logging step vs the default auto."),
    ("bench.dataprep", [], 1200, "Data-prep vs bare tokenization",
     "A generated wiki-sized dataset; medians of 3; peak memory on 1x and 4x the data."),
    ("bench.pipeline", [], 1800, "End to end on the embedded defaults",
     "Stage wall times and the hops between stages from the jobs' recorded events."),
    ("bench.export", [], 900, "Export and upload",
     "Merge and save of the tiny model; upload to an S3-compatible server on loopback "
     "(moto's, a Python server: a floor, not S3's speed) vs a plain copy."),
    ("bench.inference", [], 900, "Local inference (the Bedrock twin)",
     "The control plane's LocalModels answering one request at a time, then concurrently."),
    ("bench.ledger", [], 2400, "The job ledger at 1,000 and 100,000 jobs",
     "100,000 jobs x 50 events generated into SQLite and PostgreSQL (a private server on "
     "this machine, sharing its 2 cores with the client: fsync off, shared_buffers 2 GB); "
     "reads through the HTTP API in-process, writes on the ledger."),
]  # fmt: skip
GPU = (
    "bench.gpu_qlora",
    [],
    900,
    "GPU: flan-t5-large-shaped QLoRA and bf16 LoRA",
    "Randomly initialised model with flan-t5-large's shape; tokens/s, peak memory, MFU.",
)


#: each benchmark's arguments under ``TERMTUNE_BENCH_SIZE=smoke``: small enough that the
#: whole of ``make bench`` takes minutes; nothing they print is a figure
SMOKE = {
    "bench.training": ["--repeats", "1", "--epochs", "0.4", "--grid", "1", "--sweep", "1,32"],
    "bench.packing": ["--repeats", "1", "--epochs", "0.4", "--grid", "1", "--families", "llama"],
    "bench.kernels": ["--width", "64", "--source", "8", "--target", "16", "--layers", "2"],
    "bench.validation": ["--epochs", "0.5"],
    "bench.dataprep": ["--rows", "200", "--repeats", "1"],
    "bench.pipeline": ["--jobs", "1", "--steps", "2"],
    "bench.export": ["--mb", "4"],
    "bench.inference": ["--requests", "4", "--concurrency", "2"],
    "bench.ledger": ["--sizes", "50,100", "--events", "12", "--repeat", "5"],
}
SIZES = ("full", "smoke")


#: where ``python -m bench.gpu_qlora --out`` left its figures from a GPU machine
RECORDED_GPU = Path(__file__).parent / "results" / "gpu_qlora.jsonl"


AUTO_PLAN_NOT_MEASURED = (
    "This record predates the auto plan (batch and precision planned for the card, fused "
    "AdamW, SDPA, fused gelu and rms_norm, torch.compile): it comes from the script's "
    "earlier separate loop. No GPU has run the trainer's code path since, so the goal of "
    "at least 20% MFU with the auto plan on an H200 (5x the best row's tokens/s) is open."
)


def recorded_gpu(path: Path) -> list[str]:
    """The GPU section from figures recorded on a GPU machine, when this one has none."""
    title = f"## {GPU[3]}"
    if not path.exists():
        return [title, "", "Not run: no GPU here and no recorded figures in "
                f"`{path.name}`; `python -m bench.gpu_qlora --out {path}` on a GPU machine "
                "records them.", ""]  # fmt: skip
    head, *modes = [json.loads(line) for line in path.read_text().splitlines() if line]
    page = [
        title,
        "",
        f"{GPU[4]} Not measured on this machine: recorded by `python -m bench.gpu_qlora "
        f"--out` on an **{head['card']}** on {head['date']} (torch {head['torch']}, CUDA "
        f"{head['cuda']}, transformers {head['transformers']}, peft {head['peft']}, "
        f"bitsandbytes {head['bitsandbytes']}); {head['parameters'] / 1e6:.0f}M parameters, "
        f"{head['source_tokens']} source + {head['target_tokens']} target tokens an example, "
        f"{head['steps']} steps of which the first 5 are warm-up. MFU = 4 x (encoder weights "
        "x source tokens + decoder and LM-head weights x target tokens) x examples/s over the "
        "card's dense bf16 peak (frozen base: no weight gradients; each half charged for its "
        "own tokens; recomputed so for records that charged 6 x every parameter for every "
        "token); GPU busy = kernel time / wall time of one profiled step.",
        "",
        "| mode | batch | tokens/s | step s | peak GiB | MFU | GPU busy | kernels/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in modes:
        mfu = by_halves_mfu(m, head)
        busy = f"{m['gpu_busy']:.0%}" if "gpu_busy" in m else "n/a"
        batch = f"{m['batch']} x {m['accumulation']}" if "accumulation" in m else m["batch"]
        page.append(
            f"| {m['mode']} | {batch} | {m['tokens_per_s']:,.0f} | {m['step_s']:.3f} | "
            f"{m['peak_memory_gb']:.1f} | {mfu} | {busy} | {m.get('kernels_per_step', 'n/a')} |"
        )
    by_batch = sorted(modes, key=lambda m: m["batch"])
    small, large = by_batch[0], by_batch[-1]
    ratio = large["step_s"] / small["step_s"]
    verdict = (
        "the step is launch-bound (LoRA on every linear layer adds many small kernels), so "
        "`training.batch_size: auto` fills the card's memory"
        if ratio < 1.5
        else "the step is compute-bound at these sizes"
    )
    if not any("accumulation" in m for m in modes):
        page += ["", AUTO_PLAN_NOT_MEASURED]
    page += [
        "",
        f"Step time {small['step_s']:.2f} s at batch {small['batch']} and "
        f"{large['step_s']:.2f} s at {large['batch']} ({ratio:.1f}x for "
        f"{large['batch'] / small['batch']:.0f}x the tokens): {verdict}.",
        "",
    ]
    return page


def by_halves_mfu(mode: dict, head: dict) -> str:
    """A record's MFU, each half of flan-t5-large charged for its own tokens."""
    from bench.gpu_qlora import FLAN_T5_LARGE_MATMUL, PEAK_TFLOPS

    peak = next((v for k, v in PEAK_TFLOPS.items() if k in head["card"]), None)
    if peak is None:
        return "n/a"
    flops = mode.get("flops_per_example") or 4 * (
        FLAN_T5_LARGE_MATMUL[0] * head["source_tokens"]
        + FLAN_T5_LARGE_MATMUL[1] * head["target_tokens"]
    )
    examples_s = mode["tokens_per_s"] / (head["source_tokens"] + head["target_tokens"])
    return f"{examples_s * flops / (peak * 1e12):.1%}"


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
    """Run one benchmark, echoing its output; (output, seconds, finished in time). One that
    outlives ``limit`` is killed with every process it started; the output of one that
    failed or was killed ends with the last lines of its standard error."""
    start = time.monotonic()
    lines: list[str] = []
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            start_new_session=True,  # its group: the children it started die with it
        )
        timer = threading.Timer(limit, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                print(f"  {line}", end="", flush=True)
                lines.append(line.rstrip())
            proc.wait()
        except BaseException:  # Ctrl-C: its own session does not get the terminal's signal
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
        if proc.returncode == 0:
            return "\n".join(lines), seconds, True
        errors.seek(0)
        tail = [line.rstrip() for line in errors.read().splitlines() if line.strip()][-15:]
    why = f"killed at its limit of {limit} s" if seconds >= limit else f"exit {proc.returncode}"
    print(f"  {module} FAILED ({why}); its last error lines:", *tail, sep="\n  ", flush=True)
    return "\n".join([*lines, f"FAILED ({why}):", *tail]), seconds, False


def _sections(lines: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the lines before the first section, each "## " section's lines by title)."""
    head: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith("## "):
            current = sections.setdefault(line, [])
        (head if current is None else current).append(line)
    return head, sections


def merge(old: str, new: list[str]) -> list[str]:
    """The old page with the sections ``new`` ran replaced (or added) and its header (the
    machine and date of this run) on top; sections only the old page has are kept and
    marked with the date and machine they were measured on. Sections come in ``BENCHES``
    order, each ending with a blank line."""
    old_head, old_sections = _sections(old.splitlines())
    new_head, new_sections = _sections(new)
    date = next((line for line in old_head if line.startswith("- Date: ")), "")
    measured_on = date.removeprefix("- Date: ")
    on = next((line for line in old_head if line.startswith("- Machine: ")), "")
    if on:  # the page may be refreshed on another machine than the one that measured these
        measured_on += f", on {on.removeprefix('- Machine: ')}"
    merged: dict[str, list[str]] = {}
    for title, lines in old_sections.items():
        if title in new_sections:
            merged[title] = new_sections.pop(title)
        elif any(line.startswith("(from an earlier run") for line in lines[:3]):
            merged[title] = lines  # already marked
        else:
            merged[title] = [
                lines[0],
                "",
                f"(from an earlier run: {measured_on})",
            ]
            merged[title] += lines[1:]
    merged |= new_sections
    order = [f"## {b[3]}" for b in (*BENCHES, GPU)]
    page = list(new_head)
    for title in sorted(merged, key=lambda t: order.index(t) if t in order else len(order)):
        lines = merged[title]
        page += lines if lines[-1] == "" else [*lines, ""]
    return page


def bench_size() -> str:
    """``TERMTUNE_BENCH_SIZE``: full (the default) or smoke."""
    size = os.environ.get("TERMTUNE_BENCH_SIZE", "full")
    if size not in SIZES:
        raise SystemExit(f"TERMTUNE_BENCH_SIZE={size!r}: expected one of {', '.join(SIZES)}")
    return size


def planned(size: str, only: list[str] | None) -> list[tuple[str, list[str], int, str, str]]:
    """The benchmarks to run, with their arguments at ``size``: the GPU script where CUDA is
    present, at the full size only."""
    benches = list(BENCHES)
    try:
        import torch

        if torch.cuda.is_available() and size == "full":
            benches.append(GPU)
    except ImportError:
        pass
    if size == "smoke":
        benches = [(m, SMOKE[m], limit, title, what) for m, _, limit, title, what in benches]
    unknown = [name for name in only or () if name not in {b[0] for b in [*BENCHES, GPU]}]
    if unknown:  # before anything runs or the page is written
        known = ", ".join(b[0] for b in [*BENCHES, GPU])
        raise SystemExit(f"--only {' '.join(unknown)}: no such benchmark (known: {known})")
    return [b for b in benches if not only or b[0] in only]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="default: docs/benchmarks.md (smoke: var/)")
    parser.add_argument("--only", nargs="*", help="module names to run (default: all)")
    args = parser.parse_args()
    size = bench_size()
    out = args.out or Path("var/bench-smoke.md" if size == "smoke" else "docs/benchmarks.md")
    benches = planned(size, args.only)
    written = (
        "Written by `TERMTUNE_BENCH_SIZE=smoke make bench`: every benchmark at a size that "
        "shows only that it runs. No figure here means anything."
        if size == "smoke"
        else "Written by `make bench` (`bench/report.py`) from what it measured."
    )
    page = ["# Benchmarks", "", written, ""]
    page += machine() + [""]
    failed = []
    for module, bench_args, limit, title, what in benches:
        print(f"== {title} ({module}, limit {limit} s)", flush=True)
        output, seconds, ok = run(module, bench_args, limit)
        status = f"{seconds:.0f} s" if ok else f"stopped or failed after {seconds:.0f} s"
        command = " ".join([f"python -m {module}", *bench_args])
        page += [f"## {title}", "", f"{what} `{command}` ({status}):", "", "```"]
        page += [line for line in output.splitlines() if line.strip()] + ["```", ""]
        failed += [] if ok else [module]
    if GPU[0] not in {b[0] for b in benches}:
        page += recorded_gpu(RECORDED_GPU)
    if args.only and out.exists():  # the other sections stay as the last run left them
        page = merge(out.read_text(), page)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(page))
    print(f"wrote {out}")
    if failed:
        raise SystemExit(f"failed or stopped at their limit: {', '.join(failed)} (see {out})")


if __name__ == "__main__":
    main()
