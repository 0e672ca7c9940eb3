"""Builders of specs, contexts and commands for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.jobs import JobRecords
from shared.jobspec import JobSpec, parse_spec
from shared.settings import Settings
from shared.store import LocalStore
from shared.worker import StageContext

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DATA = ROOT / "data" / "medical_terms.jsonl"


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def spec_dict(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast job spec on the tiny model and the shipped data."""
    base = {
        "name": "test-terms",
        "base_model": str(model_dir),
        "dataset": {"source": str(SAMPLE_DATA), "max_target_length": 64},
        "training": {
            "max_steps": 6,
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 0.003,
            "logging_steps": 2,
        },
        "evaluation": {
            "bootstrap_samples": 200,
            "max_rows": 8,
            # A 6-step tiny model learns nothing: every gate rule off (the gate's tests turn
            # them on).
            "gate": {
                "require_lower_loss": False,
                "min_gain": None,
                "max_empty_share": None,
                "max_degenerate_share": None,
            },
        },
        "decoding": {"max_new_tokens": 8},
    }
    return _merge(base, overrides)


def make_spec(model_dir: Path, **overrides: Any) -> JobSpec:
    """A validated small job spec."""
    return parse_spec(spec_dict(model_dir, **overrides))


def make_ctx(var_dir: Path) -> StageContext:
    """A stage context on a local store under a temporary folder."""
    settings = Settings(var_dir=var_dir)
    store = LocalStore(var_dir / "store")
    return StageContext(store=store, jobs=JobRecords(store), settings=settings)
