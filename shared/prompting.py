"""How a (prompt, target) pair becomes tokens for a model's kind, the same everywhere.

An encoder-decoder (T5) reads the prompt and writes the target: each side is tokenized on
its own with the tokenizer's special tokens (T5 appends its EOS). A decoder-only model
reads the prompt and continues it: the prompt is wrapped in the tokenizer's chat template as
a user message with the assistant's turn opened (``dataset.chat_template: auto``, when the
tokenizer has a template) or taken as it is, and the target is the continuation with the
end-of-sequence token appended, so the model learns to stop. The rendered prompt text is
what a served model is given (Bedrock applies the same template for chat completions), so
training, evaluation and serving see the same tokens.

A harmony model (GPT-OSS, shared.harmony) is taught its answer in the final channel: the
target starts with the channel's header, which its template writes before an assistant's
message, and it trains in its chat template only (nothing else writes its format).

A cut to a length limit keeps each side's tail: T5's EOS, a decoder-only target's EOS and
the chat template's opening of the assistant's turn, without which the model would be asked
something other than it was taught.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.families import Kind
from shared.harmony import FINAL_HEAD, is_harmony

_PROBE = "\x00probe\x00"  # content no prompt holds, to find the template around a message


@dataclass(frozen=True)
class Prompting:
    """The prompt format one job trains, evaluates and serves."""

    kind: Kind
    chat_template: bool  # decoder-only: prompts wrapped in the tokenizer's chat template
    source_tail: int  # tokens a cut keeps at the end of a prompt
    target_tail: int  # ...and of a target
    harmony: bool = False  # answers written in GPT-OSS's final channel (shared.harmony)

    @classmethod
    def of(cls, tokenizer: Any, kind: Kind, choice: str = "auto") -> Prompting:
        """The format for this tokenizer and kind; ``choice`` is dataset.chat_template."""
        if kind == "seq2seq":
            tail = special_tail(tokenizer)
            return cls(kind, chat_template=False, source_tail=tail, target_tail=tail)
        if tokenizer.eos_token_id is None:
            raise ValueError("a decoder-only model's tokenizer needs an eos_token to stop on")
        chat = choice == "auto" and bool(getattr(tokenizer, "chat_template", None))
        harmony = is_harmony(tokenizer)
        if harmony and not chat:
            why = "dataset.chat_template is none" if choice != "auto" else "it has none"
            raise ValueError(
                "the model answers in GPT-OSS's harmony format, which only its chat template "
                f"writes, and {why}: set dataset.chat_template to auto and use a tokenizer "
                "with its template"
            )
        tail = _template_tail(tokenizer) if chat else 0
        return cls(kind, chat, source_tail=tail, target_tail=1, harmony=harmony)

    def text(self, tokenizer: Any, prompt: str) -> str:
        """The prompt as the model is given it (what Bedrock renders from a chat message)."""
        if not self.chat_template:
            return prompt
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )

    def prompts(self, tokenizer: Any, prompts: list[str]) -> list[list[int]]:
        """Each prompt's token ids, in full."""
        if self.chat_template:  # the template writes the special tokens itself
            texts = [self.text(tokenizer, p) for p in prompts]
            return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return tokenizer(prompts, verbose=False)["input_ids"]

    def targets(self, tokenizer: Any, targets: list[str]) -> list[list[int]]:
        """Each target's token ids, in full (a decoder-only target ends with EOS)."""
        if self.kind == "seq2seq":
            return tokenizer(text_target=targets, verbose=False)["input_ids"]
        ids = tokenizer(targets, add_special_tokens=False, verbose=False)["input_ids"]
        head = tokenizer(FINAL_HEAD, add_special_tokens=False)["input_ids"] if self.harmony else []
        return [head + x + [tokenizer.eos_token_id] for x in ids]

    def record(self) -> dict[str, Any]:
        """What the manifest keeps, for the stages after data-prep."""
        return {
            "kind": self.kind,
            "chat_template": self.chat_template,
            "source_tail": self.source_tail,
            "target_tail": self.target_tail,
            "harmony": self.harmony,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Prompting:
        return cls(
            record["kind"],
            chat_template=bool(record["chat_template"]),
            source_tail=int(record["source_tail"]),
            target_tail=int(record["target_tail"]),
            harmony=bool(record.get("harmony", False)),  # absent before GPT-OSS: no
        )


def special_tail(tokenizer: Any) -> int:
    """How many special tokens the tokenizer appends to a sequence (T5: its eos)."""
    plain = tokenizer("a term", add_special_tokens=False)["input_ids"]
    marked = tokenizer("a term")["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return len(marked) - start - len(plain)
    return 0


def _template_tail(tokenizer: Any) -> int:
    """Tokens the chat template puts after a user message's content (the end of the user's
    turn and the opening of the assistant's)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PROBE}], add_generation_prompt=True, tokenize=False
    )
    after = rendered[rendered.rindex(_PROBE) + len(_PROBE) :]
    return len(tokenizer(after, add_special_tokens=False)["input_ids"])


def cut(ids: list[int], limit: int, *, tail: int) -> list[int]:
    """A sequence cut to ``limit`` tokens, its last ``tail`` tokens kept."""
    if len(ids) <= limit:
        return ids
    return ids[: limit - tail] + ids[len(ids) - tail :] if tail else ids[:limit]


def stop_ids(eos: int | list[int] | None, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: a generation config's EOS ids (``eos``) and the
    tokenizer's EOS, which training ends every answer with (``targets``). Evaluation, the
    export's generation_config.json (what Bedrock stops on) and the local twin use these."""
    found = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return sorted(found)


def pad_id(tokenizer: Any) -> int:
    """The padding id (a tokenizer without one, as Llama 3's, pads with EOS: masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def padded(ids: list[list[int]], pad: int, *, left: bool) -> Any:
    """Prompts padded to one length as a BatchEncoding with their attention mask: on the
    left for a decoder-only model (its answer continues from the last position), on the
    right for an encoder."""
    import torch
    from transformers import BatchEncoding

    width = max(len(x) for x in ids)
    rows, mask = [], []
    for x in ids:
        fill = width - len(x)
        rows.append([pad] * fill + x if left else x + [pad] * fill)
        mask.append([0] * fill + [1] * len(x) if left else [1] * len(x) + [0] * fill)
    return BatchEncoding({"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)})
