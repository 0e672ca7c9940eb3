import os
import subprocess
import sys

import pytest

from tests.factories import ROOT

CHECK = (
    "import runpy, sys\n"
    "sys.argv = ['x', '--health']\n"
    "try:\n"
    "    runpy.run_module('services.{service}', run_name='__main__')\n"
    "except SystemExit as stop:\n"
    "    heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'torch', 'transformers', "
    "'kombu', 'sqlalchemy', 'peft', 'datasets', 'pydantic'}})\n"
    "    print(stop.code, heavy)\n"
)


@pytest.mark.parametrize("service", ["dataprep", "trainer", "evaluator", "publisher"])
def test_the_health_check_answers_without_importing_the_service(service, tmp_path):
    """Issue 20: `--health` imported torch, transformers and peft first (6-32 s) against the
    images' 5 s HEALTHCHECK timeout."""
    env = {**os.environ, "TERMTUNE_VAR_DIR": str(tmp_path)}
    run = [sys.executable, "-c", CHECK.format(service=service)]
    stale = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert stale.stdout.split() == ["1", "[]"]  # no heartbeat yet: unhealthy, nothing heavy
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / f"{service}.heartbeat").write_text("now\n")
    fresh = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["0", "[]"]


@pytest.mark.parametrize("key", ["TERMTUNE_VAR_DIR", "termtune_var_dir", None])
def test_the_health_check_reads_the_folder_settings_use(key, tmp_path, monkeypatch):
    from shared.health import run_dir_from_env
    from shared.settings import Settings

    for name in [k for k in os.environ if k.upper() == "TERMTUNE_VAR_DIR"]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    if key:
        monkeypatch.setenv(key, "some/where")
    assert run_dir_from_env() == Settings().run_dir
