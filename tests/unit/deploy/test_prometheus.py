"""deploy/prometheus/prometheus.yml and its compose service: every worker, every replica, on
the metrics port the stack gives them (scraped for real under `make test-compose`)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
WORKERS = ["dataprep", "trainer", "evaluator", "publisher"]


def test_every_worker_is_found_by_dns_on_the_stacks_metrics_port():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    job, _ = config["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == WORKERS and discovery["type"] == "A"  # every replica
    for worker in WORKERS:  # each listens where Prometheus looks
        env = compose["services"][worker]["environment"]
        assert int(env["TERMTUNE_METRICS_PORT"]) == discovery["port"]
    assert job["relabel_configs"] == [
        {"source_labels": ["__meta_dns_name"], "target_label": "service"}
    ]
    prometheus = compose["services"]["prometheus"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert mounted["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounted["/prometheus"] in compose["volumes"]  # its data in a named volume
    [published] = prometheus["ports"]
    assert published.startswith("127.0.0.1:")  # the host's loopback only
    image, _, tag = prometheus["image"].partition(":")
    assert image == "prom/prometheus" and tag.startswith("v3.")


def test_the_api_is_scraped_with_its_key_from_a_secret_only_prometheus_reads():
    """The API's /metrics is behind its key: the key reaches Prometheus as compose's secret
    (from TERMTUNE_API_KEY), mode 0400 for Prometheus's user, and is in no file of the repo."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    _, api = config["scrape_configs"]
    assert api["metrics_path"] == "/metrics"
    [static] = api["static_configs"]
    assert static == {"targets": ["api:8000"], "labels": {"service": "api"}}
    assert compose["services"]["api"]["ports"] == ["${TERMTUNE_API_PORT:-8000}:8000"]
    auth = api["authorization"]
    assert auth["type"] == "Bearer" and "credentials" not in auth
    [secret] = compose["services"]["prometheus"]["secrets"]
    assert secret["target"] == auth["credentials_file"]
    assert (secret["uid"], secret["gid"], secret["mode"]) == ("65534", "65534", "0o400")
    assert compose["secrets"][secret["source"]] == {"environment": "TERMTUNE_API_KEY"}
    # ... the variable the API itself reads from the same .env
    assert "\nTERMTUNE_API_KEY=" in (ROOT / ".env.example").read_text()
