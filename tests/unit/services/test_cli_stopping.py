"""How `run` and `up` end on a signal: SIGTERM is `up`'s normal end (exit 0), Ctrl-C an
interrupt (exit 130), and every service started is stopped, also when the signal comes
while they are being started. The services are `sleep`s here."""

from __future__ import annotations

import signal
import subprocess
import types

import pytest
import yaml

from services.cli import launcher as launcher_module
from services.cli.launcher import Launcher
from services.cli.main import main
from tests.factories import spec_dict

INTERRUPTED = "termtune: interrupted; every service it started was stopped\n"


@pytest.fixture(autouse=True)
def handlers():
    """The handlers a fresh `termtune` process starts with (an in-process worker's `main`,
    run by an earlier test, leaves SIGINT setting its stop event: Ctrl-C would then raise
    nothing here); `run` and `up` install their own: each test's are put back after it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def services(tmp_path, monkeypatch):
    """The processes the launcher starts (a `sleep` each, in a session of its own as a
    service is); ``services.signal_at`` raises a signal as the Nth starts."""
    monkeypatch.setenv("TERMTUNE_VAR_DIR", str(tmp_path / "var"))
    started: list[subprocess.Popen] = []
    plan = types.SimpleNamespace(started=started, signal_at=None)

    def popen(argv, **kwargs):
        proc = subprocess.Popen(["sleep", "60"], stdout=kwargs["stdout"], start_new_session=True)
        started.append(proc)
        if plan.signal_at and len(started) == plan.signal_at[0]:
            signal.raise_signal(plan.signal_at[1])  # inside Popen: before it returns
        return proc

    fake = types.SimpleNamespace(
        Popen=popen, STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired
    )
    monkeypatch.setattr(launcher_module, "subprocess", fake)
    yield plan
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGTERM, 0, ""), (signal.SIGINT, 130, INTERRUPTED), (signal.SIGHUP, 130, INTERRUPTED)],
    ids=["SIGTERM", "Ctrl-C", "SIGHUP"],
)
def test_up_ends_0_when_asked_to_stop_and_130_when_interrupted(
    services, monkeypatch, capsys, sig, code, said
):
    """Ctrl-C on `up` exited 0, as SIGTERM (its normal stop) does: a script could not tell."""

    def ready(self, timeout=120.0):
        signal.raise_signal(sig)  # once up

    monkeypatch.setattr(Launcher, "wait_ready", ready)
    assert main(["up"]) == code
    assert capsys.readouterr().err == said
    assert len(services.started) == 5
    assert [p.poll() for p in services.started] == [-signal.SIGTERM] * 5  # all stopped


@pytest.mark.parametrize("command", ["up", "run"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_the_services_start_stops_those_started(
    services, monkeypatch, capsys, tmp_path, tiny_model, command, sig
):
    """A Ctrl-C while `launcher.start()` started the services left them running (`start` was
    outside the `try` that stops them, and the process being started was lost)."""
    monkeypatch.setattr(Launcher, "wait_ready", lambda self, timeout=0: pytest.fail("started"))
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(spec_dict(tiny_model)))
    services.signal_at = (2, sig)  # while the second service starts
    code = main(["up"] if command == "up" else ["run", str(spec)])
    up_asked_to_stop = command == "up" and sig == signal.SIGTERM
    assert code == (0 if up_asked_to_stop else 130)
    said = capsys.readouterr().err.splitlines()  # `run` first says it starts the services
    assert said[-1:] == ([] if up_asked_to_stop else [INTERRUPTED.strip()])
    assert len(services.started) == 2  # none started after the signal
    assert [p.poll() for p in services.started] == [-signal.SIGTERM] * 2
    assert not (tmp_path / "var" / "run" / "pids.json").exists()  # `down` has nothing left


def test_a_second_signal_while_stopping_kills_at_once_and_keeps_the_exit(
    services, monkeypatch, capsys, tmp_path
):
    """Services slow to stop (a trainer storing its checkpoint): a second SIGTERM used to
    break out of the stop, leaving them running, `pids.json` behind and exit 130."""
    import os
    import threading
    import time

    monkeypatch.setattr(launcher_module.subprocess, "Popen", _deaf_to_sigterm(services))
    second = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))

    def ready(self, timeout=120.0):
        second.start()
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Launcher, "wait_ready", ready)
    started = time.monotonic()
    assert main(["up"]) == 0
    assert time.monotonic() - started < 20  # not the stop's 30 s
    assert [p.poll() for p in services.started] == [-signal.SIGKILL] * 5
    assert not (tmp_path / "var" / "run" / "pids.json").exists()


def _deaf_to_sigterm(services):
    def popen(argv, **kwargs):
        proc = subprocess.Popen(
            ["sleep", "60"], stdout=kwargs["stdout"], start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),  # before exec
        )  # fmt: skip
        services.started.append(proc)
        return proc

    return popen


def test_up_under_nohup_outlives_a_hangup(services, monkeypatch):
    """nohup sets SIGHUP to be ignored: `up` made it an interrupt again, stopping everything
    at logout."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def ready(self, timeout=120.0):
        signal.raise_signal(signal.SIGHUP)  # ignored
        signal.raise_signal(signal.SIGTERM)  # the stop

    monkeypatch.setattr(Launcher, "wait_ready", ready)
    assert main(["up"]) == 0
    assert [p.poll() for p in services.started] == [-signal.SIGTERM] * 5


def test_a_signal_that_comes_before_the_stop_holds_them_stops_the_rest_at_once(
    services, monkeypatch, tmp_path
):
    """A second Ctrl-C between the first and the stop's hold raised out of the stop before
    it had signalled anything: every service kept running."""
    launcher = Launcher(var_dir=tmp_path / "var", port=0)
    launcher.start()
    real, calls = launcher_module._signals_held, []

    def interrupted_once(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as the original handler does, before the swap
        return real(**kwargs)

    monkeypatch.setattr(launcher_module, "_signals_held", interrupted_once)
    launcher.stop(timeout=30)
    assert len(calls) == 2
    assert all(p.poll() is not None for p in services.started)
    assert not (tmp_path / "var" / "run" / "pids.json").exists()


def test_every_signal_held_back_is_handled_after_in_the_order_it_came():
    seen = []
    signal.signal(signal.SIGHUP, lambda n, f: seen.append("hup"))
    signal.signal(signal.SIGTERM, lambda n, f: seen.append("term"))
    with launcher_module._signals_held() as came:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGTERM):
            signal.raise_signal(sig)
        assert came() and seen == []
    assert seen == ["term", "hup"]  # each once, the first to come first
