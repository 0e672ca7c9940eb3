import json
import shutil

import pytest
from safetensors.torch import save_file

from services.publisher import cmi, export
from services.publisher.handler import handle
from shared.errors import PreflightError


def test_publishes_merged_model_and_registers_it(published):
    ctx, publish, event = published
    assert event.model_name == "test-terms" and event.target == "local"
    manifest = ctx.jobs.manifest(publish.job_id, "publish")
    assert manifest["merge_max_logit_gap"] < export.MERGE_TOLERANCE
    assert manifest["preflight"]["dtypes"] == ["BF16"]
    folder = ctx.store.path(ctx.store.key_of(event.location))
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    assert not any(n.startswith("adapter_") for n in names)
    entry = ctx.jobs.model("test-terms")
    assert entry["location"] == event.location and entry["job_id"] == publish.job_id


def test_exported_model_loads_and_generates(published):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    ctx, _, event = published
    folder = ctx.store.path(ctx.store.key_of(event.location))
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = model.generate(**tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=5)
    assert out.shape[1] > 1


@pytest.fixture
def model_copy(published, tmp_path):
    ctx, _, event = published
    return shutil.copytree(ctx.store.path(ctx.store.key_of(event.location)), tmp_path / "m")


def test_preflight_passes_on_the_export(model_copy):
    assert cmi.preflight(model_copy)["model_type"] == "t5"


def test_preflight_names_missing_file(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(PreflightError, match="required-files: tokenizer.json is missing"):
        cmi.preflight(model_copy)


def test_preflight_refuses_adapter_files(model_copy):
    (model_copy / "adapter_config.json").write_text("{}")
    with pytest.raises(PreflightError, match="merged-weights"):
        cmi.preflight(model_copy)


def test_preflight_refuses_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "bert"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="supported-architecture: model_type 'bert'"):
        cmi.preflight(model_copy)


def test_preflight_refuses_quantized_and_fp16_t5_weights(model_copy):
    import torch

    (model_copy / "model.safetensors").unlink()
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, model_copy / "model.safetensors")
    with pytest.raises(PreflightError, match=r"weight-dtype: tensors of \['U8'\]"):
        cmi.preflight(model_copy)
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, model_copy / "model.safetensors")
    with pytest.raises(PreflightError, match="fp16 T5 weights overflow"):
        cmi.preflight(model_copy)


def test_tokenizer_config_is_made_readable_by_transformers_4_51(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"extra_special_tokens": [], "eos_token": "</s>"}))
    export.make_tokenizer_config_portable(path)
    assert json.loads(path.read_text())["extra_special_tokens"] == {}
    path.write_text(json.dumps({"extra_special_tokens": ["<x>"]}))
    export.make_tokenizer_config_portable(path)
    assert json.loads(path.read_text()) == {
        "extra_special_tokens": {},
        "additional_special_tokens": ["<x>"],
    }


def test_republish_is_a_no_op(published):
    ctx, publish, event = published
    key = ctx.jobs.manifest_key(publish.job_id, "publish")
    before = ctx.store.path(key).stat().st_mtime_ns
    again = handle(publish, ctx)
    assert (again.model_name, again.location, again.manifest) == (
        event.model_name,
        event.location,
        event.manifest,
    )
    assert ctx.store.path(key).stat().st_mtime_ns == before
