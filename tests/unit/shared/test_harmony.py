"""GPT-OSS's harmony format: the served answer is the final channel's text, read from the
tokens a model generates."""

from __future__ import annotations

import pytest

from shared import harmony
from tests.factories import tiny_tokenizers


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tiny_tokenizers(tmp_path_factory.mktemp("harmony"), ("gpt_oss", "llama"))


@pytest.mark.parametrize(
    ("raw", "served"),
    [
        ("<|channel|>final<|message|>Asthma is a disease.<|return|>", "Asthma is a disease."),
        (
            "<|channel|>analysis<|message|>The user asks.<|end|><|start|>assistant"
            "<|channel|>final<|message|>A disease.<|return|><|endoftext|>",
            "A disease.",
        ),
        ("<|channel|>final<|message|>Cut sho", "Cut sho"),  # stopped by the length limit
        ("<|channel|>analysis<|message|>Only thinking<|end|>", ""),  # no final message
        ("An answer with no channel", ""),
    ],
)
def test_the_final_channel_is_what_is_served(raw, served):
    assert harmony.final_text(raw) == served


def test_a_harmony_tokenizer_serves_the_final_channel_and_others_what_they_decode(tokenizers):
    oss, llama = tokenizers["gpt_oss"], tokenizers["llama"]
    assert harmony.is_harmony(oss) and not harmony.is_harmony(llama)
    text = "<|channel|>final<|message|>Asthma is a disease of the airways.<|return|><|endoftext|>"
    ids = oss(text, add_special_tokens=False)["input_ids"]
    assert harmony.reply_text(oss, ids) == "Asthma is a disease of the airways."
    cut = oss("<|channel|>final<|message|>Asthma is<|end", add_special_tokens=False)
    assert harmony.reply_text(oss, cut["input_ids"]) == "Asthma is<|end"  # a literal, not a marker
    plain = llama("Asthma is a disease.<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert harmony.reply_text(llama, plain) == "Asthma is a disease."
