"""A tiny Flan-T5-shaped model and tokenizer, built offline from the shipped data.

Model hubs are out of reach on development and CI machines, so the embedded defaults and
the tests train this model instead of ``google/flan-t5-large``. It goes through the very
same ``from_pretrained`` code path as a hub model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
#: the families `termtune build-tiny-model --family` builds (services.cli.tinycausal: the
#: decoder-only ones)
TINY_FAMILIES = (
    "t5", "llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gpt_bigcode",
    "gpt_oss",
)  # fmt: skip


def corpus(data_file: Path) -> list[str]:
    """Every text of a page_title/page_text JSONL file, with the notebook's prompt."""
    texts = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts += [f"What is {row['page_title']}", row["page_text"]]
    return texts


def canonical(tokenizer):  # noqa: ANN001, ANN201
    """The trained unigram tokenizer with a reproducible vocabulary. The trainer's pieces
    are the same from run to run but not its scores: they differ in their last bits (its
    sums go through hash maps), pieces of equal score come out in any order, and the
    characters it adds at the end (those too rare to be pieces) get their descending
    scores in hash-map order. The ids, and with them the embedding row each piece gets,
    changed from build to build, and the example's gate with them. Here scores are
    rounded to 8 decimals, the pieces after the special tokens ordered by score then text,
    and the trailing run of single characters given that run's scores in text order."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    specials = len(SPECIAL_TOKENS)
    vocab = [(piece, round(score, 8)) for piece, score in state["model"]["vocab"][specials:]]
    vocab.sort(key=lambda item: (-item[1], item[0]))
    tail = len(vocab)
    while tail > 0 and len(vocab[tail - 1][0]) == 1:
        tail -= 1
    chars = sorted(piece for piece, _ in vocab[tail:])
    scores = [score for _, score in vocab[tail:]]
    vocab[tail:] = list(zip(chars, scores, strict=True))
    state["model"]["vocab"] = state["model"]["vocab"][:specials] + vocab
    return Tokenizer.from_str(json.dumps(state))


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000):  # noqa: ANN201
    """A SentencePiece unigram tokenizer wrapped as transformers' T5 tokenizer."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        list(texts),
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        show_progress=False,
    )
    return T5TokenizerFast(
        tokenizer_object=canonical(sp._tokenizer),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )


def build_tiny_t5(out_dir: Path, *, data_file: Path, seed: int = 0, d_model: int = 128) -> Path:
    """Write a randomly initialised tiny T5 (gated-GELU, like Flan-T5) and its tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tokenizer(corpus(data_file))
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_model * 2,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        relative_attention_num_buckets=32,
        dropout_rate=0.1,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # untied T5 heads start with huge logits; scale like tied ones
        model.lm_head.weight.mul_(d_model**-0.5)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_t5(out_dir: Path, *, data_file: Path) -> Path:
    """Build the tiny T5 unless a complete one is already there."""
    return ensure_tiny("t5", out_dir, data_file=data_file)


def ensure_tiny(family: str, out_dir: Path, *, data_file: Path) -> Path:
    """Build the tiny model of ``family`` unless a complete one is already there."""
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    return build_tiny(family, out_dir, data_file=data_file)


def tiny_folder(family: str) -> Path:
    """Where `termtune build-tiny-model --family FAMILY` writes by default."""
    return Path("var/models/tiny-flan-t5" if family == "t5" else f"var/models/tiny-{family}")


def build_tiny(family: str, out_dir: Path, *, data_file: Path) -> Path:
    """A tiny model of ``family`` (one of TINY_FAMILIES) written to ``out_dir``."""
    if family == "t5":
        return build_tiny_t5(out_dir, data_file=data_file)
    from services.cli.tinycausal import build_tiny_causal

    return build_tiny_causal(family, out_dir, data_file=data_file)
