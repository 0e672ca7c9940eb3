"""`termtune submit SPEC --upload`: a local dataset file and base model folder are put into
the store of a production control plane (in-process) and the spec names them there."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.cli import client as client_module
from services.cli import tinymodel
from services.cli.main import main
from shared.bus import Bus
from shared.settings import ApiSettings
from tests.factories import SAMPLE_DATA, spec_dict
from tests.unit.shared.test_uploads import small_model

KEY = "test-key-123"
pytestmark = pytest.mark.filterwarnings("ignore:You should not use the .timeout. argument")


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A production control plane the CLI's Client reaches in-process; the requests made."""
    settings = ApiSettings(
        var_dir=tmp_path / "var",
        broker_url="memory://",
        api_key=KEY,
        exchange=f"t{uuid.uuid4().hex[:8]}",
        environment="production",
    )
    app = create_app(settings, bus=Bus(settings))
    requests: list[str] = []
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {KEY}"
        http.event_hooks["request"] = [lambda r: requests.append(f"{r.method} {r.url.path}")]
        client = client_module.Client("http://testserver", api_key=KEY)
        client.http = http
        monkeypatch.setattr(client_module, "Client", lambda *args, **kwargs: client)
        yield app, requests


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A working folder with a dataset file and a model folder, named relatively."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copyfile(SAMPLE_DATA, tmp_path / "data" / "terms.jsonl")
    small_model(tmp_path / "models" / "tiny")
    return tmp_path


def _spec(folder: Path, **overrides) -> str:
    spec = spec_dict(Path("models/tiny"), name="terms", dataset={"source": "data/terms.jsonl"})
    (folder / "job.yaml").write_text(yaml.safe_dump({**spec, **overrides}))
    return "job.yaml"


def test_submit_upload_puts_the_files_in_the_store_and_submits_their_locations(api, here, capsys):
    app, requests = api
    store = app.state.jobs.store
    assert main(["submit", _spec(here)]) == 1  # production refuses a local path
    assert "TERMTUNE_ALLOWED_PATHS" in capsys.readouterr().err

    assert main(["submit", _spec(here), "--upload"]) == 0
    out = capsys.readouterr()
    job_id = out.out.strip()
    assert out.out == f"{job_id}\n"  # the job id alone on stdout, for scripts
    spec = app.state.jobs.spec(job_id)
    assert spec.dataset.source.startswith(store.root_uri + "/uploads/datasets/")
    assert spec.dataset.source.endswith("/terms.jsonl")
    assert spec.base_model.startswith(store.root_uri + "/uploads/models/")
    assert out.err.splitlines() == [
        f"uploaded data/terms.jsonl ({SAMPLE_DATA.stat().st_size / 1e3:.1f} kB): "
        f"{spec.dataset.source}",
        f"uploaded models/tiny (3 files, 2.1 kB): {spec.base_model}",
    ]
    assert sum(r.startswith("PUT /v1/uploads/models/") for r in requests) == 3

    requests.clear()  # another job (the first, not ended, holds the name "terms")
    assert main(["submit", _spec(here, name="terms-again"), "--upload"]) == 0
    again = app.state.jobs.spec(capsys.readouterr().out.strip())
    assert (again.dataset.source, again.base_model) == (spec.dataset.source, spec.base_model)
    assert not any(r.startswith("PUT /v1/uploads/models/") for r in requests)  # stored already


@pytest.mark.parametrize(
    "source,message",
    [
        ("data/*.jsonl", "is a folder or a glob; --upload puts one file"),
        ("data", "is a folder or a glob; --upload puts one file"),
        ("data/missing.jsonl", "no such file here to upload"),
        ("data/notes.txt", "data-prep reads .jsonl, .json, .csv, .tsv, .parquet files"),
    ],
)
def test_submit_upload_of_a_glob_folder_or_missing_file_names_dataset_source(
    api, here, capsys, source, message
):
    app, requests = api
    (here / "data" / "notes.txt").write_text("page_title page_text")
    spec = spec_dict(Path("models/tiny"), name="terms", dataset={"source": source})
    (here / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["submit", "job.yaml", "--upload"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"termtune: dataset.source: {source!r}") and message in err
    assert requests == [] and app.state.jobs.page() == ([], False)


class _Client:
    """The control plane as the CLI sees it; records what it was asked, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, *args, **kwargs):  # the CLI constructs Client(): hand back this one
        return self

    def upload_dataset(self, path):
        self.calls.append(("upload_dataset", str(path)))
        return {"location": "s3://b/t/uploads/datasets/x/terms.jsonl", "sha256": "x", "bytes": 9}

    def upload_model(self, folder):
        self.calls.append(("upload_model", str(folder)))
        return {"location": "s3://b/t/uploads/models/d", "digest": "d", "files": {}, "bytes": 1}

    def submit(self, spec):
        self.calls.append(("submit", f"{spec['dataset']['source']} {spec['base_model']}"))
        return {"id": "j-1", "status": "queued"}


def test_the_example_spec_builds_the_tiny_model_then_uploads_it(tmp_path, monkeypatch, capsys):
    from tests.factories import ROOT

    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    built = []

    def build(family, out, data_file):
        built.append(out)
        small_model(out)

    monkeypatch.setattr(tinymodel, "ensure_tiny", build)
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    example = str(ROOT / "examples" / "medical-terms.yaml")
    assert main(["submit", example, "--upload"]) == 0
    assert built == [Path("var/models/tiny-flan-t5")]
    assert fake.calls == [
        ("upload_dataset", "data/medical_terms.jsonl"),
        ("upload_model", "var/models/tiny-flan-t5"),
        ("submit", "s3://b/t/uploads/datasets/x/terms.jsonl s3://b/t/uploads/models/d"),
    ]
    assert capsys.readouterr().out == "j-1\n"


def test_without_upload_the_spec_is_submitted_as_written(here, monkeypatch):
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    assert main(["submit", _spec(here)]) == 0
    assert fake.calls == [("submit", "data/terms.jsonl models/tiny")]


def test_a_hub_dataset_and_model_are_not_uploaded(here, monkeypatch):
    fake = _Client()
    monkeypatch.setattr(client_module, "Client", fake)
    spec = _spec(
        here, base_model="google/flan-t5-large", dataset={"source": "gamino/wiki_medical_terms"}
    )
    assert main(["submit", spec, "--upload"]) == 0
    assert fake.calls == [("submit", "gamino/wiki_medical_terms google/flan-t5-large")]


def test_a_model_folder_with_a_link_is_refused_before_anything_is_uploaded(api, here, capsys):
    app, requests = api
    (here / "models" / "tiny" / "extra.bin").symlink_to(here / "data" / "terms.jsonl")
    assert main(["submit", _spec(here), "--upload"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("termtune: base_model: models/tiny/extra.bin is a symbolic link")
    assert requests == [] and app.state.jobs.page() == ([], False)
