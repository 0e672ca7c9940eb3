"""The gate's statistics: prompts as the bootstrap's unit, too few of them, degenerate and
echoing answers, and the report's header."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from services.evaluator import html_report, scoring
from services.evaluator.handler import build_report
from shared.jobspec import GateSpec, parse_spec

ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA = ROOT / ".." / "shared" / "data"

REFS = [f"term {i} is a chronic disease of the lungs and airways" for i in range(8)]
BASE = ["a disease"] * 3 + ["unrelated words here"] * 5
TUNED = REFS[:5] + ["nothing of it"] * 3


def _rows(predictions, references, prompts=None):
    n = len(predictions)
    return scoring.score_rows(
        predictions, references, nll=[1.0] * n, tokens=[1] * n, prompts=prompts
    )


def test_a_prompts_answers_resampled_together_do_not_narrow_the_interval():
    # The defect: rows were resampled, so a prompt with k reference answers (its one model
    # answer scored k times) counted as k independent draws and narrowed the interval by
    # about sqrt(k). Resampling prompts, k identical copies of each give the interval of one.
    copies = 4
    base, tuned = _rows(BASE, REFS), _rows(TUNED, REFS)
    keys = [f"What is term {i}?" for i in range(8)]
    once = scoring.paired_bootstrap(base, tuned, clusters=keys, samples=300, seed=3)
    repeated = [x for x in range(8) for _ in range(copies)]
    base_k = _rows([BASE[i] for i in repeated], [REFS[i] for i in repeated])
    tuned_k = _rows([TUNED[i] for i in repeated], [REFS[i] for i in repeated])
    clustered = scoring.paired_bootstrap(
        base_k, tuned_k, clusters=[keys[i] for i in repeated], samples=300, seed=3
    )
    for metric in ("rougeL", "rouge1", "chrf", "exact_match"):  # BLEU's smoothing is not
        assert clustered[metric] == pytest.approx(once[metric]), metric
    by_row = scoring.paired_bootstrap(base_k, tuned_k, samples=300, seed=3)["rougeL"]
    assert by_row[1] - by_row[0] < 0.7 * (once["rougeL"][1] - once["rougeL"][0])


def test_rows_of_one_prompt_in_any_case_are_one_cluster():
    members = scoring.cluster_rows(
        [scoring.prompt_key(p) for p in ["What is X?", "b", "WHAT IS x?"]]
    )
    assert [m.tolist() for m in members] == [[0, 2], [1]]


def _report(prompts, base, tuned, refs, **gate):
    spec = parse_spec({"name": "x1", "evaluation": {"bootstrap_samples": 200, "gate": gate}})
    table = pa.table({"prompt": prompts, "target": refs})
    scored = (_rows(base, refs, prompts), base), (_rows(tuned, refs, prompts), tuned)
    return build_report(table, *scored, spec=spec, training_log=[])


def test_too_few_test_prompts_fail_the_gain_rule_naming_the_count_and_the_minimum():
    # The defect: 3 rows, tuned a little better on each: every resample gained, the interval
    # looked clear of zero and the gate passed on three answers.
    refs = ["Asthma is a chronic disease of the airways", "Gout is a form of arthritis",
            "Anemia is a lack of red blood cells"]  # fmt: skip
    prompts = ["What is Asthma?", "What is Gout?", "What is Anemia?"]
    base, tuned = ["a disease", "arthritis", "blood"], ["a chronic disease", "a form of arthritis",
                                                       "a lack of blood"]  # fmt: skip
    report = _report(prompts, base, tuned, refs, require_lower_loss=False)
    gain = report["gate"]["rules"][0]
    assert not gain["passed"] and not report["gate"]["passed"]
    assert gain["detail"].startswith(
        "ROUGE-L: 3 distinct test prompts, fewer than the 20 an interval needs to mean anything "
        "(evaluation.gate.min_test_prompts); tuned "
    )
    assert gain["values"]["prompts"] == 3 and gain["values"]["min_prompts"] == 20
    assert report["bootstrap"] == {"unit": "prompt", "prompts": 3, "samples": 200}
    judged = _report(prompts, base, tuned, refs, require_lower_loss=False, min_test_prompts=None)
    assert judged["gate"]["rules"][0]["passed"]  # with no minimum, the interval decides


def test_the_report_counts_distinct_prompts_and_says_it_resampled_them():
    prompts = [f"What is term {i // 3}?" for i in range(24)]  # 8 prompts, 3 answers each
    refs = [f"term {i // 3} is a disease, answer {i % 3}" for i in range(24)]
    answers = [f"term {i // 3} is a disease" for i in range(24)]
    report = _report(prompts, ["no idea"] * 24, answers, refs, min_test_prompts=5)
    assert report["bootstrap"]["prompts"] == 8 and report["rows"] == 24
    assert report["gate"]["rules"][0]["values"]["prompts"] == 8
    page = html_report.render(report, job_id="j")
    assert "resampling the 8 distinct test prompts (each with all its rows)" in page


@pytest.mark.parametrize(
    "text",
    [
        "Asthma, asthma, asthma, asthma",
        "a disease, a disease, a disease",
        "Asthma. Asthma. Asthma.",
        "It is a disease of the lungs. It is a disease of the lungs.",
        "Lungs; lungs; lungs; lungs; lungs; lungs",
        "Asthma is asthma is asthma is",
        "Fever, fever, fever, fever, fever.",
        "哮喘哮喘哮喘",
    ],
)
def test_repetition_behind_punctuation_and_case_is_degenerate(text):
    # The defect: words were split at spaces only, so "Asthma," and "asthma," differed.
    assert scoring.is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "very very good",
        "need water, water loss, remove water",  # the CDC thesaurus: a word thrice in six
        "stomach, stomach area, belly, tummy",
        "A pain that is characterized by occurring in the lower back.",
    ],
)
def test_normal_definitions_are_not_degenerate(text):
    assert not scoring.is_degenerate(text)


GLOSSARIES = [  # file, term column, definition column, the prompt template
    (ROOT / "data" / "medical_terms.jsonl", "page_title", "page_text", "What is {}"),
    (
        SHARED_DATA / "cdc_plain_language_thesaurus.jsonl",
        "term",
        "definition",
        "In plain words, {}",
    ),
    (SHARED_DATA / "symptom_ontology.jsonl", "term", "definition", "What is {}?"),
]


@pytest.mark.parametrize("path,term,definition,template", GLOSSARIES, ids=lambda x: str(x)[-30:])
def test_real_glossary_definitions_are_neither_degenerate_nor_echoes(
    path, term, definition, template
):
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    answers = [r[definition] for r in rows]
    scored = _rows(answers, answers, [template.format(r[term]) for r in rows])
    assert scored.degenerate.mean() == 0  # "cancer" -> "cancer" is no echo
    assert sum(scoring.is_degenerate(a) for a in answers) == 0


@pytest.mark.parametrize(
    "answer,echo",
    [
        ("What is Asthma?", True),
        ("What is Asthma", True),
        # the term alone is a plain-language glossary's answer ("cancer" -> "cancer"); its
        # repetition is degenerate, not an echo
        ("asthma", False),
        ("Asthma, asthma.", False),
        ("A chronic disease of the airways.", False),
        ("Asthma is a chronic disease of the airways.", False),
        ("", False),  # counted as empty
    ],
)
def test_an_answer_that_gives_the_question_back_is_an_echo(answer, echo):
    assert scoring.is_echo(answer, "What is Asthma?") is echo


def test_an_answer_close_to_a_long_question_is_an_echo():
    prompt = "What is chronic obstructive pulmonary disease?"
    assert scoring.is_echo("What is chronic obstructive pulmonary disease? A", prompt)  # F1 .92
    assert not scoring.is_echo("A chronic obstructive disease of the lungs", prompt)


def test_the_gate_refuses_a_model_that_repeats_the_question():
    # The defect: no rule looked at the prompt; a tuned model answering each question with
    # the question passed whenever the base's answers were poor (mostly empty).
    prompts = [f"What is term {i}?" for i in range(30)]
    refs = [f"term {i} is a chronic disease of the lungs and airways" for i in range(30)]
    base = [""] * 21 + ["It is a medical term."] * 9
    rows_b, rows_t = _rows(base, refs, prompts), _rows(prompts, refs, prompts)
    assert rows_t.echo.all() and not rows_b.echo.any()
    base_m, tuned_m = scoring.aggregate(rows_b), scoring.aggregate(rows_t)
    assert tuned_m["echo_share"] == 1.0 and base_m["echo_share"] == 0.0
    intervals = scoring.paired_bootstrap(rows_b, rows_t, clusters=prompts, samples=200)
    rule = GateSpec(require_lower_loss=False)
    rules = scoring.gate(base_m, tuned_m, intervals, rule=rule, prompts=30)
    failed = {r["rule"]: r for r in rules if not r["passed"]}
    assert set(failed) == {"degenerate_share"}
    assert failed["degenerate_share"]["detail"] == (
        "degenerate answers: tuned 100.0% vs base 0.0% (echoing the question: tuned 100.0% vs "
        "base 0.0%); must be at most 5.0% and not above base"
    )
    assert failed["degenerate_share"]["values"]["echo"] == {"base": 0.0, "tuned": 1.0}


def _header(**report):
    from services.cli.display import evaluation_table

    full = {"metrics": {}, "metric_order": [], "curves": {}, "samples": [], **report}
    full["gate"] = {"passed": True, "forced": False, "reasons": [], "rules": []}
    page = html_report.render(full, job_id="j")
    html = page.split("Base model vs tuned model on ", 1)[1].split(". Intervals", 1)[0]
    return evaluation_table(full).title, html


def test_the_header_names_the_cap_only_where_it_cut_the_split():
    # The defect: "capped at 200" on a 75-row test split that no cap touched.
    assert _header(rows=75, capped_at=200, split_rows=75) == (
        "Held-out evaluation (75 test rows)",
        "75 held-out test rows",
    )
    assert _header(rows=40, capped_at=40, split_rows=75) == (
        "Held-out evaluation (40 test rows, capped at 40 of 75)",
        "40 held-out test rows (capped at 40 of 75 rows)",
    )
    # a report written before split_rows: the cap is named where the rows reached it
    assert _header(rows=75, capped_at=200)[0] == "Held-out evaluation (75 test rows)"
    assert _header(rows=40, capped_at=40)[0] == "Held-out evaluation (40 test rows, capped at 40)"
    assert _header(rows=40, capped_at=None, split_rows=40)[1] == "40 held-out test rows"


def test_the_report_records_the_splits_row_count():
    spec = parse_spec({"name": "x1", "evaluation": {"bootstrap_samples": 100, "max_rows": 2}})
    table = pa.table({"prompt": ["What is a?", "What is b?"], "target": ["x y", "z w"]})
    scored = (_rows(["x"] * 2, ["x y", "z w"]), ["x"] * 2)
    dataset = {"counts": {"train": 9, "test": 5}}
    report = build_report(table, scored, scored, spec=spec, training_log=[], dataset=dataset)
    assert (report["rows"], report["capped_at"], report["split_rows"]) == (2, 2, 5)
    assert build_report(table, scored, scored, spec=spec, training_log=[])["split_rows"] == 2
