"""Loading base models and tokenizers, shared by the trainer, evaluator and publisher.

``base_model`` is a Hugging Face hub id (``google/flan-t5-large``) or a local folder; both
go through the same ``from_pretrained`` call. A model that cannot be loaded fails with a
ModelError that says what to do in termtune's words (build the embedded tiny model, name a
folder, reach the hub or use its cache), never only the hub library's message.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from shared import families
from shared.errors import ModelError

TINY_MODEL = "var/models/tiny-flan-t5"  # where `termtune build-tiny-model` writes by default
EXAMPLE_HUB_ID = "google/flan-t5-large"
# The hub's form of a repo id (huggingface_hub's validate_repo_id): "name" or "namespace/name".
_REPO_ID = re.compile(r"[A-Za-z0-9_.-]{1,96}(/[A-Za-z0-9_.-]{1,96})?")


def device() -> str:
    """The device training and inference run on."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(base_model: str) -> Any:
    """The base model's fast tokenizer; ModelError naming the model if it cannot load."""
    from transformers import AutoTokenizer

    check_base_model(base_model)
    try:
        return AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "tokenizer", exc)) from exc


def load_seq2seq(base_model: str, **kwargs: Any) -> Any:
    """A seq2seq language model from a hub id or folder, refusing a model of a family
    Bedrock does not import (shared.families)."""
    return _load_kind(base_model, "seq2seq", **kwargs)


def load_causal(base_model: str, **kwargs: Any) -> Any:
    """A decoder-only language model of a family Bedrock imports, from a hub id or folder."""
    return _load_kind(base_model, "causal", **kwargs)


def load_model(base_model: str, **kwargs: Any) -> Any:
    """The base model of its family's kind: encoder-decoder or decoder-only."""
    return _load_kind(base_model, None, **kwargs)


_KIND_WORDS = {"seq2seq": "an encoder-decoder", "causal": "decoder-only"}


def _load_kind(base_model: str, kind: str | None, **kwargs: Any) -> Any:
    """The model, when its family is one Bedrock imports and of ``kind`` (None: either)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    where = f"base_model {base_model!r}"
    family = model_family(base_model)
    if kind is not None and family.kind != kind:
        raise ModelError(f"{where} is a {family.label} model, not {_KIND_WORDS[kind]}")
    auto = AutoModelForCausalLM if family.kind == "causal" else AutoModelForSeq2SeqLM
    return _load(auto, base_model, **kwargs)


def _load(
    auto: Any,
    base_model: str,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    device_map: Any = None,
    attention: str | None = None,
) -> Any:
    """``auto.from_pretrained`` with termtune's settings; ModelError in our words.

    ``attention`` names transformers' attention implementation (``sdpa``, ``eager``).
    """
    import torch

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if prequantized(base_model) == "mxfp4":
        if quantization_config is not None:
            raise ModelError(MXFP4_REQUANTIZED.format(base_model=base_model))
        from transformers import Mxfp4Config

        # the released experts are 4-bit MXFP4, which trains nowhere and exports nowhere:
        # loaded as plain weights of the dtype asked for, on any device
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        if device_map is not None:
            kwargs["device_map"] = device_map
    elif quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device_map or "auto")
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return auto.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "weights", exc)) from exc


MXFP4_REQUANTIZED = (
    "base_model {base_model!r} keeps its experts in MXFP4 (GPT-OSS's release): it trains as "
    "plain bf16 weights, which bitsandbytes cannot quantize again; set training.quantization "
    "to none or auto"
)


def prequantized(base_model: str) -> str | None:
    """The quantization a checkpoint's config says its weights are stored in (GPT-OSS's
    ``mxfp4``), or None for plain weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError):  # loading the weights says why, in termtune's words
        return None
    return stored_quantization(config)


def stored_quantization(config: Any) -> str | None:
    """The ``quant_method`` of a loaded config's ``quantization_config`` (a mapping or a
    transformers quantization config), or None."""
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    method = found.get("quant_method") if isinstance(found, dict) else found.quant_method
    return str(getattr(method, "value", method)) if method else None


def model_family(base_model: str) -> families.Family:
    """The family of a hub id or folder, read from its config; ModelError naming the model
    when the config cannot be loaded or its family is one Bedrock does not import."""
    from transformers import AutoConfig

    check_base_model(base_model)
    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as exc:
        raise ModelError(_load_hint(base_model, "config", exc)) from exc
    return families.family_of(config, where=f"base_model {base_model!r}")


def unreadable_weights(path: Path) -> str | None:
    """Why a safetensors file cannot be read (cut short, not safetensors), or None."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            list(weights.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        return f"{path.name} cannot be read ({exc})"
    return None


def load_adapter(model: Any, adapter: Path, base_model: str) -> Any:
    """The model with the LoRA adapter stored in ``adapter`` (a folder); ModelError naming
    the file when it is missing, cut short or does not fit the base model."""
    from peft import PeftModel

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"the adapter at {adapter} has no adapter_model.safetensors")
    problem = unreadable_weights(weights)
    if problem is not None:
        raise ModelError(f"the adapter at {adapter}: {problem}")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"the adapter at {adapter} does not fit {base_model}: {exc}") from exc


def is_path_like(base_model: str) -> bool:
    """Whether ``base_model`` can only mean a folder: not in the hub's repo id form."""
    return (
        base_model.startswith((".", "/", "~", "-"))
        or base_model.endswith((".", "-", ".git"))
        or "\\" in base_model
        or "--" in base_model
        or ".." in base_model
        or not _REPO_ID.fullmatch(base_model)
    )


def check_base_model(base_model: str) -> None:
    """Refuse, before asking the hub, a base_model that can only be a folder and is none."""
    path = Path(base_model).expanduser()
    if (is_path_like(base_model) or path.exists()) and not path.is_dir():
        raise ModelError(_not_a_folder(base_model))


def _not_a_folder(base_model: str) -> str:
    path = Path(base_model).expanduser()
    where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
    if path.exists():
        where = f" ({path.absolute()} is a file)"
    if Path(base_model) == Path(TINY_MODEL):
        todo = "build the embedded one with `termtune build-tiny-model` (or `make run`)"
    else:
        todo = (
            "save a model there (`save_pretrained` writes config.json, the weights and the "
            f"tokenizer files), build the embedded tiny one with `termtune build-tiny-model "
            f"--out {base_model}`"
        )
    return (
        f"base_model {base_model!r} is not a model folder on this machine: {todo}, or name "
        f"a hub id such as {EXAMPLE_HUB_ID}{where}"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and every cause or context under it."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _named(chain: list[BaseException], *names: str) -> bool:
    return any(type(e).__name__ in names for e in chain)


def _hub_offline() -> bool:
    flags = (os.environ.get(n, "") for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on it
        return "HF_HOME/hub"


def _unreachable(chain: list[BaseException]) -> bool:
    text = " ".join(str(e) for e in chain).lower()
    return (
        _named(chain, "LocalEntryNotFoundError", "OfflineModeIsEnabled")
        or _named(chain, "ConnectError", "ConnectTimeout", "ConnectionError", "gaierror")
        or "couldn't connect" in text
        or "outgoing traffic has been disabled" in text
    )


def _load_hint(base_model: str, what: str, exc: Exception) -> str:
    """What went wrong loading ``what`` of ``base_model``, and what to do, in our words."""
    chain = _chain(exc)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(" :.")
    folder = Path(base_model).expanduser()
    if folder.is_dir():
        present = sorted(p.name for p in folder.iterdir())[:8]
        return (
            f"base_model {base_model!r} is a folder on this machine but its {what} cannot be "
            f"loaded ({first_line}; it holds {', '.join(present) or 'nothing'}): a model "
            "folder needs the files `save_pretrained` writes (config.json, model.safetensors, "
            f"tokenizer.json or spiece.model); rebuild it, or name a hub id such as "
            f"{EXAMPLE_HUB_ID}"
        )
    if is_path_like(base_model) or folder.exists() or _named(chain, "HFValidationError"):
        return _not_a_folder(base_model)
    if _unreachable(chain):
        local = (
            f"name a local model folder instead (one `save_pretrained` wrote; "
            f"`termtune build-tiny-model` builds the embedded tiny one in {TINY_MODEL})"
        )
        if _hub_offline():
            return (
                f"base_model {base_model!r} is not a folder on this machine and not in its "
                f"model hub cache ({_hub_cache()}), and HF_HUB_OFFLINE is set, so the hub is "
                f"not asked: download it once where the hub is reachable (into the cache "
                f"HF_HOME points to), or {local}"
            )
        return (
            f"base_model {base_model!r} is not a folder on this machine, and the model hub "
            f"(huggingface.co) is unreachable from here while the model is not in its cache "
            f"({_hub_cache()}): {local}, or fill the cache where the hub is reachable and set "
            "HF_HUB_OFFLINE=1 here to load from it without asking the hub"
        )
    if _named(chain, "RepositoryNotFoundError", "GatedRepoError") or (
        "not a valid model identifier" in first_line
    ):
        return (
            f"base_model {base_model!r} is neither a folder on this machine nor a model the "
            "hub serves to us (a private or gated model needs `hf auth login` or HF_TOKEN): "
            f"check the name (e.g. {EXAMPLE_HUB_ID}) or name a local model folder"
        )
    return (
        f"cannot load the {what} of base_model {base_model!r}: {first_line}. Name a hub id "
        f"this machine can reach (e.g. {EXAMPLE_HUB_ID}; HF_HUB_OFFLINE=1 loads it from the "
        "cache) or a local model folder"
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
