"""GPT-OSS's harmony format: how its answers are written and what of them is served.

A harmony model writes each assistant message in a channel: ``<|channel|>analysis
<|message|>...<|end|>`` for its reasoning, then ``<|start|>assistant<|channel|>final
<|message|>ANSWER<|return|>`` for what the user is shown. Its chat template opens the
assistant's turn (``<|start|>assistant``) and writes a trained answer in the final channel,
so a job trains the answer with the final channel's header before it, and what the model
serves (OpenAI chat completions' ``message.content``, as Bedrock answers GPT-OSS imports)
is the text of its last final channel: no reasoning, no markers. The evaluator scores that
text and the local twin answers it, so the scored answer is the served one.

A tokenizer is a harmony one when its vocabulary has the channel, message and return
markers (o200k_harmony, and the tiny GPT-OSS models built here).
"""

from __future__ import annotations

from typing import Any

CHANNEL, MESSAGE, RETURN = "<|channel|>", "<|message|>", "<|return|>"
#: what precedes an answer once the template has opened the assistant's turn
FINAL_HEAD = f"{CHANNEL}final{MESSAGE}"
#: the markers that end a message: the answer's, any other, a tool call
ENDS = (RETURN, "<|end|>", "<|call|>")


def is_harmony(tokenizer: Any) -> bool:
    """Whether the tokenizer writes GPT-OSS's harmony format."""
    added = tokenizer.added_tokens_encoder  # the markers are added tokens, a short list
    return all(marker in added for marker in (CHANNEL, MESSAGE, RETURN))


def final_text(raw: str) -> str:
    """The last final-channel message of a generation decoded with its special tokens: up
    to the marker that ends it, or to the end when the generation was cut short; empty when
    the model wrote no final message (only reasoning, or no channel at all)."""
    start = raw.rfind(FINAL_HEAD)
    if start < 0:
        return ""
    text = raw[start + len(FINAL_HEAD) :]
    ends = [i for i in (text.find(marker) for marker in ENDS) if i >= 0]
    return text[: min(ends)] if ends else text


def reply_text(tokenizer: Any, ids: list[int]) -> str:
    """The served text of generated ``ids``: a harmony model's final channel (without the
    special tokens a cut-short message may hold), else the tokens without special ones."""
    if not is_harmony(tokenizer):
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    text = final_text(tokenizer.decode(ids, skip_special_tokens=False))
    for token in tokenizer.added_tokens_decoder.values():
        if token.special:
            text = text.replace(token.content, "")
    return text.strip()
