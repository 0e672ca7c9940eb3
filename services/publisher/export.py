"""Merging the adapter into the unquantized base and saving an importable folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared import families
from shared.errors import ModelError
from shared.jobspec import DecodingSpec
from shared.modeling import device, load_adapter, load_model, load_tokenizer
from shared.planner import device_memory
from shared.trainplan import GIB, model_shape

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
MERGE_TOLERANCE = 1e-3
#: share of the GPU's free memory the fp32 weights may take (the rest: the adapter, the
#: probe rows' activations, the allocator)
GPU_SHARE = 0.8


@dataclass(frozen=True)
class MergePlan:
    """Where the merge runs, and why (recorded in the publish manifest)."""

    device: str
    reason: str


def merge_plan(base_model: str) -> MergePlan:
    """On the GPU when the base's fp32 weights fit in its free memory (loaded straight
    there, shard by shard), else on the CPU in the host's memory."""
    if device() != "cuda":
        return MergePlan("cpu", "no GPU")
    need = model_shape(base_model).parameters * 4
    free = device_memory("cuda")
    sizes = f"fp32 weights {need / GIB:.1f} GiB, GPU free {free / GIB:.1f} GiB"
    if need > free * GPU_SHARE:
        return MergePlan("cpu", f"{sizes}: more than {GPU_SHARE:.0%} of it, merged in host memory")
    return MergePlan("cuda", sizes)


def merge(
    base_model: str, adapter: Path, probe_ids: list[list[int]], *, on: str = "cpu"
) -> tuple[Any, float]:
    """The merged fp32 model (on device ``on``) and the largest logit gap between it and
    base+adapter."""
    base = load_model(  # never the quantized copy
        base_model, dtype=torch.float32, device_map=on if on != "cpu" else None
    )
    model = load_adapter(base, adapter, base_model)
    model.eval()
    before = _logits(model, probe_ids)
    merged = model.merge_and_unload()
    gap = float((before - _logits(merged, probe_ids)).abs().max()) if probe_ids else 0.0
    if gap > MERGE_TOLERANCE:
        raise ModelError(
            f"merged model differs from base+adapter by {gap:.2e} in logits "
            f"(tolerance {MERGE_TOLERANCE})"
        )
    return merged, gap


@torch.no_grad()
def _logits(model: Any, probe_ids: list[list[int]]) -> torch.Tensor:
    if not probe_ids:
        return torch.zeros(0)
    width = max(len(ids) for ids in probe_ids)
    on = model.device
    ids = torch.tensor([x + [0] * (width - len(x)) for x in probe_ids], device=on)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in probe_ids], device=on)
    if not model.config.is_encoder_decoder:  # every position's next-token logits
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.cpu()
    start = torch.full((len(probe_ids), 1), model.config.decoder_start_token_id, device=on)
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits.cpu()


def save(model: Any, base_model: str, out_dir: Path, *, dtype: str) -> list[str]:
    """Write safetensors weights, config, generation config and tokenizer files; the names of
    the tokenizer model files the base tokenizer has (each shipped too)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype]).save_pretrained(out_dir, max_shard_size="4GB")
    make_config_portable(out_dir / "config.json")
    tokenizer = load_tokenizer(base_model)
    tokenizer.save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir / "tokenizer_config.json")
    write_special_tokens_map(tokenizer, out_dir / "special_tokens_map.json")
    return copy_sentencepiece_model(tokenizer, base_model, out_dir)


def write_special_tokens_map(tokenizer: Any, path: Path) -> None:
    """special_tokens_map.json, which transformers 5 no longer writes and 4.x readers use."""
    tokens = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    extra = [str(t) for t in tokenizer.special_tokens_map.get("additional_special_tokens", [])]
    if extra:
        tokens["additional_special_tokens"] = extra  # type: ignore[assignment]
    path.write_text(json.dumps(tokens, indent=2, sort_keys=True) + "\n")


def copy_sentencepiece_model(tokenizer: Any, base_model: str, out_dir: Path) -> list[str]:
    """Ship the SentencePiece model (spiece.model) where the base tokenizer has one; its
    name, or none."""
    candidates = [getattr(tokenizer, "vocab_file", None), Path(base_model) / "spiece.model"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and Path(candidate).suffix == ".model":
            target = out_dir / Path(candidate).name
            if not target.exists():
                shutil.copyfile(candidate, target)
            return [target.name]
    return []


def make_config_portable(path: Path) -> None:
    """Write config.json's settings under the names transformers 4.51.3 (Bedrock's) reads
    as well: transformers 5 keeps the rope settings in ``rope_parameters`` (4.51.3 would
    fall back to its defaults, rope_theta 10000 and no scaling, and answer differently) and
    the weights' dtype as ``dtype`` (4.51.3: ``torch_dtype``)."""
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        default = scaling.get("rope_type", "default") == "default"
        config["rope_scaling"] = None if default else scaling
    if "dtype" in config:
        config["torch_dtype"] = config["dtype"]
    if "head_dim" in config and config["head_dim"] is None:
        # 5 writes an unset head_dim as null; 4.51.3's Mixtral then has no head width
        del config["head_dim"]
    family = families.FAMILIES.get(str(config.get("model_type")))
    for old, new in family.renamed if family else ():
        if new in config:
            config[old] = config[new]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_tokenizer_config_portable(path: Path) -> None:
    """Rewrite what transformers 5 writes that Bedrock's transformers 4.51.3 cannot read."""
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        # transformers 5's name for a tokenizer with no model-specific class (Llama 3's);
        # 4.51.3 and Bedrock know that class as PreTrainedTokenizerFast
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        # whose default inputs include token_type_ids, which no causal LM takes (generate
        # refuses them); Llama 3's own tokenizer_config.json names these two
        config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.51.3 expects a name -> token mapping; keep list entries as additional tokens.
        config["extra_special_tokens"] = {}
        if extra:
            config["additional_special_tokens"] = list(extra)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def apply_decoding(model: Any, decoding: DecodingSpec) -> None:
    """Make the spec's decoding the model's own: saved as generation_config.json, it is what
    the local twin serves and what the evaluator generated with."""
    config = model.generation_config
    config.update(**decoding.generation_config())
    if decoding.temperature == 0:  # greedy or beam: no sampling setting left from the base
        config.update(temperature=None, top_p=None, top_k=None)
