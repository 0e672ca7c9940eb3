"""`termtune`: launch the services, submit and follow jobs, invoke models, run stages."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.cli.exits import Exit, job_exit
from services.cli.tinymodel import TINY_FAMILIES
from shared.errors import SpecError, TermtuneError
from shared.jobspec import JobSpec, load_spec
from shared.messages import JOB_STATUSES
from shared.unique_keys import load_yaml

TINY_MODEL_DIR = Path("var/models/tiny-flan-t5")
#: what `pip install 'termtune[services]'` adds to the client alone (import names)
SERVICE_MODULES = frozenset(
    [
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "safetensors",
        "tokenizers",
        "pyarrow",
        "kombu",
        "boto3",
        "botocore",
        "fastapi",
        "prometheus_client",
        "uvicorn",
        "rouge_score",
        "sacrebleu",
        "numpy",
        "tenacity",
        "pythonjsonlogger",
        "sqlalchemy",
        "alembic",
        "psycopg",
    ]
)
SAMPLE_DATA = Path("data/medical_terms.jsonl")


def version() -> str:
    """This termtune's version (the installed distribution's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("termtune")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _parser() -> argparse.ArgumentParser:
    from services.cli.exits import epilog

    p = argparse.ArgumentParser(
        prog="termtune",
        description=__doc__,
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"termtune {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json", action="store_true", help="the API's objects as JSON, for scripts"
    )
    timeout_flag = argparse.ArgumentParser(add_help=False)
    timeout_flag.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop waiting after this long (exit 1; default: wait until the job ends)",
    )
    run = sub.add_parser(
        "run", help="start the services, run a job end to end, stop", parents=[timeout_flag]
    )
    run.add_argument("spec", type=Path)
    run.add_argument("--port", type=int, default=None, help="default: TERMTUNE_PORT or 8000")
    run.add_argument("--prompt", default=None, help="question for the published model")
    up = sub.add_parser("up", help="start the services in the foreground (Ctrl-C stops)")
    up.add_argument("--port", type=int, default=None, help="default: TERMTUNE_PORT or 8000")
    up.add_argument("--trainers", type=int, default=1, help="competing trainer processes")
    sub.add_parser("down", help="stop services a `termtune up` left running")
    submit = sub.add_parser("submit", help="submit a job spec", parents=[timeout_flag])
    submit.add_argument("spec", type=Path)
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument(
        "--upload",
        action="store_true",
        help="put a local dataset file and base model folder into the object store first "
        "(for a deployed stack) and submit their locations there",
    )
    status = sub.add_parser("status", help="a job's status (JSON)", parents=[json_flag])
    status.add_argument("job_id")
    jobs = sub.add_parser("jobs", help="jobs, newest first", parents=[json_flag])
    jobs.add_argument("--limit", type=_positive, default=20, help="the newest N (default 20)")
    jobs.add_argument("--all", action="store_true", help="every job (page after page)")
    jobs.add_argument("--status", choices=JOB_STATUSES, default=None, help="only these")
    events = sub.add_parser("events", help="a job's events", parents=[json_flag])
    events.add_argument("job_id")
    events.add_argument("--follow", action="store_true", help="stream until the job ends")
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    retry = sub.add_parser("retry", help="resume a failed or cancelled job", parents=[timeout_flag])
    retry.add_argument("job_id")
    retry.add_argument("--wait", action="store_true", help="follow the job until it ends")
    report = sub.add_parser("report", help="a job's evaluation table and gate", parents=[json_flag])
    report.add_argument("job_id")
    models = sub.add_parser("models", help="published models", parents=[json_flag])
    models.add_argument(
        "--imported", action="store_true", help="every model imported into Bedrock instead"
    )
    delete = sub.add_parser("delete-model", help="delete a published model and its import")
    delete.add_argument("model")
    invoke = sub.add_parser("invoke", help="ask a published model (JSON)", parents=[json_flag])
    invoke.add_argument("model")
    invoke.add_argument("prompt")
    for flag, kind in (("--max-gen-len", int), ("--temperature", float), ("--top-p", float)):
        invoke.add_argument(flag, type=kind, help="default: the job spec's decoding")
    invoke.add_argument(
        "--chat", action="store_true", help="send the prompt as a chat message (OpenAI chat "
        "completions, rendered by the model's chat template); the answer in that shape",
    )  # fmt: skip
    est = sub.add_parser(
        "estimate", help="training time and cost on a g5 instance, and Bedrock's cost"
    )
    est.add_argument("spec", type=Path, nargs="?", help="prepared here first, unless --job")
    est.add_argument("--job", default=None, help="a job the control plane has prepared")
    est.add_argument("--instance-type", default="g5.xlarge")
    db = sub.add_parser("db", help="the job database: migrate it, import an old store's jobs")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="migrate TERMTUNE_DATABASE_URL to this version's schema")
    db_sub.add_parser(
        "import-store", help="import the jobs and models an older termtune kept in the store"
    )
    sub.add_parser("schema", help="the job spec's JSON Schema (docs/job-spec.schema.json)")
    tiny = sub.add_parser("build-tiny-model", help="build an offline tiny model of a family")
    tiny.add_argument("--family", choices=TINY_FAMILIES, default="t5")
    tiny.add_argument("--out", type=Path, help=f"default {TINY_MODEL_DIR} for t5, else "
                      "var/models/tiny-FAMILY")  # fmt: skip
    tiny.add_argument("--data", type=Path, default=SAMPLE_DATA)
    for stage in ("prepare", "train", "evaluate", "publish"):
        sp = sub.add_parser(stage, help=f"run the {stage} stage in this process")
        sp.add_argument("spec", type=Path)
        sp.add_argument("--job", default=None, help="job id (default: <name>-local)")
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _raw_spec(path: Path) -> dict[str, Any]:
    load_spec(path)  # validate here first: errors name the field before anything starts
    return load_yaml(path.read_text(encoding="utf-8"))


def _ensure_model(spec_path: Path) -> None:
    """Build the offline tiny model when the spec names it and it is not built yet."""
    _ensure_base_model(load_spec(spec_path).base_model)


def _ensure_base_model(base_model: str) -> None:
    """Build the tiny model of a family when ``base_model`` is its default folder."""
    from services.cli.tinymodel import ensure_tiny, tiny_folder

    wanted = Path(base_model).resolve()
    family = next((f for f in TINY_FAMILIES if tiny_folder(f).resolve() == wanted), None)
    if family is None:
        return
    folder = tiny_folder(family)
    if not ((folder / "config.json").exists() and (folder / "tokenizer.json").exists()):
        how = "termtune build-tiny-model" + ("" if family == "t5" else f" --family {family}")
        print(f"building the embedded tiny model in {folder} (`{how}`)", file=sys.stderr)
    ensure_tiny(family, folder, data_file=SAMPLE_DATA)


def _ensure_job_model(client: Any, job_id: str) -> None:
    """Build the tiny model a job's spec names, when that spec is a file on this machine
    (the embedded store), before the job is retried: a fresh var/ lacks it."""
    from urllib.parse import unquote, urlparse

    submitted = next((e for e in client.events(job_id) if e.get("type") == "JobSubmitted"), {})
    uri = urlparse(submitted.get("spec_uri") or "")
    if uri.scheme != "file" or not Path(unquote(uri.path)).is_file():
        return  # a remote store: the control plane's machine has its own models
    spec = json.loads(Path(unquote(uri.path)).read_text(encoding="utf-8"))
    if isinstance(spec.get("base_model"), str):
        _ensure_base_model(spec["base_model"])


def _local_dataset(source: str) -> Path | None:
    """The local file a dataset.source names; None for a hub id or a store or S3 location."""
    from urllib.parse import unquote, urlparse

    from shared.locations import GLOB_CHARS, HUB_ID
    from shared.uploads import DATASET_SUFFIXES

    if "://" in source and not source.startswith("file://"):
        return None
    local = source.startswith("file://")
    path = Path(unquote(urlparse(source).path) if local else source).expanduser()
    if path.is_file():
        if not path.name.lower().endswith(DATASET_SUFFIXES):
            raise SpecError(
                f"dataset.source: {source!r}: data-prep reads {', '.join(DATASET_SUFFIXES)} files"
            )
        return path
    if path.is_dir() or any(c in source for c in GLOB_CHARS):
        raise SpecError(
            f"dataset.source: {source!r} is a folder or a glob; --upload puts one file into "
            "the store: join the files into one (.jsonl, .csv, .parquet...) and name it"
        )
    if local or source.lower().endswith(DATASET_SUFFIXES) or not HUB_ID.match(source):
        raise SpecError(f"dataset.source: {source!r}: no such file here to upload")
    return None


def _local_model(base_model: str) -> Path | None:
    """The local folder base_model names (its files checked); None for a hub id or a store
    location."""
    from shared.modeling import check_base_model
    from shared.uploads import model_files

    if "://" in base_model:
        return None
    path = Path(base_model).expanduser()
    if path.is_dir():
        model_files(path)  # links, odd names, no config.json: refused before any upload
        return path
    check_base_model(base_model)  # a path that is no folder: ModelError saying what to do
    return None


def _upload_inputs(client: Any, raw: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """The spec with its local dataset file and base model folder put into the store and
    named by their locations there; what was uploaded is told on stderr."""
    raw = dict(raw)
    dataset, folder = _local_dataset(spec.dataset.source), _local_model(spec.base_model)
    if dataset is not None:
        done = client.upload_dataset(dataset)
        raw["dataset"] = {**(raw.get("dataset") or {}), "source": done["location"]}
        print(f"uploaded {dataset} ({_size(done['bytes'])}): {done['location']}", file=sys.stderr)
    if folder is not None:
        done = client.upload_model(folder)
        raw["base_model"] = done["location"]
        files = f"{len(done['files'])} files, {_size(done['bytes'])}"
        print(f"uploaded {folder} ({files}): {done['location']}", file=sys.stderr)
    return raw


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


class StopAsked(KeyboardInterrupt):
    """SIGTERM: a supervisor (or `kill`) asks the launcher to stop; `up`'s normal end."""


def _stop_asked(signum: int, frame: Any) -> None:
    raise StopAsked(signum)


def _launcher(port: int | None) -> Any:
    """A launcher on TERMTUNE_VAR_DIR and the given port (else TERMTUNE_PORT); SIGTERM
    (as ``StopAsked``) and SIGHUP stop it as Ctrl-C does, so every service it starts is
    stopped with it."""
    from services.cli.launcher import Launcher
    from shared.settings import ApiSettings

    settings = ApiSettings()
    signal.signal(signal.SIGTERM, _stop_asked)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # `nohup termtune up` keeps on
        signal.signal(signal.SIGHUP, signal.default_int_handler)
    return Launcher(var_dir=settings.var_dir, port=port or settings.port)


def cmd_run(args: argparse.Namespace) -> int:
    from services.cli import display
    from services.cli.client import Client

    spec = _raw_spec(args.spec)
    _ensure_model(args.spec)
    launcher = _launcher(args.port)
    started = time.monotonic()
    display.progress_console.print(
        f"starting api and workers (logs in {launcher.log_dir})", markup=False
    )
    try:
        launcher.start()
        launcher.wait_ready()
        client = Client(launcher.url, api_key=launcher.api_key())
        job = client.submit(spec)
        display.console.print(f"submitted job {job['id']}", markup=False)
        job = display.follow(client, job["id"], timeout=args.timeout)
        display.summary(client, job)
        if job["status"] == "succeeded":
            report = client.report(job["id"])
            prompt = args.prompt or report["samples"][0]["prompt"]
            display.invoked(client, job["model_name"], prompt)  # the decoding evaluated
        display.console.print(
            f"done in {time.monotonic() - started:.0f}s; artifacts in {launcher.var_dir}",
            markup=False,
        )
        return job_exit(job)
    finally:
        launcher.stop()


def cmd_up(args: argparse.Namespace) -> int:
    """The services in the foreground until SIGTERM (exit 0, its end) or Ctrl-C or SIGHUP
    (an interrupt: ``main`` says so and exits 130); either stops every one."""
    launcher = _launcher(args.port)
    try:
        launcher.start(trainers=args.trainers)
        launcher.wait_ready()
        print(
            f"termtune is up at {launcher.url} (API key in {launcher.run_dir / 'api_key'}); "
            "Ctrl-C stops it"
        )
        while True:  # a service that exits is started again (with a backoff); Ctrl-C stops
            for line in launcher.supervise():
                print(line, file=sys.stderr)
            time.sleep(1)
    except StopAsked:
        return Exit.OK
    finally:
        launcher.stop()


def cmd_local_stage(args: argparse.Namespace) -> int:
    from services.cli.stages import run_local

    _ensure_model(args.spec)
    job_id, event = run_local(args.command, load_spec(args.spec), job_id=args.job)
    print(json.dumps({"job_id": job_id, **event.model_dump(mode="json")}, indent=2))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Migrate the job database, or import an old store's job records into it."""
    from shared.jobs import open_records
    from shared.ledger import migrate
    from shared.settings import Settings

    settings = Settings()
    jobs = open_records(settings)
    if args.db_command == "upgrade":
        revision = migrate.upgrade(jobs.ledger.engine)
        print(f"{jobs.ledger.where}: schema {revision} (the newest this termtune knows)")
        return 0
    from shared.ledger.importer import import_store

    report = import_store(jobs)
    print(
        f"imported {len(report.imported)} jobs and {report.models} models from "
        f"{jobs.store.root_uri} into {jobs.ledger.where}; "
        f"{len(report.already)} jobs were already there"
    )
    for job_id, reason in report.failed.items():
        print(f"not imported: {job_id}: {reason}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Through the control plane (--job), or data-prep here and the same arithmetic."""
    if args.job:
        from services.cli.client import Client

        spec = _raw_spec(args.spec) if args.spec else None
        if args.spec:
            _ensure_model(args.spec)
        result = Client().estimate(args.job, args.instance_type, spec=spec)
    else:
        if args.spec is None:
            raise SpecError("estimate needs a SPEC (prepared here) or --job ID")
        from services.cli.stages import run_local
        from shared.estimate import G5_INSTANCES, Prices, estimate
        from shared.jobs import open_records
        from shared.settings import BedrockSettings, Settings
        from shared.trainplan import model_shape

        _ensure_model(args.spec)
        spec = load_spec(args.spec)
        with tempfile.TemporaryDirectory(prefix="termtune-estimate-") as scratch:
            settings = Settings(var_dir=Path(scratch))  # prepared here; no job is recorded
            job_id, _ = run_local("prepare", spec, settings=settings)
            dataset = open_records(settings).manifest(job_id, "prepare") or {}
        prices = Prices(G5_INSTANCES, BedrockSettings().cmu_price_per_minute)
        result = estimate(
            spec,
            dataset,
            instance_type=args.instance_type,
            shape=model_shape(spec.base_model),
            prices=prices,
        )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _client_command(args: argparse.Namespace) -> int:
    from services.cli import display, reads
    from services.cli.client import Client

    client = Client()
    if args.command == "submit":
        spec = _raw_spec(args.spec)
        _ensure_model(args.spec)
        if args.upload:
            spec = _upload_inputs(client, spec, load_spec(args.spec))
        job = client.submit(spec)
        print(job["id"])
        if args.wait:
            job = display.follow(client, job["id"], timeout=args.timeout)
            display.summary(client, job)
            return job_exit(job)
        return 0
    if args.command == "retry":
        _ensure_job_model(client, args.job_id)
        job = client.retry(args.job_id)
        print(f"{args.job_id}: {job['status']} (retry {job.get('retries', 1)})")
        if args.wait:
            job = display.follow(client, args.job_id, timeout=args.timeout)
            display.summary(client, job)
            return job_exit(job)
        return 0
    if args.command in reads.COMMANDS:
        return reads.COMMANDS[args.command](client, args)
    if args.command == "cancel":
        print(f"{args.job_id}: {client.cancel(args.job_id)['status']} (cancel requested)")
    elif args.command == "delete-model":
        deleted = client.delete_model(args.model)
        arn = deleted["imported_model_arn"]
        print(f"deleted {deleted['deleted']}" + (f" and its Bedrock import {arn}" if arn else ""))
    elif args.command == "invoke":
        limit = "max_tokens" if args.chat else "max_gen_len"
        chosen = {limit: args.max_gen_len, "temperature": args.temperature, "top_p": args.top_p}
        given = {k: v for k, v in chosen.items() if v is not None}
        if args.chat:
            body = {"messages": [{"role": "user", "content": args.prompt}], **given}
            print(json.dumps(client.invoke_body(args.model, body), indent=2))
        else:
            print(json.dumps(client.invoke(args.model, args.prompt, **given), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; a one-line reason and exit 1 on errors."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "up":
            return cmd_up(args)
        if args.command == "down":
            from services.cli.launcher import stop_recorded
            from shared.settings import Settings

            stopped = stop_recorded(Settings().var_dir)  # where `up` recorded them
            print("stopped: " + (", ".join(stopped) or "nothing was running"))
            return 0
        if args.command == "schema":
            from services.cli.docs import schema_text

            print(schema_text(), end="")
            return 0
        if args.command == "build-tiny-model":
            from services.cli.tinymodel import build_tiny, tiny_folder

            out = args.out or tiny_folder(args.family)
            print(build_tiny(args.family, out, data_file=args.data))
            return 0
        if args.command in ("prepare", "train", "evaluate", "publish"):
            return cmd_local_stage(args)
        if args.command == "estimate":
            return cmd_estimate(args)
        if args.command == "db":
            return cmd_db(args)
        return _client_command(args)
    except (TermtuneError, TimeoutError) as exc:
        print(f"termtune: {exc}", file=sys.stderr)
        return Exit.ERROR
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in SERVICE_MODULES:
            raise
        print(
            f"termtune: `termtune {args.command}` needs the services' packages ({missing} is "
            "not installed): pip install 'termtune[services]'",
            file=sys.stderr,
        )
        return Exit.ERROR
    except KeyboardInterrupt:
        print("termtune: interrupted; every service it started was stopped", file=sys.stderr)
        return Exit.INTERRUPTED
