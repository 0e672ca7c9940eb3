import numpy as np
import pytest

from services.evaluator import html_report, scoring
from services.evaluator.handler import check_tokenizer, handle
from shared.errors import ModelError, SpecError
from shared.jobspec import parse_spec


def _rows(predictions, references, nll=None, tokens=None):
    n = len(predictions)
    return scoring.score_rows(
        predictions, references, nll=nll or [1.0] * n, tokens=tokens or [1] * n
    )


def test_rouge_matches_hand_computation():
    # "the cat sat" vs "the cat sat on the mat": LCS 3, P = 3/3, R = 3/6, F = 2/3;
    # bigrams: 2 shared of 2 predicted and 5 reference bigrams, F = 2*1*0.4/1.4
    rows = _rows(["the cat sat"], ["the cat sat on the mat"])
    assert rows.rouge["rougeL"][0] == pytest.approx(2 / 3)
    assert rows.rouge["rouge1"][0] == pytest.approx(2 / 3)
    assert rows.rouge["rouge2"][0] == pytest.approx(0.8 / 1.4)


def test_bleu_and_chrf_are_100_for_identical_text_and_0_for_disjoint():
    same = scoring.aggregate(_rows(["a plain sentence here"], ["a plain sentence here"]))
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    disjoint = scoring.aggregate(_rows(["xyz"], ["abc"]))
    assert disjoint["bleu"] == 0.0 and disjoint["chrf"] == 0.0


def test_corpus_bleu_from_row_statistics_equals_sacrebleu():
    from sacrebleu.metrics import BLEU

    preds = ["the cat sat on the mat", "a dog ran far", "nothing alike"]
    refs = ["the cat sat on a mat", "the dog ran far away", "completely different words"]
    ours = scoring.aggregate(_rows(preds, refs))["bleu"]
    assert ours == pytest.approx(BLEU(effective_order=True).corpus_score(preds, [refs]).score)


def test_loss_is_token_weighted_and_perplexity_its_exp():
    rows = _rows(["a", "b"], ["a", "b"], nll=[2.0, 6.0], tokens=[1, 3])
    agg = scoring.aggregate(rows)
    assert agg["loss"] == pytest.approx(8.0 / 4)
    assert agg["perplexity"] == pytest.approx(np.exp(2.0))


def test_exact_match_ignores_case_punctuation_and_spacing():
    rows = _rows(["Asthma,  a lung disease.", "wrong"], ["asthma a lung disease", "right"])
    assert rows.exact.tolist() == [True, False]
    assert scoring.aggregate(rows)["exact_match"] == 0.5


@pytest.mark.parametrize(
    "text,degenerate",
    [
        ("is a is a is a is a is a", True),
        ("the the the the cat", True),
        ("flow flow flow thick occurs", True),
        ("very very good", False),
        ("a normal definition of a medical term", False),
        ("", False),
    ],
)
def test_degenerate_outputs(text, degenerate):
    assert scoring.is_degenerate(text) is degenerate


def test_empty_share_and_output_length():
    agg = scoring.aggregate(_rows(["", "two words"], ["x", "y"]))
    assert agg["empty_share"] == 0.5 and agg["mean_output_words"] == 1.0


def test_bootstrap_of_identical_models_is_zero():
    rows = _rows(["a b c", "d e"], ["a b c", "x y"])
    intervals = scoring.paired_bootstrap(rows, rows, samples=100)
    assert all(low == high == 0.0 for low, high in intervals.values())


def test_bootstrap_interval_brackets_a_clear_gain():
    refs = [f"term {i} is a disease of the lungs" for i in range(30)]
    base = _rows(["unrelated words"] * 30, refs)
    tuned = _rows(refs, refs)
    low, high = scoring.paired_bootstrap(base, tuned, samples=200)["rougeL"]
    observed = scoring.aggregate(tuned)["rougeL"] - scoring.aggregate(base)["rougeL"]
    assert 0 < low <= observed <= high


def test_gate_passes_when_tuned_beats_base():
    passed, reasons = scoring.gate(
        {"rougeL": 0.1, "loss": 3.0},
        {"rougeL": 0.2, "loss": 2.0},
        min_rouge_l_gain=0.05,
        require_lower_loss=True,
    )
    assert passed and reasons == []


def test_gate_fails_with_each_reason():
    passed, reasons = scoring.gate(
        {"rougeL": 0.2, "loss": 2.0},
        {"rougeL": 0.21, "loss": 2.5},
        min_rouge_l_gain=0.05,
        require_lower_loss=True,
    )
    assert not passed
    assert reasons == [
        "ROUGE-L 0.2100 is below base 0.2000 + 0.05",
        "test loss 2.5000 is not below base 2.0000",
    ]


def test_no_repeat_ngram_size_refuses_the_notebooks_true():
    with pytest.raises(SpecError, match="evaluation.no_repeat_ngram_size"):
        parse_spec({"name": "x1", "evaluation": {"no_repeat_ngram_size": True}})


def test_evaluates_base_and_tuned_and_writes_report(trained_job):
    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    event = handle(cmd, ctx)
    report = ctx.jobs.manifest(cmd.job_id, "evaluate")
    assert report["rows"] == 8 and report["capped_at"] == 8
    assert set(report["metrics"]) == set(scoring.METRICS)
    loss = report["metrics"]["loss"]
    assert loss["tuned"] < loss["base"]  # even 6 steps move the loss
    assert loss["delta"] == pytest.approx(loss["tuned"] - loss["base"])
    assert loss["ci95"][0] <= loss["ci95"][1]
    assert len(report["samples"]) == 8
    assert set(report["samples"][0]) == {"prompt", "reference", "base", "tuned"}
    assert [s for s, _ in report["curves"]["train_loss"]] == [2, 4, 6]
    assert [s for s, _ in report["curves"]["validation_loss"]] == [2, 4, 6]
    assert event.passed and event.publish  # the test spec's gate is lenient
    prefix = ctx.jobs.stage_prefix(cmd.job_id, "evaluate")
    page = ctx.store.get_bytes(f"{prefix}/report.html").decode()
    assert "<svg" in page and "validation loss" in page and "Quality gate" in page
    assert ctx.store.get_json(f"{prefix}/report.json") == report


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


def test_mismatched_tokenizer_is_named(trained_job):
    class Tok:
        def __len__(self):
            return 32128

    dataset = {"tokenizer": {"name": "google/flan-t5-large", "vocab_size": 32128}}
    with pytest.raises(ModelError, match="tokenized with 'google/flan-t5-large'"):
        check_tokenizer(Tok(), dataset, trained_job["spec"])


def test_missing_adapter_is_a_clear_error(trained_job):
    from shared.artifacts import adapter_dir

    ctx = trained_job["ctx"]
    with pytest.raises(ModelError, match="trained adapter is missing"):
        adapter_dir(
            ctx.store,
            {"adapter": ctx.store.uri("jobs/nope/train/adapter")},
            cache_dir=ctx.settings.cache_dir,
        )


def test_html_escapes_model_output():
    report = {
        "rows": 1,
        "capped_at": None,
        "metrics": {},
        "curves": {},
        "gate": {"passed": True, "reasons": [], "forced": False},
        "samples": [
            {"prompt": "<b>", "reference": "r", "base": "<script>x</script>", "tuned": "t"}
        ],
    }
    page = html_report.render(report, job_id="j")
    assert "<script>x" not in page and "&lt;script&gt;" in page
