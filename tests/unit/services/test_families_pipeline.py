"""The mixture-of-experts families (Mixtral, Qwen3 MoE, GPT-OSS) and GPTBigCode through every
stage: data-prep in the model's chat template, trl's trainer with an adapter on every expert,
the evaluation's gate, and a merged export that keeps the experts under the names the
transformers Bedrock loads them with reads (4.51.3; 4.55.0 for GPT-OSS: its answers checked
there in test_publisher_families)."""

from __future__ import annotations

import json

import pytest

from services.cli.tinycausal import build_tiny_causal
from shared import families
from shared.messages import PrepareDataset
from shared.pipeline import next_command
from shared.trainplan import model_shape
from shared.worker import run_stage
from tests.conftest import _handler
from tests.factories import SAMPLE_DATA, make_ctx, make_spec

#: family -> (the architecture exported, a tensor name only the legacy expert layout has)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "model.layers.0.block_sparse_moe.experts.3.w1.weight"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "model.layers.0.mlp.experts.3.gate_proj.weight"),
    "gpt_bigcode": ("GPTBigCodeForCausalLM", "transformer.h.0.attn.c_attn.weight"),
    "gpt_oss": ("GptOssForCausalLM", "model.layers.0.mlp.experts.gate_up_proj"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_evaluates_and_publishes(family, tmp_path):
    from safetensors import safe_open

    base = build_tiny_causal(family, tmp_path / "base", data_file=SAMPLE_DATA, hidden=64)
    ctx = make_ctx(tmp_path / "var")
    spec = make_spec(base, dataset={"validation_size": 0.1})
    job = f"{family}-job"
    prepare = PrepareDataset(job_id=job, spec_uri=ctx.jobs.create(job, spec))
    prepared = run_stage(prepare, _handler("dataprep"), ctx)
    assert ctx.jobs.manifest(job, "prepare")["prompting"]["chat_template"] is True
    train = next_command(prepare, prepared)
    trained = run_stage(train, _handler("trainer"), ctx)
    manifest = ctx.jobs.manifest(job, "train")
    assert manifest["plan"]["kind"] == "causal"
    assert manifest["plan"]["packing"] is families.FAMILIES[family].packs

    adapter = ctx.store.path(ctx.store.key_of(manifest["adapter"]))
    config = json.loads((adapter / "adapter_config.json").read_text())
    shape = model_shape(str(base))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as tensors:
        sizes = sum(tensors.get_tensor(k).numel() for k in tensors.keys())  # noqa: SIM118
    assert sizes == shape.adapter_parameters(config["r"])  # the planner's count is peft's
    if family != "gpt_bigcode":  # all-linear reaches the fused experts and the routers
        leaves = {name.rpartition(".")[2] for name in config["target_parameters"]}
        assert leaves >= {"gate_up_proj", "down_proj"}

    evaluate = next_command(train, trained)
    evaluated = run_stage(evaluate, _handler("evaluator"), ctx)
    report = ctx.jobs.manifest(job, "evaluate")
    assert report["metrics"]["loss"]["tuned"] < report["metrics"]["loss"]["base"]
    run_stage(next_command(evaluate, evaluated), _handler("publisher"), ctx)
    published = ctx.jobs.manifest(job, "publish")
    assert published["preflight"]["model_type"] == family
    assert published["merge"]["check"]["effect_share"] < 0.1  # bf16 keeps the adapter (limit 0.25)
    folder = ctx.store.path(ctx.store.key_of(published["location"]))
    architecture, legacy = FAMILIES[family]
    assert json.loads((folder / "config.json").read_text())["architectures"] == [architecture]
    with safe_open(str(folder / "model.safetensors"), "pt") as tensors:
        assert legacy in tensors.keys()  # noqa: SIM118


def _packed_and_alone(family: str, tmp_path):
    """The logits of two examples joined in one row with restarting position ids, and of
    each alone."""
    import torch
    from transformers import AutoModelForCausalLM

    base = build_tiny_causal(family, tmp_path / "m", data_file=SAMPLE_DATA, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    first, second = torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), torch.tensor([[12, 13, 14, 15, 16]])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], 1)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
        packed = model(
            input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False
        ).logits
    return packed, alone


@pytest.mark.parametrize("family", [f for f in FAMILIES if families.FAMILIES[f].packs])
def test_packed_examples_stay_apart_in_each_family(family, tmp_path):
    """What packing: auto relies on, per family: two examples joined in one row with
    restarting position ids get the logits each gets alone (experts routed per token,
    GPTBigCode's learned positions from the position ids)."""
    import torch

    packed, alone = _packed_and_alone(family, tmp_path)
    assert torch.allclose(packed, alone, atol=1e-5)


def test_packed_examples_mix_in_gpt_oss_so_its_jobs_are_not_packed(tmp_path):
    """GPT-OSS's attention (eager, with sinks: it has no SDPA) lets a packed row's second
    example see the first: the planner pads its batches instead (the pipeline test above)."""
    import torch

    packed, alone = _packed_and_alone("gpt_oss", tmp_path)
    assert not families.FAMILIES["gpt_oss"].packs
    assert torch.allclose(packed[:, :7], alone[:, :7], atol=1e-5)  # the first sees only itself
    assert not torch.allclose(packed[:, 7:], alone[:, 7:], atol=1e-2)
