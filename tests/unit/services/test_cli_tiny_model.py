"""`termtune submit`, `retry` and `estimate --job` build the offline tiny model a spec names,
as `termtune run` does: the README's "Using it" path works on a fresh var/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from services.cli import client as client_module
from services.cli import tinymodel
from services.cli.main import main
from tests.factories import spec_dict

TINY = "var/models/tiny-flan-t5"


class _Client:
    """The control plane as the CLI sees it; records what it was asked."""

    def __init__(self, spec_uri: str = "") -> None:
        self.spec_uri, self.calls = spec_uri, []

    def __call__(self, *args, **kwargs):  # the CLI constructs Client(): hand back this one
        return self

    def submit(self, spec):
        self.calls.append(("submit", spec["base_model"]))
        return {"id": "j-1", "status": "queued"}

    def events(self, job_id):
        return [{"type": "JobSubmitted", "spec_uri": self.spec_uri, "name": "j"}]

    def retry(self, job_id):
        self.calls.append(("retry", job_id))
        return {"id": job_id, "status": "queued", "retries": 1}

    def estimate(self, job_id, instance_type, spec=None):
        self.calls.append(("estimate", job_id))
        return {"instance_type": instance_type}


@pytest.fixture
def built(tmp_path, monkeypatch) -> list[Path]:
    """A fresh checkout's folder; the tiny model's builds are recorded, not run."""
    monkeypatch.chdir(tmp_path)
    builds: list[Path] = []
    monkeypatch.setattr(tinymodel, "ensure_tiny", lambda family, out, data_file: builds.append(out))
    return builds


def _spec(tmp_path: Path, base_model: str) -> str:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict(base_model, name="terms")))
    return "job.yaml"


def test_submit_builds_the_tiny_model_the_spec_names_before_submitting(
    tmp_path, monkeypatch, built, capsys
):
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["submit", _spec(tmp_path, TINY)]) == 0
    assert built == [Path(TINY)]
    assert fake.calls == [("submit", TINY)]
    out = capsys.readouterr()
    assert out.out == "j-1\n"  # the job id alone on stdout, for scripts
    assert out.err == (
        "building the embedded tiny model in var/models/tiny-flan-t5 "
        "(`termtune build-tiny-model`)\n"
    )


def test_submit_of_a_hub_model_builds_nothing(tmp_path, monkeypatch, built):
    monkeypatch.setattr(client_module, "Client", _Client())
    assert main(["submit", _spec(tmp_path, "google/flan-t5-large")]) == 0
    assert built == []


def test_retry_builds_the_tiny_model_the_jobs_spec_names(tmp_path, monkeypatch, built, capsys):
    spec_file = tmp_path / "var" / "store" / "jobs" / "j-1" / "spec.json"
    spec_file.parent.mkdir(parents=True)
    spec_file.write_text(json.dumps(spec_dict(TINY, name="terms")))
    fake = _Client(spec_uri=spec_file.as_uri())
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["retry", "j-1"]) == 0
    assert built == [Path(TINY)]
    assert fake.calls == [("retry", "j-1")]
    assert capsys.readouterr().out == "j-1: queued (retry 1)\n"


def test_retry_of_a_job_in_a_remote_store_builds_nothing_here(monkeypatch, built):
    fake = _Client(spec_uri="s3://bucket/jobs/j-1/spec.json")
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["retry", "j-1"]) == 0
    assert built == []


def test_estimate_of_a_job_with_a_spec_builds_the_tiny_model(tmp_path, monkeypatch, built):
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["estimate", _spec(tmp_path, TINY), "--job", "j-1"]) == 0
    assert built == [Path(TINY)]
    assert fake.calls == [("estimate", "j-1")]


_BUILD_TOKENIZER = """
import sys
from pathlib import Path
from services.cli.tinymodel import build_tokenizer, corpus
build_tokenizer(corpus(Path(sys.argv[1]))).save_pretrained(sys.argv[2])
"""


def test_the_tokenizer_is_the_same_from_build_to_build(tmp_path):
    """The unigram trainer's scores and the order of its rarest characters change from
    process to process (hash-map order); the ids did too, and the example's gate with them
    (a clean-clone CI run refused the example that passed here). Built in two processes,
    the tokenizers are byte for byte the same, the special tokens at T5's ids."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    data = Path(__file__).parents[3] / "data" / "medical_terms.jsonl"
    for build in ("a", "b"):
        subprocess.run(
            [sys.executable, "-c", _BUILD_TOKENIZER, str(data), str(tmp_path / build)],
            check=True,
        )
    first, second = ((tmp_path / b / "tokenizer.json").read_bytes() for b in ("a", "b"))
    assert first == second
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2]
    assert tokenizer("What is Dexamethasone suppression test?").input_ids[-1] == 1


def test_submit_builds_a_tiny_decoder_only_model_the_spec_names(
    tmp_path, monkeypatch, built, capsys
):
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["submit", _spec(tmp_path, "var/models/tiny-qwen3")]) == 0
    assert built == [Path("var/models/tiny-qwen3")]
    assert capsys.readouterr().err == (
        "building the embedded tiny model in var/models/tiny-qwen3 "
        "(`termtune build-tiny-model --family qwen3`)\n"
    )
