"""The decoder-only families Bedrock imports: tiny models of each (`termtune
build-tiny-model --family`), exported as the publisher saves, pass the CMI preflight and
load and answer the same in transformers 4.51.3 (Bedrock's; 4.55.0, the first with GPT-OSS,
for GPT-OSS); the per-family rules refuse what would not import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.cli.tinycausal import FAMILIES, VOCABULARIES, build_tiny_causal
from services.publisher import cmi, export
from shared import families
from shared.errors import PreflightError
from tests.factories import SAMPLE_DATA

QUESTION = [{"role": "user", "content": "What is Asthma"}]


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).float(), AutoTokenizer.from_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """family -> an export (bf16, the publisher's save) of a tiny model of that family."""
    root = tmp_path_factory.mktemp("families")
    done = {}
    for family in FAMILIES:
        base = build_tiny_causal(family, root / f"base-{family}", data_file=SAMPLE_DATA)
        model, _ = _load(base)
        export.save(model, str(base), root / family, dtype="bfloat16")
        done[family] = root / family
    return done


def _greedy(model, tokenizer, n: int = 6) -> list[int]:
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0].tolist()


def test_build_tiny_model_builds_each_family_with_its_tokenizer_and_chat_template(tmp_path):
    from services.cli.main import main

    assert main(["build-tiny-model", "--family", "mistral", "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    model, tokenizer = _load(tmp_path / "m")
    assert tokenizer.chat_template == VOCABULARIES["mistral"].chat_template
    ids = tokenizer("What is Asthma?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert len(tokenizer) <= config["vocab_size"] == model.get_input_embeddings().num_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_export_passes_the_preflight(exports, family):
    summary = cmi.preflight(exports[family], region="us-east-1")
    assert summary["model_type"] == family and summary["dtypes"] == ["BF16"]
    assert summary["chat_template"] is True
    config = json.loads((exports[family] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] in cmi.TOKENIZER_CLASSES
    if family == "llama":  # Llama 3's class: transformers 5 writes TokenizersBackend
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert summary["notes"] == [
            "rope_scaling 'llama3': Bedrock overrides a Llama model's rope_scaling with its own"
        ]


COMPAT_SCRIPT = """
import json, sys, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
found = {"version": transformers.__version__}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder).float()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is Asthma"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    found[folder] = {"ids": out[0].tolist(), "class": type(model).__name__, "text": text}
print(json.dumps(found))
"""


#: the transformers each family's exports are checked in -> the environment that has it
#: (`make compat`): 4.51.3, the one AWS documents; 4.55.0, the first with GPT-OSS
COMPAT_PYTHONS = {
    "4.51.3": os.environ.get("TERMTUNE_CMI_PYTHON", ".venv-cmi/bin/python"),
    "4.55.0": os.environ.get("TERMTUNE_CMI_GPT_OSS_PYTHON", ".venv-cmi-gpt-oss/bin/python"),
}


@pytest.mark.parametrize("version", sorted(COMPAT_PYTHONS))
def test_every_familys_export_loads_and_answers_the_same_where_bedrock_loads_it(exports, version):
    """AWS documents transformers 4.51.3 for Custom Model Import, which predates GPT-OSS:
    each family's export loads in the release its family is checked in (4.51.3, or the
    first that has the family), renders the same chat prompt and generates the same greedy
    tokens as here."""
    checked = [f for f in FAMILIES if families.FAMILIES[f].load_check == version]
    assert checked, f"no family is checked in {version}"
    python = Path(COMPAT_PYTHONS[version])
    if not python.exists():
        pytest.fail(f"{python} is missing: `make compat` builds the transformers {version} env")
    folders = [str(exports[f]) for f in checked]
    done = subprocess.run(
        [str(python), "-c", COMPAT_SCRIPT, *folders], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["version"] == version
    for family in checked:
        model, tokenizer = _load(exports[family])
        theirs = found[str(exports[family])]
        assert theirs["class"] == cmi.SUPPORTED_ARCHITECTURES[family]
        assert theirs["text"] == tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=False
        )
        assert theirs["ids"] == _greedy(model, tokenizer), family


def test_every_family_is_checked_in_a_release_the_tests_install():
    assert {f.load_check for f in families.FAMILIES.values()} == set(COMPAT_PYTHONS)


def _edit(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _copy(exports: dict[str, Path], family: str, tmp_path: Path, **changes) -> Path:
    """A copy of ``family``'s export with ``changes`` made to its config.json."""
    folder = Path(shutil.copytree(exports[family], tmp_path / family))
    _edit(folder, **changes)
    return folder


def _refusal(folder: Path) -> PreflightError:
    with pytest.raises(PreflightError) as caught:
        cmi.preflight(folder)
    return caught.value


def test_preflight_refuses_a_family_bedrock_does_not_import(exports, tmp_path):
    folder = _copy(exports, "qwen2", tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    refused = _refusal(folder)
    assert refused.rule == "supported-architecture"
    assert "model_type 'gpt2' is not one Bedrock imports" in str(refused)


def test_preflight_refuses_a_wrong_head_rule(exports, tmp_path):
    folder = _copy(exports, "llama", tmp_path, num_key_value_heads=3)
    assert str(_refusal(folder)) == (
        "attention-heads: num_attention_heads 4 is not a multiple of num_key_value_heads 3: "
        "each key/value head serves a whole group of query heads"
    )
    _edit(folder, num_key_value_heads=2, hidden_size=130, head_dim=None)
    with pytest.raises(PreflightError, match="hidden_size 130 does not split into 4 heads"):
        cmi.preflight(folder)


def test_preflight_refuses_embeddings_the_config_or_tokenizer_does_not_match(exports, tmp_path):
    folder = _copy(exports, "mistral", tmp_path, vocab_size=1024)
    assert str(_refusal(folder)) == (
        "vocabulary-size: lm_head.weight has 1000 rows but config.json's vocab_size "
        "is 1024: the embeddings were resized without the config (or the reverse)"
    )
    _edit(folder, vocab_size=1000)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": 1000, "content": "<x>"})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(PreflightError, match="tokenizer.json produces token id 1000 but the"):
        cmi.preflight(folder)


def test_preflight_refuses_rope_settings_transformers_4_51_cannot_read(exports, tmp_path):
    config = json.loads((exports["qwen3"] / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1000000.0
    assert config["rope_scaling"] is None and config["torch_dtype"] == "bfloat16"
    # as transformers 5 writes it, without the export's fix
    refused = _refusal(_copy(exports, "qwen3", tmp_path, rope_theta=None))
    assert refused.rule == "config-portable"
    assert "rope_theta 1000000.0 / rope_type 'default' only in rope_parameters" in str(refused)


def test_preflight_accepts_only_the_causal_lm_architectures_of_qwen3(exports, tmp_path):
    folder = _copy(exports, "qwen3", tmp_path, architectures=["Qwen3ForSequenceClassification"])
    with pytest.raises(
        PreflightError,
        match=r"supported-architecture: architectures \['Qwen3ForSequenceClassification'\] of "
        r"model_type 'qwen3': Bedrock imports only Qwen3ForCausalLM",
    ):
        cmi.preflight(folder)
    _edit(folder, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    assert cmi.preflight(folder)["model_type"] == "qwen3_moe"


def test_preflight_refuses_gpt_oss_outside_us_east_1(exports, tmp_path):
    folder = _copy(
        exports, "qwen2", tmp_path, model_type="gpt_oss", architectures=["GptOssForCausalLM"]
    )
    with pytest.raises(
        PreflightError, match="region: GPT-OSS models import only in us-east-1, not us-west-2"
    ):
        cmi.preflight(folder, region="us-west-2")
    assert cmi.preflight(folder, region="us-east-1")["region"] == "us-east-1"
    assert cmi.preflight(folder)["model_type"] == "gpt_oss"  # region not known: local


def test_preflight_refuses_config_names_transformers_4_51_reads_otherwise(exports, tmp_path):
    config = json.loads((exports["qwen3_moe"] / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 4  # the export wrote both
    assert "head_dim" not in json.loads((exports["mixtral"] / "config.json").read_text())
    # as transformers 5 writes them: 4.51.3 would build 128 experts, or heads of no width
    moe = _copy(exports, "qwen3_moe", tmp_path, num_experts=None)
    assert str(_refusal(moe)) == (
        "config-portable: config.json names num_local_experts 4 but not num_experts, the "
        "name transformers 4.51.3 (Bedrock's) reads for a Qwen3 MoE model: write both (the "
        "publisher's export does)"
    )
    with pytest.raises(PreflightError, match="config-portable: config.json's head_dim is null"):
        cmi.preflight(_copy(exports, "mixtral", tmp_path, head_dim=None))


def test_preflight_reads_gpt_bigcodes_head_names(exports, tmp_path):
    folder = _copy(exports, "gpt_bigcode", tmp_path, multi_query=False)
    assert cmi.preflight(folder)["model_type"] == "gpt_bigcode"  # one key/value head a query
    _edit(folder, n_head=6)
    with pytest.raises(PreflightError, match="hidden_size 128 does not split into 6 heads"):
        cmi.preflight(folder)
