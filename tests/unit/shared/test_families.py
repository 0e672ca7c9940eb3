"""The families Bedrock imports: read from a model's config, refused by name where
termtune cannot take them, at submission when the config is at hand."""

from __future__ import annotations

import json

import pytest

from services.cli.tinycausal import build_tiny_causal
from shared import families
from shared.basemodel import base_model_family
from shared.errors import ModelError
from shared.modeling import load_seq2seq
from shared.store import LocalStore
from tests.factories import SAMPLE_DATA

EVERY_FAMILY = (
    "Flan-T5 (t5), Llama 2/3.x (llama), Mistral (mistral), Mixtral (mixtral), Qwen2/2.5 "
    "(qwen2), Qwen3 (qwen3), Qwen3 MoE (qwen3_moe), GPTBigCode (gpt_bigcode), GPT-OSS (gpt_oss)"
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_causal("llama", tmp_path_factory.mktemp("llama") / "m", data_file=SAMPLE_DATA)


def test_a_family_bedrock_does_not_import_is_refused_naming_those_it_does():
    with pytest.raises(ModelError) as caught:
        families.family_of({"model_type": "bert"}, where="base_model 'bert-base-uncased'")
    assert str(caught.value) == (
        "base_model 'bert-base-uncased' is a 'bert' model, a family Bedrock Custom Model "
        f"Import does not take; name a model of one it does: {EVERY_FAMILY}"
    )


def test_every_family_names_the_one_architecture_bedrock_imports():
    assert families.FAMILIES["qwen3_moe"].architecture == "Qwen3MoeForCausalLM"
    assert families.FAMILIES["gpt_oss"].regions == ("us-east-1",)
    kinds = {f.model_type: f.kind for f in families.FAMILIES.values()}
    assert kinds["t5"] == "seq2seq" and set(kinds.values()) == {"seq2seq", "causal"}


def test_a_model_of_the_other_kind_is_refused_by_the_kinds_loader(tiny_llama):
    with pytest.raises(ModelError, match=r"is a Llama 2/3.x model, not an encoder-decoder"):
        load_seq2seq(str(tiny_llama))


def test_gpt_oss_is_served_in_openai_shapes_only_and_trained_in_its_chat_template():
    oss = families.FAMILIES["gpt_oss"]
    assert (oss.bedrock_completion, oss.chat_only, oss.load_check) == (False, True, "4.55.0")
    others = [f for f in families.FAMILIES.values() if f is not oss]
    assert all(f.bedrock_completion and not f.chat_only for f in others)
    assert {f.load_check for f in others} == {"4.51.3"}
    families.check_prompting(oss, "auto", where="base_model 'm'")
    families.check_prompting(families.FAMILIES["llama"], "none", where="base_model 'm'")
    with pytest.raises(ModelError, match=r"dataset.chat_template is none: set it to auto$"):
        families.check_prompting(oss, "none", where="base_model 'm'")


def test_the_family_is_read_from_a_folder_an_upload_or_nowhere(
    tiny_model, tiny_llama, tmp_path, monkeypatch
):
    store = LocalStore(tmp_path / "store")
    cache = tmp_path / "cache"
    assert base_model_family(str(tiny_model), store=store, cache_dir=cache).model_type == "t5"
    assert base_model_family(str(tiny_llama), store=store, cache_dir=cache).kind == "causal"
    # a hub id whose config is not in the hub's cache here: the stages check it later
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_model_family("google/flan-t5-large", store=store, cache_dir=cache) is None


def test_a_hub_model_in_the_local_cache_is_checked_without_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    snapshot = hub / "models--org--coder" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hub / "models--org--coder" / "refs").mkdir()
    (hub / "models--org--coder" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(ModelError, match="base_model 'org/coder' is a 'gpt2' model"):
        base_model_family("org/coder", store=LocalStore(tmp_path / "s"), cache_dir=tmp_path)


def test_an_unreadable_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"base_model 'x': .*config\.json is not readable JSON"):
        families.folder_family(tmp_path, where="base_model 'x'")
