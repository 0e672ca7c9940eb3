"""Loading base models and tokenizers, shared by the trainer, evaluator and publisher.

``base_model`` is a Hugging Face hub id (``google/flan-t5-large``) or a local folder; both
go through the same ``from_pretrained`` call.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

from shared.errors import ModelError

SEQ2SEQ_MODEL_TYPES = ("t5", "mt5", "umt5", "bart", "mbart", "pegasus")


def device() -> str:
    """The device training and inference run on."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(base_model: str) -> Any:
    """The base model's fast tokenizer; ModelError naming the model if it cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "tokenizer", exc)) from exc


def load_seq2seq(
    base_model: str,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    device_map: Any = None,
) -> Any:
    """A seq2seq language model from a hub id or folder, refusing decoder-only models."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "config", exc)) from exc
    if config.model_type not in SEQ2SEQ_MODEL_TYPES:
        raise ModelError(
            f"base_model {base_model!r} is a {config.model_type!r} model; termtune "
            f"trains encoder-decoder models ({', '.join(SEQ2SEQ_MODEL_TYPES)})"
        )
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device_map or "auto")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "weights", exc)) from exc


def _load_hint(base_model: str, what: str, exc: Exception) -> str:
    return (
        f"cannot load the {what} of base_model {base_model!r}: {exc}. Use a hub id the "
        "machine can reach (set HF_HUB_OFFLINE=1 to use its cache) or a local folder"
    )


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on ("absent" where not installed)."""
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "tokenizers", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found
