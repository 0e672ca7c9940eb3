"""Waiting on a job and following its events: no time limit unless asked, the control plane
restarting or its database down waited out, the server's text printed as it is, and what
goes wrong said in one line."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import threading

import httpx
import pytest
from rich.console import Console

from services.cli import client as client_module
from services.cli import display
from services.cli.main import main

URL = "http://api.test"
DOWN = {"detail": "the job database cannot be reached"}
SSE = {"content-type": "text/event-stream; charset=utf-8"}


class _Clock:
    """``time.monotonic`` and ``time.sleep``, where a sleep passes at once and is recorded."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(display, "time", clock)
    monkeypatch.setattr(client_module, "time", clock, raising=False)
    return clock


def _job(status: str, reason: str | None = None) -> dict:
    stages = {s: {"status": "succeeded"} for s in ("prepare", "train", "evaluate", "publish")}
    job = {"id": "j-1", "name": "terms", "status": status, "model_name": "terms", "result": {}}
    job.update(created_at="2026-12-01T00:00:00+00:00", stages=stages)
    if reason:
        stages["train"] = {"status": "failed", "error": reason}
        stages["evaluate"] = stages["publish"] = {"status": "pending"}
        job["error"] = {"stage": "train", "reason": reason, "type": "ModelError"}
    return job


class _Fake:
    """A client whose job answers ``jobs`` one after another (the last one for good)."""

    def __init__(self, *jobs: dict, events: tuple = ()) -> None:
        self.jobs, self.streamed = list(jobs), events

    def __call__(self, *args, **kwargs):  # the CLI constructs Client(): hand back this one
        return self

    def job(self, job_id):
        return self.jobs.pop(0) if len(self.jobs) > 1 else self.jobs[0]

    def retry(self, job_id):
        return {"id": job_id, "status": "queued", "retries": 1}

    def events(self, job_id):
        return []

    def stream_events(self, job_id):
        yield from self.streamed


def _client(monkeypatch, handler) -> client_module.Client:
    """A real client whose requests ``handler`` answers; ``Client()`` in the CLI returns it."""
    client = client_module.Client(URL, api_key="k")
    client.http = httpx.Client(base_url=URL, transport=httpx.MockTransport(handler))
    monkeypatch.setattr(client_module, "Client", lambda *args, **kwargs: client)
    return client


def test_a_wait_has_no_time_limit_unless_asked(clock, monkeypatch, capsys):
    hours = 1000 + 3 * 3600

    class Long(_Fake):
        def job(self, job_id):
            return _job("running" if clock.now < hours else "succeeded")

    job = display.follow(Long(), "j-1", poll=60, bars=False)
    assert job["status"] == "succeeded" and clock.now >= hours
    monkeypatch.setattr(client_module, "Client", _Fake(_job("running")))
    assert main(["retry", "j-1", "--wait", "--timeout", "90"]) == 1
    err = capsys.readouterr().err  # the stages' lines, then the reason
    assert err.splitlines()[-1] == "termtune: job j-1 still running after --timeout 90 s"


def test_a_wait_rides_out_a_database_outage_and_an_api_restart(clock, monkeypatch, capsys):
    answers = [
        httpx.Response(503, json=DOWN),
        httpx.ConnectError("connection refused"),
        httpx.Response(502, text="bad gateway"),
        httpx.Response(200, json=_job("succeeded")),
    ]

    def handler(request):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = _client(monkeypatch, handler)
    assert display.follow(client, "j-1", poll=1, bars=False)["status"] == "succeeded"
    assert clock.sleeps == [0.5, 1.0, 2.0]
    err = capsys.readouterr().err
    assert err.count("asking again") == 1 and "HTTP 503: the job database cannot" in err


def test_a_wait_gives_up_after_five_minutes_of_failures_in_one_line(clock, monkeypatch, capsys):
    def handler(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(200, json={"data": [], "last_seq": 0, "has_more": False})
        if request.method == "POST":
            return httpx.Response(200, json=_job("queued"))
        return httpx.Response(503, json=DOWN)

    _client(monkeypatch, handler)
    assert main(["retry", "j-1", "--wait"]) == 1
    assert clock.now - 1000 >= 300 and max(clock.sleeps) == 10.0
    assert capsys.readouterr().err.splitlines()[-1] == (
        "termtune: gave up waiting for job j-1: the control plane failed for 300 s in a row "
        f"(HTTP 503: {DOWN['detail']})"
    )


@pytest.mark.parametrize("bars", [False, True])
def test_server_text_with_brackets_is_printed_as_it_is(monkeypatch, bars):
    """A Llama chat marker or a path in brackets is not rich markup: no MarkupError."""
    reason = "prompt ends with [/INST]; see [/data/x.jsonl]"
    out, err = io.StringIO(), io.StringIO()
    for name, file in (("console", out), ("progress_console", err)):
        console = Console(file=file, force_terminal=bars, width=200, highlight=False)
        monkeypatch.setattr(display, name, console)
    monkeypatch.setattr(client_module, "Client", _Fake(_job("failed", reason)))
    assert main(["retry", "j-1", "--wait"]) == 3
    summary, progress = (re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f.getvalue()) for f in (out, err))
    assert f"failed in train: {reason}" in summary
    assert f"failed: {reason}" in progress  # the train stage's bar or line, on stderr

    class Answers(_Fake):
        def model(self, model):
            return {}

        def invoke(self, model, prompt):
            return {
                "generation": "[INST] a [/INST]",
                "generation_token_count": 4,
                "stop_reason": "stop",
            }

    display.invoked(Answers(), "terms", "[/x]")
    assert "'[/x]'\n  -> '[INST] a [/INST]' (4 tokens" in out.getvalue()


def test_down_stops_the_services_up_recorded_in_termtune_var_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no var/ here: only TERMTUNE_VAR_DIR's
    var = tmp_path / "elsewhere"
    monkeypatch.setenv("TERMTUNE_VAR_DIR", str(var))
    (var / "run").mkdir(parents=True)
    api = subprocess.Popen(["sleep", "60"])
    reaper = threading.Thread(target=api.wait)
    reaper.start()
    try:
        (var / "run" / "pids.json").write_text(json.dumps({"api": api.pid}))
        assert main(["down"]) == 0
        assert capsys.readouterr().out == "stopped: api\n"
        reaper.join(timeout=10)
        assert api.returncode == -signal.SIGTERM
        assert not (var / "run" / "pids.json").exists()
    finally:
        if api.poll() is None:
            api.kill()
        reaper.join()


class _Broken(httpx.SyncByteStream):
    """An event stream that breaks after its text (the API restarting, a proxy's timeout)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __iter__(self):
        yield self.text.encode()
        raise httpx.ReadError("connection reset by peer")


def _sse(seq: int, *, end: bool = False) -> str:
    """An event as the API streams it: its sequence number in the SSE id, after its data
    (FastAPI's order), not in the data."""
    event = {"type": "StageProgress", "job_id": "j-1", "created_at": "2026-12-01T00:00:00Z"}
    text = f"event: StageProgress\r\ndata: {json.dumps(event)}\r\nid: {seq}\r\n\r\n"
    return text + ("event: end\r\ndata: {}\r\n\r\n" if end else "")


def test_events_follow_resumes_each_break_after_its_last_event(clock, monkeypatch):
    answers = [httpx.Response(503, json=DOWN), httpx.ConnectError("connection refused")]
    answers += [httpx.Response(200, headers=SSE, stream=_Broken(_sse(n))) for n in range(1, 8)]
    answers.append(httpx.Response(200, headers=SSE, text=_sse(8, end=True)))
    resumed = []

    def handler(request):
        resumed.append(request.headers.get("last-event-id"))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = _client(monkeypatch, handler)
    assert [e["seq"] for e in client.stream_events("j-1")] == list(range(1, 9))
    assert resumed == [None, None, None, *(str(n) for n in range(1, 8))]
    assert clock.sleeps == [0.5, 1.0] + [0.5] * 7  # each event starts the count again


def test_events_follow_waits_longer_each_try_then_gives_up(clock, monkeypatch):
    def handler(request):
        raise httpx.ConnectError("connection refused")

    client = _client(monkeypatch, handler)
    with pytest.raises(client_module.ApiError, match="gave up following job j-1's events"):
        list(client.stream_events("j-1"))
    assert clock.sleeps[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert clock.now - 1000 >= 300


@pytest.mark.parametrize(("status", "code"), [("succeeded", 0), ("failed", 3), ("cancelled", 3)])
def test_events_follow_exits_3_for_a_job_that_did_not_succeed(monkeypatch, capsys, status, code):
    event = {"created_at": "2026-12-01T00:00:00+00:00", "type": "JobSubmitted", "seq": 1}
    monkeypatch.setattr(client_module, "Client", _Fake(_job(status), events=(event,)))
    assert main(["events", "j-1", "--follow"]) == code
    assert "JobSubmitted" in capsys.readouterr().out


def test_a_spec_that_is_a_folder_or_not_utf8_is_a_one_line_error(tmp_path, capsys):
    latin1 = tmp_path / "spec.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    assert main(["submit", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"termtune: {tmp_path} is a folder: name the job spec file (.yaml) in it\n"
    )
    assert main(["submit", str(latin1)]) == 1
    assert capsys.readouterr().err == (
        f"termtune: {latin1}: not UTF-8 text (byte 9): save the job spec as UTF-8\n"
    )


def test_an_answer_that_is_not_json_names_the_url(monkeypatch, capsys):
    _client(monkeypatch, lambda request: httpx.Response(200, text="<html>It works!</html>"))
    assert main(["status", "j-1"]) == 1
    assert capsys.readouterr().err == (
        f"termtune: {URL}/v1/jobs/j-1 answered HTTP 200 with a body that is not JSON: not the "
        "termtune API's answer (set TERMTUNE_API_URL)\n"
    )


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:8123"),
        ("0.0.0.0", "http://127.0.0.1:8123"),  # every address: asked on the loopback one
        ("127.0.0.2", "http://127.0.0.2:8123"),
        ("::1", "http://[::1]:8123"),
    ],
)
def test_the_cli_calls_the_control_plane_where_termtune_host_has_it_listen(
    monkeypatch, tmp_path, host, url
):
    """The API listens on TERMTUNE_HOST; the CLI and `run`/`up` asked 127.0.0.1 whatever it
    was, and a host set to this machine's LAN address was never reached."""
    from services.cli.client import default_url
    from services.cli.launcher import Launcher

    monkeypatch.setenv("TERMTUNE_PORT", "8123")
    if host is None:
        monkeypatch.delenv("TERMTUNE_HOST", raising=False)
    else:
        monkeypatch.setenv("TERMTUNE_HOST", host)
    assert default_url() == url
    assert Launcher(var_dir=tmp_path, port=8123).url == url


def test_a_wait_shows_progress_on_stderr_so_stdout_holds_the_results(clock, monkeypatch, capsys):
    """`--wait` printed the stages' progress on stdout, between the job id and the summary,
    where a script reads the id."""
    running = _job("running")
    running["stages"]["train"] = {"status": "running", "progress": {"step": 1, "total_steps": 2}}
    monkeypatch.setattr(client_module, "Client", _Fake(running, _job("succeeded")))
    assert main(["retry", "j-1", "--wait"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0] == "j-1: queued (retry 1)"
    assert "job j-1: succeeded" in printed.out  # the finished job's summary
    assert "running" not in printed.out and "[train]" not in printed.out
    assert "train running" in printed.err and "[train] step 1/2" in printed.err


WRONG_SHAPE = "not the answer of this termtune's API (check TERMTUNE_API_URL, and that client "
WRONG_SHAPE += "and server are one version)"


@pytest.mark.parametrize(
    ("argv", "answer", "said"),
    [
        (  # a list where an object is expected
            ["status", "j-1"],
            [],
            "/v1/jobs/j-1 answered JSON of the wrong shape (the answer: Input should be a valid "
            "dictionary or instance of JobView)",
        ),
        (  # a proxy's own JSON
            ["jobs"],
            {"status": "ok"},
            "/v1/jobs?limit=20 answered JSON of the wrong shape (data: Field required; count: "
            "Field required; has_more: Field required)",
        ),
        (
            ["report", "j-1"],
            ["a", "list"],
            "/v1/jobs/j-1/report answered JSON of the wrong shape (the answer: Input should be "
            "a valid dictionary or instance of EvaluationReport)",
        ),
        (
            ["report", "j-1"],
            {},  # a proxy's empty answer: was a KeyError on found["gate"]
            "/v1/jobs/j-1/report answered JSON of the wrong shape (rows: Field required; "
            "metrics: Field required; gate: Field required)",
        ),
        (
            ["invoke", "terms", "What is Asthma?"],
            {},  # was printed as the model's answer
            "/v1/models/terms/invoke answered JSON of the wrong shape (generation: Field "
            "required; prompt_token_count: Field required; generation_token_count: Field "
            "required; 1 more)",
        ),
        (
            ["invoke", "terms", "What is Asthma?", "--chat"],
            {"generation": "a chat model's answer in Bedrock's shape"},
            "/v1/models/terms/invoke answered JSON of the wrong shape (model: Field required; "
            "usage: Field required; choices: Field required)",
        ),
        (
            ["models", "--imported"],
            {"data": [{"modelName": "x"}]},
            "/v1/imported-models answered JSON of the wrong shape (data.0.modelArn: Field "
            "required)",
        ),
    ],
)
def test_an_answer_of_the_wrong_shape_is_one_line_naming_the_url(
    monkeypatch, capsys, argv, answer, said
):
    """A reply that is JSON but not the API's (a proxy answering 200, a list for an object)
    was a pydantic ValidationError's traceback, or a KeyError's."""
    _client(monkeypatch, lambda request: httpx.Response(200, json=answer))
    assert main(argv) == 1
    assert capsys.readouterr().err == f"termtune: {URL}{said}: {WRONG_SHAPE}\n"


def test_an_error_answer_whose_json_is_no_object_is_one_line(monkeypatch, capsys):
    _client(monkeypatch, lambda request: httpx.Response(500, json=["upstream", "failed"]))
    assert main(["status", "j-1"]) == 1
    assert capsys.readouterr().err == 'termtune: HTTP 500: ["upstream","failed"]\n'


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ("<html>", "streamed an event that is not JSON: '<html>'"),
        ("[1]", "streamed an event that is not a JSON object with a numeric id (id '1', data "
         "'[1]'): not the termtune API's stream"),
        ('{"type": "X"}', f"answered JSON of the wrong shape (job_id: Field required; "
         f"created_at: Field required): {WRONG_SHAPE}"),
    ],
)  # fmt: skip
def test_a_streamed_event_of_the_wrong_shape_is_one_line(clock, monkeypatch, capsys, data, said):
    answers = [httpx.Response(200, headers=SSE, text=f"event: X\ndata: {data}\nid: 1\n\n")]

    def handler(request):
        if answers:
            return answers.pop()
        raise httpx.ConnectError("connection refused")  # (where the old code asked again)

    _client(monkeypatch, handler)
    assert main(["events", "j-1", "--follow", "--json"]) == 1
    assert capsys.readouterr().err == f"termtune: {URL}/v1/jobs/j-1/events/stream {said}\n"


def test_stream_lines_split_only_where_server_sent_events_split_them():
    """httpx's iter_lines also split at U+2028, U+2029 and U+0085, which JSON leaves as they
    are inside a data line: an event quoting such text was cut in two."""
    from services.cli.client import _sse_events, _sse_lines

    chunks = ['data: {"e": "a\u2028b\x85c"}\r', "\nid: 7\r\n\r", "\n", "data: x\rid: 8\r\r"]
    assert list(_sse_lines(chunks)) == [
        'data: {"e": "a\u2028b\x85c"}',
        "id: 7",
        "",
        "data: x",
        "id: 8",
        "",
    ]
    assert list(_sse_events(_sse_lines(chunks))) == [
        ("message", '{"e": "a\u2028b\x85c"}', "7"),
        ("message", "x", "8"),
    ]


def test_a_streamed_id_of_other_digits_is_one_line():
    from services.cli.client import ApiError, _event

    with pytest.raises(ApiError, match="not a JSON object with a numeric id"):
        _event("{}", "\u00b2", where="http://x/stream")
