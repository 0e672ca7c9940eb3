"""Tiny decoder-only models of the families Bedrock imports, built offline.

Each is a randomly initialised two-layer model whose config has its family's shape (grouped
query attention, the family's rope settings, tied or untied embeddings as its small
releases have them; four experts, two a token, for the mixture-of-experts families; one
key/value head and learned positions for GPTBigCode) and whose tokenizer has the family's
kind (byte-level BPE for Llama 3, Qwen, GPTBigCode and GPT-OSS, SentencePiece-style BPE for
Mistral and Mixtral), special tokens and chat template, trained on the shipped data. GPT-OSS's
experts are stored in MXFP4, as its releases are. No hub is
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
#: GPT-OSS's harmony format, as its released template writes it for these messages (a system
#: message naming the channels first, a system message's text as the developer's
#: instructions, a trained answer in the final channel ending with <|return|>), without the
#: date and tools it adds
HARMONY_TEMPLATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, "
    "commentary, final. Channel must be included for every message.<|end|>"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] }}"
    "{{ '<|return|>' if loop.last else '<|end|>' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '<|start|>developer<|message|># Instructions\\n\\n' + message['content'] + '<|end|>' }}"
    "{% else %}{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"
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
HARMONY = Vocabulary(  # o200k_harmony's special tokens; its eos ends the final answer
    "byte-level", "PreTrainedTokenizerFast",
    ("<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>",
     "<|call|>", "<|constrain|>"),
    bos=None, eos="<|return|>", pad="<|endoftext|>", chat_template=HARMONY_TEMPLATE,
)  # fmt: skip
VOCABULARIES = {
    "llama": LLAMA3,
    "qwen2": QWEN,
    "qwen3": QWEN,
    "qwen3_moe": QWEN,
    "mistral": MISTRAL,
    "mixtral": MISTRAL,
    "gpt_bigcode": STARCHAT,
    "gpt_oss": HARMONY,
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
    if family == "gpt_oss":  # gpt-oss-20b: sliding and full attention by turns, yarn rope,
        # attention sinks and biases, experts fused with a bias each, untied
        return transformers.GptOssConfig(
            **ids, **{**shape, "intermediate_size": hidden}, head_dim=hidden // 4,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0,
            },
            tie_word_embeddings=False,
        )  # fmt: skip
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
    if family == "gpt_oss":  # released with its experts in MXFP4
        store_experts_mxfp4(out_dir)
    return out_dir


#: the values a 4-bit E2M1 code stands for, by code (the sign is the top bit)
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
MXFP4_BLOCK = 32  # values sharing one power-of-two scale


def to_mxfp4(weight: Any) -> tuple[Any, Any]:
    """An ``(experts, in, out)`` expert weight as GPT-OSS's release stores it: for each
    expert and output, blocks of 32 inputs as 4-bit codes two a byte (the lower nibble
    first), ``(experts, out, in / 32, 16)``, and each block's E8M0 scale (2^(s - 127)),
    ``(experts, out, in / 32)``; each value the nearest code after scaling its block's
    largest to at most 6."""
    import torch

    rows = weight.transpose(1, 2).float()  # (experts, out, in)
    blocks = rows.reshape(*rows.shape[:2], -1, MXFP4_BLOCK)
    peak = blocks.abs().amax(-1, keepdim=True).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-127, 127)
    values = torch.tensor(FP4_VALUES)
    scaled = blocks / torch.exp2(exponent)
    codes = (scaled[..., None] - values).abs().argmin(-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent[..., 0] + 127).to(torch.uint8)


def store_experts_mxfp4(folder: Path) -> None:
    """Rewrite a saved GPT-OSS model's expert weights in MXFP4 and say so in its config,
    as openai/gpt-oss-20b is released (transformers loads it dequantized where it cannot
    run MXFP4 kernels, and termtune always so: shared.modeling)."""
    import json

    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    weights = load_file(path)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = to_mxfp4(weights.pop(name))
    save_file(weights, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head",
        ],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
