"""The prompt format of each kind of model: T5 as it was, decoder-only models wrapped in
their chat template (or not) with EOS appended, and cuts that keep each side's tail."""

from __future__ import annotations

import pytest

from services.cli.tinycausal import build_tiny_causal
from shared.modeling import load_tokenizer
from shared.prompting import Prompting, cut
from tests.factories import SAMPLE_DATA, tiny_tokenizers


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tiny_tokenizers(tmp_path_factory.mktemp("prompting"), ("llama", "qwen3", "mistral"))


def test_t5_keeps_its_format_each_side_ending_with_eos(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    prompting = Prompting.of(tokenizer, "seq2seq")
    assert (prompting.chat_template, prompting.source_tail, prompting.target_tail) == (False, 1, 1)
    assert prompting.text(tokenizer, "What is Asthma") == "What is Asthma"
    (ids,) = prompting.prompts(tokenizer, ["What is Asthma"])
    assert ids == tokenizer("What is Asthma")["input_ids"] and ids[-1] == tokenizer.eos_token_id


def test_a_chat_prompt_opens_the_assistants_turn_and_the_target_ends_the_turn(tokenizers):
    qwen = tokenizers["qwen3"]
    prompting = Prompting.of(qwen, "causal")
    assert prompting.chat_template and prompting.target_tail == 1
    assert prompting.text(qwen, "What is Asthma") == (
        "<|im_start|>user\nWhat is Asthma<|im_end|>\n<|im_start|>assistant\n"
    )
    (prompt,) = prompting.prompts(qwen, ["What is Asthma"])
    tail = qwen("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert prompting.source_tail == len(tail) and prompt[-len(tail) :] == tail
    (target,) = prompting.targets(qwen, ["A disease of the lungs."])
    assert target[-1] == qwen.convert_tokens_to_ids("<|im_end|>") == qwen.eos_token_id
    assert qwen.decode(target[:-1]) == "A disease of the lungs."


def test_a_template_that_writes_bos_gets_it_once(tokenizers):
    llama = tokenizers["llama"]
    (prompt,) = Prompting.of(llama, "causal").prompts(llama, ["What is Asthma"])
    assert prompt[0] == llama.bos_token_id and prompt.count(llama.bos_token_id) == 1


def test_without_the_chat_template_the_prompt_is_taken_as_it_is(tokenizers):
    mistral = tokenizers["mistral"]
    prompting = Prompting.of(mistral, "causal", "none")
    assert not prompting.chat_template and prompting.source_tail == 0
    assert prompting.text(mistral, "What is Asthma") == "What is Asthma"
    (prompt,) = prompting.prompts(mistral, ["What is Asthma"])
    assert prompt == mistral("What is Asthma")["input_ids"] and prompt[0] == mistral.bos_token_id
    assert Prompting.from_record(prompting.record()) == prompting


def test_a_cut_keeps_the_tail():
    assert cut(list(range(10)), 6, tail=3) == [0, 1, 2, 7, 8, 9]
    assert cut(list(range(10)), 6, tail=0) == [0, 1, 2, 3, 4, 5]
    assert cut([1, 2], 6, tail=3) == [1, 2]


def test_a_decoder_only_tokenizer_without_eos_is_refused(tokenizers):
    llama = tokenizers["llama"]
    llama_without_eos = llama.__class__.from_pretrained(llama.name_or_path, eos_token=None)
    llama_without_eos.eos_token = None
    with pytest.raises(ValueError, match="needs an eos_token to stop on"):
        Prompting.of(llama_without_eos, "causal")


def test_gpt_oss_is_taught_its_answer_in_the_final_channel_and_only_in_its_template(tmp_path):
    from shared.harmony import FINAL_HEAD

    folder = build_tiny_causal("gpt_oss", tmp_path / "oss", data_file=SAMPLE_DATA, hidden=32)
    tokenizer = load_tokenizer(str(folder))
    prompting = Prompting.of(tokenizer, "causal")
    assert prompting.chat_template and prompting.harmony
    assert prompting.text(tokenizer, "What is Asthma").endswith(
        "<|start|>user<|message|>What is Asthma<|end|><|start|>assistant"
    )
    (target,) = prompting.targets(tokenizer, ["A disease."])
    head = tokenizer(FINAL_HEAD, add_special_tokens=False)["input_ids"]
    assert target[: len(head)] == head and target[-1] == tokenizer.eos_token_id
    # prompt + target is what the template writes for the answered conversation
    (prompt,) = prompting.prompts(tokenizer, ["What is Asthma"])
    turns = [
        {"role": "user", "content": "What is Asthma"},
        {"role": "assistant", "content": "A disease."},
    ]
    answered = tokenizer.apply_chat_template(turns, tokenize=False)
    assert tokenizer.decode(prompt + target) == answered
    assert Prompting.from_record(prompting.record()) == prompting
    old = {k: v for k, v in prompting.record().items() if k != "harmony"}
    assert Prompting.from_record(old).harmony is False  # a manifest from before GPT-OSS
    with pytest.raises(ValueError, match="dataset.chat_template is none: set dataset.chat_"):
        Prompting.of(tokenizer, "causal", "none")
