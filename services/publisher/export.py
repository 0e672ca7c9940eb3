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
from shared.planner import HALVE_WITH_BF16, Placement, advice, merge_options, place_weights
from shared.prompting import stop_ids
from shared.trainplan import model_shape

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
#: fp32 export: the largest logit gap allowed between the merged model and base+adapter
MERGE_TOLERANCE = 1e-3
#: bf16 export: the gap's size allowed as a share of the adapter's effect (both as the root
#: mean square over the probe logits, both models in bf16). bf16 rounds the logits themselves
#: (one step at 5.6 is 0.03), so the share grows as the effect shrinks: 0.3% for the demo's
#: adapter (an effect of 6-7 in logits), 0.7-0.9% for the tiny decoder families' (0.45-0.84),
#: 8% for a T5 adapter trained 6 steps (0.6); a merge that drops half of the update shows
#: 44%, a wrong scaling or a missed module more.
BF16_EFFECT_SHARE = 0.25


@dataclass(frozen=True)
class MergeCheck:
    """The merged weights' logits on the probe rows against base+adapter's (both in the
    export's dtype)."""

    dtype: str  # of the merged weights: the export's
    max_logit_gap: float
    adapter_effect: float  # the largest logit change the adapter makes
    effect_share: float  # the gap's RMS over the adapter effect's RMS

    @property
    def passed(self) -> bool:
        if self.max_logit_gap <= MERGE_TOLERANCE:
            return True
        return self.dtype == "bfloat16" and self.effect_share <= BF16_EFFECT_SHARE

    def describe(self) -> str:
        """One sentence for the model card and the error."""
        if self.dtype == "bfloat16":
            return (
                f"the merged bf16 weights reproduce base+adapter's logits to within "
                f"{self.effect_share:.1%} of the adapter's effect (root mean square; limit "
                f"{BF16_EFFECT_SHARE:.0%}), largest gap {self.max_logit_gap:.2e}"
            )
        return (
            f"the merged fp32 weights match base+adapter within {self.max_logit_gap:.2e} "
            f"in logits (tolerance {MERGE_TOLERANCE:.0e})"
        )

    def record(self) -> dict[str, Any]:
        """For the publish manifest."""
        return {
            "max_logit_gap": self.max_logit_gap,
            "adapter_effect": self.adapter_effect,
            "effect_share": self.effect_share,
            "limit": BF16_EFFECT_SHARE if self.dtype == "bfloat16" else MERGE_TOLERANCE,
        }


def merge_plan(base_model: str, export_dtype: str) -> Placement:
    """The merge in the export's dtype, on the GPU where the weights fit in its free memory,
    else in the host's (``shared.planner.merge_options``); ModelError, before anything is
    loaded, when neither fits."""
    gpu = device() == "cuda"
    return place_weights(
        model_shape(base_model).parameters,
        merge_options(gpu, export_dtype),
        what=f"the merge of {base_model}",
        advice=merge_advice(export_dtype, gpu),
    )


def merge_advice(export_dtype: str, gpu: bool) -> str:
    """What to change when the merge fits nowhere."""
    return advice("publisher", gpu) + (HALVE_WITH_BF16 if export_dtype != "bfloat16" else "")


def merge(
    base_model: str, adapter: Path, probe_ids: list[list[int]], *, plan: Placement
) -> tuple[Any, MergeCheck]:
    """The merged model in the plan's dtype, on its device, and the check of its logits
    against base+adapter's in that dtype; ModelError when the check fails."""
    base = load_model(  # never the quantized copy
        base_model,
        dtype=DTYPES[plan.dtype],
        device_map=plan.device if plan.device != "cpu" else None,
    )
    model = load_adapter(base, adapter, base_model)
    model.eval()
    before = _logits(model, probe_ids)
    with model.disable_adapter():
        effect = before - _logits(model, probe_ids)
    merged = model.merge_and_unload()
    gap = before - _logits(merged, probe_ids)
    check = MergeCheck(
        dtype=plan.dtype,
        max_logit_gap=float(gap.abs().max()) if probe_ids else 0.0,
        adapter_effect=float(effect.abs().max()) if probe_ids else 0.0,
        effect_share=_share(gap, effect),
    )
    if not check.passed:
        hint = (
            "; publish.dtype float32 merges and checks in fp32" if plan.dtype != "float32" else ""
        )
        raise ModelError(f"merge check failed: {check.describe()}{hint}")
    return merged, check


def _share(gap: torch.Tensor, effect: torch.Tensor) -> float:
    gap_rms = float(gap.pow(2).mean().sqrt()) if gap.numel() else 0.0
    if gap_rms == 0.0:
        return 0.0
    effect_rms = float(effect.pow(2).mean().sqrt())
    return gap_rms / effect_rms if effect_rms else float("inf")


@torch.no_grad()
def _logits(model: Any, probe_ids: list[list[int]]) -> torch.Tensor:
    """Every probe row's logits, in fp32 on the CPU (padded positions left out)."""
    if not probe_ids:
        return torch.zeros(0)
    width = max(len(ids) for ids in probe_ids)
    on = model.device
    ids = torch.tensor([x + [0] * (width - len(x)) for x in probe_ids], device=on)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in probe_ids], device=on)
    if not model.config.is_encoder_decoder:  # every position's next-token logits
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[mask.bool()].float().cpu()
    start = torch.full((len(probe_ids), 1), model.config.decoder_start_token_id, device=on)
    return model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits.float().cpu()


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


def apply_decoding(model: Any, decoding: DecodingSpec, tokenizer: Any) -> None:
    """Make the spec's decoding the model's own: saved as generation_config.json, it is what
    the local twin serves and what the evaluator generated with; its EOS ids include the
    tokenizer's, which training ended every answer with (a base whose config lists others
    would otherwise run on past its answers on Bedrock)."""
    config = model.generation_config
    config.update(**decoding.generation_config())
    stops = stop_ids(config.eos_token_id, tokenizer)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if decoding.temperature == 0:  # greedy or beam: no sampling setting left from the base
        config.update(temperature=None, top_p=None, top_k=None)
