"""Shared fixtures: the tiny model, temporary stores, a prepared and trained job."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from services.cli.tinymodel import build_tiny_t5
from shared.messages import PrepareDataset
from shared.pipeline import next_command
from shared.worker import StageContext, run_stage
from tests.factories import SAMPLE_DATA, make_ctx, make_spec

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: ``TERMTUNE_TEST_DATABASE=postgresql`` (make test sets it) runs every test on a fresh
#: database of a private PostgreSQL server; otherwise each test's ledger is SQLite under its
#: own var folder, the embedded default.
ON_POSTGRES = os.environ.get("TERMTUNE_TEST_DATABASE", "sqlite") == "postgresql"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Flan-T5-shaped model folder with its tokenizer."""
    return build_tiny_t5(tmp_path_factory.mktemp("model") / "tiny-t5", data_file=SAMPLE_DATA)


@pytest.fixture
def ctx(tmp_path: Path) -> StageContext:
    """A stage context over an empty local store."""
    return make_ctx(tmp_path / "var")


@pytest.fixture(scope="session")
def session_database(request: pytest.FixtureRequest) -> str | None:
    """A database for session-long fixtures: on PostgreSQL one of its own (a test's fresh
    database is dropped after the test); None: SQLite under the fixture's var folder."""
    return request.getfixturevalue("postgres").fresh_database() if ON_POSTGRES else None


@pytest.fixture(scope="module")
def module_database(request: pytest.FixtureRequest) -> str | None:
    """A database for a module's long-lived services (like session_database, per module)."""
    return request.getfixturevalue("postgres").fresh_database() if ON_POSTGRES else None


@pytest.fixture(scope="session")
def trained_job(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, session_database: str | None
) -> dict:
    """A job whose prepare and train stages ran (shared by evaluator/publisher tests)."""
    ctx = make_ctx(tmp_path_factory.mktemp("trained") / "var", session_database)
    spec = make_spec(tiny_model, dataset={"validation_size": 0.1})
    job_id = "trained-job"
    prepare = PrepareDataset(job_id=job_id, spec_uri=ctx.jobs.create(job_id, spec))
    prepared = run_stage(prepare, _handler("dataprep"), ctx)
    train = next_command(prepare, prepared)
    trained = run_stage(train, _handler("trainer"), ctx)
    evaluate = next_command(train, trained)
    return {
        "ctx": ctx,
        "spec": spec,
        "job_id": job_id,
        "evaluate": evaluate,
        "prepared": prepared,
        "trained": trained,
    }


def _handler(service: str):  # noqa: ANN202
    import importlib

    return importlib.import_module(f"services.{service}.handler").handle


@pytest.fixture(scope="session")
def llama_7b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Llama 2 7B's config alone (trainplan.model_shape reads the shape from it)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-7b")
    config = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008)
    config.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-shaped decoder-only model with its tokenizer and chat template."""
    from services.cli.tinycausal import build_tiny_causal

    return build_tiny_causal("qwen3", tmp_path_factory.mktemp("qwen") / "m", data_file=SAMPLE_DATA)


@pytest.fixture(scope="session")
def trained_qwen(tmp_path_factory: pytest.TempPathFactory, tiny_qwen: Path) -> dict:
    """A job on the tiny Qwen model whose prepare and train stages ran."""
    ctx = make_ctx(tmp_path_factory.mktemp("trained-qwen") / "var")
    spec = make_spec(tiny_qwen, dataset={"validation_size": 0.1})
    prepare = PrepareDataset(job_id="qwen-job", spec_uri=ctx.jobs.create("qwen-job", spec))
    prepared = run_stage(prepare, _handler("dataprep"), ctx)
    train = next_command(prepare, prepared)
    trained = run_stage(train, _handler("trainer"), ctx)
    return {
        "ctx": ctx,
        "prepared": prepared,
        "trained": trained,
        "evaluate": next_command(train, trained),
    }


@pytest.fixture(scope="session")
def published_qwen(trained_qwen: dict) -> tuple:
    """The tiny Qwen job evaluated and published (local): (ctx, ModelEvaluated,
    ModelPublished)."""
    ctx, command = trained_qwen["ctx"], trained_qwen["evaluate"]
    evaluated = _handler("evaluator")(command, ctx)
    return ctx, evaluated, _handler("publisher")(next_command(command, evaluated), ctx)


@pytest.fixture(scope="session")
def published_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A tiny GPT-OSS job (its experts stored in MXFP4, as released) through every stage,
    published locally: (ctx, the EvaluateModel command, ModelEvaluated). It trains long
    enough to learn the final channel's header, so it answers (the gate checks)."""
    from services.cli.tinycausal import build_tiny_causal

    root = tmp_path_factory.mktemp("gpt-oss")
    base = build_tiny_causal("gpt_oss", root / "base", data_file=SAMPLE_DATA, hidden=64)
    ctx = make_ctx(root / "var")
    spec = make_spec(
        base,
        dataset={"validation_size": 0.1},
        training={"max_steps": 60, "learning_rate": 0.01},
        evaluation={"gate": {"max_empty_share": 0.5}},
    )
    prepare = PrepareDataset(job_id="oss-job", spec_uri=ctx.jobs.create("oss-job", spec))
    train = next_command(prepare, run_stage(prepare, _handler("dataprep"), ctx))
    evaluate = next_command(train, run_stage(train, _handler("trainer"), ctx))
    evaluated = run_stage(evaluate, _handler("evaluator"), ctx)
    run_stage(next_command(evaluate, evaluated), _handler("publisher"), ctx)
    return ctx, evaluate, evaluated


@pytest.fixture(scope="session")
def published(trained_job) -> tuple:
    """The trained job evaluated and published: (ctx, PublishModel, ModelPublished)."""
    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    evaluated = _handler("evaluator")(cmd, ctx)
    publish = next_command(cmd, evaluated)
    return ctx, publish, _handler("publisher")(publish, ctx)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3-compatible server over HTTP on loopback (moto's), for the session."""
    from moto.server import ThreadedMotoServer

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """The tests' PostgreSQL server, for the session (in a folder of its own: as root the
    server runs as the postgres account, which cannot enter pytest's private folders)."""
    import shutil
    import tempfile

    from tests.postgres import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="termtune-pg-"))
    root.chmod(0o755)
    server = PostgresServer(root / "server")
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """A real MLflow tracking server for the session (on PostgreSQL runs, its runs in a
    database of the tests' PostgreSQL server, as compose keeps them in the stack's)."""
    from tests.mlflow_server import MlflowServer

    backend = request.getfixturevalue("postgres").fresh_database() if ON_POSTGRES else None
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), backend_store_uri=backend)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """On PostgreSQL, a fresh database for this test (every process it starts inherits it)."""
    if not ON_POSTGRES:
        yield None
        return
    server = request.getfixturevalue("postgres")
    url = server.fresh_database()
    monkeypatch.setenv("TERMTUNE_DATABASE_URL", url)
    yield url
    from shared.ledger.core import forget

    forget(url)
    server.drop_database(url)
