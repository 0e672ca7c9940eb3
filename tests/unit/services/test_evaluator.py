import numpy as np
import pytest
import torch

from services.evaluator import html_report, scoring
from services.evaluator.handler import check_tokenizer, data_section, handle
from shared import planner
from shared.errors import ModelError, SpecError
from shared.jobspec import GateSpec, parse_spec
from shared.trainplan import GIB


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


def test_rouge_of_english_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    preds = ["The cats were running!", "an e-mail, isn't it?", "ICD_10 code J45 (asthma)"]
    refs = ["a cat runs", "E-mails aren't it", "asthma: code J45.9 in ICD-10"]
    rows = _rows(preds, refs)
    for i, (pred, ref) in enumerate(zip(preds, refs, strict=True)):
        expected = default.score(ref, pred)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert rows.rouge[key][i] == expected[key].fmeasure


def test_words_of_any_script():
    assert scoring.words("L'électricité statique") == ["l", "électricité", "statique"]
    assert scoring.words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay in the word
    assert scoring.words("東京タワー2024年") == ["東", "京", "タ", "ワ", "ー", "2024", "年"]
    assert scoring.words("กินข้าว") == ["กิ", "น", "ข้", "า", "ว"]


def test_rouge_scores_answers_in_any_script():
    # The defect: rouge_score's tokenizer keeps only [a-z0-9], so these all scored 0.
    refs = ["Электричество — поток заряженных частиц", "光合成は植物が光から糖を作る過程"]
    right = _rows(refs, refs)
    assert right.rouge["rougeL"].tolist() == right.rouge["rouge1"].tolist() == [1.0, 1.0]
    wrong = _rows(["Магнетизм — поток частиц", "光合成は動物の呼吸"], refs)
    assert all(0 < score < 1 for score in wrong.rouge["rougeL"])  # below a right answer


def test_gate_passes_a_model_that_learned_russian_terms():
    refs = ["астма: болезнь лёгких", "пневмония: воспаление лёгких", "бронхит: кашель"] * 10
    base = _rows(["a disease of the lungs"] * 30, refs, nll=[40.0] * 30)  # English, not Russian
    tuned = _rows(refs, refs, nll=[20.0] * 30)
    rules = _gate(base, tuned)
    assert len(rules) == 4 and not _failed(rules)
    assert rules[0]["values"]["gain"] == pytest.approx(1.0)


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


ZH_REFS = ["光合成是植物利用光能把二氧化碳和水转化为糖的过程", "高血压是动脉血压持续升高的疾病"]


def test_bleu_of_chinese_answers_counts_each_character():
    # The defect: sacrebleu's default 13a tokenizer splits at spaces, so each Chinese answer
    # was one token: a right answer with a final "。" and a near one both scored BLEU 0, as
    # a wrong one did.
    from sacrebleu.metrics import BLEU

    near = ["光合成是植物利用光能把水转化为糖的过程", "高血压是动脉血压升高的疾病"]
    wrong = ["呼吸作用是动物消耗氧气的过程", "糖尿病是血糖过高的疾病"]
    answers = ([r + "。" for r in ZH_REFS], near, wrong)
    rows = [_rows(preds, ZH_REFS) for preds in answers]
    right, close, far = (scoring.aggregate(r)["bleu"] for r in rows)
    assert right > 90 and 50 < close < right and far < 20
    assert {r.bleu_tokenizer for r in rows} == {"zh"}
    assert close == pytest.approx(
        BLEU(effective_order=True, tokenize="zh").corpus_score(near, [ZH_REFS]).score
    )


def test_bleu_of_japanese_answers_counts_each_character():
    refs = ["光合成は植物が光から糖を作る過程", "東京は日本の首都です"]
    near = _rows(["光合成は植物が光で糖を作る過程", "東京は日本の首都だ"], refs)
    assert 50 < scoring.aggregate(near)["bleu"] < 100 and near.bleu_tokenizer == "char"


@pytest.mark.parametrize(
    ("references", "tokenizer"),
    [
        (["a disease of the lungs", "a lung disease"], "13a"),
        (ZH_REFS, "zh"),
        (["DNA是遗传物质", "a lung disease"], "zh"),  # half Han: 'zh' is 13a on other text
        (["a disease of the lungs", "a lung disease", "肺病"], "13a"),  # a few Han terms
        (["光合成は植物が光から糖を作る過程", "肺病"], "char"),  # kana: Japanese
        (["กินข้าว", "ภาษาไทย"], "char"),  # Thai
        (["a lung disease (肺病)", "a heart disease (心脏病)"], "zh"),  # Han terms: zh is 13a
        (["the tsunami (ツナミ) of 2004", "a wave called ナミ"], "13a"),  # stray kana
        ([], "13a"),
    ],
)
def test_bleu_tokenizer_follows_the_references_script(references, tokenizer):
    assert scoring.bleu_tokenizer(references) == tokenizer


def test_report_records_the_bleu_tokenizer_and_sacrebleus_signatures():
    import pyarrow as pa
    import sacrebleu

    from services.evaluator.handler import build_report

    table = pa.table({"prompt": ["光合成?", "高血压?"], "target": ZH_REFS})
    base, tuned = _rows(["不知道", "不知道"], ZH_REFS), _rows(ZH_REFS, ZH_REFS)
    spec = parse_spec({"name": "x1", "evaluation": {"bootstrap_samples": 100}})
    report = build_report(
        table, (base, ["不知道"] * 2), (tuned, ZH_REFS), spec=spec, training_log=[]
    )
    version = sacrebleu.__version__
    assert report["sacrebleu"] == {
        "bleu_tokenizer": "zh",
        "bleu": f"nrefs:1|case:mixed|eff:yes|tok:zh|smooth:exp|version:{version}",
        "chrf": f"nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:{version}",
    }
    assert report["metrics"]["bleu"]["tuned"] == pytest.approx(100.0)
    page = html_report.render(report, job_id="j")
    assert f"signatures: BLEU nrefs:1|case:mixed|eff:yes|tok:zh|smooth:exp|version:{version}, " in (
        page
    )


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


@pytest.mark.parametrize(
    "text,degenerate",
    [
        ("成本" * 10, True),
        ("好好好", True),
        ("成本是生产商品所花费的费用", False),
        ("東京は日本の首都です", False),
    ],
)
def test_degenerate_outputs_in_scripts_without_spaces(text, degenerate):
    assert scoring.is_degenerate(text) is degenerate


def test_empty_share_and_output_length():
    agg = scoring.aggregate(_rows(["", "two words"], ["x", "y"]))
    assert agg["empty_share"] == 0.5 and agg["mean_output_words"] == 1.0


def test_output_length_counts_words_in_any_script():
    # The defect: words were counted at spaces, so an answer in Chinese or Japanese was one
    # word however long. Each of their characters is a word now; English is counted as
    # written ("don't" and "COVID-19" are one word each, not two as ROUGE splits them).
    answers = [
        "高血压是一种疾病",
        "東京は日本の首都です",
        "a lung disease, chronic",
        "don't COVID-19",
    ]
    rows = _rows(answers, ["x"] * 4)
    assert rows.words.tolist() == [8, 10, 4, 2]
    assert scoring.aggregate(rows)["mean_output_words"] == pytest.approx(24 / 4)


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


def _gate(base, tuned, samples=200, **rule):
    """The gate's rules for two RowScores, as build_report applies them."""
    intervals = scoring.paired_bootstrap(base, tuned, samples=samples)
    return scoring.gate(
        scoring.aggregate(base),
        scoring.aggregate(tuned),
        intervals,
        rule=GateSpec(**rule),
        prompts=len(base),  # one row a prompt
    )


def _failed(rules):
    return {r["rule"]: r["detail"] for r in rules if not r["passed"]}


REFS = [f"term {i} is a disease of the lungs" for i in range(30)]


def test_gate_refuses_a_model_that_answers_nothing():
    # The defect: tuned answers were 100% empty, ROUGE-L 0 before and after, and the old
    # gate (ROUGE-L >= base + 0) passed it. Every default rule now has its say.
    base = _rows(["unrelated words here"] * 30, REFS, nll=[40.0] * 30, tokens=[10] * 30)
    tuned = _rows([""] * 30, REFS, nll=[50.0] * 30, tokens=[10] * 30)
    assert scoring.aggregate(base)["rougeL"] == scoring.aggregate(tuned)["rougeL"] == 0.0
    rules = _gate(base, tuned)
    assert [r["rule"] for r in rules] == [
        "rougeL_gain",
        "empty_share",
        "degenerate_share",
        "lower_loss",
    ]
    assert _failed(rules) == {
        "rougeL_gain": "ROUGE-L: tuned 0.0000 vs base 0.0000, gain +0.0000, 95% interval "
        "[+0.0000, +0.0000]; its lower bound must be above 0",
        "empty_share": "empty answers: tuned 100.0% vs base 0.0%; "
        "must be at most 5.0% and not above base",
        "lower_loss": "test loss: tuned 5.0000 vs base 4.0000; must be below base",
    }
    degenerate = next(r for r in rules if r["rule"] == "degenerate_share")
    assert degenerate["passed"] and degenerate["values"] == {
        "base": 0.0,
        "tuned": 0.0,
        "max": 0.05,
        "echo": {"base": 0.0, "tuned": 0.0},
    }


def test_gate_passes_a_model_that_learned_with_every_number():
    base = _rows(["unrelated words"] * 30, REFS, nll=[40.0] * 30, tokens=[10] * 30)
    tuned = _rows(REFS, REFS, nll=[20.0] * 30, tokens=[10] * 30)
    rules = _gate(base, tuned)
    assert all(r["passed"] for r in rules) and len(rules) == 4
    gain = rules[0]
    assert gain["values"]["gain"] == pytest.approx(1.0) and gain["values"]["ci95"][0] > 0
    assert gain["detail"].startswith("ROUGE-L: tuned 1.0000 vs base 0.0000, gain +1.0000")
    assert gain["detail"].endswith("its lower bound is above 0")
    assert rules[3]["detail"] == "test loss: tuned 2.0000 vs base 4.0000; below base"


def test_gate_wants_a_gain_clear_of_noise_on_the_primary_metric():
    # Tuned is better on half the rows and worse on the other half: no gain the interval
    # holds clear of zero, on ROUGE-L or on the metric the spec names.
    good, bad = REFS[:15], ["unrelated words"] * 15
    base = _rows(bad + good, REFS)
    tuned = _rows(good + bad, REFS)
    for metric, label in (("rougeL", "ROUGE-L"), ("chrf", "chrF")):
        rules = _gate(base, tuned, primary_metric=metric, require_lower_loss=False)
        assert _failed(rules)[f"{metric}_gain"].startswith(f"{label}: tuned ")
    assert not _failed(_gate(base, tuned, min_gain=-0.5, require_lower_loss=False))


def test_gate_refuses_more_degenerate_answers_than_base_even_under_the_cap():
    base = _rows(["a definition of it"] * 40, REFS + REFS[:10])
    tuned = _rows(["a definition of it"] * 39 + ["the the the the"], REFS + REFS[:10])
    rules = _gate(base, tuned, min_gain=None, require_lower_loss=False)
    assert _failed(rules) == {
        "degenerate_share": "degenerate answers: tuned 2.5% vs base 0.0%; "
        "must be at most 5.0% and not above base"
    }


def test_gate_rules_can_be_turned_off_and_older_specs_read():
    spec = parse_spec({"name": "x1", "evaluation": {"gate": {"min_rouge_l_gain": 0.1}}})
    assert spec.evaluation.gate.min_gain == 0.1
    off = GateSpec(
        min_gain=None, max_empty_share=None, max_degenerate_share=None, require_lower_loss=False
    )
    base = _rows(["x"], ["y"])
    assert _gate(base, _rows([""], ["y"]), samples=100, **off.model_dump()) == []
    with pytest.raises(SpecError, match="evaluation.gate.primary_metric"):
        parse_spec({"name": "x1", "evaluation": {"gate": {"primary_metric": "loss"}}})


def test_no_repeat_ngram_size_refuses_the_notebooks_true():
    with pytest.raises(SpecError, match="decoding.no_repeat_ngram_size"):
        parse_spec({"name": "x1", "decoding": {"no_repeat_ngram_size": True}})
    with pytest.raises(SpecError, match="decoding.no_repeat_ngram_size"):
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
    assert set(report["samples"][0]) == {"prompt", "reference", "base", "tuned", "prompt_cut"}
    assert [s for s, _ in report["curves"]["train_loss"]] == [2, 4, 6]
    # validation on its own clock: "auto" is about 10 passes a run, here every one of 6 steps
    assert [s for s, _ in report["curves"]["validation_loss"]] == [1, 2, 3, 4, 5, 6]
    assert event.passed and event.publish  # the test spec's gate has every rule off
    # the job's result carries the timing (the CLI's summary prints it)
    assert event.timing == report["timing"] and event.timing["device"] == "cpu"
    assert event.timing["base_s"] > 0 and event.timing["tuned_s"] > 0  # 8 rows generated
    assert event.timing["batch_size"] == 8  # CPU's "auto" is 16; the test split has 8 rows
    assert report["sacrebleu"]["bleu_tokenizer"] == "13a"  # English references
    assert report["gate"]["rules"] == [] and report["gate"]["reasons"] == []
    assert report["decoding"] == trained_job["spec"].decoding.model_dump()
    prefix = ctx.jobs.stage_prefix(cmd.job_id, "evaluate")
    page = ctx.store.get_bytes(f"{prefix}/report.html").decode()
    assert "<svg" in page and "validation loss" in page and "Quality gate" in page
    assert ctx.store.get_json(f"{prefix}/report.json") == report
    prepared = ctx.jobs.manifest(cmd.job_id, "prepare")
    assert report["data"] == data_section(prepared)
    assert report["data"]["tokens"]["target"] == prepared["lengths"]["target"]
    assert report["data"]["counts"] == trained_job["prepared"].counts
    target = prepared["lengths"]["target"]
    assert (
        f"<tr data-side='target'><td>target</td><td class=num>{target['max_length']}</td>" in page
    )


@pytest.mark.parametrize("force", [False, True])
def test_strict_gate_rejects_unless_forced(trained_job, force):
    from shared.messages import EvaluateModel
    from tests.factories import make_spec

    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    spec = make_spec(
        trained_job["spec"].base_model,
        # the test split's 8 prompts: below the default 20, which would fail for that alone
        evaluation={"gate": {"min_gain": 1.0, "force_publish": force, "min_test_prompts": 8}},
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
    assert event.reasons[0].startswith("ROUGE-L: tuned ")
    assert event.reasons[0].endswith("its lower bound must be above 1")
    assert event.publish is force
    gate = ctx.jobs.manifest(job_id, "evaluate")["gate"]
    assert gate["forced"] is force and gate["publish"] is force
    assert [(r["rule"], r["passed"]) for r in gate["rules"]] == [("rougeL_gain", False)]
    assert gate["reasons"] == [gate["rules"][0]["detail"]]


def _evaluate_as(trained_job, job_id):
    """The trained job's evaluation again under another job id (a fresh report)."""
    from shared.messages import EvaluateModel

    ctx, cmd = trained_job["ctx"], trained_job["evaluate"]
    command = EvaluateModel(
        job_id=job_id,
        spec_uri=ctx.jobs.create(job_id, trained_job["spec"]),
        dataset_manifest=cmd.dataset_manifest,
        training_manifest=cmd.training_manifest,
    )
    handle(command, ctx)
    return ctx.jobs.manifest(job_id, "evaluate")


def test_the_report_states_the_batch_sizes_auto_chose_for_each_model(trained_job, monkeypatch):
    # The defect: the report's batch_size was recomputed after both runs; on a GPU, "auto"
    # then read a free memory other than either run's.
    from services.evaluator import metrics

    chosen = iter([4, 3, 1])  # base, tuned; the 1 is what the old code recomputed after them
    monkeypatch.setattr(metrics, "batch_size", lambda *args: next(chosen))
    timing = _evaluate_as(trained_job, "auto-sized")["timing"]
    assert timing["batch_size"] == 4  # 8 rows: batches of 4 for base, 3 + 3 + 2 for tuned
    assert timing["batches"] == {
        "base": {"planned": 4, "loss": [4], "generation": [4]},
        "tuned": {"planned": 3, "loss": [3, 2], "generation": [3, 2]},
    }


def test_the_report_states_the_batches_an_out_of_memory_split(trained_job, monkeypatch):
    # The defect: the report said 16 (CPU's "auto") when every generation ran 2 rows at a time.
    from services.evaluator import handler as evaluator

    load = evaluator.base_on_device

    def tight_memory(base_model):  # generating more than 2 rows runs out of memory
        model, placement = load(base_model)
        generate = model.generate

        def at_most_two_rows(**kwargs):
            if kwargs["input_ids"].shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return generate(**kwargs)

        model.generate = at_most_two_rows
        return model, placement

    monkeypatch.setattr(evaluator, "base_on_device", tight_memory)
    report = _evaluate_as(trained_job, "out-of-memory")
    assert report["timing"]["batch_size"] == 2
    split = {"planned": 16, "loss": [8], "generation": [2]}  # 8 rows -> 4 + 4 -> 2 + 2 + 2 + 2
    assert report["timing"]["batches"] == {"base": split, "tuned": split}


def test_mismatched_tokenizer_is_named(trained_job):
    class Tok:
        def __len__(self):
            return 32128

    dataset = {"tokenizer": {"name": "google/flan-t5-large", "vocab_size": 32128}}
    with pytest.raises(ModelError, match="tokenized with 'google/flan-t5-large'"):
        check_tokenizer(Tok(), dataset, trained_job["spec"])


def test_missing_adapter_is_a_clear_error(trained_job):
    from shared.artifacts import adapter_dir
    from shared.errors import CorruptOutput

    ctx = trained_job["ctx"]
    with pytest.raises(CorruptOutput, match="trained adapter is missing") as raised:
        adapter_dir(
            ctx.store,
            {"adapter": ctx.store.uri("jobs/nope/train/adapter")},
            cache_dir=ctx.settings.cache_dir,
        )
    assert raised.value.stage == "train"  # the stage that runs again


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


def test_every_rule_is_shown_with_its_numbers_in_cli_and_html():
    from services.cli.display import gate_lines

    base = _rows(["unrelated words here"] * 30, REFS, nll=[40.0] * 30, tokens=[10] * 30)
    tuned = _rows([""] * 30, REFS, nll=[50.0] * 30, tokens=[10] * 30)
    rules = _gate(base, tuned)
    gate = {
        "passed": False,
        "forced": True,
        "publish": True,
        "rules": rules,
        "reasons": [r["detail"] for r in rules if not r["passed"]],
    }
    lines = gate_lines(gate).splitlines()
    assert lines[0] == "quality gate: failed (publishing forced by evaluation.gate.force_publish)"
    assert lines[1:] == [f"  {'pass' if r['passed'] else 'FAIL'}  {r['detail']}" for r in rules]
    assert lines[2] == (
        "  FAIL  empty answers: tuned 100.0% vs base 0.0%; must be at most 5.0% and not above base"
    )
    report = {"rows": 30, "capped_at": None, "metrics": {}, "curves": {}, "samples": []}
    page = html_report.render({**report, "gate": gate}, job_id="j")
    assert "<span class=fail>failed</span>" in page and "publishing was forced" in page
    assert (
        "<li class=fail data-rule='empty_share'>FAIL: empty answers: tuned 100.0% vs base 0.0%; "
        "must be at most 5.0% and not above base</li>"
    ) in page
    assert "<li class=pass data-rule='degenerate_share'>pass: degenerate answers: " in page


MANIFEST = {  # the data-prep manifest's keys the report's data section reads
    "rows_read": 5000,
    "sample": {"method": "random", "seed": 7, "rows": 1500, "of": 5000},
    "bad_rows_skipped": 2,
    "cleaning": {"dropped_duplicate": 3, "dropped_empty_field": 0, "whitespace": 9},
    "counts": {"train": 1200, "validation": 150, "test": 145},
    "lengths": {
        side: {
            "max_length": n,
            "setting": setting,
            "cap": 512 if setting == "auto" else None,
            "p50": 20,
            "p90": 60,
            "p99": p99,
            "max": 700,
            "reason": reason,
            "truncated_share": cut,
            "unknown_share": unknown,
        }
        for side, n, setting, p99, reason, cut, unknown in (
            ("source", 64, "spec", 30, "set by dataset.max_source_length", 0.0, 0.001),
            ("target", 128, "auto", 128, "auto: the p99 is 128 tokens", 0.482, 0.0123),
        )
    },
    "unknown_tokens": {"unk_id": 2, "tokens": 9000, "unknown": 72, "share": 0.008},
    "warnings": ["target: 48.2% of rows are cut at 128 tokens (p99 128); raise it", "<b>"],
    "tokenizer": {"name": "m", "class": "T5TokenizerFast", "vocab_size": 32128},
}


def test_report_data_section_is_what_data_prep_found():
    data = data_section(MANIFEST)
    assert data["tokens"] == MANIFEST["lengths"]
    assert data["dropped"] == {"duplicate": 3, "empty_field": 0}  # only the dropping rules
    assert data["bad_rows_skipped"] == 2 and data["warnings"] == MANIFEST["warnings"]
    assert data["counts"] == MANIFEST["counts"] and data["sample"] == MANIFEST["sample"]
    assert data["unknown_tokens"]["share"] == 0.008
    assert data_section({}) == {  # a manifest written before data-prep measured its data
        "counts": {},
        "rows_read": None,
        "sample": None,
        "tokens": {},
        "unknown_tokens": None,
        "dropped": {},
        "bad_rows_skipped": 0,
        "cast_to_string": [],
        "warnings": [],
    }


def _page(**report):
    base = {"rows": 1, "capped_at": None, "metrics": {}, "curves": {}, "samples": []}
    gate = {"passed": True, "reasons": [], "forced": False}
    return html_report.render({**base, "gate": gate, **report}, job_id="j")


def test_html_shows_lengths_cuts_unknowns_cleaning_and_warnings():
    page = _page(data=data_section(MANIFEST))
    assert "<h2>Data</h2>" in page
    assert (
        "<tr data-side='target'><td>target</td><td class=num>128</td>"
        "<td>auto: the p99 is 128 tokens</td><td class=num>20</td><td class=num>128</td>"
        "<td class=num>48.2%</td><td class=num>1.23%</td></tr>"
    ) in page
    assert ("<td>source</td><td class=num>64</td><td>set by dataset.max_source_length</td>") in page
    assert "<td class=num>0.0%</td><td class=num>0.10%</td>" in page
    assert "<li>rows: a random sample of 1500 of 5000 rows (seed 7); kept train 1200, " in page
    assert "<li>dropped by cleaning: 3 duplicate</li><li>bad rows skipped: 2</li>" in page
    assert (
        "<ul class=warnings><li class=warn>warning: target: 48.2% of rows are cut at 128 "
        "tokens (p99 128); raise it</li><li class=warn>warning: &lt;b&gt;</li></ul>"
    ) in page


def test_html_says_no_warnings_and_reads_reports_without_a_data_section():
    clean = {**MANIFEST, "warnings": [], "cleaning": {}, "bad_rows_skipped": 0}
    clean["sample"] = {"method": "all", "seed": None, "rows": 1495, "of": 1495}
    page = _page(data=data_section(clean))
    assert "<p class=pass>No warnings.</p>" in page and "class=warn>" not in page
    assert "<li>dropped by cleaning: none</li><li>bad rows skipped: 0</li>" in page
    assert "<li>rows: all rows; kept train 1200, validation 150, test 145</li>" in page
    assert "<h2>Data</h2>" not in _page()  # a report.json written before it had one


def test_generation_by_length_answers_in_the_tables_order(tiny_model):
    """Rows taken longest first and put back: the same answers as one row at a time."""
    import pyarrow as pa
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from services.evaluator import metrics
    from shared.jobspec import DecodingSpec

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    prompts = ["What is Gout?", "What is Acromegaly of the pituitary gland?", "What is X?"] * 2
    table = pa.table({"input_ids": tokenizer(prompts)["input_ids"]})
    decoding = DecodingSpec(max_new_tokens=6)
    done = []
    batched = metrics.generate(
        model, tokenizer, table, decoding=decoding, batch_size=4, on_batch=done.append
    )
    one_by_one = [
        metrics.generate(model, tokenizer, table.slice(i, 1), decoding=decoding, batch_size=1,
                         on_batch=lambda n: None)[0]
        for i in range(table.num_rows)
    ]  # fmt: skip
    assert batched == one_by_one and done == [4, 6]
    assert metrics.longest_first(table, "input_ids")[0] in (1, 4)


def test_an_out_of_memory_batch_is_split_until_it_fits():
    import pyarrow as pa
    import torch

    from services.evaluator import metrics

    seen = []

    def run(chunk):
        seen.append(chunk.num_rows)
        if chunk.num_rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return chunk.column("x").to_pylist()

    table = pa.table({"x": list(range(7))})
    assert metrics.halving(run, table) == list(range(7))
    assert seen == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4, 3 -> 1 + 2, 4 -> 2 + 2


def test_evaluation_batch_auto_is_sixteen_on_cpu(tiny_model):
    import pyarrow as pa
    from transformers import AutoModelForSeq2SeqLM

    from services.evaluator import metrics
    from shared.jobspec import DecodingSpec, EvaluationSpec

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model)
    table = pa.table({"input_ids": [[5, 6, 1]]})
    assert metrics.batch_size(EvaluationSpec(), model, table, DecodingSpec()) == metrics.CPU_BATCH
    assert metrics.batch_size(EvaluationSpec(batch_size=3), model, table, DecodingSpec()) == 3


def test_the_base_loads_in_bf16_straight_onto_the_gpu(tiny_model, monkeypatch):
    from services.evaluator import handler as evaluator

    asked = []
    load = evaluator.load_model

    def load_on_cpu(base_model, **kwargs):  # no GPU here: recorded, then loaded on the CPU
        asked.append(kwargs)
        return load(base_model, **{**kwargs, "device_map": None})

    monkeypatch.setattr(evaluator, "load_model", load_on_cpu)
    model, placement = evaluator.base_on_device(str(tiny_model))
    assert model.dtype == torch.float32 and (placement.device, placement.dtype) == (
        "cpu",
        "float32",
    )
    monkeypatch.setattr(evaluator, "device", lambda: "cuda")
    monkeypatch.setattr(planner, "device_memory", lambda dev: 20 * GIB)
    model, placement = evaluator.base_on_device(str(tiny_model))
    assert model.dtype == torch.bfloat16 and placement.device == "cuda"
    assert asked == [
        {"dtype": torch.float32},
        {"dtype": torch.bfloat16, "device_map": "cuda"},
    ]


@pytest.mark.parametrize(
    ("dev", "gpu", "advice"),
    [
        ("cuda", "bf16 weights 12.6 GiB over 80% of the GPU's 10.0 GiB free; ",
         "run the evaluator on a GPU with more memory, or choose a smaller base model"),
        ("cpu", "no GPU; ", "give the evaluator more memory or a GPU "
         "(the ECS stack: StageMemory, or EvaluatorPublisherCapacity=Gpu)"),
    ],
)  # fmt: skip
def test_a_7b_base_that_fits_neither_the_gpu_nor_the_host_is_refused_before_loading(
    llama_7b, monkeypatch, dev, gpu, advice
):
    from services.evaluator import handler as evaluator

    monkeypatch.setattr(evaluator, "load_model", _must_not_load)
    monkeypatch.setattr(evaluator, "device", lambda: dev)
    free = {"cuda": 10 * GIB, "cpu": 14 * GIB}  # a 12 GB GPU, a 16 GB task
    monkeypatch.setattr(planner, "device_memory", lambda dev: free[dev])
    with pytest.raises(ModelError) as refused:
        evaluator.base_on_device(llama_7b)
    assert str(refused.value) == (
        f"the evaluation of {llama_7b} fits nowhere: {gpu}"
        "fp32 weights 25.1 GiB over 80% of the host's 14.0 GiB free; "
        f"bf16 weights 12.6 GiB over 80% of the host's 14.0 GiB free; {advice}"
    )


def test_a_base_too_big_for_fp32_in_host_memory_is_evaluated_in_bf16(llama_7b, monkeypatch):
    from services.evaluator import handler as evaluator

    loaded = []
    monkeypatch.setattr(evaluator, "load_model", lambda base, **kwargs: loaded.append(kwargs))
    monkeypatch.setattr(evaluator, "device", lambda: "cpu")
    monkeypatch.setattr(planner, "device_memory", lambda dev: 28 * GIB)
    _, placement = evaluator.base_on_device(llama_7b)
    assert loaded == [{"dtype": torch.bfloat16}] and placement.reason == (
        "bf16 weights 12.6 GiB in host memory (28.0 GiB free); no GPU; "
        "fp32 weights 25.1 GiB over 80% of the host's 28.0 GiB free"
    )


def _must_not_load(*args, **kwargs):
    raise AssertionError("loaded a model that does not fit")


def test_generation_stops_at_the_tokenizers_eos_as_serving_does(tiny_model):
    """Training ends every answer with the tokenizer's EOS; the local twin and the export's
    generation_config stop there. A base whose generation config lists other EOS ids had
    the evaluator run on past it, scoring text the served model never writes."""
    import pyarrow as pa
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from services.evaluator import metrics
    from shared.jobspec import DecodingSpec

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model).eval()
    model.generation_config.eos_token_id = None  # the config's EOS: none
    ids = tokenizer(["What is Gout?"])["input_ids"]
    full = model.generate(torch.tensor(ids), max_new_tokens=8)[0].tolist()
    stop = full[3]  # the tokenizer's EOS: a token the model writes third
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    expected = metrics.reply_text(tokenizer, full[: full.index(stop, 1) + 1])
    answer = metrics.generate(
        model,
        tokenizer,
        pa.table({"input_ids": ids}),
        decoding=DecodingSpec(max_new_tokens=8),
        batch_size=1,
        on_batch=lambda n: None,
    )
    assert answer == [expected] and expected != metrics.reply_text(tokenizer, full)
