from pathlib import Path

import pytest

from services.cli.tinymodel import TINY_FAMILIES
from shared.errors import SpecError
from shared.jobspec import JobSpec, load_spec, parse_spec, template_fields

ROOT = Path(__file__).resolve().parents[3]


def test_defaults_are_the_notebooks_task_with_termtunes_recipe():
    spec = JobSpec(name="medical-terms")
    assert spec.base_model == "google/flan-t5-large"
    assert spec.dataset.source == "gamino/wiki_medical_terms"
    assert spec.dataset.prompt_template == "What is {page_title}"
    assert spec.dataset.target_template == "{page_text}"
    assert spec.dataset.test_size == 0.3
    assert spec.dataset.max_target_length == "auto"  # the p99 under the notebook's 512
    assert spec.dataset.max_target_length_cap == 512
    assert (spec.dataset.max_rows, spec.dataset.sample) == (None, "random")
    lora = spec.training.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, 0.0, "all-linear")
    assert lora.loraplus_lr_ratio == 1.0  # plain LoRA unless asked
    assert spec.training.recipe == "termtune"
    assert (spec.training.batch_size, spec.training.gradient_accumulation_steps) == ("auto", "auto")
    assert spec.training.effective_batch_size == "auto"
    assert spec.training.epochs == 1
    assert spec.training.quantization == "auto"
    notebook = JobSpec(name="medical-terms", training={"recipe": "notebook"}).training
    assert (notebook.lora.dropout, notebook.batch_size, notebook.gradient_accumulation_steps) == (
        0.1,
        1,
        2,
    )


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(JobSpec)


def test_token_lengths_are_auto_or_a_number_in_range():
    with pytest.raises(
        SpecError,
        match=r"field 'dataset.max_source_length': Value error, must be \"auto\" or a number "
        r"of tokens from 8 to 8192, not 1000000000",
    ):
        parse_spec({"name": "x1", "dataset": {"max_source_length": 10**9}})
    spec = parse_spec({"name": "x1", "dataset": {"max_source_length": 64}})
    assert (spec.dataset.max_source_length, spec.dataset.max_target_length) == (64, "auto")


def test_unknown_field_is_named():
    with pytest.raises(SpecError, match=r"field 'training.learnig_rate': unknown field"):
        parse_spec({"name": "x1", "training": {"learnig_rate": 0.1}})


def test_bad_value_is_named():
    with pytest.raises(SpecError, match=r"field 'dataset.test_size'"):
        parse_spec({"name": "x1", "dataset": {"test_size": 1.5}})


def test_a_loraplus_ratio_under_1_is_named():
    with pytest.raises(SpecError, match=r"field 'training.lora.loraplus_lr_ratio'"):
        parse_spec({"name": "x1", "training": {"lora": {"loraplus_lr_ratio": 0.5}}})


def test_bad_name_is_named():
    with pytest.raises(SpecError, match=r"field 'name'"):
        parse_spec({"name": "Has Spaces"})


def test_template_without_field_is_refused():
    with pytest.raises(SpecError, match=r"dataset.prompt_template"):
        parse_spec({"name": "x1", "dataset": {"prompt_template": "no placeholder"}})


def test_template_fields():
    assert template_fields("Define {term} ({abbreviation})") == ["term", "abbreviation"]


def test_load_missing_file(tmp_path):
    with pytest.raises(SpecError, match="job spec file not found: .*nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_load_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(path)


def test_load_refuses_a_key_said_twice(tmp_path):
    """PyYAML alone keeps the last: this spec would train 3 epochs with no word said."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: terms\ntraining:\n  epochs: 1\n  learning_rate: 0.001\n  epochs: 3\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == (
        f"{path}: line 5: the key 'epochs' a second time in one mapping (first on line 3): "
        "say each key once"
    )


def test_shipped_example_is_valid():
    spec = load_spec(ROOT / "examples" / "medical-terms.yaml")
    assert spec.name == "medical-terms"
    assert spec.publish.target == "local"


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "t5"])
def test_each_decoder_only_family_has_a_valid_example(family):
    from services.cli.tinymodel import tiny_folder

    spec = load_spec(ROOT / "examples" / f"{family}-terms.yaml")
    assert Path(spec.base_model) == tiny_folder(family)  # `termtune run` builds it
    assert spec.dataset.chat_template == "auto" and spec.publish.target == "local"


def test_readme_spec_reference_is_current():
    from services.cli.docs import rendered

    readme = (ROOT / "README.md").read_text()
    assert rendered(readme) == readme, "run `make docs` to regenerate the spec reference"
    assert "| `evaluation.gate.primary_metric` |" in readme and "| `decoding.top_p` |" in readme


def test_non_finite_numbers_and_names_with_a_final_newline_are_refused():
    import json

    from shared.errors import SpecError
    from shared.jobspec import parse_spec

    data = json.loads('{"name": "terms", "training": {"checkpoint_every_minutes": 1e999}}')
    with pytest.raises(SpecError, match="field 'training.checkpoint_every_minutes'"):
        parse_spec(data)
    with pytest.raises(SpecError, match="field 'name'"):
        parse_spec({"name": "terms\n"})
    with pytest.raises(SpecError, match="field 'publish.model_name'"):
        parse_spec({"name": "terms", "publish": {"model_name": "terms\n"}})


def test_training_settings_are_bounded_at_submission():
    """Issue 19: accepted, then failed late after three wasted attempts (or never sensible)."""
    from shared.jobspec import MAX_TEMPLATE_CHARS

    cases = {
        ("training", "optimizer"): "adamw_turbo",
        ("training", "lr_scheduler"): "reduce_lr_on_plateau",
        ("training", "seed"): 2**70,
        ("training", "max_steps"): 10**12,
        ("training", "data_parallel"): 65,
        ("evaluation", "seed"): -1,
        ("dataset", "seed"): 2**32,
        ("dataset", "prompt_template"): "What is {page_title}" + "x" * MAX_TEMPLATE_CHARS,
    }
    for (section, name), value in cases.items():
        with pytest.raises(SpecError, match=rf"field '{section}\.{name}"):
            parse_spec({"name": "terms", section: {name: value}})
    with pytest.raises(SpecError, match=r"field 'training\.lora\.target_modules"):
        parse_spec({"name": "terms", "training": {"lora": {"target_modules": ["q; rm -rf"]}}})
    ok = parse_spec(
        {
            "name": "terms",
            "training": {
                "optimizer": "paged_adamw_8bit",
                "seed": 2**32 - 1,
                "lora": {"target_modules": ["q", "v"]},
            },
        }  # fmt: skip
    )
    assert ok.training.lora.target_modules == ["q", "v"]


def test_every_optimizer_and_scheduler_offered_is_one_transformers_knows():
    from typing import get_args

    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from shared.jobspec import Optimizer, Scheduler

    assert set(get_args(Optimizer)) <= {o.value for o in OptimizerNames}
    assert set(get_args(Scheduler)) <= {s.value for s in SchedulerType}


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("What is {} {page_title}", r"placeholder \{\} must name a column"),
        ("What is {0}", r"placeholder \{0\} must name a column"),
        ("What is {page_title.upper}", r"placeholder \{page_title.upper\} must name a column"),
        ("What is {page_title!x}", r"placeholder \{page_title!x\} takes no conversion"),
        ("What is {page_title:{w}}", r"placeholder \{page_title:\{w\}\} takes no conversion"),
    ],
)
def test_a_placeholder_that_is_not_a_column_is_refused_with_the_spec(template, says):
    """Each passed validation and failed in data-prep, after the tokenizer had loaded."""
    with pytest.raises(SpecError, match=r"field 'dataset.prompt_template': .*" + says):
        parse_spec({"name": "x1", "dataset": {"prompt_template": template}})
    spec = parse_spec({"name": "x1", "dataset": {"prompt_template": "What is {page_title:>4}"}})
    assert spec.dataset.template_columns == ["page_title", "page_text"]
