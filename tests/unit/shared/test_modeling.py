"""A base_model that cannot be loaded says what to do in termtune's words, never only the
hub library's message ("Repo id must be in the form ...")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from shared.errors import ModelError
from shared.modeling import _load_hint, check_base_model, load_seq2seq, load_tokenizer

HUB_LIBRARY_TEXT = "Repo id must be in the form"


@pytest.mark.parametrize("load", [load_tokenizer, load_seq2seq], ids=["tokenizer", "model"])
def test_the_embedded_tiny_model_not_built_yet_says_build_it(tmp_path, monkeypatch, load):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no var/ yet
    with pytest.raises(ModelError) as raised:
        load("var/models/tiny-flan-t5")
    assert str(raised.value) == (
        "base_model 'var/models/tiny-flan-t5' is not a model folder on this machine: build "
        "the embedded one with `termtune build-tiny-model` (or `make run`), or name a hub id "
        f"such as google/flan-t5-large (looked for {tmp_path / 'var/models/tiny-flan-t5'})"
    )
    assert HUB_LIBRARY_TEXT not in str(raised.value)


def test_another_missing_folder_says_how_to_fill_it(tmp_path):
    folder = tmp_path / "models" / "mine"
    with pytest.raises(ModelError) as raised:
        load_tokenizer(str(folder))
    assert str(raised.value) == (
        f"base_model '{folder}' is not a model folder on this machine: save a model there "
        "(`save_pretrained` writes config.json, the weights and the tokenizer files), build "
        f"the embedded tiny one with `termtune build-tiny-model --out {folder}`, or name a "
        "hub id such as google/flan-t5-large"
    )


def test_a_file_is_not_a_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"^base_model 'weights.bin' is not a model folder") as e:
        load_seq2seq("weights.bin")
    assert str(e.value).endswith(f"({tmp_path / 'weights.bin'} is a file)")


def test_an_empty_folder_says_what_a_model_folder_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as raised:
        load_tokenizer(str(tmp_path / "empty"))
    message = str(raised.value)
    assert message.startswith(
        f"base_model '{tmp_path / 'empty'}' is a folder on this machine but its tokenizer "
        "cannot be loaded ("
    )
    assert "it holds nothing): a model folder needs the files `save_pretrained` writes " in message
    assert message.endswith(
        "(config.json, model.safetensors, tokenizer.json or spiece.model); rebuild it, or "
        "name a hub id such as google/flan-t5-large"
    )


def test_a_folder_is_never_refused_before_loading(tmp_path):
    assert check_base_model(str(tmp_path)) is None  # a folder goes on to from_pretrained
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):  # a file there is refused at once
        check_base_model(str(tmp_path / "weights.bin"))


def _hub_unreachable() -> OSError:
    """What transformers raises when huggingface.co cannot be resolved (its real chain)."""
    try:
        try:
            try:
                raise httpx.ConnectError("[Errno -2] Name or service not known")
            except httpx.ConnectError as exc:
                raise LocalEntryNotFoundError(
                    "An error happened while trying to locate the file on the Hub"
                ) from exc
        except LocalEntryNotFoundError as exc:
            raise OSError(
                "We couldn't connect to 'https://huggingface.co' to load the files, and "
                "couldn't find them in the cached files."
            ) from exc
    except OSError as exc:
        return exc


def test_an_unreachable_hub_says_use_a_folder_or_the_cache(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    message = _load_hint("google/flan-t5-large", "tokenizer", _hub_unreachable())
    assert message.startswith(
        "base_model 'google/flan-t5-large' is not a folder on this machine, and the model hub "
        "(huggingface.co) is unreachable from here while the model is not in its cache ("
    )
    assert message.endswith(
        "): name a local model folder instead (one `save_pretrained` wrote; `termtune "
        "build-tiny-model` builds the embedded tiny one in var/models/tiny-flan-t5), or fill "
        "the cache where the hub is reachable and set HF_HUB_OFFLINE=1 here to load from it "
        "without asking the hub"
    )


def test_a_hub_id_missing_from_the_cache_offline_says_so_for_real(tmp_path):
    # transformers reads HF_HUB_OFFLINE when it is imported: a process of its own.
    code = (
        "from shared.modeling import load_tokenizer\n"
        "try:\n    load_tokenizer('google/flan-t5-large')\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).parents[3],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip() == (
        "ModelError base_model 'google/flan-t5-large' is not a folder on this machine and not "
        f"in its model hub cache ({tmp_path / 'hf' / 'hub'}), and HF_HUB_OFFLINE is set, so "
        "the hub is not asked: download it once where the hub is reachable (into the cache "
        "HF_HOME points to), or name a local model folder instead (one `save_pretrained` "
        "wrote; `termtune build-tiny-model` builds the embedded tiny one in "
        "var/models/tiny-flan-t5)"
    ), done.stderr


def test_a_hub_id_the_hub_does_not_serve_says_check_the_name():
    # transformers' words for a hub answer of 404 (RepositoryNotFoundError underneath)
    exc = OSError(
        "nosuch/model is not a local folder and is not a valid model identifier listed on "
        "'https://huggingface.co/models'"
    )
    message = _load_hint("nosuch/model", "config", exc)
    assert message == (
        "base_model 'nosuch/model' is neither a folder on this machine nor a model the hub "
        "serves to us (a private or gated model needs `hf auth login` or HF_TOKEN): check the "
        "name (e.g. google/flan-t5-large) or name a local model folder"
    )


def test_the_hub_librarys_repo_id_message_is_never_all_we_say():
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    # a folder not built (var/models/tiny-flan-t5 exists once `make run` has run)
    missing = "var/models/not-built-here"
    with pytest.raises(HFValidationError, match=HUB_LIBRARY_TEXT) as raised:
        validate_repo_id(missing)
    message = _load_hint(missing, "tokenizer", raised.value)
    assert HUB_LIBRARY_TEXT not in message
    assert message.startswith(f"base_model '{missing}' is not a model folder")


def test_a_cut_short_adapter_is_named_by_file(tmp_path):
    """Issue 19: a truncated adapter failed with "header too small", naming no file."""
    from shared.errors import ModelError
    from shared.modeling import load_adapter

    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x08\x00")
    with pytest.raises(
        ModelError, match=r"adapter at .*: adapter_model.safetensors cannot be read"
    ):
        load_adapter(object(), tmp_path, "base")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"has no adapter_model.safetensors"):
        load_adapter(object(), tmp_path, "base")


FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _decoded(blocks, scales):
    """MXFP4 as its spec reads: per byte the lower nibble's value first, each block of 32
    times 2^(scale - 127); rows are outputs, so the (in, out) weight is the transpose."""
    import torch

    low, high = blocks & 0x0F, blocks >> 4
    codes = torch.stack([low, high], -1).flatten(-2).long()  # (experts, out, blocks, 32)
    values = torch.tensor(FP4)[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2).transpose(1, 2)


def test_gpt_oss_mxfp4_experts_load_as_plain_weights_equal_to_their_codes(tmp_path):
    import json

    import torch
    from safetensors import safe_open

    from services.cli.tinycausal import build_tiny_causal
    from shared.modeling import load_causal, prequantized
    from tests.factories import SAMPLE_DATA

    folder = build_tiny_causal("gpt_oss", tmp_path / "oss", data_file=SAMPLE_DATA, hidden=64)
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head",
        ],
    }  # fmt: skip
    assert prequantized(str(folder)) == "mxfp4"
    model = load_causal(str(folder), dtype=torch.float32)  # any device: dequantized
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        for layer, name in ((0, "gate_up_proj"), (1, "down_proj")):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            assert key not in stored.keys()  # noqa: SIM118
            expected = _decoded(
                stored.get_tensor(f"{key}_blocks"), stored.get_tensor(f"{key}_scales")
            )
            loaded = getattr(model.model.layers[layer].mlp.experts, name)
            assert loaded.dtype == torch.float32 and torch.equal(loaded.detach(), expected)
    assert getattr(model.config, "quantization_config", None) is None  # saved as plain weights


def test_mxfp4_codes_are_each_values_nearest_at_its_blocks_scale():
    import torch

    from services.cli.tinycausal import to_mxfp4

    weight = torch.randn(2, 64, 96) * 0.02  # (experts, in, out)
    blocks, scales = to_mxfp4(weight)
    assert blocks.shape == (2, 96, 2, 16) and scales.shape == (2, 96, 2)
    decoded = _decoded(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
    assert ((decoded - weight).abs() <= step).all()  # within one step of the grid (6 - 4 = 2)
    assert (decoded - weight).abs().mean() < 0.2 * weight.abs().mean()  # 4 bits: ~12%


def test_bitsandbytes_on_mxfp4_experts_is_refused_by_name(tmp_path):
    from transformers import BitsAndBytesConfig

    from services.cli.tinycausal import build_tiny_causal
    from shared.modeling import load_causal
    from tests.factories import SAMPLE_DATA

    folder = build_tiny_causal("gpt_oss", tmp_path / "oss", data_file=SAMPLE_DATA, hidden=32)
    with pytest.raises(
        ModelError, match=r"keeps its experts in MXFP4 .* set training.quantization"
    ):
        load_causal(str(folder), quantization_config=BitsAndBytesConfig(load_in_4bit=True))
