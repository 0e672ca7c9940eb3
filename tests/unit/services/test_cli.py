"""The termtune command in-process: estimate, and one-line reasons with exit 1."""

from __future__ import annotations

import json
import math

import yaml

from services.cli.main import main
from tests.factories import spec_dict


def test_estimate_prepares_the_data_here_and_prices_it(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TERMTUNE_VAR_DIR", str(tmp_path / "var"))
    spec = spec_dict(tiny_model, training={"max_steps": -1, "epochs": 2, "batch_size": 4})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["estimate", "job.yaml", "--instance-type", "g5.2xlarge"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["dataset"]["train_rows"]
    assert rows > 100
    assert result["training"]["optimizer_steps"] == math.ceil(rows / 4) * 2
    assert result["training"]["price_per_hour_usd"] == 1.212


def test_errors_are_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["estimate"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "termtune: estimate needs a SPEC (prepared here) or --job ID"
