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


COMPAT_SCRIPT = """
import json, sys, transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1]).float()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = model.generate(**tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=8,
                     do_sample=False, num_beams=1)
print(json.dumps({"version": transformers.__version__, "ids": out[0].tolist()}))
"""


def test_export_loads_and_generates_in_transformers_4_51_3(published):
    """AWS documents transformers 4.51.3 for Custom Model Import: load the export there."""
    import os
    import subprocess
    from pathlib import Path

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    python = Path(os.environ.get("TERMTUNE_CMI_PYTHON", ".venv-cmi/bin/python"))
    if not python.exists():
        pytest.fail(f"{python} is missing: `make compat` builds the transformers 4.51.3 env")
    ctx, _, event = published
    folder = ctx.store.path(ctx.store.key_of(event.location))
    done = subprocess.run(
        [str(python), "-c", COMPAT_SCRIPT, str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "4.51.3"
    # The same greedy tokens as the current transformers produces from the same folder.
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).float()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = model.generate(
        **tokenizer("What is Asthma", return_tensors="pt"), max_new_tokens=8, do_sample=False
    )
    assert result["ids"] == ours[0].tolist()


def test_model_card_describes_the_model_and_warns_it_is_not_medical_advice(published):
    ctx, publish, event = published
    card = (ctx.store.path(ctx.store.key_of(event.location)) / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" in card
    assert "**Not medical advice.**" in card
    spec = ctx.spec(publish)
    lora = spec.training.lora
    assert f"| LoRA r / alpha / dropout | {lora.r} / {lora.alpha} / {lora.dropout} |" in card
    report = ctx.manifest_at(publish.evaluation_manifest)
    loss = report["metrics"]["loss"]
    assert f"| loss | {loss['base']:.4f} | {loss['tuned']:.4f} |" in card
    counts = ctx.manifest_at(publish.dataset_manifest)["counts"]
    assert f"train {counts['train']}, validation {counts['validation']}" in card


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


def test_export_ships_special_tokens_map_and_the_sentencepiece_model(tiny_model, tmp_path):
    import torch

    from shared.modeling import load_seq2seq

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "spiece.model").write_bytes(b"sentencepiece model bytes")
    out = tmp_path / "out"
    export.save(load_seq2seq(str(base), dtype=torch.float32), str(base), out, dtype="float32")
    assert (out / "spiece.model").read_bytes() == b"sentencepiece model bytes"
    tokens = json.loads((out / "special_tokens_map.json").read_text())
    assert tokens["eos_token"] == "</s>" and tokens["pad_token"] == "<pad>"
