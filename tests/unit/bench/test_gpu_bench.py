"""The GPU benchmark's code path, run small on CPU: a GPU session's minutes are scarce."""

import json
import subprocess
import sys

import pytest
import torch

from tests.factories import ROOT


def _smoke(*flags: str) -> tuple[dict, dict]:
    """`python -m bench.gpu_qlora --smoke` (with this venv's python): the header and mode."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_qlora", "--smoke", *flags],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    head, mode = (json.loads(line) for line in lines)
    return head, mode


def test_the_gpu_benchmark_runs_the_trainers_code_path_on_cpu():
    """`python -m bench.gpu_qlora --smoke`, as the README gives it."""
    head, mode = _smoke()
    assert head["card"] == "CPU" and head["steps"] == 8
    assert mode["mode"] == "auto plan (termtune default)"
    assert (mode["batch"], mode["accumulation"], mode["quantization"]) == (32, 1, "none")
    assert mode["examples_per_s"] > 0 and mode["flops_per_example"] > 0
    assert mode["operator_calls"] > 1000  # the profiled step's operators were counted


def test_the_gpu_benchmark_runs_a_decoder_only_shape_on_cpu():
    """`--family llama`: Llama-3.2-1B's shape, small, through trl's trainer, packed."""
    head, mode = _smoke("--family", "llama")
    assert head["family"] == "llama" and head["steps"] == 8
    assert mode["mode"] == "auto plan (termtune default: packed)"
    assert mode["examples_per_s"] > 0 and mode["flops_per_example"] > 0


def test_the_recording_command_refuses_a_machine_without_a_gpu_and_keeps_the_record():
    """`python -m bench.gpu_qlora --out bench/results/gpu_qlora.jsonl`, as the README gives it
    for a lent GPU, run here: without CUDA it says so and leaves the record as it was."""
    command = "python -m bench.gpu_qlora --out bench/results/gpu_qlora.jsonl"
    assert f"`{command}`" in (ROOT / "README.md").read_text(encoding="utf-8")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the command would record it (a GPU session runs it)")
    record = ROOT / "bench" / "results" / "gpu_qlora.jsonl"
    before = record.read_bytes()
    done = subprocess.run(
        command.replace("python", sys.executable, 1).split(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "bench.gpu_qlora needs a CUDA GPU (or --smoke, on CPU)"
    )
    assert record.read_bytes() == before
