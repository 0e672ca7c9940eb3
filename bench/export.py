"""Export benchmark: merge and save time and size; S3 upload throughput vs a plain copy.

``python -m bench.export``: merges a LoRA adapter (r=64, all linear layers) into the tiny
Flan-T5-shaped model and saves the bf16 folder (median of 3), then uploads a file of
``--mb`` random megabytes to an S3-compatible server on loopback (moto's) with the
publisher's uploader (multipart, parallel, SHA-256 checksums) and copies the same bytes on
local disk, three times each. Prints figures; nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RUNS = 3


def _median_time(fn) -> float:  # noqa: ANN001 - a zero-argument callable
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def merge_and_save(work: Path) -> tuple[float, float, int]:
    """(merge s, save s, folder bytes) for the tiny model with a fresh r=64 adapter."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from services.cli.tinymodel import build_tiny_t5
    from services.publisher import export
    from shared.modeling import load_seq2seq
    from tests.factories import SAMPLE_DATA

    base = build_tiny_t5(work / "base", data_file=SAMPLE_DATA)
    model = get_peft_model(
        load_seq2seq(str(base), dtype=torch.float32),
        LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM, r=64, lora_alpha=16, target_modules="all-linear"
        ),
    )
    model.save_pretrained(work / "adapter")
    probes = [[5, 6, 7, 8, 1], [9, 10, 11, 1]]
    plan = export.merge_plan(str(base), "bfloat16")
    merge_s = _median_time(lambda: export.merge(str(base), work / "adapter", probes, plan=plan))
    merged, _ = export.merge(str(base), work / "adapter", probes, plan=plan)

    def save() -> None:
        shutil.rmtree(work / "out", ignore_errors=True)
        export.save(merged, str(base), work / "out", dtype="bfloat16")

    save_s = _median_time(save)
    size = sum(p.stat().st_size for p in (work / "out").iterdir())
    return merge_s, save_s, size


def upload_vs_copy(work: Path, megabytes: int) -> tuple[float, float]:
    """(upload MB/s, copy MB/s) of the same file, medians of 3."""
    import boto3
    from moto.server import ThreadedMotoServer

    from services.publisher import upload

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    folder = work / "payload"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(os.urandom(megabytes * 2**20))
    files = upload.digests(folder)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="bench")
        runs = iter(range(100))

        def send() -> None:
            upload.upload_folder(
                s3, folder, "bench", f"run-{next(runs)}", files=files, report=lambda _: None
            )

        upload_s = _median_time(send)
    finally:
        server.stop()
    copy_s = _median_time(
        lambda: shutil.copyfile(folder / "model.safetensors", work / "copy.safetensors")
    )
    return megabytes / upload_s, megabytes / copy_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=256, help="size of the uploaded file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        print("merging and saving the tiny model (3 runs each)...", flush=True)
        merge_s, save_s, size = merge_and_save(work)
        print(f"merge {merge_s:.2f} s, save {save_s:.2f} s, folder {size / 2**20:.1f} MB")
        print(f"uploading {args.mb} MB vs copying it (3 runs each)...", flush=True)
        up, cp = upload_vs_copy(work, args.mb)
        print(
            f"upload to the S3 server {up:.0f} MB/s, plain copy {cp:.0f} MB/s "
            f"(upload at {up / cp:.2f}x the copy's rate)"
        )


if __name__ == "__main__":
    main()
