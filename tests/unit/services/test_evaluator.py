import pytest

from services.evaluator import metrics
from services.evaluator.handler import handle


def test_rouge_l_matches_hand_computation():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3
    [score] = metrics.rouge_l(["the cat sat"], ["the cat sat on the mat"])
    assert score == pytest.approx(2 / 3)
    assert metrics.rouge_l(["dog"], ["cat"]) == [0.0]
    assert metrics.rouge_l(["Same words"], ["same words"]) == [1.0]


def test_gate_passes_when_tuned_beats_base():
    passed, reasons = metrics.gate(
        {"rouge_l": 0.1, "loss": 3.0},
        {"rouge_l": 0.2, "loss": 2.0},
        min_rouge_l_gain=0.05,
        require_lower_loss=True,
    )
    assert passed and reasons == []


def test_gate_fails_with_each_reason():
    passed, reasons = metrics.gate(
        {"rouge_l": 0.2, "loss": 2.0},
        {"rouge_l": 0.21, "loss": 2.5},
        min_rouge_l_gain=0.05,
        require_lower_loss=True,
    )
    assert not passed
    assert reasons == [
        "ROUGE-L 0.2100 is below base 0.2000 + 0.05",
        "test loss 2.5000 is not below base 2.0000",
    ]


def test_evaluates_base_and_tuned_and_writes_report(trained_job):
    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    event = handle(cmd, ctx)
    report = ctx.jobs.manifest(cmd.job_id, "evaluate")
    assert report["rows"] == 8 and report["capped_at"] == 8
    for side in ("base", "tuned"):
        assert set(report[side]) == {
            "loss",
            "perplexity",
            "rouge_l",
            "empty_share",
            "mean_output_words",
        }
    assert report["tuned"]["loss"] < report["base"]["loss"]  # even 6 steps move the loss
    assert report["delta"]["loss"] == pytest.approx(
        report["tuned"]["loss"] - report["base"]["loss"], abs=1e-4
    )
    assert len(report["samples"]) == 8 and set(report["samples"][0]) == {
        "prompt",
        "reference",
        "base",
        "tuned",
    }
    assert event.passed and event.publish  # the test spec's gate is lenient


@pytest.mark.parametrize("force", [False, True])
def test_strict_gate_rejects_unless_forced(trained_job, force):
    from shared.messages import EvaluateModel
    from tests.factories import make_spec

    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    spec = make_spec(
        trained_job["spec"].base_model,
        evaluation={"gate": {"min_rouge_l_gain": 1.0, "force_publish": force}},
    )
    job_id = f"strict-{force}"
    strict = EvaluateModel(
        job_id=job_id,
        spec_uri=ctx.jobs.create(job_id, spec),
        dataset_manifest=cmd.dataset_manifest,
        training_manifest=cmd.training_manifest,
    )
    event = handle(strict, ctx)
    assert not event.passed
    assert event.reasons[0].startswith("ROUGE-L")
    assert event.publish is force
    assert ctx.jobs.manifest(job_id, "evaluate")["gate"]["forced"] is force
