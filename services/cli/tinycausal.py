"""Tiny decoder-only models of the families Bedrock imports, built offline.

Each is a randomly initialised two-layer model whose config has its family's shape (grouped
query attention, the family's rope settings, tied or untied embeddings as its small
releases have them; four experts, two a token, for the mixture-of-experts families; one
key/value head and learned positions for GPTBigCode) and whose tokenizer has the family's
kind (byte-level BPE for Llama 3, Qwen and GPTBigCode, SentencePiece-style BPE for Mistral
and Mixtral), special tokens and chat template, trained on the shipped data. No hub is
asked: tests and the embedded examples load them through the same ``from_pretrained`` path
as the real models.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cli.tinymodel import corpus

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
STARCHAT_TEMPLATE = (  # StarChat's, the chat-tuned GPTBigCode models'
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Vocabulary:
    """A family's tokenizer: its kind, class, special tokens and chat template."""

    kind: str  # "byte-level" or "sentencepiece"
    tokenizer_class: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    chat_template: str


LLAMA3 = Vocabulary(
    "byte-level", "PreTrainedTokenizerFast",
    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eot_id|>"),
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, chat_template=LLAMA3_TEMPLATE,
)  # fmt: skip
QWEN = Vocabulary(
    "byte-level", "Qwen2TokenizerFast", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHATML_TEMPLATE,
)  # fmt: skip
MISTRAL = Vocabulary(
    "sentencepiece", "LlamaTokenizerFast", ("<unk>", "<s>", "</s>"),
    bos="<s>", eos="</s>", pad=None, chat_template=MISTRAL_TEMPLATE,
)  # fmt: skip
STARCHAT = Vocabulary(
    "byte-level", "GPT2TokenizerFast",
    ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    bos=None, eos="<|end|>", pad=None, chat_template=STARCHAT_TEMPLATE,
)  # fmt: skip
VOCABULARIES = {
    "llama": LLAMA3,
    "qwen2": QWEN,
    "qwen3": QWEN,
    "qwen3_moe": QWEN,
    "mistral": MISTRAL,
    "mixtral": MISTRAL,
    "gpt_bigcode": STARCHAT,
}
FAMILIES = tuple(VOCABULARIES)


def build_tokenizer(vocabulary: Vocabulary, texts: list[str], *, vocab_size: int = 1000) -> Any:
    """A BPE tokenizer of the vocabulary's kind trained on ``texts``, as transformers'."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from tokenizers.processors import TemplateProcessing

    train: dict[str, Any] = {"vocab_size": vocab_size, "show_progress": False}
    if vocabulary.kind == "byte-level":  # every byte has a token: nothing is unknown
        bpe: Any = ByteLevelBPETokenizer(add_prefix_space=False)
    else:  # every printable ASCII character, as a real vocabulary has them
        bpe = SentencePieceBPETokenizer(unk_token="<unk>")
        train["initial_alphabet"] = list(string.printable.strip())
    bpe.train_from_iterator(texts, special_tokens=list(vocabulary.specials), **train)
    if vocabulary.bos is not None:  # Llama and Mistral tokenizers start every text with BOS
        bos = (vocabulary.bos, bpe.token_to_id(vocabulary.bos))
        bpe._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    cls = getattr(transformers, vocabulary.tokenizer_class)
    tokens = {"bos_token": vocabulary.bos, "eos_token": vocabulary.eos}
    if vocabulary.pad is not None:
        tokens["pad_token"] = vocabulary.pad
    if vocabulary.kind == "sentencepiece":
        tokens["unk_token"] = "<unk>"
    tokenizer = cls(tokenizer_object=bpe._tokenizer, **tokens)
    tokenizer.chat_template = vocabulary.chat_template
    return tokenizer


def config_for(family: str, tokenizer: Any, *, hidden: int) -> Any:
    """A two-layer config of ``family``'s shape for ``tokenizer``'s vocabulary."""
    import transformers

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "gpt_bigcode":  # StarCoder's: one key/value head, learned positions
        return transformers.GPTBigCodeConfig(
            **ids, n_embd=hidden, n_inner=hidden * 4, n_layer=2, n_head=4, multi_query=True,
            n_positions=8192,
        )  # fmt: skip
    shape = {
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as every current release
    }
    long_rope = {"max_position_embeddings": 32768, "rope_theta": 1000000.0}
    experts = {"num_experts_per_tok": 2}  # of four, as Mixtral takes 2 of 8
    if family == "llama":  # Llama 3.2's small models: tied embeddings, llama3 rope scaling
        rope = {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        return transformers.LlamaConfig(
            **ids, **shape, max_position_embeddings=131072, rope_theta=500000.0,
            rope_scaling=rope, tie_word_embeddings=True,
        )  # fmt: skip
    if family == "qwen2":  # Qwen2.5-0.5B: tied embeddings, bias on q/k/v
        return transformers.Qwen2Config(**ids, **shape, **long_rope, tie_word_embeddings=True)
    if family == "qwen3":  # Qwen3-0.6B: an explicit head_dim, q/k norms
        return transformers.Qwen3Config(
            **ids, **shape, **long_rope, head_dim=hidden // 4, tie_word_embeddings=True
        )  # fmt: skip
    if family == "qwen3_moe":  # Qwen3-30B-A3B: every layer sparse, narrow experts, untied
        return transformers.Qwen3MoeConfig(
            **ids, **shape, **long_rope, **experts, head_dim=hidden // 4, num_experts=4,
            moe_intermediate_size=hidden // 2, decoder_sparse_step=1, norm_topk_prob=True,
            tie_word_embeddings=False,
        )  # fmt: skip
    if family == "mixtral":  # Mixtral-8x7B: Mistral's attention, 8 experts of Mistral's FFN
        return transformers.MixtralConfig(
            **ids, **shape, **long_rope, **experts, num_local_experts=4, sliding_window=None,
            tie_word_embeddings=False,
        )  # fmt: skip
    return transformers.MistralConfig(  # Mistral-7B-v0.3: untied, no sliding window
        **ids, **shape, **long_rope, sliding_window=None, tie_word_embeddings=False
    )


def build_tiny_causal(
    family: str, out_dir: Path, *, data_file: Path, seed: int = 0, hidden: int = 128
) -> Path:
    """Write a randomly initialised tiny ``family`` model with its tokenizer and chat
    template into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    if family not in VOCABULARIES:
        raise ValueError(f"family {family!r}: tiny decoder-only models are {', '.join(FAMILIES)}")
    tokenizer = build_tokenizer(VOCABULARIES[family], corpus(data_file))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(family, tokenizer, hidden=hidden))
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
